"""The description of a PGD attack: threat model (norm, eps), step size and number of steps, in pixel units.

One description for every place that runs PGD: the training attack of the objectives, the recipe's `attack`
section (`flatrobust.config`), the monitoring attack of the training loop, and the attack that estimates the
robust loss in `landscape` and `flatness`. As the training attack it also says which kind (`kind`: PGD, FGSM from
`init`, Free AT with its `replays`, or none) and PGD's `restarts` (docs/OFFICIAL_FLAGS.md); `evaluation` is the PGD
attack monitoring uses then. The step size has one default everywhere, `default_alpha(norm, eps)`:
the step of AWP's official code scaled with eps (2/255 at L-inf 8/255, 15/255 at L2 128/255).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

from .threat import THREAT_MODELS, default_alpha

FIELDS = ("norm", "eps", "alpha", "steps")  # the order of `as_dict` (and of a run's config.yaml)
KINDS = ("pgd", "fgsm", "free", "none")  # the training attack: PGD, FGSM (Wong et al. 2020), Free AT (Shafahi et al. 2019), none
INITS = ("zero", "random", "previous")  # FGSM's start: x, uniform in the ball, or the previous batch's perturbation
TRAINING = {"kind": "pgd", "init": "random", "restarts": 1, "replays": None}  # training-only keys: in `as_dict` when not these defaults
FREE_REPLAYS = 8  # Free AT's m when not given: Shafahi et al.'s choice for CIFAR-10 (their Table 1)


@dataclasses.dataclass
class AttackConfig:
    """PGD-`steps` with step `alpha` in the `norm` ball of radius `eps` (pixel units).

    `eps` has no default: it depends on the data (CIFAR L-inf 8/255, L2 128/255; digits 0.2). `alpha`
    defaults to `default_alpha(norm, eps)` (eps/4 for L-inf, so 2/255 at 8/255; eps * 15/128 for L2), for FGSM to 1.25 eps
    and for Free AT to eps.
    ValueError, naming the field, for a value outside its range.
    """

    eps: float  # radius of the threat model in pixel units, e.g. 8/255 (CIFAR L-inf), 128/255 (L2), 0.2 (digits)
    alpha: float | None = None  # attack step size; unset (null): follows eps (PGD: eps/4 for L-inf, eps * 15/128 for L2; FGSM: 1.25 eps; Free AT: eps)
    steps: int = 10  # PGD steps of the training attack
    norm: str = "linf"  # linf | l2
    # As a training attack only (the recipe's `attack` section; docs/OFFICIAL_FLAGS.md): pgd | fgsm | free | none
    kind: str = "pgd"  # training attack: pgd | fgsm | free | none (official --attack)
    init: str = "random"  # fgsm: zero | random | previous (official --fgsm-init); pgd always starts at random
    restarts: int = 1  # pgd: independent runs, the worst per example kept (official --restarts)
    replays: int | None = None  # free: m, each batch replayed m times (unset: 8, Shafahi et al.'s CIFAR-10 m); epochs are divided by m

    def __post_init__(self) -> None:
        if self.norm not in THREAT_MODELS:
            raise ValueError(f"AttackConfig norm must be one of {', '.join(map(repr, THREAT_MODELS))}, got {self.norm!r}")
        if not _nonnegative(self.eps):
            raise ValueError(f"AttackConfig eps must be a finite number >= 0 (pixel units, e.g. 8/255), got {self.eps!r}")
        if self.kind not in KINDS:
            raise ValueError(f"AttackConfig kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
        if self.init not in INITS:
            raise ValueError(f"AttackConfig init must be one of {', '.join(INITS)}, got {self.init!r}")
        if not isinstance(self.restarts, int) or isinstance(self.restarts, bool) or self.restarts < 1:
            raise ValueError(f"AttackConfig restarts must be an integer >= 1, got {self.restarts!r}")
        if self.replays is None and self.kind == "free":
            self.replays = FREE_REPLAYS
        if self.replays is not None and (not isinstance(self.replays, int) or isinstance(self.replays, bool) or self.replays < 1):
            raise ValueError(f"AttackConfig replays must be an integer >= 1, got {self.replays!r}")
        if self.alpha is None:  # FGSM: Wong et al.'s 1.25 eps; Free AT: Shafahi et al.'s eps; PGD: the paper's step scaled with eps
            self.alpha = 1.25 * self.eps if self.kind == "fgsm" else self.eps if self.kind == "free" else default_alpha(self.norm, self.eps)
        if not _nonnegative(self.alpha):
            raise ValueError(f"AttackConfig alpha must be a finite number >= 0, got {self.alpha!r}")
        self.eps, self.alpha = float(self.eps), float(self.alpha)
        if not isinstance(self.steps, int) or isinstance(self.steps, bool) or self.steps < 1:
            raise ValueError(f"AttackConfig steps must be an integer >= 1, got {self.steps!r}")

    @classmethod
    def of(cls, attack: AttackConfig | Mapping[str, Any]) -> AttackConfig:
        """`attack` itself, or the one a mapping {norm, eps, alpha, steps} describes (eps required, extra keys ignored)."""
        if isinstance(attack, cls):
            return attack
        if not isinstance(attack, Mapping) or "eps" not in attack:
            raise ValueError(f"attack must be an AttackConfig or a dict with keys norm, eps, alpha, steps (eps required), "
                             f"e.g. dict(norm='linf', eps=8/255, alpha=2/255, steps=10), got {attack!r}")
        values = {k: attack[k] for k in (*FIELDS, *TRAINING) if k in attack}
        for k in ("steps", "replays"):
            if isinstance(values.get(k), float) and values[k].is_integer():  # e.g. read from JSON as 10.0
                values[k] = int(values[k])
        return cls(**values)

    def as_dict(self) -> dict[str, Any]:
        """{norm, eps, alpha, steps}: the JSON form written beside every result that used the attack, and the
        training-only keys (kind, init, restarts, replays) where they differ from their defaults."""
        return {k: getattr(self, k) for k in FIELDS} | {k: getattr(self, k) for k, v in TRAINING.items() if getattr(self, k) != v}

    @property
    def batch_replays(self) -> int:
        """SGD steps taken on each batch: Free AT's m (`replays`), 1 for every other kind."""
        return self.replays if self.kind == "free" and self.replays else 1

    def passes(self, epochs: int) -> int:
        """Passes over the training data a run of `epochs` epochs makes: ceil(epochs / m) under Free AT, as Shafahi et
        al.'s code rounds (so its SGD steps, passes * m epochs' worth, match or just exceed standard training's), else `epochs`."""
        return math.ceil(epochs / self.batch_replays)

    @property
    def evaluation(self) -> AttackConfig:
        """The PGD attack of the same threat model, for monitoring: this one without its training-only keys (and
        with the default step when this one's step was chosen for FGSM)."""
        alpha = self.alpha if self.kind == "pgd" else default_alpha(self.norm, self.eps)
        return AttackConfig(eps=self.eps, alpha=alpha, steps=self.steps, norm=self.norm)


def _nonnegative(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v >= 0
