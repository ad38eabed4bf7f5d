"""A Markdown report with figures that compares run directories (e.g. AT against AT-AWP).

A run directory is what `flatrobust train` writes: config.yaml, metrics.jsonl (one JSON object per
epoch), and possibly, one file per checkpoint (`rundir.result_files`), eval_best.json, eval_last.json, ...
(`flatrobust eval`), landscape_best.json, ... (`flatrobust landscape`) and flatness_best.json, ...
(`flatrobust flatness`); runs analysed before then have one eval.json, landscape.json, flatness.json, still
read. Every number of these files is shown with the checkpoint it is of. `write_report` reads them and writes
into one folder:

    report.md                 tables and figures, readable on GitHub or in any Markdown viewer
    summary.json              the report's figures, sample sizes and AWP-vs-baseline verdicts as JSON
    fig_robust_accuracy.png   train (dashed) and test (solid) robust accuracy per epoch (AWP paper, Figure 2)
    fig_gap.png               robust generalization gap per epoch
    fig_clean_accuracy.png    test clean accuracy per epoch (when logged)
    fig_landscape.png         weight loss landscapes overlaid (AWP paper, Figure 1; when landscape files exist)

Accuracies are shown in percent: a run whose logged accuracies all lie in [0, 1] is taken to log
fractions and is scaled by 100. Figures are drawn with matplotlib's object API (`Figure`, Agg), which
needs no display and leaves pyplot's global state alone.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from matplotlib.figure import Figure

from . import rundir
from .attacks.threat import format_eps
from .data.builtin import WITHOUT_FILES
from .errors import UserError

__all__ = ["NOISE_SE", "Run", "compare", "load_run", "plot_landscape_1d", "plot_landscape_2d", "summary", "write_report"]

ACC_KEYS = ("train_clean_acc", "train_robust_acc", "test_clean_acc", "test_robust_acc", "gap")
EMA_KEYS = tuple(f"ema_{k}" for k in ACC_KEYS)  # the same, for the moving average of the weights (ema.decay > 0)


@dataclass
class Run:
    """One run directory, read."""

    name: str
    path: Path
    config: dict[str, Any]
    metrics: list[dict[str, Any]]  # one dict per epoch, sorted by epoch, accuracies in percent
    eval: dict[str, Any] | None = None  # the first of `evals` (best.pt's when there is one): what comparisons use
    evals: list[tuple[str, dict[str, Any]]] = field(default_factory=list)  # (checkpoint label, result) per eval file
    landscape: dict[str, Any] | None = None  # the first of `landscapes`, as `eval`
    landscapes: list[tuple[str, dict[str, Any]]] = field(default_factory=list)  # (checkpoint label, result) per file
    flatness: dict[str, Any] | None = None  # the first of `flatnesses`, as `eval`: what comparisons use
    flatnesses: list[tuple[str, dict[str, Any]]] = field(default_factory=list)  # (checkpoint label, result) per file
    data: dict[str, Any] | None = None  # data.json: the training data's classes, shape and normalization
    notes: list[str] = field(default_factory=list)

    def series(self, key: str) -> tuple[list[float], list[float]]:
        """(epochs, values) of a per-epoch metric, skipping epochs that lack it."""
        pts = [(m["epoch"], m[key]) for m in self.metrics if _finite(m.get(key))]
        return [e for e, _ in pts], [v for _, v in pts]


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{path} cannot be read as JSON ({type(e).__name__}): re-create it with the flatrobust command that writes it") from None
    if not isinstance(data, dict):
        raise UserError(f"{path} does not hold a JSON object: re-create it with the flatrobust command that writes it")
    return data


def _read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """`rundir.read_metrics`, with accuracies in percent and the gap filled in where a run did not log it."""
    rows = rundir.read_metrics(run_dir)
    if not rows:
        raise UserError(f"{run_dir / rundir.METRICS} holds no epoch yet: let the run finish at least one epoch")
    # Accuracies in percent. Fractions are recognised by every accuracy of the run lying in [0, 1].
    values = [r[k] for r in rows for k in ACC_KEYS[:4] if _finite(r.get(k))]
    scale = 100.0 if values and max(abs(v) for v in values) <= 1.0 else 1.0
    for r in rows:
        for k in ACC_KEYS + EMA_KEYS:
            if _finite(r.get(k)):
                r[k] = r[k] * scale
        if not _finite(r.get("gap")) and _finite(r.get("train_robust_acc")) and _finite(r.get("test_robust_acc")):
            r["gap"] = r["train_robust_acc"] - r["test_robust_acc"]
    return rows


def load_run(path: str | os.PathLike) -> Run:
    """Read a run directory; UserError (one line) when it is missing or is not a run directory."""
    path = Path(path)
    if not path.is_dir():
        raise UserError(f"run directory {path} does not exist (or is not a folder): pass folders written by `flatrobust train`")
    if not (path / rundir.METRICS).is_file():
        raise UserError(f"{path} has no {rundir.METRICS}: pass folders written by `flatrobust train`")
    config = rundir.read_config(path, required=False)
    name = config.get("name") if isinstance(config.get("name"), str) and config.get("name") else path.resolve().name
    run = Run(name=name, path=path, config=config, metrics=_read_metrics(path))
    if (path / rundir.DATA).is_file():
        run.data = _read_json(path / rundir.DATA)
    for kind, found in (("eval", run.evals), ("landscape", run.landscapes), ("flatness", run.flatnesses)):
        for file in rundir.result_files(path, kind):
            res = _read_json(file)
            found.append((result_label(res, file), res))
    run.eval, run.landscape, run.flatness = (found[0][1] if found else None for found in (run.evals, run.landscapes, run.flatnesses))
    return run


def result_label(res: dict[str, Any], file: Path) -> str:
    """Which checkpoint the numbers of an eval, landscape or flatness file are of: "best.pt, epoch 12", "last.pt,
    epoch 30, EMA weights"; the file's name in place of the checkpoint's for a result that does not record its
    checkpoint file (an old landscape.json given a run directory recorded the folder)."""
    ckpt = res.get("checkpoint")
    text = Path(ckpt).name if isinstance(ckpt, str) and Path(ckpt).suffix else f"`{file.name}`"
    text += f", epoch {res['epoch']}" if isinstance(res.get("epoch"), int) and not isinstance(res.get("epoch"), bool) else ""
    weights = res.get("weights", (res.get("config") or {}).get("weights") if isinstance(res.get("config"), dict) else None)
    return text + (", EMA weights" if weights == "ema" else "")


# --------------------------------------------------------------------------------------------- figures


def _color(i: int) -> str:
    return f"C{i % 10}"  # matplotlib's default cycle: one colour per run, the same in every figure


def _save(fig: Figure, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def plot_robust_accuracy(runs: Sequence[Run], path: Path) -> None:
    """Figure 2 of the AWP paper: test (solid) and train (dashed) robust accuracy per epoch; a dot marks
    each run's best test epoch."""
    fig = Figure(figsize=(7.5, 4.5))
    ax = fig.add_subplot()
    for i, run in enumerate(runs):
        ep, test = run.series("test_robust_acc")
        ep_tr, train = run.series("train_robust_acc")
        if test:
            ax.plot(ep, test, "-", color=_color(i), label=f"{run.name}: test")
            best = max(range(len(test)), key=test.__getitem__)
            ax.plot([ep[best]], [test[best]], "o", color=_color(i), markersize=5)
        if train:
            ax.plot(ep_tr, train, "--", color=_color(i), label=f"{run.name}: train")
    ax.set_xlabel("epoch")
    ax.set_ylabel("robust accuracy (%)")
    ax.set_title("Robust accuracy: test (solid), train (dashed), best test epoch (dot)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    _save(fig, path)


def plot_metric(runs: Sequence[Run], key: str, ylabel: str, title: str, path: Path) -> None:
    fig = Figure(figsize=(7.5, 4.0))
    ax = fig.add_subplot()
    for i, run in enumerate(runs):
        ep, values = run.series(key)
        if values:
            ax.plot(ep, values, "-", color=_color(i), label=run.name)
    if key == "gap":
        ax.axhline(0, color="0.5", linewidth=0.8)
    ax.set_xlabel("epoch")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    _save(fig, path)


def _attack_text(attack: dict[str, Any] | None) -> str:
    """e.g. "PGD-10 linf eps=8/255"; eps as the recipe writes it (0.2 stays 0.2, see `format_eps`)."""
    if not attack:
        return "?"
    return f"PGD-{attack.get('steps', '?')} {attack.get('norm', '?')} eps={format_eps(attack.get('eps', float('nan')))}"


def plot_landscape_1d(curves: Sequence[tuple[str, dict[str, Any]]], path: Path, title: str | None = None) -> None:
    """Figure 1 of the AWP paper: adversarial loss g(alpha) (left) and robust accuracy (right) along
    filter-normalized directions. Per run: the mean over directions (line) and the range over directions
    (shaded). `curves` are (run name, `landscape_1d` result) pairs."""
    fig = Figure(figsize=(10, 4.2))
    ax_loss, ax_acc = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    for i, (name, res) in enumerate(curves):
        a = res["alphas"]
        k = res.get("directions", len(res["losses"]))
        for ax, rows, mean, scale in ((ax_loss, res["losses"], res["mean_loss"], 1.0),
                                      (ax_acc, res["accuracies"], res["mean_accuracy"], 100.0)):
            lo = [min(col) * scale for col in zip(*rows)]
            hi = [max(col) * scale for col in zip(*rows)]
            ax.plot(a, [m * scale for m in mean], "-o", color=_color(i), markersize=3,
                    label=f"{name} (mean of {k} direction{'s' if k > 1 else ''})")
            if k > 1:
                ax.fill_between(a, lo, hi, color=_color(i), alpha=0.15, linewidth=0)
    ax_loss.set_ylabel("adversarial loss rho (cross-entropy, nats)")
    ax_acc.set_ylabel("robust accuracy (%)")
    for ax in (ax_loss, ax_acc):
        ax.set_xlabel("alpha (step along the filter-normalized direction d)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    ax_loss.set_title("g(alpha) = rho(w + alpha d)")
    ax_acc.set_title("robust accuracy at w + alpha d")
    if title:
        fig.suptitle(title, fontsize=10)
    _save(fig, path)


def plot_landscape_2d(name: str, res: dict[str, Any], path: Path) -> None:
    """Contour plot of g(alpha, beta) = rho(w + alpha d1 + beta d2) from a `landscape_2d` result."""
    fig = Figure(figsize=(5.8, 4.8))
    ax = fig.add_subplot()
    # loss[i][j] is at (alphas[i], betas[j]): rows of Z must follow the y axis (betas), hence the transpose
    z = [list(col) for col in zip(*res["loss"])]
    if len(res["alphas"]) > 1 and len(res["betas"]) > 1:
        cs = ax.contourf(res["alphas"], res["betas"], z, levels=20, cmap="viridis")
        ax.contour(res["alphas"], res["betas"], z, levels=10, colors="white", linewidths=0.5)
        fig.colorbar(cs, ax=ax, label="adversarial loss rho (cross-entropy, nats)")
    ax.plot([0], [0], "r*", markersize=10, label=f"{name}: w")
    ax.set_xlabel("alpha (along d1, filter-normalized)")
    ax.set_ylabel("beta (along d2, filter-normalized)")
    ax.set_title(f"{name}: rho(w + alpha d1 + beta d2)", fontsize=10)
    ax.legend(fontsize=8, loc="upper right")
    _save(fig, path)


# --------------------------------------------------------------------------------------------- Markdown


def _f(v: Any, digits: int = 2) -> str:
    return f"{v:.{digits}f}" if _finite(v) else "-"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |" for row in rows]
    return out + [""]


def _data_section(runs: Sequence[Run]) -> list[str]:
    """The data each run was trained on, from its data.json: classes by name, image shape, split sizes and
    where the normalization came from (runs written before data.json existed are left out)."""
    rows = []
    for r in runs:
        d = r.data
        if not isinstance(d, dict):
            continue
        classes = d.get("classes") or []
        n = d.get("num_classes")
        names = ", ".join(map(str, classes)) if classes else (f"{n} unnamed (0..{n - 1})" if isinstance(n, int) else "?")
        mean = ", ".join(f"{v:.4f}" for v in d.get("mean", []) if _finite(v))
        std = ", ".join(f"{v:.4f}" for v in d.get("std", []) if _finite(v))
        where = "" if d.get("name") in WITHOUT_FILES or not d.get("root") else f" `{d['root']}`"  # digits reads no file
        rows.append([r.name, f"{d.get('name', '?')}{where}", names,
                     f"{d.get('in_channels', '?')}x{d.get('image_size', '?')}x{d.get('image_size', '?')}",
                     f"{d.get('train_size', '?')} / {d.get('test_size', '?')}",
                     f"mean ({mean}), std ({std}), from the {d.get('stats_from', '?')}"])
    if not rows:
        return []
    return ["### Data", ""] + _table(["run", "data", "classes", "image (CxHxW)", "train / test images", "normalization"], rows)


def _method(cfg: dict[str, Any]) -> tuple[str, str]:
    """(method, AWP gamma) as far as the config says; '-' for what it does not."""
    obj = cfg.get("method", cfg.get("objective", "-"))
    if isinstance(obj, dict):
        obj = obj.get("name", obj.get("type", "-"))
    awp = cfg.get("awp")
    gamma = awp.get("gamma") if isinstance(awp, dict) else (cfg.get("awp_gamma", cfg.get("gamma")))
    if not _finite(gamma):
        return str(obj), "-"
    return str(obj), (f"{gamma:g}" if gamma > 0 else "off")


def _summary(run: Run) -> dict[str, Any]:
    ep, test = run.series("test_robust_acc")
    s: dict[str, Any] = {"epochs": len(run.metrics), "last_epoch": run.metrics[-1]["epoch"]}
    if test:
        best = max(range(len(test)), key=test.__getitem__)
        s.update(best_epoch=ep[best], best=test[best], last=test[-1], drop=test[best] - test[-1])
    last = run.metrics[-1]
    s.update(gap_last=last.get("gap"), train_last=last.get("train_robust_acc"), clean_last=last.get("test_clean_acc"))
    return s


def _ema_section(runs: Sequence[Run]) -> list[str]:
    """Runs with an EMA of the weights: its per-epoch accuracies beside the raw weights'."""
    with_ema = [r for r in runs if r.series("ema_test_robust_acc")[1]]
    if not with_ema:
        return []
    lines = ["## EMA of the weights", "",
             "Runs trained with `ema.decay > 0` evaluate the exponential moving average of their weights every epoch, "
             "on the same subsets with the same attack as the raw weights (`ema_*` in `metrics.jsonl`). "
             "`flatrobust eval --weights ema` runs the full protocol on it.", ""]
    rows = []
    for r in with_ema:
        ep, ema = r.series("ema_test_robust_acc")
        best = max(range(len(ema)), key=ema.__getitem__)
        last = r.metrics[-1]
        decay = (r.config.get("ema") or {}).get("decay") if isinstance(r.config.get("ema"), dict) else None
        diff = last["ema_test_robust_acc"] - last["test_robust_acc"] if _finite(last.get("ema_test_robust_acc")) and _finite(last.get("test_robust_acc")) else None
        rows.append([r.name, f"{decay:g}" if _finite(decay) else "-", str(ep[best]), _f(ema[best]), _f(ema[-1]),
                     _f(last.get("test_robust_acc")), _f(diff), _f(last.get("ema_gap")), _f(last.get("ema_test_clean_acc"))])
    lines += _table(["run", "decay", "EMA best epoch", "EMA test robust @best (%)", "EMA test robust @last (%)",
                     "raw test robust @last (%)", "EMA - raw @last (pts)", "EMA gap @last (pts)", "EMA test clean @last (%)"], rows)
    return lines


def _monitor_n(run: Run) -> tuple[int | None, bool]:
    """(n, exact) of the per-epoch monitoring subsets (as many test as train images): `eval_n` of
    metrics.jsonl, or for runs written before it was logged config data.eval_subset, an upper bound."""
    ns = [m["eval_n"] for m in run.metrics if isinstance(m.get("eval_n"), int)]
    if ns:
        return ns[-1], True
    sub = (run.config.get("data") or {}).get("eval_subset") if isinstance(run.config.get("data"), dict) else None
    return (sub, False) if isinstance(sub, int) and sub > 0 else (None, False)


def _awp_info(run: Run) -> dict[str, Any]:
    """AWP as the run had it: gamma, warm-up and in how many logged epochs it was active (`awp_active` of
    metrics.jsonl, or from the warm-up for runs that did not log it)."""
    awp = run.config.get("awp") if isinstance(run.config.get("awp"), dict) else {}
    gamma, warmup = awp.get("gamma"), awp.get("warmup", 0)
    warmup = warmup if isinstance(warmup, int) else 0
    epochs = len(run.metrics)
    if not _finite(gamma) or gamma <= 0:
        return {"gamma": gamma if _finite(gamma) else None, "warmup": warmup, "active_epochs": 0, "epochs": epochs,
                "never_active": False, "text": "off" if _finite(gamma) else "-"}
    flags = [m.get("awp_active") for m in run.metrics]
    if all(isinstance(f, bool) for f in flags):
        active = sum(flags)
    else:
        active = sum(1 for m in run.metrics if m["epoch"] > warmup)
    text = f"gamma {gamma:g}" + (f", warm-up {warmup} epoch{'s' if warmup != 1 else ''}" if warmup else "")
    if active == 0:
        text += ": never active"
    elif active < epochs:
        text += f": active {active} of {epochs} epochs"
    return {"gamma": gamma, "warmup": warmup, "active_epochs": active, "epochs": epochs, "never_active": active == 0,
            "text": text}


def _eval_accuracy(entry: Any) -> float | None:
    acc = entry.get("accuracy") if isinstance(entry, dict) else entry
    return acc if _finite(acc) else None


def _eval_section(runs: Sequence[Run]) -> list[str]:
    lines = ["## Final evaluation", ""]
    evals = [(r, label, ev) for r in runs for label, ev in r.evals if isinstance(ev.get("attacks"), dict)]
    with_eval = [r for r in runs if any(r is e for e, _, _ in evals)]
    if with_eval:
        attacks: list[str] = []
        for _, _, ev in evals:
            attacks += [a for a in ev["attacks"] if a not in attacks]
        rows, notes = [], []
        for r, label, ev in evals:
            accs = {a: _eval_accuracy(v) for a, v in ev["attacks"].items()}
            scale = 100.0 if all(v is None or v <= 1.0 for v in accs.values()) else 1.0
            checks = ev.get("checks") or []
            failed = [c for c in checks if isinstance(c, dict) and any(c.get(k) is False for k in ("passed", "ok", "pass"))]
            check_text = f"{len(checks) - len(failed)}/{len(checks)} passed" if checks else "-"
            if failed:
                check_text += ": failed " + ", ".join(str(c.get("name", c.get("check", "?"))) for c in failed)
            n = ev.get("n")
            rows.append([r.name, label, str(n) if isinstance(n, int) else "-"]
                        + [_f(accs.get(a) * scale if accs.get(a) is not None else None) for a in attacks] + [check_text])
            notes += [f"- {r.name} ({label}), {a}: {v['note']}" for a, v in ev["attacks"].items()
                      if isinstance(v, dict) and isinstance(v.get("note"), str)]
        lines.append("Accuracy (%) on n test images of each evaluated checkpoint (`flatrobust eval`: `eval_best.json`, "
                     "`eval_last.json`, ...), per attack:")
        lines.append("")
        lines += _table(["run", "checkpoint", "n"] + attacks + ["trust checks"], rows)
        if notes:
            lines += ["Notes:", "", *notes, ""]
        if any(len(r.evals) > 1 for r in with_eval):
            lines += ["Comparisons between runs use each run's first row (best.pt's evaluation when there is one).", ""]
    without = [r for r in runs if not any(r is w for w in with_eval)]
    if without:
        lines.append("Runs without an evaluation file (run `flatrobust eval` for the full protocol); from `metrics.jsonl`, "
                     "i.e. the per-epoch monitoring attack on the evaluation subset used during training:")
        lines.append("")
        rows = []
        for r in without:
            s = _summary(r)
            best_row = next((m for m in r.metrics if m["epoch"] == s.get("best_epoch")), {})
            rows.append([r.name, _f(best_row.get("test_clean_acc")), _f(s.get("best")), _f(s.get("clean_last")), _f(s.get("last"))])
        lines += _table(["run", "clean @best (%)", "robust @best (%)", "clean @last (%)", "robust @last (%)"], rows)
    return lines


def _settings_key(res: dict[str, Any]) -> tuple:
    return (json.dumps(res.get("attack"), sort_keys=True), res.get("n"), res.get("split"))


def _landscape_section(runs: Sequence[Run], out: Path) -> list[str]:
    have = [(r, label, land, land["1d"]) for r in runs for label, land in r.landscapes if isinstance(land.get("1d"), dict)]
    if not have:
        return []
    plot_landscape_1d([(f"{r.name} ({label.replace('`', '')})", res) for r, label, _, res in have], out / "fig_landscape.png")
    lines = ["## Weight loss landscape", "",
             "![weight loss landscape](fig_landscape.png)", "",
             "g(alpha) = rho(w + alpha d): the adversarial (PGD) cross-entropy when the weights move along random "
             "filter-normalized directions d, with adversarial examples regenerated for every perturbed model "
             "(`flatrobust landscape`). Line: mean over directions; band: range over directions. "
             "A flatter curve (smaller rise away from alpha = 0) goes with a smaller robust generalization gap. "
             "One curve and row per analysed checkpoint (`landscape_best.json`, `landscape_last.json`, ...).", ""]
    rows = []
    for r, label, land, res in have:
        a, mean = res["alphas"], res["mean_loss"]
        g0 = res.get("loss_at_w")
        lo, hi = min(range(len(a)), key=a.__getitem__), max(range(len(a)), key=a.__getitem__)
        data = land.get("data", {})
        rows.append([r.name, label, f"{data.get('split', '?')}, n={res.get('n', '?')}", _attack_text(res.get("attack")),
                     str(res.get("directions", "?")), _f(g0, 4),
                     f"{_f(mean[lo] - g0, 4)} (alpha={a[lo]:g})" if _finite(g0) else "-",
                     f"{_f(mean[hi] - g0, 4)} (alpha={a[hi]:g})" if _finite(g0) else "-"])
    lines += _table(["run", "checkpoint", "data", "attack", "directions", "rho(w) (nats)", "mean g - rho(w), left end",
                     "mean g - rho(w), right end"], rows)
    if len({_settings_key({**res, "split": land.get("data", {}).get("split")}) for _, _, land, res in have}) > 1:
        lines += ["**Warning:** the landscapes were computed with different data or attacks and are not directly comparable.", ""]
    return lines


def _flatness_section(runs: Sequence[Run]) -> list[str]:
    have = [(r, label, flat) for r in runs for label, flat in r.flatnesses]
    if not have:
        return []
    rows = []
    for r, label, flat in have:
        avg, worst = flat.get("average") or {}, flat.get("worst") or {}
        base = avg or worst
        se = avg.get("standard_error")
        rows.append([
            r.name, label,
            f"{flat.get('data', {}).get('split', '?')}, n={base.get('n', '?')}",
            _attack_text(base.get("attack")),
            _f(base.get("robust_loss"), 4),
            _f(base.get("robust_accuracy", float("nan")) * 100) if _finite(base.get("robust_accuracy")) else "-",
            (f"{_f(avg.get('average_flatness'), 4)}" + (f" ± {_f(se, 4)}" if _finite(se) else "")
             + f" (xi={avg.get('xi')}, {avg.get('draws')} draws)") if avg else "-",
            f"{_f(worst.get('worst_flatness'), 4)} (xi={worst.get('xi')}, {worst.get('steps')} steps)" if worst else "-",
        ])
    lines = ["## Flatness", "",
             "Stutz, Hein, Schiele (ICCV 2021), from `flatrobust flatness`: average-case = E_nu[rho(w + nu)] - rho(w), "
             "nu uniform on the layer-wise sphere ||nu_l|| = xi ||w_l||; worst-case = max over ||nu_l|| <= xi ||w_l|| "
             "(joint weight + input attack) of rho(w + nu) - rho(w). In nats; lower is flatter. ± is the standard "
             "error over draws. One row per analysed checkpoint (`flatness_best.json`, `flatness_last.json`, ...).", ""]
    lines += _table(["run", "checkpoint", "data", "attack", "rho(w) (nats)", "robust acc (%)", "average-case flatness",
                     "worst-case flatness"], rows)
    if any(len(r.flatnesses) > 1 for r in runs):
        lines += ["Comparisons between runs use each run's first row (best.pt's when there is one).", ""]
    return lines


_SAME_SETTING = ("method", "model", "data", "attack", "epochs", "optim", "beta")


def _pairs(runs: Sequence[Run]) -> list[tuple[Run, Run]]:
    """(baseline, AWP run) pairs: the same setting (_SAME_SETTING keys of the config), AWP off vs on."""
    def setting(r: Run) -> str:
        return json.dumps({k: r.config.get(k) for k in _SAME_SETTING}, sort_keys=True, default=str)

    base = [r for r in runs if _method(r.config)[1] == "off"]
    pairs = []
    for r in runs:
        if _method(r.config)[1] in ("off", "-"):
            continue
        match = next((b for b in base if setting(b) == setting(r)), None)
        if match is not None:
            pairs.append((match, r))
    return pairs


NOISE_SE = 2.0  # a difference counts as held (or as its opposite) only beyond this many standard errors


def _binomial_var(p_percent: Any, n: Any) -> float | None:
    """Variance, in percentage points squared, of an accuracy of p_percent % measured on n examples."""
    if not (_finite(p_percent) and isinstance(n, int) and n > 0):
        return None
    p = min(max(p_percent / 100.0, 0.0), 1.0)
    return 1e4 * p * (1 - p) / n


def _sum_var(*variances: float | None) -> float | None:
    return None if any(v is None for v in variances) else sum(variances)


def compare(b: Run, a: Run) -> dict[str, Any]:
    """AWP run `a` against its baseline `b`: per measure the two values, the difference, its standard error
    and a verdict, "held" / "opposite" (beyond NOISE_SE standard errors either way), "within noise", or
    "not judged" (no noise estimate). Accuracies are binomial on the number of examples each was measured on,
    the two runs taken as independent (see docs/ANALYSIS.md); flatness uses the standard error over draws."""
    sb, sa = _summary(b), _summary(a)
    nb, na = _monitor_n(b)[0], _monitor_n(a)[0]

    def acc_var(s: dict, n: Any, *keys: str) -> float | None:
        return _sum_var(*(_binomial_var(s.get(k), n) for k in keys))

    # (measure, baseline value, AWP value, +1 if higher is expected of AWP / -1 if lower, variance b, variance a)
    items = [("test robust accuracy @last (%)", sb.get("last"), sa.get("last"), 1, acc_var(sb, nb, "last"), acc_var(sa, na, "last")),
             ("test robust accuracy @best (%)", sb.get("best"), sa.get("best"), 1, acc_var(sb, nb, "best"), acc_var(sa, na, "best")),
             ("robust generalization gap @last (pts)", sb.get("gap_last"), sa.get("gap_last"), -1,
              acc_var(sb, nb, "train_last", "last"), acc_var(sa, na, "train_last", "last")),
             ("drop best - last (pts)", sb.get("drop"), sa.get("drop"), -1, acc_var(sb, nb, "best", "last"), acc_var(sa, na, "best", "last"))]
    if b.eval and a.eval:
        for attack in ("autoattack", "pgd20"):
            vb, va = (_eval_accuracy((r.eval.get("attacks") or {}).get(attack)) for r in (b, a))
            if vb is not None and va is not None:
                scale = 100.0 if max(vb, va) <= 1.0 else 1.0
                items.append((f"final {attack} accuracy (%)", vb * scale, va * scale, 1,
                              _binomial_var(vb * scale, b.eval.get("n")), _binomial_var(va * scale, a.eval.get("n"))))
    if b.flatness and a.flatness:
        fb, fa = (r.flatness.get("average") or {} for r in (b, a))
        se_b, se_a = fb.get("standard_error"), fa.get("standard_error")
        of = _checkpoints_of(b.flatnesses[0][0], a.flatnesses[0][0])
        items.append((f"average-case flatness (nats), {of}", fb.get("average_flatness"), fa.get("average_flatness"), -1,
                      se_b ** 2 if _finite(se_b) else None, se_a ** 2 if _finite(se_a) else None))
        items.append((f"worst-case flatness (nats), {of}", (b.flatness.get("worst") or {}).get("worst_flatness"),
                      (a.flatness.get("worst") or {}).get("worst_flatness"), -1, None, None))
    rows = []
    counts = {"held": 0, "opposite": 0, "within_noise": 0, "not_judged": 0, "total": 0}
    for what, vb, va, sign, var_b, var_a in items:
        if not (_finite(vb) and _finite(va)):
            continue
        var = _sum_var(var_b, var_a)
        se = math.sqrt(var) if var is not None else None
        d = (va - vb) * sign  # > 0: as the paper expects
        if se is None:
            verdict = "not_judged"
        else:
            verdict = "held" if d > NOISE_SE * se else "opposite" if d < -NOISE_SE * se else "within_noise"
        counts[verdict] += 1
        counts["total"] += 1
        rows.append({"measure": what, "expected": "higher" if sign > 0 else "lower", "baseline": vb, "awp": va,
                     "difference": va - vb, "se": se, "verdict": verdict})
    awp = _awp_info(a)
    return {"baseline": b.name, "awp": a.name, "awp_text": awp["text"], "awp_never_active": awp["never_active"],
            "items": rows, "counts": counts, "noise_se": NOISE_SE}


def _checkpoints_of(label_b: str, label_a: str) -> str:
    """The checkpoint two runs' numbers are of ("best.pt"), or both ("best.pt / last.pt", baseline's first) when
    they differ: a result label (`result_label`) without its epoch, which differs between runs."""
    b, a = (", ".join(part for part in label.split(", ") if not part.startswith("epoch ")) for label in (label_b, label_a))
    return b if b == a else f"{b} / {a}"


_VERDICT_TEXT = {"held": "yes", "opposite": "no: the opposite", "within_noise": "within noise", "not_judged": "not judged (no noise estimate)"}


def _comparison_section(runs: Sequence[Run]) -> list[str]:
    """For each AWP run with a baseline of the same setting: did what the paper expects hold here, beyond noise?"""
    pairs = _pairs(runs)
    if not pairs:
        return []
    lines = ["## AWP against its baseline", "",
             "What the AWP paper leads one to expect, checked on these runs (same method, model, data, attack, "
             "epochs and optimizer; AWP off vs on). A difference counts, as expected or as its opposite, only when it "
             f"exceeds {NOISE_SE:g} standard errors (SE); smaller ones are within noise. The SE of an accuracy is "
             "binomial, sqrt(p (1 - p) / n) with n the images it was measured on (the monitoring subsets for the "
             "per-epoch figures, the evaluation file's n for the final ones), the runs taken as independent; that of "
             "average-case flatness is the standard error over its draws; worst-case flatness has none and is not "
             "judged. See docs/ANALYSIS.md.", ""]
    for b, a in pairs:
        c = compare(b, a)
        rows = []
        for it in c["items"]:
            digits = 4 if "nats" in it["measure"] else 2
            rows.append([it["measure"], it["expected"], _f(it["baseline"], digits), _f(it["awp"], digits),
                         _f(it["difference"], digits), f"{NOISE_SE:g} SE = {_f(NOISE_SE * it['se'], digits)}" if it["se"] is not None else "-",
                         _VERDICT_TEXT[it["verdict"]]])
        lines += [f"**{a.name}** (AWP {c['awp_text']}) against **{b.name}**:", ""]
        if c["awp_never_active"]:
            lines += [f"**AWP was never active in {a.name}** (its warm-up covers every epoch): both runs trained the "
                      "plain method, so this table says nothing about AWP.", ""]
        lines += _table(["measure", "AWP expected", b.name, a.name, "AWP - baseline", "noise", "as expected"], rows)
        k = c["counts"]
        lines += [f"Of {k['total']}: {k['held']} held, {k['opposite']} went the other way, {k['within_noise']} within "
                  f"noise, {k['not_judged']} not judged. One seed each: seed-to-seed variation adds to this noise, so "
                  "repeat with other `seed=` values before concluding.", ""]
    return lines


def summary(runs: Sequence[Run]) -> dict[str, Any]:
    """The report's figures as JSON (written as summary.json beside report.md): per run the settings, sample
    sizes, best/last figures, final evaluation, flatness and the seconds each command recorded; and the
    AWP-against-baseline comparisons with their verdicts (`compare`). Accuracies in percent."""
    out_runs = []
    for r in runs:
        s, (n, exact) = _summary(r), _monitor_n(r)
        monitor = r.config.get("eval") if isinstance(r.config.get("eval"), dict) else {}
        attack = r.config.get("attack") if isinstance(r.config.get("attack"), dict) else {}
        train_s = [m.get("epoch_time_s", 0) + m.get("eval_time_s", 0) for m in r.metrics]
        entry: dict[str, Any] = {
            "name": r.name, "path": str(r.path), "model": r.config.get("model"),
            "data": (r.config.get("data") or {}).get("name") if isinstance(r.config.get("data"), dict) else None,
            "method": _method(r.config)[0], "awp": _awp_info(r), "attack": _attack_text(attack) if attack else None,
            "monitor_attack": f"PGD-{monitor['steps']}" if "steps" in monitor else None,
            "monitor_n": n, "monitor_n_exact": exact, "epochs": len(r.metrics),
            **{k: s.get(k) for k in ("best_epoch", "best", "last_epoch", "last", "drop", "gap_last", "train_last", "clean_last")},
            "final": None, "flatness": None,
            "seconds": {"train": round(sum(train_s), 1) if all(_finite(t) for t in train_s) else None,
                        "eval": (r.eval or {}).get("seconds"), "landscape": (r.landscape or {}).get("seconds"),
                        "flatness": (r.flatness or {}).get("seconds")},
        }
        if r.eval and isinstance(r.eval.get("attacks"), dict):
            accs = {a: _eval_accuracy(v) for a, v in r.eval["attacks"].items()}
            scale = 100.0 if all(v is None or v <= 1.0 for v in accs.values()) else 1.0
            checks = [c for c in r.eval.get("checks") or [] if isinstance(c, dict)]
            entry["final"] = {"checkpoint": r.evals[0][0].strip("`"), "n": r.eval.get("n"), "attacks": {a: v * scale if v is not None else None for a, v in accs.items()},
                              "checks_passed": sum(1 for c in checks if c.get("passed") is True), "checks": len(checks)}
        if r.flatness:
            avg, worst = r.flatness.get("average") or {}, r.flatness.get("worst") or {}
            entry["flatness"] = {"checkpoint": r.flatnesses[0][0].replace("`", ""), "n": (avg or worst).get("n"),
                                 "average": avg.get("average_flatness"),
                                 "average_se": avg.get("standard_error"), "worst": worst.get("worst_flatness")}
        out_runs.append(entry)
    return {"format": "flatrobust-report-summary", "version": 1, "runs": out_runs,
            "comparisons": [compare(b, a) for b, a in _pairs(runs)]}


def _unique_names(runs: Sequence[Run]) -> None:
    seen: dict[str, int] = {}
    for r in runs:
        seen[r.name] = seen.get(r.name, 0) + 1
    for r in runs:
        if seen[r.name] > 1:
            r.name = f"{r.name} ({r.path})"


def write_report(run_dirs: Sequence[str | os.PathLike], out: str | os.PathLike = "report", command: str | None = None) -> Path:
    """Read the run directories, write report.md and its PNG figures into `out`; return report.md's path."""
    if not run_dirs:
        raise UserError("no run directory given: pass one or more folders written by `flatrobust train`")
    runs = [load_run(p) for p in run_dirs]
    _unique_names(runs)
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create the output folder {out}: {e.strerror}") from None
    from . import __version__

    names = [r.name for r in runs]
    lines = [f"# flatrobust report: {' vs '.join(names)}", ""]
    if command:
        lines += [f"Written by `{command}` (flatrobust {__version__}).", ""]

    lines += ["## Runs", ""]
    rows = []
    for r in runs:
        data = r.config.get("data", {})
        method, gamma = _method(r.config)
        attack = r.config.get("attack") if isinstance(r.config.get("attack"), dict) else {}
        monitor = r.config.get("eval") if isinstance(r.config.get("eval"), dict) else {}
        attack_text = _attack_text(attack) if attack else "-"
        monitor_text = _attack_text({**attack, "steps": monitor["steps"]}) if attack and "steps" in monitor else "-"
        n, exact = _monitor_n(r)
        rows.append([r.name, f"`{r.path}`", str(r.config.get("model", "-")),
                     str(data.get("name", "-")) if isinstance(data, dict) else str(data), method, _awp_info(r)["text"],
                     attack_text, monitor_text, "-" if n is None else str(n) if exact else f"<= {n}", str(len(r.metrics))])
    lines += _table(["run", "folder", "model", "data", "method", "AWP", "training attack",
                     "per-epoch monitor", "monitoring n", "epochs logged"], rows)
    never = [r.name for r in runs if _awp_info(r)["never_active"]]
    if never:
        lines += [f"**AWP was never active in {', '.join(never)}**: its warm-up (`awp.warmup`) covers every epoch, so "
                  "the run trained the plain method.", ""]
    lines += _data_section(runs)

    lines += ["## Summary", "",
              "Test robust accuracy is the per-epoch monitoring attack of `metrics.jsonl`, on a fixed subset of "
              "\"monitoring n\" test images (and as many training images for the train figures); the gap is train "
              "robust accuracy minus test robust accuracy (percentage points). Best minus last measures robust "
              "overfitting.", ""]
    rows, sentences = [], []
    for r in runs:
        s = _summary(r)
        rows.append([r.name, str(s.get("best_epoch", "-")), _f(s.get("best")), str(s["last_epoch"]), _f(s.get("last")),
                     _f(s.get("drop")), _f(s.get("train_last")), _f(s.get("gap_last")), _f(s.get("clean_last"))])
        if _finite(s.get("best")):
            sentences.append(f"- **{r.name}**: best test robust accuracy {_f(s['best'])}% at epoch {s['best_epoch']}, "
                             f"{_f(s['last'])}% at the last epoch ({s['last_epoch']}), a drop of {_f(s['drop'])} points; "
                             f"gap at the end {_f(s.get('gap_last'))} points.")
    lines += _table(["run", "best epoch", "test robust @best (%)", "last epoch", "test robust @last (%)",
                     "best - last (pts)", "train robust @last (%)", "gap @last (pts)", "test clean @last (%)"], rows)
    lines += sentences + [""]
    for r in runs:  # warnings the training loop stored in metrics.jsonl (e.g. an AWP collapse)
        warned = [m for m in r.metrics if isinstance(m.get("warning"), str)]
        if warned:
            lines += [f"**Warning, {r.name}** (epoch {warned[-1]['epoch']}): {warned[-1]['warning']}", ""]
        for m in (m for m in r.metrics if isinstance(m.get("catastrophic"), str)):  # the guard's lines (guard.catastrophic)
            lines += [f"**Catastrophic overfitting, {r.name}** (epoch {m['epoch']}): {m['catastrophic']}", ""]
        ep, val = r.series("val_robust_acc")
        if val and r.metrics[-1].get("best_on") == "val":  # data.val_subset: best.pt is not the best test epoch above
            at = ep[max(range(len(val)), key=val.__getitem__)]
            lines += [f"**{r.name}**: best.pt was chosen on the validation split (data.val_subset), not on the test images: "
                      f"epoch {at}, validation robust accuracy {_f(max(val))}%.", ""]
    lines += _ema_section(runs)

    plot_robust_accuracy(runs, out / "fig_robust_accuracy.png")
    lines += ["## Robust accuracy per epoch", "", "![robust accuracy per epoch](fig_robust_accuracy.png)", "",
              "Solid: test robust accuracy; dashed: train robust accuracy (AWP paper, Figure 2). One colour per run. "
              "The space between a run's dashed and solid lines is its robust generalization gap.", ""]
    plot_metric(runs, "gap", "train - test robust accuracy (percentage points)", "Robust generalization gap", out / "fig_gap.png")
    lines += ["## Robust generalization gap", "", "![robust generalization gap](fig_gap.png)", "",
              "Train robust accuracy minus test robust accuracy per epoch. A gap that keeps growing while test robust "
              "accuracy falls is robust overfitting.", ""]
    if any(r.series("test_clean_acc")[1] for r in runs):
        plot_metric(runs, "test_clean_acc", "clean test accuracy (%)", "Clean test accuracy", out / "fig_clean_accuracy.png")
        lines += ["## Clean accuracy per epoch", "", "![clean test accuracy](fig_clean_accuracy.png)", ""]

    lines += _eval_section(runs)
    lines += _landscape_section(runs, out)
    lines += _flatness_section(runs)
    lines += _comparison_section(runs)
    lines += ["## How to read this report", "",
              "The AWP paper's claim: a flatter weight loss landscape goes with a smaller robust generalization gap, "
              "and AWP flattens it explicitly. Compared with AT, an AT-AWP run should show a smaller gap, a smaller "
              "drop from the best to the last epoch, a flatter landscape curve and lower flatness values. Compare "
              "runs only under the same data, threat model and evaluation settings (the tables list them).", ""]
    report = out / "report.md"
    report.write_text("\n".join(lines))
    (out / "summary.json").write_text(json.dumps({"command": command, **summary(runs)}, indent=1) + "\n")
    return report
