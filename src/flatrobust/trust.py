"""Can this robustness number be trusted? The sanity checks of Carlini et al. (2019) and AutoAttack's flags.

    >>> from flatrobust.trust import run_checks, format_checks
    >>> checks = run_checks(model, x[:200], y[:200], norm="linf", eps=8 / 255)
    >>> print(format_checks(checks))

Each check is a named flag with what its failure suggests (gradient masking, a randomized model, a
broken attack, ...). They run on a small subset (`evaluate` passes 200 examples by default) with a few
cheap attacks, about 200 forward+backward and 30 forward passes over the subset in all, and read the
results of the full evaluation when there is one.

Noise tolerance: a comparison "A <= B" of correctly classified counts passes when A <= B + slack with
slack = max(1 example, 0.5% of the examples); "accuracy ~ 0" passes with at most `slack` examples left.
"""
from __future__ import annotations

import math
import zlib
from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from .attacks import default_alpha, fgsm, pgd, threat_model
from .modes import train_mode
from .progress import Progress

__all__ = ["AUTOATTACK_CHECK", "CHECKS", "NOISE_DRAWS", "Probe", "SLACK_FRACTION", "format_checks", "run_checks", "slack"]

SLACK_FRACTION = 0.005  # +0.5% of the examples (at least 1) for the randomness of the attacks
NOISE_DRAWS = 20  # random points per example in the noise check
PGD_STEPS = 20  # the reference PGD of the checks (as pgd20)
MORE_STEPS, MORE_RESTARTS = 50, 2  # the stronger PGD that must not do worse


def slack(n: int) -> int:
    """Examples of tolerance on n examples: max(1, ceil(0.5% of n))."""
    return max(1, math.ceil(SLACK_FRACTION * n))


@dataclass
class Probe:
    """The subset under test, with cached per-example robustness under the attacks the checks share."""

    model: nn.Module
    x: torch.Tensor  # (n, C, H, W) in [0, 1], on device
    y: torch.Tensor  # (n,)
    norm: str
    eps: float
    alpha: float
    seed: int
    batch_size: int
    results: dict | None  # the full evaluation, when the checks run inside `evaluate`
    cache: dict = field(default_factory=dict)
    violations: list = field(default_factory=list)  # (attack, eps, max distance, points outside [0, 1])

    @property
    def n(self) -> int:
        return len(self.y)

    @property
    def slack(self) -> int:
        return slack(self.n)

    def robust(self, key: str, eps: float, make_adv: Callable) -> torch.Tensor:
        """(n,) bool: still correct after `make_adv(xb, yb, generator)`; cached under `key`, checked against the ball."""
        if key not in self.cache:
            g = torch.Generator(self.x.device).manual_seed((self.seed * 1_000_003 + zlib.crc32(key.encode())) % 2**63)
            ball = threat_model(self.norm, eps)
            masks, worst, outside = [], 0.0, 0
            for lo in range(0, self.n, self.batch_size):
                xb, yb = self.x[lo : lo + self.batch_size], self.y[lo : lo + self.batch_size]
                x_adv = make_adv(xb, yb, g)
                with torch.no_grad():
                    masks.append(self.model(x_adv).argmax(1) == yb)
                worst = max(worst, float(ball.norm(x_adv - xb).max()))
                outside += int(((x_adv < 0) | (x_adv > 1)).flatten(1).any(1).sum())
            self.violations.append((key, eps, worst, outside))
            self.cache[key] = torch.cat(masks)
        return self.cache[key]

    def pgd(self, eps: float, steps: int = PGD_STEPS, restarts: int = 1, loss: str = "ce") -> torch.Tensor:
        alpha = self.alpha * eps / self.eps if self.eps > 0 else default_alpha(self.norm, eps)  # same relative step
        return self.robust(f"pgd{steps}x{restarts}-{loss}@{eps!r}", eps, lambda xb, yb, g: pgd(
            self.model, xb, yb, eps=eps, alpha=alpha, steps=steps, norm=self.norm, loss=loss, restarts=restarts, generator=g))

    def outputs(self) -> torch.Tensor:
        with torch.no_grad():
            return torch.cat([self.model(self.x[lo : lo + self.batch_size]) for lo in range(0, self.n, self.batch_size)])


def _count(mask: torch.Tensor) -> int:
    return int(mask.sum())


def _frac(k: int, n: int) -> str:
    return f"{k}/{n} ({100 * k / n:.1f}%)"


def _huge_eps(p: Probe) -> tuple[bool, str]:
    # An eps that contains the whole image box: [0, 1]^d for L-inf, its diagonal sqrt(d) for L2.
    huge = 1.0 if p.norm == "linf" else math.sqrt(p.x[0].numel())
    k = _count(p.robust(f"huge@{huge!r}", huge, lambda xb, yb, g: pgd(
        p.model, xb, yb, eps=huge, alpha=huge / 4, steps=PGD_STEPS, norm=p.norm, generator=g)))
    return k <= p.slack, f"PGD-{PGD_STEPS} at eps={huge:.4g} ({p.norm}, any image reachable) leaves {_frac(k, p.n)} correct; expected <= {p.slack}"


def _monotone_eps(p: Probe) -> tuple[bool, str]:
    scales = (0.0, 0.25, 0.5, 1.0, 2.0)
    counts = [_count(p.pgd(s * p.eps)) for s in scales]
    ok = all(b <= a + p.slack for a, b in zip(counts, counts[1:]))
    labels = ("0", "eps/4", "eps/2", "eps", "2eps")
    pairs = ", ".join(f"{label}: {c}" for label, c in zip(labels, counts))
    return ok, f"correct (of {p.n}) under PGD-{PGD_STEPS} at {pairs}; must not increase by more than {p.slack}"


def _full(p: Probe, a: str, b: str) -> tuple[int, int, int] | None:
    """Correct counts of attacks a and b in the full evaluation, and its slack, when both ran."""
    att = (p.results or {}).get("attacks", {})
    if a in att and b in att:
        return att[a]["correct"], att[b]["correct"], slack(p.results["n"])
    return None


def _pgd_le_fgsm(p: Probe) -> tuple[bool, str]:
    k_pgd = _count(p.pgd(p.eps))
    k_fgsm = _count(p.robust(f"fgsm@{p.eps!r}", p.eps, lambda xb, yb, g: fgsm(p.model, xb, yb, eps=p.eps, norm=p.norm)))
    ok = k_pgd <= k_fgsm + p.slack
    detail = f"subset: PGD-{PGD_STEPS} {k_pgd} vs FGSM {k_fgsm} correct of {p.n}"
    full = _full(p, "pgd20", "fgsm")
    if full:
        ok &= full[0] <= full[1] + full[2]
        detail += f"; full evaluation: pgd20 {full[0]} vs fgsm {full[1]} of {p.results['n']}"
    return ok, detail


def _more_steps_no_better(p: Probe) -> tuple[bool, str]:
    k = _count(p.pgd(p.eps))
    k_more = _count(p.pgd(p.eps, steps=MORE_STEPS, restarts=MORE_RESTARTS))
    ok = k_more <= k + p.slack
    detail = f"subset: PGD-{MORE_STEPS} x {MORE_RESTARTS} restarts {k_more} vs PGD-{PGD_STEPS} {k} correct of {p.n}"
    full = _full(p, "pgd100", "pgd20")
    if full:
        ok &= full[0] <= full[1] + full[2]
        detail += f"; full evaluation: pgd100 {full[0]} vs pgd20 {full[1]} of {p.results['n']}"
    return ok, detail


def _noise(p: Probe, xb: torch.Tensor, yb: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Random search: NOISE_DRAWS random points of the ball per example; keeps the first that fools the model.

    L-inf draws are corners of the cube (each pixel +-eps), the strongest points of the ball for a
    locally linear model; L2 draws are uniform directions on the sphere of radius eps."""
    ball = threat_model(p.norm, p.eps)
    best = xb.clone()
    with torch.no_grad():
        correct = p.model(xb).argmax(1) == yb  # (B,) not fooled yet
    for _ in range(NOISE_DRAWS):
        if p.norm == "linf":
            d = p.eps * (2 * torch.randint(0, 2, xb.shape, generator=g, device=xb.device) - 1).to(xb.dtype)
        else:
            d = torch.randn(xb.shape, generator=g, device=xb.device, dtype=xb.dtype)
            d = p.eps * d / d.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *([1] * (xb.dim() - 1)))
        cand = ball.project(xb + d, xb)
        with torch.no_grad():
            fooled = correct & (p.model(cand).argmax(1) != yb)
        best[fooled] = cand[fooled]
        correct &= ~fooled
    return best


def _square_not_better(p: Probe) -> tuple[bool, str]:
    k_pgd = _count(p.pgd(p.eps))
    k_noise = _count(p.robust(f"noise@{p.eps!r}", p.eps, lambda xb, yb, g: _noise(p, xb, yb, g)))
    ok = k_pgd <= k_noise + p.slack
    detail = f"subset: PGD-{PGD_STEPS} {k_pgd} vs random noise ({NOISE_DRAWS} draws) {k_noise} correct of {p.n}"
    aa = (p.results or {}).get("attacks", {}).get("autoattack", {})
    stages = aa.get("stages", {})
    if "square" in stages and "fab-t" in stages:
        n = p.results["n"]
        before, after = stages["fab-t"]["correct"], stages["square"]["correct"]  # Square runs last in the cascade
        ok &= before - after <= slack(n)
        detail += f"; AutoAttack: Square broke {before - after} of the {before} points the white-box stages left robust"
    return ok, detail


def _finite_nonzero_input_grads(p: Probe) -> tuple[bool, str]:
    zero = nonfinite = 0
    norms = []
    for lo in range(0, p.n, p.batch_size):
        xb = p.x[lo : lo + p.batch_size].clone().requires_grad_(True)
        loss = F.cross_entropy(p.model(xb), p.y[lo : lo + p.batch_size], reduction="sum")
        (grad,) = torch.autograd.grad(loss, xb)  # (B, C, H, W)
        g1 = grad.flatten(1).abs().sum(1)  # (B,) L1 norm per example
        nonfinite += int((~torch.isfinite(grad.flatten(1))).any(1).sum())
        zero += int((g1 == 0).sum())
        norms.append(g1[torch.isfinite(g1)].detach())
    med = torch.cat(norms).median().item() if sum(len(t) for t in norms) else float("nan")
    ok = nonfinite == 0 and zero <= p.slack
    return ok, f"cross-entropy input gradients at the clean points: {zero} exactly zero, {nonfinite} non-finite of {p.n}; median L1 norm {med:.3g}"


def _logits_not_probabilities(p: Probe) -> tuple[bool, str]:
    out = p.outputs()  # (n, K)
    sums = out.sum(1)
    probabilities = bool((out >= -1e-6).all() and ((sums - 1).abs() <= 1e-4).all())
    return not probabilities, f"outputs in [{out.min().item():.3g}, {out.max().item():.3g}], row sums in [{sums.min().item():.4g}, {sums.max().item():.4g}]"


def _deterministic_forward(p: Probe) -> tuple[bool, str]:
    a, b = p.outputs(), p.outputs()
    diff = (a - b).abs().max().item()
    tol = 1e-5 * max(1.0, a.abs().max().item())
    changed = int((a.argmax(1) != b.argmax(1)).sum())
    return diff <= tol, f"two eval-mode forwards of {p.n} examples: max |logit difference| {diff:.3g} (tolerance {tol:.3g}), {changed} predictions changed"


def _in_ball_and_box(p: Probe) -> tuple[bool, str]:
    bad = [f"{key}: max distance {d:.6g} > eps {e:.6g}" if d > e + 1e-5 else f"{key}: {o} points outside [0, 1]"
           for key, e, d, o in p.violations if d > e + 1e-5 or o]
    att = (p.results or {}).get("attacks", {})
    bad += [f"{name}: {r['outside_threat_model']} points outside the threat model (max distance {r['max_perturbation']:.6g})"
            for name, r in att.items() if r.get("outside_threat_model")]
    checked = len(p.violations) + len(att)
    return not bad, "; ".join(bad) if bad else f"every adversarial point of {checked} attack runs within eps ({p.norm}) and in [0, 1]"


def _autoattack_flags(p: Probe) -> tuple[bool, str]:
    warnings = p.results["attacks"]["autoattack"].get("warnings", [])
    return not warnings, " | ".join(warnings) if warnings else "AutoAttack raised no flag"


# name -> (check, what a failure suggests). Run in this order; `in_ball_and_box` last, as it reads the
# distances of every attack the checks before it ran.
CHECKS: dict[str, tuple[Callable[[Probe], tuple[bool, str]], str]] = {
    "logits_not_probabilities": (_logits_not_probabilities,
        "the model returns probabilities (a softmax inside the model): cross-entropy on them saturates and "
        "gradient attacks weaken; return logits"),
    "deterministic_forward": (_deterministic_forward,
        "the model is randomized (noise, dropout or BatchNorm in train mode, stochastic layers): single-run "
        "attacks overestimate robustness; fix the mode, or attack with EOT and AutoAttack version='rand'"),
    "finite_nonzero_input_grads": (_finite_nonzero_input_grads,
        "gradient masking (non-differentiable preprocessing such as quantization, thresholding, saturated "
        "outputs) or NaN/Inf in the model: gradient attacks are blind; use BPDA or a black-box attack"),
    "huge_eps": (_huge_eps,
        "gradient masking or a broken attack: PGD cannot fool the model even when it may change the image "
        "into anything; the robust accuracy at the real eps is not trustworthy"),
    "monotone_eps": (_monotone_eps,
        "the attack does not converge (too few steps, wrong step size) or gradients are masked: a larger "
        "ball contains the smaller one, so accuracy cannot rise with eps"),
    "pgd_le_fgsm": (_pgd_le_fgsm,
        "the iterative attack is weaker than one step: step size or steps are off, or gradients are masked "
        "near the data points (local gradients mislead the iterations)"),
    "more_steps_no_better": (_more_steps_no_better,
        "a stronger attack did worse: a randomized model or a broken attack; numbers of one run are not reliable"),
    "square_not_better": (_square_not_better,
        "a gradient-free attack (Square or random noise) finds adversarial points the gradient attacks miss: "
        "gradient masking; evaluate with AutoAttack, more Square queries or adaptive attacks"),
    "in_ball_and_box": (_in_ball_and_box,
        "an attack left the threat model (farther than eps or outside [0, 1]): the reported accuracy is not "
        "for this eps; a bug in the attack or its projection"),
}
# Only when the evaluation ran AutoAttack: its own checks (randomized defense, probabilities, Square, ...).
AUTOATTACK_CHECK = ("autoattack_flags", _autoattack_flags,
                    "AutoAttack's own checks raised a flag (see detail): read it before trusting the AutoAttack number")


def run_checks(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    norm: str,
    eps: float,
    alpha: float | None = None,
    results: dict | None = None,
    seed: int = 0,
    batch_size: int = 256,
    device: str | torch.device | None = None,
    names: Iterable[str] | None = None,
    progress: bool = False,
) -> list[dict]:
    """Run the checks of CHECKS on (x, y), a small subset (100-200 examples is enough), in eval mode.

    `results` is `evaluate`'s dict for the full evaluation when there is one: its FGSM/PGD-20/PGD-100
    numbers, AutoAttack's Square stage and warnings, and the attacks' distances join the checks.
    `names` runs only those checks (default: all); `progress` reports them on stderr (`flatrobust.progress`). Returns [{"name", "passed", "detail", "suggests"}] in
    CHECKS order (+ "autoattack_flags" when AutoAttack ran); `suggests` says what a failure means.
    """
    if device is None:
        device = next(model.parameters(), torch.empty(0)).device
    device = torch.device(device)
    alpha = default_alpha(norm, eps) if alpha is None else alpha
    checks = [(name, fn, suggests) for name, (fn, suggests) in CHECKS.items()]
    if results and "autoattack" in results.get("attacks", {}):
        checks.insert(-1, AUTOATTACK_CHECK)
    if names is not None:
        names = list(names)
        unknown = [n for n in names if n not in CHECKS and n != AUTOATTACK_CHECK[0]]
        if unknown:
            raise ValueError(f"unknown trust check(s) {unknown}: known checks are {', '.join(CHECKS)}, {AUTOATTACK_CHECK[0]}")
        checks = [c for c in checks if c[0] in names]
    out = []
    with train_mode(model, False):
        p = Probe(model, x.to(device), y.to(device), norm, float(eps), float(alpha), seed, batch_size, results)
        with Progress(total=len(checks), desc="trust checks", unit="check", enabled=progress) as bar:
            for name, fn, suggests in checks:
                bar.set_postfix_str(name)
                passed, detail = fn(p)
                out.append({"name": name, "passed": bool(passed), "detail": detail, "suggests": suggests})
                bar.update()
    return out


def format_checks(checks: list[dict]) -> str:
    """One line per check; a failed one is a WARNING line that ends with what the failure suggests."""
    lines = []
    for c in checks:
        if c["passed"]:
            lines.append(f"  ok       {c['name']}: {c['detail']}")
        else:
            lines.append(f"  WARNING  {c['name']} FAILED: {c['detail']} -- suggests: {c['suggests']}")
    return "\n".join(lines)
