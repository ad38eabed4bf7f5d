"""Adversarial training objectives: AT (Madry et al. 2018), TRADES (Zhang et al. 2019), MART (Wang et al. 2020).

Each objective says three things, as the official code of each method does them:
  - `attack(model, x, y)`: how its adversarial examples are generated (AT: PGD on CE in train mode;
    TRADES: PGD on KL in eval mode; MART: PGD on CE in eval mode);
  - `loss(model, x, x_adv, y)`: its training loss (a scalar, mean over the batch);
  - `ascent_loss(model, x, x_adv, y)`: the loss AWP ascends to find v. For all three methods the paper's
    code ascends the method's own training loss (for TRADES: CE on natural + beta * KL with batchmean,
    natural logits NOT detached), evaluated at w on the same adversarial batch.

The training attack is an `attacks.AttackConfig` (re-exported here). A training step with any objective and AWP::

    x_adv = obj.attack(model, x, y)
    awp.perturb(lambda m: obj.ascent_loss(m, x, x_adv, y))
    loss = obj.loss(model, x, x_adv, y); opt.zero_grad(); loss.backward(); opt.step()
    awp.restore()

With Free AT (`attack.kind="free"`, Shafahi et al. 2019) `attack` returns x + the carried perturbation (no gradient
work), and the training step's own backward pass gives the input gradient that moves it (`objective.free`,
`train.train_step`): the gradient of the training loss at x_adv. For AT that is the CE gradient of the paper; for
TRADES it is beta times the gradient of its KL term, the direction TRADES' own attack ascends. MART's attack ascends
CE, not MART's loss, so Free MART is refused.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .attacks import AttackConfig, FreePerturbation, fgsm_train, pgd

__all__ = ["AT", "MART", "OBJECTIVES", "TRADES", "AttackConfig", "Objective", "create_objective"]


class Objective:
    """An adversarial training objective. The training attack is required: its radius depends on the data."""

    name = "objective"

    def __init__(self, attack: AttackConfig | None = None):
        if not isinstance(attack, AttackConfig):
            cls = type(self).__name__
            raise TypeError(f"{cls} needs its training attack, e.g. {cls}(AttackConfig(eps=8/255)) for CIFAR L-inf: "
                            f"eps depends on the data, so there is no default (got {attack!r})")
        self.attack_config = attack
        # Free AT: the perturbation carried across replays and batches (None for the other kinds)
        self.free = FreePerturbation(attack.eps, attack.alpha, attack.norm) if attack.kind == "free" else None

    def attack(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, generator=None) -> torch.Tensor:
        raise NotImplementedError

    def loss(self, model: nn.Module, x: torch.Tensor, x_adv: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.loss_and_logits(model, x, x_adv, y)[0]

    def loss_and_logits(self, model, x, x_adv, y) -> tuple[torch.Tensor, torch.Tensor]:
        """(training loss, adversarial logits (B, K)); the logits let a loop log accuracy without a forward."""
        raise NotImplementedError

    def ascent_loss(self, model: nn.Module, x: torch.Tensor, x_adv: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.loss(model, x, x_adv, y)

    def _pgd(self, model, x, y, *, loss, mode, random_start=True, generator=None):
        """The training attack `attack_config.kind` describes: PGD (with its restarts), FGSM from its `init` (Wong et al.
        2020), Free AT's carried perturbation (Shafahi et al. 2019; the step moves it), or none (x itself: standard
        training, and AWP then ascends the clean loss)."""
        a = self.attack_config
        if a.kind == "none":
            return x.detach()
        if self.free is not None:
            return self.free.apply(x, start="kl" if loss == "kl" else "zero", generator=generator)
        if a.kind == "fgsm":
            start: str | torch.Tensor = a.init
            if a.init == "previous":  # the previous batch's perturbation (zero at the first), as the official script keeps it
                prev = getattr(self, "_previous", None)
                start = torch.zeros_like(x) if prev is None or prev.shape[1:] != x.shape[1:] else \
                    torch.cat([prev, torch.zeros_like(x)])[:len(x)].to(x.device)
            x_adv = fgsm_train(model, x, y, eps=a.eps, alpha=a.alpha, norm=a.norm, loss=loss, start=start, mode=mode,
                               generator=generator)
            if a.init == "previous":
                self._previous = (x_adv - x).detach()
            return x_adv
        return pgd(model, x, y, eps=a.eps, alpha=a.alpha, steps=a.steps, norm=a.norm, loss=loss,
                   random_start=random_start, restarts=a.restarts, mode=mode, generator=generator)

    def state_dict(self) -> dict:
        """What the attack carries from batch to batch (FGSM's previous perturbation, Free AT's delta), for an exact resume."""
        return {"previous": getattr(self, "_previous", None)} | ({"free": self.free.state_dict()} if self.free is not None else {})

    def load_state_dict(self, state: dict | None) -> None:
        self._previous = (state or {}).get("previous")
        if self.free is not None:
            self.free.load_state_dict((state or {}).get("free"))


class AT(Objective):
    """Madry et al.: min_w E[max_{x'} CE(f(x'), y)]. The attack runs in train mode, as in Rice et al.'s
    and the AWP code (so BatchNorm statistics see the attack's batches too)."""

    name = "at"

    def attack(self, model, x, y, generator=None):
        return self._pgd(model, x, y, loss="ce", mode="train", generator=generator)

    def loss_and_logits(self, model, x, x_adv, y):
        logits_adv = model(x_adv)
        return F.cross_entropy(logits_adv, y), logits_adv


class TRADES(Objective):
    """Zhang et al.: CE(f(x), y) + beta * KL(f(x) || f(x_adv)) with batchmean; attack maximizes the KL in eval mode."""

    name = "trades"

    def __init__(self, attack: AttackConfig | None = None, beta: float = 6.0):
        super().__init__(attack)
        if beta < 0:
            raise ValueError(f"TRADES beta must be >= 0, got {beta}")
        self.beta = beta

    def attack(self, model, x, y, generator=None):
        return self._pgd(model, x, y, loss="kl", mode="eval", generator=generator)

    def loss_and_logits(self, model, x, x_adv, y):
        logits_nat = model(x)  # natural logits are not detached (official TRADES and TRADES-AWP)
        logits_adv = model(x_adv)
        kl = F.kl_div(F.log_softmax(logits_adv, 1), F.softmax(logits_nat, 1), reduction="batchmean")
        return F.cross_entropy(logits_nat, y) + self.beta * kl, logits_adv


class MART(Objective):
    """Wang et al. 2020: boosted CE on x_adv + beta * KL(f(x) || f(x_adv)) weighted by 1 - p_y(x)."""

    name = "mart"

    def __init__(self, attack: AttackConfig | None = None, beta: float = 6.0):
        super().__init__(attack)
        if beta < 0:
            raise ValueError(f"MART beta must be >= 0, got {beta}")
        if attack.kind == "free":
            raise ValueError(FREE_MART)
        self.beta = beta

    def attack(self, model, x, y, generator=None):
        return self._pgd(model, x, y, loss="ce", mode="eval", generator=generator)

    def loss_and_logits(self, model, x, x_adv, y):
        logits_nat, logits_adv = model(x), model(x_adv)
        p_adv = F.softmax(logits_adv, 1)  # (B, K)
        # boosted CE: CE plus -log(1 - p of the most likely wrong class)
        top2 = p_adv.argsort(dim=1)[:, -2:]
        wrong = torch.where(top2[:, -1] == y, top2[:, -2], top2[:, -1])
        bce = F.cross_entropy(logits_adv, y) + F.nll_loss(torch.log(1.0001 - p_adv + 1e-12), wrong)
        p_nat = F.softmax(logits_nat, 1)
        p_true = p_nat.gather(1, y[:, None]).squeeze(1)
        kl = F.kl_div(torch.log(p_adv + 1e-12), p_nat, reduction="none").sum(1)  # (B,)
        return bce + self.beta * (kl * (1.0000001 - p_true)).mean(), logits_adv


FREE_MART = ("Free AT with MART: Free AT moves its perturbation with the training loss's input gradient, and MART's "
             "attack ascends CE, not MART's loss, so it would not be MART's attack; use method=at or method=trades")
OBJECTIVES = {"at": AT, "trades": TRADES, "mart": MART}


def create_objective(name: str, attack: AttackConfig | None = None, beta: float = 6.0) -> Objective:
    """The objective `name` ("at", "trades", "mart") with its training attack (required) and beta (TRADES, MART)."""
    if name not in OBJECTIVES:
        raise ValueError(f"unknown method {name!r}: choose one of {', '.join(OBJECTIVES)}")
    return AT(attack) if name == "at" else OBJECTIVES[name](attack, beta=beta)
