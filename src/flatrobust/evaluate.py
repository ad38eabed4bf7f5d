"""The evaluation protocol of the field as a library: named attacks, one `evaluate` call, trust checks.

    >>> from flatrobust.evaluate import evaluate
    >>> res = evaluate(model, x, y, attacks=["clean", "pgd20", "autoattack"], norm="linf", eps=8 / 255)
    >>> res["attacks"]["pgd20"]["accuracy"], res["worst_case"]["accuracy"], res["checks"]

The attacks of the AWP paper's tables (Wu et al. 2020): natural, FGSM, PGD-20, PGD-100, CW-inf (PGD-20 on
the CW margin) and AutoAttack "standard" (Croce & Hein 2020: APGD-CE, APGD-T, FAB-T, Square, cascaded on
the points still robust). Inputs are in [0, 1] with normalization inside the model, the model is in eval
mode for every attack and every forward, and each attack draws its randomness from its own generator
seeded by (seed, attack name), so a number does not depend on which other attacks ran with it.
"""
from __future__ import annotations

import difflib
import logging
import math
import sys
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch
from torch import nn

from . import trust
from .attacks import default_alpha, fgsm, pgd, threat_model
from .errors import UserError
from .evalstore import fingerprint_model, fingerprint_tensors, open_store
from .modes import train_mode
from .progress import Progress

__all__ = [
    "ATTACKS", "AUTOATTACK_STAGES", "PROTOCOL", "Attack", "AttackContext", "autoattack_stages", "default_alpha", "evaluate",
    "format_table", "require_autoattack", "resolve_attacks",
]


@dataclass(frozen=True)
class AttackContext:
    """What an attack needs besides (model, x, y): the threat model, the PGD step, its own randomness."""

    norm: str
    eps: float
    alpha: float
    seed: int  # this attack's seed, derived from evaluate's seed and the attack's name
    generator: torch.Generator  # on `device`, seeded with `seed`, consumed batch after batch
    device: torch.device
    note: Callable[[str], None] | None = None  # where a long attack says which stage it is in (progress display)
    num_classes: int | None = None  # the model's number of outputs (AutoAttack's stages depend on it)


@dataclass(frozen=True)
class Attack:
    """A named attack of the protocol.

    `run(model, x, y, ctx)` gets a batch (B, C, H, W) in [0, 1] on ctx.device, the model in eval mode, and
    returns x_adv of the same shape inside the eps ball, or (x_adv, extras) where extras may hold
    "stages": {stage: ((B,) bool robust after that stage, seconds)} and "warnings": [str] (AutoAttack).
    `params(ctx)` is the dict of parameters written next to the result.
    """

    name: str
    summary: str
    run: Callable[[nn.Module, torch.Tensor, torch.Tensor, AttackContext], Any]
    params: Callable[[AttackContext], dict]


def _pgd_attack(name: str, steps: int, loss: str, summary: str) -> Attack:
    def run(model, x, y, ctx):
        return pgd(model, x, y, eps=ctx.eps, alpha=ctx.alpha, steps=steps, norm=ctx.norm, loss=loss,
                   random_start=True, restarts=1, generator=ctx.generator)

    def params(ctx):
        return {"steps": steps, "alpha": ctx.alpha, "loss": loss, "random_start": True, "restarts": 1}

    return Attack(name, summary, run, params)


# AutoAttack "standard", in the order it cascades them (each runs on the points the previous ones left robust).
AUTOATTACK_STAGES = ("apgd-ce", "apgd-t", "fab-t", "square")


def autoattack_stages(num_classes: int) -> tuple[tuple[str, ...], str | None]:
    """(the AutoAttack stages valid for a `num_classes`-way model, a note saying what changed or None).

    APGD-T's targeted DLR loss divides by z_pi1 - (z_pi3 + z_pi4)/2 and so needs >= 4 classes; the
    untargeted DLR loss, (z_pi1 - z_pi3) in its denominator, needs 3 (Croce & Hein 2020, Section 4). With 3
    classes APGD-T is replaced by untargeted APGD-DLR (the stage AutoAttack's "plus" version also runs), with
    2 it is dropped; FAB-T (against the K - 1 other classes) and Square work for any K >= 2.
    """
    if num_classes < 2:
        raise UserError(f"AutoAttack needs a model with at least 2 classes, this one has {num_classes} output(s)")
    if num_classes >= 4:
        return AUTOATTACK_STAGES, None
    stages = ("apgd-ce", "apgd-dlr", "fab-t", "square") if num_classes == 3 else ("apgd-ce", "fab-t", "square")
    return stages, (f"AutoAttack standard needs >= 4 classes for APGD-T's targeted DLR loss; with {num_classes} classes "
                    f"this ran {', '.join(s.upper() for s in stages)} (FAB-T against the {num_classes - 1} other "
                    f"class{'es' if num_classes > 2 else ''}): a weaker cascade than the standard one")
_AA_NORMS = {"linf": "Linf", "l2": "L2"}


def require_autoattack() -> None:
    """UserError (one line) if pyautoattack, the optional dependency behind the 'autoattack' attack, is missing."""
    try:
        import pyautoattack  # noqa: F401
    except ImportError:
        raise UserError("attack 'autoattack' needs the pyautoattack package: pip install pyautoattack "
                        "(or pip install 'flatrobust[autoattack]'), or leave autoattack out of the attacks") from None


class _Collect(logging.Handler):
    """Keeps AutoAttack's own warnings (randomized defense, probabilities, Square better, ...) for the report."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def _autoattack(model, x, y, ctx):
    """AutoAttack "standard" through pyautoattack, one stage at a time so that each stage's accuracy is known.

    Each stage runs on the points of the batch that every earlier stage left robust, with the same seed,
    as pyautoattack's own cascade does; run stage by stage, we also keep the robust mask and the time
    after every stage (the Square check of `trust` reads them). pyautoattack reseeds torch at every call
    and draws the random starts of all the points of a call at once, so the numbers depend on how the
    images are split into calls: `evaluate` always splits them the same way, one call per batch.
    """
    from pyautoattack import AutoAttack

    aa = AutoAttack(model, norm=_AA_NORMS[ctx.norm], eps=ctx.eps, version="standard", device=ctx.device, seed=ctx.seed)
    with torch.no_grad():
        logits = model(x)  # (B, K)
    robust = logits.argmax(1) == y
    stage_names, _ = autoattack_stages(logits.shape[1])
    n_targets = min(9, logits.shape[1] - 1)  # the standard 9 target classes; fewer only with < 10 classes
    aa.apgd_targeted.n_target_classes = aa.fab.n_target_classes = n_targets
    x_adv, stages = x.clone(), {}
    collect = _Collect()
    aa_logger = logging.getLogger("auto-attack")
    aa_logger.addHandler(collect)
    # pyautoattack reseeds torch's global RNG with its seed; fork_rng gives the caller its RNG state back.
    devices = [x.device.index or 0] if x.device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices):
            for i, stage in enumerate(stage_names, 1):
                if ctx.note is not None:
                    ctx.note(f"stage {i}/{len(stage_names)}: {stage}")
                idx = robust.nonzero().squeeze(1)
                _sync(x.device)
                t0 = time.perf_counter()
                if len(idx):
                    aa.attacks_to_run = [stage]
                    adv, _ = aa.run_standard_evaluation(x[idx], y[idx], batch_size=len(idx))
                    with torch.no_grad():
                        fooled = model(adv).argmax(1) != y[idx]
                    x_adv[idx[fooled]] = adv[fooled].to(x_adv.dtype)
                    robust[idx[fooled]] = False
                _sync(x.device)
                stages[stage] = (robust.clone(), time.perf_counter() - t0)
    finally:
        aa_logger.removeHandler(collect)
    # pyautoattack's class-count warning ("not possible to use the targeted DLR loss") is about a stage
    # autoattack_stages already left out; the note of the result says what ran instead
    warnings = [m for m in collect.messages if "classes it is not possible to use" not in m]
    return x_adv, {"stages": stages, "warnings": warnings}


def _autoattack_params(ctx):
    k = ctx.num_classes or 10
    stages, note = autoattack_stages(k)
    return {"version": "standard" if note is None else f"standard, reduced for {k} classes", "stages": list(stages),
            "seed": ctx.seed, "package": "pyautoattack", "apgd_iterations": 100, "target_classes": min(9, k - 1),
            "square_queries": 5000, **({"note": note} if note else {})}


ATTACKS: dict[str, Attack] = {
    "clean": Attack("clean", "natural accuracy, no attack", lambda model, x, y, ctx: x, lambda ctx: {}),
    "fgsm": Attack("fgsm", "FGSM: one step of size eps on cross-entropy, no random start",
                   lambda model, x, y, ctx: fgsm(model, x, y, eps=ctx.eps, norm=ctx.norm),
                   lambda ctx: {"steps": 1, "alpha": ctx.eps, "loss": "ce", "random_start": False}),
    "pgd20": _pgd_attack("pgd20", 20, "ce", "PGD-20 on cross-entropy, random start"),
    "pgd100": _pgd_attack("pgd100", 100, "ce", "PGD-100 on cross-entropy, random start"),
    "cw20": _pgd_attack("cw20", 20, "cw", "PGD-20 on the CW margin max_{j!=y} z_j - z_y (CW-inf of the paper)"),
    "autoattack": Attack("autoattack", "AutoAttack standard (APGD-CE, APGD-T, FAB-T, Square) via pyautoattack",
                         _autoattack, _autoattack_params),
}

# The paper's table, in its column order.
PROTOCOL = ("clean", "fgsm", "pgd20", "pgd100", "cw20", "autoattack")


def resolve_attacks(names: str | Iterable[str]) -> list[str]:
    """Attack names (a comma-separated string or a list) checked against ATTACKS, duplicates dropped.

    UserError (one line, with the closest known name) for an unknown one."""
    if isinstance(names, str):
        names = names.split(",")
    out: list[str] = []
    for raw in names:
        name = raw.strip().lower()
        if not name:
            continue
        if name not in ATTACKS:
            close = difflib.get_close_matches(name, list(ATTACKS), n=1, cutoff=0.5)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise UserError(f"unknown attack {raw.strip()!r}: {hint}known attacks: {', '.join(ATTACKS)}")
        if name not in out:
            out.append(name)
    if not out:
        raise UserError(f"no attack given: choose from {', '.join(ATTACKS)}")
    return out


def _attack_seed(seed: int, name: str) -> int:
    """A seed per (evaluation seed, attack): each attack's randomness is independent of the others'."""
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def evaluate(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    norm: str,
    eps: float,
    attacks: str | Sequence[str] = PROTOCOL,
    alpha: float | None = None,
    batch_size: int = 256,
    seed: int = 0,
    device: str | torch.device | None = None,
    progress: bool = True,
    checks: bool = True,
    checks_n: int = 200,
    resume_dir: str | Path | None = None,
    chunk_size: int | None = None,
    restart: bool = False,
) -> dict:
    """Accuracy of `model` on (x, y) under each attack of `attacks`, plus the worst case over them and the
    trust checks of `flatrobust.trust`.

    Args:
        model: maps images in [0, 1] to logits; evaluated in eval mode (its modes are restored after) and
            moved to `device`.
        x, y: images (N, C, H, W) in [0, 1] and labels (N,), on any device (moved batch by batch).
        norm, eps: the threat model, "linf" or "l2", eps in pixel units (e.g. 8/255).
        attacks: names from ATTACKS (list or comma-separated string); default the whole PROTOCOL.
        alpha: PGD step size; default `default_alpha(norm, eps)` (2/255 at L-inf 8/255, 15/255 at L2 128/255).
        batch_size: examples per attack call.
        seed: seeds every attack's randomness; same seed, batch size and device -> same numbers.
        device: where to run; None: the device of the model's parameters.
        progress: report progress over (attack, batch) and the trust checks on stderr, as
            `flatrobust.progress` does everywhere: a bar on a terminal, otherwise a heartbeat line every
            30 s (with AutoAttack's current stage); False: silent.
        checks: run the trust checks on a fixed subset of `checks_n` examples (seeded by `seed`).
        resume_dir: keep every finished batch of every attack in this folder (`flatrobust.evalstore`) and
            reuse the batches already there: an interrupted evaluation called again with the same arguments
            loses at most the batch that was in progress, says in one line on stderr what it kept (when
            `progress`), and gives exactly the result it would have had uninterrupted. A folder written
            for other arguments (model weights, data, threat model, alpha, seed, batch or chunk size, device
            type) is refused with a UserError; `restart=True` deletes it first.
        chunk_size: examples per file of finished batches, a multiple of `batch_size`; default the multiple
            nearest to 1000. It changes no number: the grain of resumption is the batch.

    Returns a JSON-ready dict:
        {"n", "norm", "eps", "alpha", "seed", "batch_size", "device",
         "attacks": {name: {"accuracy", "correct", "seconds", "params", "max_perturbation",
                            "outside_threat_model",
                            ["stages": {stage: {"accuracy", "correct", "seconds"}}, "warnings": [str]]}},
         "worst_case": {"accuracy", "correct", "over": [names]},  # correct clean and under every attack
         "checks": [{"name", "passed", "detail", "suggests"}] or None, "checks_n", "seconds",
         ["chunks": {"size", "count", "reused": {name: whole chunks read from resume_dir}, "batches",
                     "batches_reused": {name: batches read}, "resumed": the line said on restart or None}]}
    """
    names = resolve_attacks(attacks)
    if "autoattack" in names:
        require_autoattack()
    if norm not in ("linf", "l2"):
        raise UserError(f"unknown norm {norm!r}: use 'linf' or 'l2'")
    if not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps < 0:
        raise UserError(f"eps must be a finite number >= 0, got {eps!r}")
    alpha = default_alpha(norm, eps) if alpha is None else alpha
    if not isinstance(alpha, (int, float)) or not math.isfinite(alpha) or alpha < 0:
        raise UserError(f"alpha must be a finite number >= 0, got {alpha!r}")
    if batch_size < 1:
        raise UserError(f"batch size must be >= 1, got {batch_size}")
    chunk_size = batch_size * max(1, round(1000 / batch_size)) if chunk_size is None else chunk_size
    if chunk_size < 1 or chunk_size % batch_size:
        raise UserError(f"chunk size must be a positive multiple of the batch size {batch_size}, got {chunk_size}")
    n = len(y)
    if n < 1 or x.shape[0] != n:
        raise UserError(f"need at least one example and as many labels as images, got {x.shape[0]} images and {n} labels")
    if device is None:
        device = next(model.parameters(), torch.empty(0)).device
    device = torch.device(device)
    model.to(device)
    ball = threat_model(norm, eps)
    num_classes = None
    if "autoattack" in names:  # its stages depend on the number of classes: refused or chosen before anything runs
        with torch.no_grad(), train_mode(model, False):
            num_classes = int(model(x[:1].to(device)).shape[1])
        autoattack_stages(num_classes)
    start_all = time.perf_counter()
    result: dict[str, Any] = {"n": n, "norm": norm, "eps": float(eps), "alpha": float(alpha), "seed": seed,
                              "batch_size": batch_size, "device": str(device), "attacks": {}}
    store, kept = None, {}
    if resume_dir is not None:
        key = {"model": fingerprint_model(model), "data": fingerprint_tensors([("x", x), ("y", y)]), "n": n, "norm": norm,
               "eps": float(eps), "alpha": float(alpha), "seed": seed, "batch_size": batch_size, "chunk_size": chunk_size,
               "device": device.type}
        store = open_store(resume_dir, key, restart=restart)
        kept = {name: _load_kept(store, name, n, batch_size, chunk_size) for name in names}
        done = {name: _progress_of(k, n, batch_size, chunk_size) for name, k in kept.items()}  # (batches, first image)
        resumed = _kept_line(resume_dir, done, n, batch_size) if any(d for d, _ in done.values()) else None
        result["chunks"] = {"size": chunk_size, "count": math.ceil(n / chunk_size), "reused": {},
                            "batches": math.ceil(n / batch_size), "batches_reused": {k: d for k, (d, _) in done.items()},
                            "resumed": resumed}
        if resumed and progress is not False:
            print(f"flatrobust: {resumed}", file=sys.stderr, flush=True)
    robust_all = {}
    n_batches = math.ceil(n / batch_size)
    enabled = progress is not False  # None, the former "only on a terminal", is what True now means
    bar = Progress(total=len(names) * n_batches, desc="eval", unit="batch", enabled=enabled)
    with train_mode(model, False), bar:  # the bar is closed after the attacks, or on an exception
        for i, name in enumerate(names, 1):
            attack = ATTACKS[name]
            s = _attack_seed(seed, name)
            ctx = AttackContext(norm, float(eps), float(alpha), s, torch.Generator(device).manual_seed(s), device,
                                note=bar.set_postfix_str, num_classes=num_classes)
            bar.set_description(f"eval {name}", phase_total=n_batches, phase=f"attack {i} of {len(names)}")
            bar.set_postfix_str("")
            whole, reused = _run_attack(attack, model, x, y, ctx, ball, batch_size, chunk_size, store, kept.get(name), bar)
            if store is not None:
                result["chunks"]["reused"][name] = reused
            robust_all[name] = whole["robust"]
            res = {"accuracy": whole["robust"].float().mean().item(), "correct": int(whole["robust"].sum()),
                   "seconds": round(whole["seconds"], 3), "params": attack.params(ctx),
                   "max_perturbation": whole["max_perturbation"], "outside_threat_model": whole["outside"]}
            if whole["stages"]:
                res["stages"] = {stage: {"accuracy": st["mask"].float().mean().item(), "correct": int(st["mask"].sum()),
                                         "seconds": round(st["seconds"], 3)} for stage, st in whole["stages"].items()}
                res["warnings"] = whole["warnings"]
            if res["params"].get("note"):
                res["note"] = res["params"]["note"]
            result["attacks"][name] = res
        bar.close()
        if "clean" not in robust_all:  # the worst case also asks for a correct clean prediction
            with torch.no_grad():
                robust_all["clean"] = torch.cat([model(x[lo : lo + batch_size].to(device)).argmax(1).cpu()
                                                 for lo in range(0, n, batch_size)]) == y.cpu()
        worst = torch.stack(list(robust_all.values())).all(0)  # robust only if every attack failed on it
        result["worst_case"] = {"accuracy": worst.float().mean().item(), "correct": int(worst.sum()), "over": names}
        result["checks"], result["checks_n"] = None, 0
        if checks:
            g = torch.Generator().manual_seed(seed)
            idx = torch.randperm(n, generator=g)[:checks_n].sort().values  # a fixed subset for this seed
            result["checks"] = trust.run_checks(model, x[idx.to(x.device)], y[idx.to(y.device)], norm=norm, eps=eps,
                                                alpha=alpha, results=result, seed=seed, batch_size=batch_size, device=device,
                                                progress=enabled)
            result["checks_n"] = len(idx)
    result["seconds"] = round(time.perf_counter() - start_all, 3)
    return result


def _run_attack(attack: Attack, model, x, y, ctx: AttackContext, ball, batch_size: int, chunk_size: int,
                store, kept: list[tuple] | None, bar) -> tuple[dict, int]:
    """One attack on all of (x, y), batch after batch: its merged record and how many whole chunks were read.

    With a `store`, every finished batch is written before the next one starts (the chunk in progress as a
    part file, a finished chunk as one record), and the batches an earlier run finished (`kept`, from
    `_load_kept`) are read instead of computed, the attack's generator set to the state it had after the
    last of them. The numbers therefore do not depend on where a run was interrupted: a batch's randomness
    is the generator's state after the batches before it (PGD, CW, FGSM) or a fixed seed (AutoAttack, which
    pyautoattack reseeds at every call), the same in an interrupted and an uninterrupted run.
    """
    n = len(y)
    chunks, reused = [], 0
    for c, lo in enumerate(range(0, n, chunk_size)):
        hi = min(lo + chunk_size, n)
        record, batches = kept[c] if kept is not None else (None, [])
        if record is not None:  # a chunk an earlier run finished
            reused += 1
            bar.skip(math.ceil((hi - lo) / batch_size))
            chunks.append(record)
            continue
        bar.skip(len(batches))
        previous = batches[-1] if batches else chunks[-1] if chunks else None
        if previous is not None:  # the generator as the uninterrupted run left it after that batch
            ctx.generator.set_state(previous["generator_state"])
        batches = list(batches)
        for b in range(lo + len(batches) * batch_size, hi, batch_size):
            xb = x[b : min(b + batch_size, hi)].to(ctx.device)  # (B, C, H, W)
            yb = y[b : min(b + batch_size, hi)].to(ctx.device)  # (B,)
            batches.append(_run_batch(attack, model, xb, yb, ctx, ball))
            bar.update(1)
            if store is not None and b + batch_size < hi:
                store.save_part(attack.name, c, batches)
        chunks.append(_merge(batches))
        if store is not None:
            store.save(attack.name, c, chunks[-1])
    return _merge(chunks), reused


def _run_batch(attack: Attack, model, xb, yb, ctx: AttackContext, ball) -> dict:
    """One batch of one attack: everything the result needs from it (the record `flatrobust.evalstore`
    keeps), and the state of the attack's generator after it."""
    _sync(ctx.device)
    t0 = time.perf_counter()
    out = attack.run(model, xb, yb, ctx)
    x_adv, extras = out if isinstance(out, tuple) else (out, {})
    with torch.no_grad():
        correct = model(x_adv).argmax(1) == yb
    _sync(ctx.device)
    seconds = time.perf_counter() - t0
    dist = ball.norm(x_adv - xb)  # (B,)
    bad = (dist > ctx.eps + 1e-5) | (x_adv.flatten(1).amin(1) < 0) | (x_adv.flatten(1).amax(1) > 1)
    return {"robust": correct.cpu(), "seconds": seconds, "max_perturbation": float(dist.max()), "outside": int(bad.sum()),
            "stages": {k: {"mask": mask.cpu(), "seconds": secs} for k, (mask, secs) in extras.get("stages", {}).items()},
            "warnings": list(dict.fromkeys(extras.get("warnings", []))), "generator_state": ctx.generator.get_state()}


def _merge(records: list[dict]) -> dict:
    """The records of consecutive batches (or chunks) as one record of the examples they cover, in order."""
    return {"robust": torch.cat([r["robust"] for r in records]), "seconds": sum(r["seconds"] for r in records),
            "max_perturbation": max(r["max_perturbation"] for r in records), "outside": sum(r["outside"] for r in records),
            "stages": {k: {"mask": torch.cat([r["stages"][k]["mask"] for r in records]),
                           "seconds": sum(r["stages"][k]["seconds"] for r in records)} for k in records[0]["stages"]},
            "warnings": list(dict.fromkeys(w for r in records for w in r["warnings"])),
            "generator_state": records[-1]["generator_state"]}


def _load_kept(store, name: str, n: int, batch_size: int, chunk_size: int) -> list[tuple]:
    """Per chunk of attack `name`, what an earlier run left in `store`: (the chunk's record, []) if it was
    finished, else (None, the records of its finished batches, in order).

    A part file that does not fit (as many batches as the chunk holds or more, or batches of other sizes)
    is dropped, and its chunk computed again from its first batch."""
    kept = []
    for lo in range(0, n, chunk_size):
        hi, c = min(lo + chunk_size, n), lo // chunk_size
        record = store.load(name, c)
        part = store.load_part(name, c) if record is None else []
        sizes = [min(batch_size, hi - b) for b in range(lo, hi, batch_size)]
        if len(part) >= len(sizes) or any(len(r.get("robust", ())) != k for r, k in zip(part, sizes)):
            part = []
        kept.append((record, part))
    return kept


def _progress_of(kept: list[tuple], n: int, batch_size: int, chunk_size: int) -> tuple[int, int | None]:
    """(batches finished, first example still to compute or None) of one attack's `_load_kept`."""
    done, first = 0, None
    for c, (record, part) in enumerate(kept):
        lo, hi = c * chunk_size, min((c + 1) * chunk_size, n)
        have = math.ceil((hi - lo) / batch_size) if record is not None else len(part)
        done += have
        if first is None and record is None:
            first = lo + have * batch_size
    return done, first


def _kept_line(folder, done: dict[str, tuple[int, int | None]], n: int, batch_size: int) -> str:
    """What an earlier run left, in one line: "resuming ...: clean: all 4 batches done; autoattack: 3 of 4
    batches done, resuming at image 768"."""
    total = math.ceil(n / batch_size)
    said = [f"{name}: all {total} batches done" if first is None else
            f"{name}: {k} of {total} batches done, resuming at image {first}" if k else f"{name}: not started"
            for name, (k, first) in done.items()]
    return f"resuming the evaluation kept in {folder} ({n} images, batches of {batch_size}): " + "; ".join(said)


def format_table(result: dict) -> str:
    """The results of `evaluate` as a plain-text table, one row per attack plus the worst case."""
    n = result["n"]
    rows = [f"{'attack':<12} {'accuracy':>9} {'correct':>12} {'seconds':>9}"]
    for name, r in result["attacks"].items():
        rows.append(f"{name:<12} {100 * r['accuracy']:>8.2f}% {r['correct']:>6}/{n:<5} {r['seconds']:>9.2f}")
        for stage, st in r.get("stages", {}).items():
            rows.append(f"{'  ' + stage:<12} {100 * st['accuracy']:>8.2f}% {st['correct']:>6}/{n:<5} {st['seconds']:>9.2f}")
    w = result["worst_case"]
    if len(result["attacks"]) > 1:
        rows.append(f"{'worst case':<12} {100 * w['accuracy']:>8.2f}% {w['correct']:>6}/{n:<5} {'':>9}")
    rows += [f"note ({name}): {r['note']}" for name, r in result["attacks"].items() if r.get("note")]
    return "\n".join(rows)
