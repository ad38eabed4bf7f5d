"""Flatness across RobustBench models next to their robust generalization gap: Stutz, Hein and Schiele,
"Relating Adversarially Robust Generalization to Flat Minima" (ICCV 2021), measured flatness over many
RobustBench models and related it to robust generalization. One command over a list of names:

    python tools/robustbench_flatness.py Wu2020Adversarial Zhang2019Theoretically Carmon2019Unlabeled \\
        --data cifar10:./data --n 1000

For each name: `flatrobust import` (RobustBench's weights file from --model-dir, default ./models, never
downloaded; skipped when OUT/<Name>/model.pt exists), then `flatrobust flatness` on a fixed subset of --n test
images and of --n training images (PGD at RobustBench's leaderboard radius, --steps steps). It writes
OUT/flatness_table.md and OUT/flatness_table.json: per model the robust loss and robust accuracy on train and
test, the robust generalization gap (test minus train robust loss), and the average- and worst-case flatness
on the test subset; with 3 or more models, the Spearman rank correlation of each flatness with the gap.
Stutz et al. report that flatter models generalize better (flatness and gap rise together). A GPU and the
downloaded weights are the user's (docs/ROBUSTBENCH.md); every step is a flatrobust command, so its files
(model.pt, flatness.json, train/flatness.json) stay beside the table.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from flatrobust.cli import main as flatrobust  # noqa: E402

PREFIX = "robustbench:"


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("names", nargs="+", help="RobustBench names (robustbench: prefix optional)")
    p.add_argument("--data", required=True, help="the data, as flatrobust import takes it: cifar10:./data, cifar100:./data, ...")
    p.add_argument("--dataset", default=None, help="RobustBench's dataset when --data is not cifar10/cifar100 (e.g. an .npz copy)")
    p.add_argument("--threat", default="Linf", help="RobustBench's threat model: Linf (default) or L2")
    p.add_argument("--model-dir", default="models", help="RobustBench's cache folder (default: models)")
    p.add_argument("--out", default="runs/robustbench", help="one folder per model, and the table (default: runs/robustbench)")
    p.add_argument("--n", type=int, default=1000, help="test and training images, fixed subsets (default: 1000)")
    p.add_argument("--steps", default=None, help="PGD steps of the robust loss (default: the imported checkpoint's, 10)")
    p.add_argument("--draws", default="10", help="random draws of the average case (default: 10)")
    p.add_argument("--worst-steps", default="20", help="steps of the worst case (default: 20)")
    p.add_argument("--seed", default="0", help="subsets, draws, random starts (default: 0)")
    p.add_argument("--device", default="auto", help="auto (default), cpu or cuda")
    return p.parse_args(argv)


def _run(argv: list[str]) -> None:
    rc = flatrobust(argv)
    if rc:  # flatrobust printed its one line
        raise SystemExit(rc)


def measure(args: argparse.Namespace, name: str) -> dict:
    """Import `name` unless done, its flatness on test and train; the row of the table."""
    folder = Path(args.out) / name
    ckpt = folder / "model.pt"
    if not ckpt.exists():
        _run(["import", PREFIX + name, "--data", args.data, "--threat", args.threat, "--model-dir", args.model_dir, "--out", str(folder)]
             + (["--dataset", args.dataset] if args.dataset else []))
    common = ["--n", str(args.n), "--draws", args.draws, "--worst-steps", args.worst_steps, "--seed", args.seed, "--device", args.device]
    common += ["--steps", args.steps] if args.steps else []
    _run(["flatness", str(ckpt), "--split", "test", "--out", str(folder), *common])
    _run(["flatness", str(ckpt), "--split", "train", "--out", str(folder / "train"), *common])
    test = json.loads((folder / "flatness.json").read_text())
    train = json.loads((folder / "train" / "flatness.json").read_text())
    t, tr = test["average"], train["average"]
    return {"name": name, "train_robust_loss": tr["robust_loss"], "test_robust_loss": t["robust_loss"],
            "train_robust_accuracy": tr["robust_accuracy"], "test_robust_accuracy": t["robust_accuracy"],
            "robust_loss_gap": t["robust_loss"] - tr["robust_loss"],
            "average_flatness": t["average_flatness"], "worst_flatness": test["worst"]["worst_flatness"]}


def correlations(rows: list[dict]) -> dict:
    """Spearman rank correlation of each flatness with the robust loss gap (3 or more models)."""
    if len(rows) < 3:
        return {}
    from scipy.stats import spearmanr

    gap = [r["robust_loss_gap"] for r in rows]
    out = {}
    for key in ("average_flatness", "worst_flatness"):
        res = spearmanr([r[key] for r in rows], gap)
        out[key] = {"spearman": float(res.statistic), "p": float(res.pvalue), "models": len(rows)}
    return out


def table(rows: list[dict], corr: dict, args: argparse.Namespace) -> str:
    lines = [f"Flatness of {len(rows)} RobustBench models ({args.data}, {args.threat}; {args.n} test and {args.n} training images; "
             "written by tools/robustbench_flatness.py)", "",
             "| model | robust loss train | robust loss test | gap (test - train) | robust acc. train | robust acc. test "
             "| average-case flatness | worst-case flatness |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['name']} | {r['train_robust_loss']:.4f} | {r['test_robust_loss']:.4f} | {r['robust_loss_gap']:+.4f} | "
                     f"{100 * r['train_robust_accuracy']:.1f}% | {100 * r['test_robust_accuracy']:.1f}% | {r['average_flatness']:.4f} | "
                     f"{r['worst_flatness']:.4f} |")
    for key, c in corr.items():
        lines.append(f"\nSpearman rank correlation of {key.replace('_', ' ')} with the gap: {c['spearman']:+.2f} "
                     f"(p = {c['p']:.2g}, {c['models']} models)")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    names = [n[len(PREFIX):] if n.startswith(PREFIX) else n for n in args.names]
    rows = [measure(args, name) for name in names]
    corr = correlations(rows)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "flatness_table.json").write_text(json.dumps({"rows": rows, "correlations": corr}, indent=2) + "\n")
    text = table(rows, corr, args)
    (out / "flatness_table.md").write_text(text)
    print(text, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
