"""Evaluation throughput: PGD-20 images/s and AutoAttack (standard) seconds on a fixed small digits subset.

    python bench/eval_throughput.py --n 100 --threads 1 --out bench/results/eval_throughput_digits_cpu.json
    python bench/eval_throughput.py --checkpoint runs/digits_at_awp/best.pt --n 100

Both attacks run through `flatrobust.evaluate.evaluate` (the library path behind `flatrobust eval`), in
eval mode, L-inf eps 0.2 step 0.05 (the digits recipes' threat model; 8/255 is no threat on 17 grey
levels). AutoAttack's time depends on how many points are still robust after each stage, so it is only
meaningful on a robust model: without --checkpoint a SmallCNN is first adversarially trained (AT-AWP,
--train-epochs epochs) on the digits training split, which takes about ten seconds per epoch on one CPU
thread. PGD-20 is timed --repeats times (median); AutoAttack once (it is slow on a CPU).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

from flatrobust import AWP, models  # noqa: E402
from flatrobust.data import DATASETS, load_dataset  # noqa: E402
from flatrobust.objectives import AttackConfig, create_objective  # noqa: E402
from flatrobust.train import train_step  # noqa: E402

EPS, ALPHA = 0.2, 0.05  # recipes/digits_*.yaml


def quick_model(epochs: int, device: torch.device) -> torch.nn.Module:
    """SmallCNN adversarially trained (AT-AWP, PGD-10 eps 0.2, gamma 0.01, SGD 0.05) on the digits train split."""
    info = DATASETS["digits"]
    train = load_dataset("digits", "train").to(device)
    torch.manual_seed(0)
    model = models.create("smallcnn", num_classes=10, in_channels=1, mean=info.mean, std=info.std).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    objective = create_objective("at", AttackConfig(eps=EPS, alpha=ALPHA, steps=10))
    awp, g = AWP(model, gamma=0.01), torch.Generator(device=device).manual_seed(0)
    for _ in range(epochs):
        for idx in torch.randperm(len(train), generator=torch.Generator().manual_seed(_)).split(128):
            train_step(model, objective, opt, train.x[idx], train.y[idx], awp=awp, generator=g)
    return model.eval()


def _stage(name: str, st) -> str:
    """'apgd-ce 40% (3.1 s)': accuracy after a stage (evaluate gives a float, or a dict with its seconds)."""
    if isinstance(st, dict):
        return f"{name} {100 * st['accuracy']:.0f}%" + (f" ({st['seconds']:.1f} s)" if "seconds" in st else "")
    return f"{name} {100 * st:.0f}%"


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 2)[2])
    p.add_argument("--checkpoint", default=None, help="a digits run's best.pt/last.pt (default: train a SmallCNN first)")
    p.add_argument("--train-epochs", type=int, default=10, help="epochs of the quick AT-AWP model (without --checkpoint)")
    p.add_argument("--n", type=int, default=100, help="test images (a fixed subset of the digits test split)")
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--attacks", default="pgd20,autoattack", help="comma-separated attacks of flatrobust.evaluate")
    p.add_argument("--repeats", type=int, default=5, help="timed runs of every attack but autoattack (median)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    common.set_threads(args.threads)
    device = common.resolve_device(args.device)
    from flatrobust.evaluate import evaluate

    t0 = time.perf_counter()
    if args.checkpoint:
        from flatrobust.checkpoint import model_from_checkpoint

        model, _ = model_from_checkpoint(args.checkpoint, device=device)
        source = args.checkpoint
    else:
        model = quick_model(args.train_epochs, device)
        source = f"SmallCNN, AT-AWP {args.train_epochs} epochs on digits (bench/eval_throughput.py quick_model)"
    train_s = time.perf_counter() - t0
    test = load_dataset("digits", "test").subset(args.n, seed=0)
    names = [a.strip() for a in args.attacks.split(",") if a.strip()]
    res = {"env": common.environment(device), "config": {"model": source, "n": len(test), "batch_size": args.batch_size,
           "norm": "linf", "eps": EPS, "alpha": ALPHA, "repeats": args.repeats}, "model_seconds": train_s, "attacks": {}}
    clean = evaluate(model, test.x, test.y, norm="linf", eps=EPS, alpha=ALPHA, attacks=["clean"], checks=False, progress=False,
                     device=device)
    res["clean_accuracy"] = clean["attacks"]["clean"]["accuracy"]
    for name in names:
        runs = []
        for _ in range(1 if name == "autoattack" else args.repeats):
            r = evaluate(model, test.x, test.y, norm="linf", eps=EPS, alpha=ALPHA, attacks=[name], batch_size=args.batch_size,
                         checks=False, progress=False, device=device)["attacks"][name]
            runs.append(r)
        secs = [r["seconds"] for r in runs]
        med = common.median(secs)
        res["attacks"][name] = {"accuracy": runs[0]["accuracy"], "median_seconds": med, "images_per_s": len(test) / med,
                                "seconds_per_run": secs, "stages": runs[0].get("stages"), "params": runs[0]["params"]}
    e = res["env"]
    print(f"## evaluation throughput: {len(test)} digits test images, L-inf eps {EPS}, {e['device']}: {e['cpu']} "
          f"({e['cpu_capability']}), {e['torch_threads']} thread(s), torch {e['torch']}, {e['date']}\n"
          f"model: {source}; clean accuracy {100 * res['clean_accuracy']:.1f}%\ncommand: `{e['command']}`\n")
    rows = []
    for name, r in res["attacks"].items():
        stages = ", ".join(_stage(k, v) for k, v in (r["stages"] or {}).items())
        rows.append([name, f"{100 * r['accuracy']:.1f}%", f"{r['median_seconds']:.2f}", f"{r['images_per_s']:.1f}",
                     str(len(r["seconds_per_run"])), stages])
    print(common.markdown_table(["attack", "robust accuracy", "seconds (median)", "images/s", "runs", "accuracy after each stage"], rows))
    common.write_json(args.out, res)
    return res


if __name__ == "__main__":
    main()
