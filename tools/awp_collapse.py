"""The measurements behind docs/AWP_COLLAPSE.md: why AT-AWP from the first step can leave SmallCNN at one class.

Replays `flatrobust train`'s batches, augmentation and attack noise exactly (same `build`, per-epoch generators,
learning rate per step and `train_step` calls as `fit`), so its numbers belong to the same trajectory as the
CLI run with the same recipe and overrides. Three modes:

    python tools/awp_collapse.py init [key=value ...]
        SmallCNN at initialization: how input-independent fc1's input, fc1 and the logits are.
    python tools/awp_collapse.py steps [key=value ...] --epochs 4 [--measure-gamma G] [--out steps.json]
        per step: losses at w and at w + v, per-layer ||w||, ||v||, ascent and training gradient norms, BatchNorm
        parameters and running statistics, live ReLU shares per layer, logit spread. With AWP off (warm-up
        epochs), --measure-gamma G computes and measures the perturbation of size G at every step without
        training at it (perturb, measure, restore: the weights then differ from plain AT in the last bits).
    python tools/awp_collapse.py outcome [key=value ...] --epochs 6 [--only NAME,...]
        per epoch: test clean accuracy (eval mode), distinct predicted classes, share of fc1 units live on at
        least one test image, top predicted-class share; --only restricts AWP to the named weights
        (conv1, conv2, conv3, fc1, fc2).

The recipe is recipes/digits_at_awp.yaml unless --recipe says otherwise. Run with OMP_NUM_THREADS=1: the thread
count changes the floating-point trajectory.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from flatrobust.awp import AWP, perturbed_parameters  # noqa: E402
from flatrobust.config import load_config  # noqa: E402
from flatrobust.data import augment  # noqa: E402
from flatrobust.models.smallcnn import SmallCNN  # noqa: E402
from flatrobust.modes import frozen_bn_stats, train_mode  # noqa: E402
from flatrobust.train import EpochPlan, build, train_step  # noqa: E402

LAYERS = ("bn1", "bn2", "bn3", "fc1")  # outputs that feed a ReLU


def _smallcnn(model) -> SmallCNN:
    nets = [m for m in model.modules() if isinstance(m, SmallCNN)]
    if not nets:
        raise SystemExit("tools/awp_collapse.py measures SmallCNN's layers: use a recipe with model: smallcnn")
    return nets[0]


class Taps:
    """Forward hooks on the inputs of SmallCNN's ReLUs (and fc1's input), recording only when switched on."""

    def __init__(self, cnn: SmallCNN):
        self.on, self.out = False, {}
        for name in LAYERS:
            getattr(cnn, name).register_forward_hook(self._hook(name))
        cnn.fc1.register_forward_hook(lambda m, i, o: self.out.__setitem__("fc1_in", i[0].detach()) if self.on else None)

    def _hook(self, name):
        def hook(module, inputs, output):
            if self.on:
                self.out[name] = output.detach()
        return hook

    def forward(self, model, x, *, train: bool = True):
        self.on = True
        try:
            with train_mode(model, train), frozen_bn_stats(model), torch.no_grad():
                return model(x)
        finally:
            self.on = False


def _batch_stats(taps: Taps, model, x, y, tag: str) -> dict:
    logits = taps.forward(model, x)
    d = {f"{tag}_loss": F.cross_entropy(logits, y).item(), f"{tag}_acc": (logits.argmax(1) == y).float().mean().item(),
         f"{tag}_logit_spread": logits.std(0).mean().item(), f"{tag}_classes": int(logits.argmax(1).unique().numel())}
    for name in LAYERS:
        o = taps.out[name]
        dims = [0, 2, 3] if o.dim() == 4 else [0]
        d[f"{tag}_{name}_positive"] = (o > 0).float().mean().item()  # share of positive ReLU inputs
        d[f"{tag}_{name}_off"] = 1 - (o > 0).float().amax(dim=dims).mean().item()  # units off on the whole batch
    return d


def _setup(args):
    cfg = load_config(args.recipe, args.overrides)
    if cfg.attack.kind != "pgd":  # its loop is fit's for one SGD step per batch after a PGD attack
        raise SystemExit(f"awp_collapse.py measures PGD training (attack.kind=pgd), not attack.kind={cfg.attack.kind}")
    run = build(cfg)
    return cfg, run, _smallcnn(run.model)


def cmd_init(args) -> None:
    cfg, run, cnn = _setup(args)
    taps = Taps(cnn)
    logits = taps.forward(run.model, run.train.x[:128])
    h, z = taps.out["fc1_in"], taps.out["fc1"]
    print(json.dumps({
        "seed": cfg.seed, "fc1_input_mean": h.mean().item(),
        "fc1_input_rel_spread": (h.std(0) / h.mean(0)).mean().item(),  # per feature: std over images / mean
        "fc1_preact_std_over_images": z.std(0).mean().item(), "fc1_preact_abs_mean": z.mean(0).abs().mean().item(),
        "fc1_on_for_all": (z > 0).all(0).float().mean().item(), "fc1_off_for_all": (z <= 0).all(0).float().mean().item(),
        "logit_spread": logits.std(0).mean().item(),
    }))


def _awp_for(run, cfg, only: str) -> AWP | None:
    if not only:
        return run.awp
    named = dict(run.model.named_parameters())
    chosen = []
    for short in only.split(","):
        hits = [p for n, p in named.items() if n.endswith(f"{short}.weight")]
        if len(hits) != 1:
            raise SystemExit(f"--only: no single weight named {short!r}")
        chosen += hits
    return AWP(run.model, gamma=cfg.awp.gamma, params=chosen)


def _epochs(args, cfg, run, awp, on_step, on_epoch) -> None:
    """fit's loop without evaluation and files: the same epoch plan (batches, noise, lr per step) and train_step."""
    plan = EpochPlan.of(run)
    for epoch in range(args.epochs):
        order, noise = plan.generators(epoch, run.device)
        awp_on = awp is not None and epoch >= cfg.awp.warmup
        sums = [0.0, 0.0, 0]
        for b, idx in enumerate(plan.index_batches(order, run.train.x.device)):
            for g in run.optimizer.param_groups:
                g["lr"] = plan.lr(plan.step(epoch, b))
            x, y = augment(run.train.x[idx], generator=noise, **plan.augment), run.train.y[idx]
            loss, correct = on_step(epoch, plan.step(epoch, b) + 1, x, y, noise, awp if awp_on else None)
            sums[0] += loss * len(y)
            sums[1] += correct
            sums[2] += len(y)
        on_epoch(epoch, sums[0] / sums[2], sums[1] / sums[2])


def cmd_steps(args) -> None:
    cfg, run, cnn = _setup(args)
    model, obj, opt = run.model, run.objective, run.optimizer
    awp = _awp_for(run, cfg, args.only)
    taps = Taps(cnn)
    weights = perturbed_parameters(model)
    rows = []

    def step(epoch, step_no, x, y, noise, awp_now):
        r = {"epoch": epoch + 1, "step": step_no}
        r.update({f"w_{n}": p.norm().item() for n, p in weights})
        x_adv = obj.attack(model, x, y, generator=noise)  # as train_step: the attack at w, from the epoch's noise
        r.update(_batch_stats(taps, model, x, y, "clean_w"))
        r.update(_batch_stats(taps, model, x_adv, y, "adv_w"))
        measure = awp_now or (AWP(model, gamma=args.measure_gamma) if args.measure_gamma > 0 else None)
        if measure is not None:
            with train_mode(model, True), frozen_bn_stats(model):
                grads = torch.autograd.grad(obj.ascent_loss(model, x, x_adv, y), measure.params)
            r.update({f"ascent_grad_{n}": g.norm().item() for n, g in zip(measure.names, grads)})
            measure.perturb(lambda m: obj.ascent_loss(m, x, x_adv, y))
            r.update({f"v_{n}": v.norm().item() for n, v in zip(measure.names, measure.perturbation())})
            r.update(_batch_stats(taps, model, x_adv, y, "adv_wv"))
            if awp_now is None:
                measure.restore()  # measured only: the step below is plain AT
        model.train()
        loss, logits = obj.loss_and_logits(model, x, x_adv, y)  # the rest of train_step, at w (+ v)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        r.update({f"grad_{n}": p.grad.norm().item() for n, p in model.named_parameters() if p.grad is not None})
        opt.step()
        if awp_now is not None:
            awp_now.restore()
        r["train_loss"] = loss.item()
        for name in ("bn1", "bn2", "bn3"):
            bn = getattr(cnn, name)
            r.update({f"{name}_weight_mean": bn.weight.mean().item(), f"{name}_bias_mean": bn.bias.mean().item(),
                      f"{name}_running_var_mean": bn.running_var.mean().item(),
                      f"{name}_running_mean_abs": bn.running_mean.abs().mean().item()})
        r["fc1_bias_mean"] = cnn.fc1.bias.mean().item()
        rows.append(r)
        return loss.item(), (logits.argmax(1) == y).sum().item()

    def epoch_end(epoch, train_loss, batch_adv_acc):
        model.eval()
        with torch.no_grad():
            clean = (model(run.eval_test.x).argmax(1) == run.eval_test.y).float().mean().item()
        row = {"epoch_end": epoch + 1, "train_loss": train_loss, "train_batch_adv_acc": batch_adv_acc, "test_clean_acc": clean}
        rows.append(row)
        print(json.dumps(row), flush=True)

    _epochs(args, cfg, run, awp, step, epoch_end)
    if args.out:
        Path(args.out).write_text(json.dumps(rows))


def cmd_outcome(args) -> None:
    cfg, run, cnn = _setup(args)
    awp = _awp_for(run, cfg, args.only)
    taps = Taps(cnn)
    per_epoch = []

    def step(epoch, step_no, x, y, noise, awp_now):
        result = train_step(run.model, run.objective, run.optimizer, x, y, awp=awp_now, generator=noise)
        return result.loss.item(), result.correct.item()

    def epoch_end(epoch, train_loss, batch_adv_acc):
        logits = taps.forward(run.model, run.eval_test.x, train=False)
        pred = logits.argmax(1)
        per_epoch.append({
            "epoch": epoch + 1, "train_loss": round(train_loss, 4),
            "test_clean_acc": round((pred == run.eval_test.y).float().mean().item(), 3),
            "classes": int(pred.unique().numel()),
            "fc1_live": round((taps.out["fc1"] > 0).any(0).float().mean().item(), 2),
            "top_class_share": round(torch.bincount(pred).max().item() / len(pred), 3)})

    _epochs(args, cfg, run, awp, step, epoch_end)
    print(json.dumps({"overrides": args.overrides, "only": args.only, "epochs": per_epoch}), flush=True)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("mode", choices=["init", "steps", "outcome"])
    ap.add_argument("overrides", nargs="*", help="config overrides, e.g. seed=1 awp.warmup=0")
    ap.add_argument("--recipe", default=str(ROOT / "recipes" / "digits_at_awp.yaml"))
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--only", default="", help="perturb only these weights: conv1,conv2,conv3,fc1,fc2")
    ap.add_argument("--measure-gamma", type=float, default=0.0)
    ap.add_argument("--out", default="")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    {"init": cmd_init, "steps": cmd_steps, "outcome": cmd_outcome}[args.mode](args)


if __name__ == "__main__":
    main()
