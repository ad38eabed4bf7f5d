"""Do the speed switches change robust accuracy? fp32 against speed.amp=bf16 and speed.channels_last=on, over seeds.

    python bench/amp_accuracy.py --seeds 0,1,2 --epochs 5 --train-subset 512 --out bench/results/amp_accuracy_digits_cpu.json

Trains recipes/digits_at_awp.yaml with the CLI (`python -m flatrobust train ... --quiet`, exactly what a user
runs) once per (variant, seed), then re-evaluates every final checkpoint (last.pt) the same way, in fp32,
with `flatrobust.evaluate` PGD-20 on the whole digits test split, so that only the training differs. A
switch is "within seed noise" when the difference of the means is at most two standard errors of that
difference. The run's own per-epoch number (PGD-20 under the run's forward, i.e. under bf16 autocast for
the bf16 runs) and the training seconds per epoch are reported too: on a CPU without bf16 matrix units,
bf16 autocast is slower than fp32, which is why the default is a small subset for few epochs.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

# name -> CLI overrides. 'off'/'on' are quoted because the override parser reads bare off/on as YAML
# booleans (speed.amp=off is rejected as 'False' by flatrobust 0.1.0's config).
VARIANTS = {
    "fp32": ["speed.amp='off'", "speed.channels_last='off'"],
    "bf16": ["speed.amp=bf16", "speed.channels_last='off'"],
    "channels_last": ["speed.amp='off'", "speed.channels_last='on'"],
    "bf16+channels_last": ["speed.amp=bf16", "speed.channels_last='on'"],
}


def train(recipe: str, variant: str, seed: int, args, out_dir: Path) -> Path:
    name = f"{variant.replace('+', '_')}_s{seed}"
    cmd = [sys.executable, "-m", "flatrobust", "train", recipe, f"seed={seed}", f"epochs={args.epochs}",
           f"data.train_subset={args.train_subset}", "device=cpu", f"out_dir={out_dir}", f"name={name}",
           "awp.warmup=0",  # AWP in every epoch, as when docs/PERFORMANCE.md's table was measured (the recipe now warms up 5)
           *VARIANTS[variant], *args.override, "--overwrite", "--quiet"]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, env=env, cwd=common.ROOT)
    print(f"{variant} seed {seed}: {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    return out_dir / name


def speed_check(variants: list[str], rounds: int) -> dict[str, float]:
    """Median seconds of one AT-AWP SmallCNN step (batch 128, 1x8x8) per variant, timed interleaved."""
    from flatrobust import AWP, models
    from flatrobust.objectives import AttackConfig, create_objective
    from flatrobust.speed import accelerate
    from flatrobust.train import train_step

    g = torch.Generator().manual_seed(0)
    x, y = torch.rand((128, 1, 8, 8), generator=g), torch.randint(0, 10, (128,), generator=g)
    objective = create_objective("at", AttackConfig(eps=0.2, alpha=0.05, steps=10))
    steps = {}
    for v in variants:
        opts = {k: val.strip("'") for k, val in (o.split("=") for o in VARIANTS[v])}
        torch.manual_seed(0)
        model = models.create("smallcnn", num_classes=10, in_channels=1)
        fwd = accelerate(model, torch.device("cpu"), amp=opts["speed.amp"], channels_last=opts["speed.channels_last"])
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        awp = AWP(fwd, gamma=0.01)
        steps[v] = lambda fwd=fwd, opt=opt, awp=awp: train_step(fwd, objective, opt, x, y, awp=awp, generator=g)
    times = common.interleaved(steps, device=torch.device("cpu"), warmup=1, repeats=rounds)
    return {v: common.median(t["wall"]) for v, t in times.items()}


def fp32_pgd20(run_dir: Path) -> float:
    """PGD-20 accuracy of the run's last.pt on the whole digits test split, fp32, eval mode, seed 0."""
    from flatrobust.checkpoint import model_from_checkpoint
    from flatrobust.data import load_dataset
    from flatrobust.evaluate import evaluate

    model, state = model_from_checkpoint(run_dir / "last.pt")
    a = state["config"]["attack"]
    test = load_dataset("digits", "test")
    r = evaluate(model, test.x, test.y, norm=a["norm"], eps=a["eps"], alpha=a["alpha"], attacks=["pgd20"], checks=False,
                 progress=False, seed=0)
    return r["attacks"]["pgd20"]["accuracy"]


def mean_std(xs: list[float]) -> tuple[float, float]:
    return statistics.mean(xs), statistics.stdev(xs) if len(xs) > 1 else 0.0


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 2)[2])
    p.add_argument("--recipe", default="recipes/digits_at_awp.yaml")
    p.add_argument("--variants", default="fp32,bf16,channels_last", help=f"comma-separated, from {', '.join(VARIANTS)}")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--train-subset", type=int, default=512, help="training images (0 = the whole split)")
    p.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of every training run")
    p.add_argument("--override", action="append", default=[], help="extra key=value for every run (repeatable)")
    p.add_argument("--speed-rounds", type=int, default=5, help="interleaved rounds of the step-time check (0: skip)")
    p.add_argument("--jobs", type=int, default=1, help="training runs at a time (each with --threads threads)")
    p.add_argument("--runs-dir", default=None, help="where the runs go (default: a temporary folder, deleted)")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    if any(v not in VARIANTS for v in variants):
        p.error(f"unknown variant in {variants}: choose from {', '.join(VARIANTS)}")
    seeds = [int(s) for s in args.seeds.split(",")]
    torch.set_num_threads(args.threads)
    tmp = tempfile.TemporaryDirectory(prefix="amp_accuracy_") if args.runs_dir is None else None
    out_dir = Path(args.runs_dir or tmp.name)
    speed = speed_check(variants, args.speed_rounds) if args.speed_rounds > 0 else {}
    if speed:
        print("AT-AWP step, SmallCNN batch 128, median s: " + ", ".join(f"{v} {t:.3f}" for v, t in speed.items()), file=sys.stderr)
    # seeds outer, variants inner: machine drift spreads over all variants alike
    jobs = [(v, seed) for seed in seeds for v in variants]
    with concurrent.futures.ThreadPoolExecutor(max_workers=args.jobs) as pool:
        dirs = list(pool.map(lambda job: train(args.recipe, job[0], job[1], args, out_dir), jobs))
    runs: dict[str, list[dict]] = {v: [] for v in variants}
    for (v, seed), run_dir in zip(jobs, dirs):
        history = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines() if ln.strip()]
        last = history[-1]
        runs[v].append({"seed": seed, "fp32_pgd20": fp32_pgd20(run_dir), "run_pgd20": last["test_robust_acc"],
                        "run_clean": last["test_clean_acc"],
                        "train_s_per_epoch": statistics.median(r["epoch_time_s"] for r in history)})
    if tmp is not None:
        tmp.cleanup()
    env = common.environment(torch.device("cpu"))
    env["torch_threads"] = args.threads
    res = {"env": env, "config": {"recipe": args.recipe, "epochs": args.epochs, "train_subset": args.train_subset,
           "seeds": seeds, "overrides": args.override, "threads": args.threads, "jobs": args.jobs},
           "step_s": speed, "runs": runs, "summary": {}}
    base = runs.get("fp32")
    rows = []
    for v, rs in runs.items():
        acc, run_acc, clean = ([r[k] for r in rs] for k in ("fp32_pgd20", "run_pgd20", "run_clean"))
        secs = [r["train_s_per_epoch"] for r in rs]
        (m, s), (rm, rsd), (cm, csd) = mean_std(acc), mean_std(run_acc), mean_std(clean)
        summ = {"fp32_pgd20_mean": m, "fp32_pgd20_std": s, "run_pgd20_mean": rm, "run_pgd20_std": rsd, "clean_mean": cm,
                "clean_std": csd, "train_s_per_epoch_median": statistics.median(secs)}
        diff = ""
        if base is not None and v != "fp32":
            bm, bs = mean_std([r["fp32_pgd20"] for r in base])
            se = math.sqrt(s**2 / len(rs) + bs**2 / len(base))
            summ["diff_vs_fp32"], summ["two_standard_errors"] = m - bm, 2 * se
            summ["within_seed_noise"] = abs(m - bm) <= 2 * se
            summ["time_vs_fp32"] = statistics.median(secs) / statistics.median(r["train_s_per_epoch"] for r in base)
            diff = (f"{100 * (m - bm):+.1f} (2 SE {100 * 2 * se:.1f}): {'within' if summ['within_seed_noise'] else 'BEYOND'} seed noise")
        res["summary"][v] = summ
        step = f"{speed[v]:.3f} ({speed[v] / speed['fp32']:.2f}x)" if v in speed and "fp32" in speed else ""
        rows.append([v, str(len(rs)), f"{100 * m:.1f} ± {100 * s:.1f}", diff, f"{100 * rm:.1f} ± {100 * rsd:.1f}",
                     f"{100 * cm:.1f} ± {100 * csd:.1f}", f"{statistics.median(secs):.1f}",
                     f"{summ['time_vs_fp32']:.2f}x" if "time_vs_fp32" in summ else "1.00x", step])
    print(f"## speed switches vs robust accuracy: {args.recipe}, epochs={args.epochs}, data.train_subset={args.train_subset}, "
          f"seeds {seeds}, cpu: {env['cpu']} ({env['cpu_capability']}), {args.threads} thread(s), torch {env['torch']}, {env['date']}\n"
          f"command: `{env['command']}`\n")
    print(common.markdown_table(["variant", "seeds", "test PGD-20 % (fp32 re-eval, mean ± std)", "vs fp32, points",
                                 "test PGD-20 % (run's own forward)", "test clean %", "train s/epoch (median)", "time vs fp32",
                                 "AT-AWP step s, interleaved check (vs fp32)"], rows))
    common.write_json(args.out, res)
    return res


if __name__ == "__main__":
    main()
