"""Everything a GPU must confirm, in one command: correctness on the device, speed against the targets, real
training through the CLI, and DDP on NCCL. Writes OUT/device_check.json and OUT/device_check.md.

    python bench/device_check.py --out OUT --data-root data     # on a GPU machine (sized for ~6 min on one H100)
    python bench/device_check.py --quick --out /tmp/dc          # CPU, tiny shapes, the same code paths (tests run it)

Sections (each records its checks as {name, value, tolerance, passed}; a section that cannot run says why):

1. correctness: one AT-AWP and one TRADES-AWP step (`flatrobust.train.train_step`) on the device in float64
   equals the same step on the CPU in float64 (relative 1e-9; the attacks' random starts drawn on the CPU
   for both, so that only the arithmetic differs); one AT-AWP step in channels_last fp32 and in bf16 autocast
   + channels_last agrees with the fp32 step (tolerances below, TF32 off for the fp32 reference); `AWP.perturb`
   leaves BatchNorm statistics and every `.grad` untouched (fp32 and bf16 + channels_last); no host
   synchronization in AT/TRADES/MART steps with and without AWP (`torch.cuda.set_sync_debug_mode("error")`);
   training with the data in pinned host memory (`data.on_device=off`) equals training with it on the device.
2. training: `flatrobust train` of PreActResNet-18 AT and AT-AWP for a few epochs on Fashion-MNIST (its four
   idx files under DATA_ROOT/FashionMNIST/raw, carried with the command), per-epoch time, then
   `flatrobust eval --attacks clean,pgd20` on each best.pt: the whole CLI path on the device.
3. speed: images/s of AT, AT-AWP, TRADES-AWP and the official AT-AWP procedure (`flatrobust.reference`), timed
   interleaved (bench/common.py) per model/batch/mode: PreActResNet-18 b128 and b512, WRN-34-10 b128, in fp32
   eager, bf16 autocast + channels_last, and + torch.compile (the compiled mode leaves out the official
   procedure, whose proxy is a deep copy of the model, and runs where the time budget allows); the attack
   (AT's PGD-10) timed alone gives its share of the step; peak memory of one step of each. Targets (issue 12):
   PreActResNet-18 AT-AWP >= 10,000 images/s, >= 3x the official fp32 eager step, AT-AWP / AT <= 1.13.
4. ddp (2 or more GPUs visible, or `--ddp` on the CPU with gloo): a few AT-AWP steps of a BatchNorm-free
   network under torchrun (NCCL on CUDA) equal the same steps in one process, each rank's shard attacked with
   that rank's noise and the losses averaged over the shards (what DDP's gradient averaging computes).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
import step_time  # noqa: E402

from flatrobust import AWP, create_objective, models  # noqa: E402
from flatrobust.guard import StepMonitor  # noqa: E402
from flatrobust.objectives import AttackConfig  # noqa: E402
from flatrobust.speed import accelerate  # noqa: E402
from flatrobust.train import train_step  # noqa: E402

REL_FLOAT64 = 1e-9
# Agreement of a whole AT-AWP step with the fp32 (TF32 off) step: (logits, loss, 1 - cosine of the updates).
# channels_last changes only the order of summation; bf16 keeps 8 bits of mantissa (about 0.4% per rounding).
TOL_CHANNELS_LAST = (1e-4, 1e-4, 1e-4)
TOL_BF16 = (5e-2, 5e-2, 5e-2)
TARGETS = {"images_per_s": 10_000, "vs_official_fp32": 3.0, "awp_over_at": 1.13}
SECTIONS = ("correctness", "data_placement", "training", "speed", "ddp")
SPEED_METHODS = ["at", "at_awp", "trades_awp", "official_at_awp"]
MODES = {  # name -> (amp, channels_last, compile)
    "fp32 eager": ("off", "off", False),
    "bf16 + channels_last": ("bf16", "on", False),
    "bf16 + channels_last + compile": ("bf16", "on", True),
}


def check(name: str, value, tolerance: str, passed: bool) -> dict:
    return {"name": name, "value": value, "tolerance": tolerance, "passed": bool(passed)}


def _log(msg: str) -> None:
    print(f"[device_check {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------- correctness


@contextlib.contextmanager
def host_noise(seed: int):
    """torch.rand/randn (the attacks' random starts) drawn from one CPU generator, then moved to the
    requested device: the same noise on every device, so a CPU and a GPU step can be compared."""
    g = torch.Generator().manual_seed(seed)
    rand, randn = torch.rand, torch.randn

    def on_host(fn):
        def drawn(*size, generator=None, device=None, dtype=None, **kwargs):
            out = fn(*size, generator=g, dtype=dtype, **kwargs)
            return out.to(device) if device is not None else out
        return drawn

    torch.rand, torch.randn = on_host(rand), on_host(randn)
    try:
        yield
    finally:
        torch.rand, torch.randn = rand, randn


def _state(model: nn.Module, opt: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    out = {k: v.detach().double().cpu() for k, v in model.state_dict().items() if v.is_floating_point()}
    for i, s in enumerate(opt.state.values()):
        out[f"momentum.{i}"] = s["momentum_buffer"].double().cpu()
    return out


def _rel(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """Largest |a - b| relative to the largest |b|, over every tensor."""
    return max(float((a[k] - b[k]).abs().max()) / max(float(b[k].abs().max()), 1e-30) for k in b)


def _problem(quick: bool, dtype: torch.dtype, batch: int):
    name, shape = ("smallcnn", (1, 8, 8)) if quick else ("preactresnet18", (3, 32, 32))
    torch.manual_seed(0)
    model = models.create(name, num_classes=10, in_channels=shape[0]).to(dtype)
    g = torch.Generator().manual_seed(1)
    x = torch.rand((batch, *shape), generator=g, dtype=dtype)
    y = torch.randint(0, 10, (batch,), generator=g)
    return model, x, y


def _one_step(method: str, gamma: float, device: torch.device, dtype: torch.dtype, quick: bool, *, amp="off", cl="off",
              batch: int = 8, steps: int = 2):
    """(state after one step, loss, logits before it) of one AWP step on `device` with host-drawn noise."""
    model, x, y = _problem(quick, dtype, batch)
    model, x, y = model.to(device), x.to(device), y.to(device)
    fwd = accelerate(model, device, amp=amp, channels_last=cl)
    with torch.no_grad():
        logits = fwd.eval()(x).double().cpu()
    objective = create_objective(method, AttackConfig(eps=8 / 255, alpha=2 / 255, steps=steps))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    with host_noise(2):
        r = train_step(fwd, objective, opt, x, y, awp=AWP(fwd, gamma=gamma))
    return _state(model, opt), float(r.loss), logits


def correctness(device: torch.device, quick: bool) -> dict:
    checks = []
    for method, gamma, label in (("at", 0.01, "AT-AWP"), ("trades", 0.005, "TRADES-AWP")):
        ref, ref_loss, _ = _one_step(method, gamma, torch.device("cpu"), torch.float64, quick)
        got, loss, _ = _one_step(method, gamma, device, torch.float64, quick)
        rel = _rel(got, ref)
        checks.append(check(f"{label} step, {device.type} float64 vs CPU float64: weights, BN statistics, momentum "
                            f"(max rel. diff; loss {loss:.10g} vs {ref_loss:.10g})", rel, f"<= {REL_FLOAT64:g}", rel <= REL_FLOAT64))

    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False  # a true fp32 reference
    try:
        model, _, _ = _problem(quick, torch.float32, 8)
        w0 = {k: v.double() for k, v in _state(model, torch.optim.SGD(model.parameters(), lr=0.1)).items()}
        base, base_loss, base_logits = _one_step("at", 0.01, device, torch.float32, quick, batch=32)
        upd_base = torch.cat([(base[k] - w0[k]).flatten() for k in w0])
        for label, amp, cl, tol in (("channels_last fp32", "off", "on", TOL_CHANNELS_LAST),
                                    ("bf16 autocast + channels_last", "bf16", "on", TOL_BF16)):
            st, loss, logits = _one_step("at", 0.01, device, torch.float32, quick, amp=amp, cl=cl, batch=32)
            upd = torch.cat([(st[k] - w0[k]).flatten() for k in w0])
            d_logits = float((logits - base_logits).abs().max() / base_logits.abs().max())
            d_loss = abs(loss - base_loss) / abs(base_loss)
            d_cos = 1 - float(F.cosine_similarity(upd, upd_base, dim=0))
            checks.append(check(f"AT-AWP step, {label} vs fp32: logits (max rel. diff)", d_logits, f"<= {tol[0]:g}", d_logits <= tol[0]))
            checks.append(check(f"AT-AWP step, {label} vs fp32: training loss (rel. diff)", d_loss, f"<= {tol[1]:g}", d_loss <= tol[1]))
            checks.append(check(f"AT-AWP step, {label} vs fp32: weight update (1 - cosine)", d_cos, f"<= {tol[2]:g}", d_cos <= tol[2]))
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32

    for label, amp, cl in (("fp32", "off", "off"), ("bf16 + channels_last", "bf16", "on")):
        checks.extend(_perturb_hygiene(device, quick, label, amp, cl))
    checks.extend(_no_host_syncs(device, quick))
    return {"checks": checks}


def _perturb_hygiene(device: torch.device, quick: bool, label: str, amp: str, cl: str) -> list[dict]:
    model, x, y = _problem(quick, torch.float32, 16)
    model, x, y = model.to(device).train(), x.to(device), y.to(device)
    fwd = accelerate(model, device, amp=amp, channels_last=cl)
    F.cross_entropy(fwd(x), y).backward()  # .grad holds something perturb must not touch
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    awp = AWP(fwd, gamma=0.01)
    awp.perturb(lambda m: F.cross_entropy(m(x), y))
    moved = sum(not torch.equal(p, weights[n]) for n, p in model.named_parameters())
    same_grad = all(torch.equal(p.grad, grads[n]) for n, p in model.named_parameters())
    same_bn = all(torch.equal(b, buffers[n]) for n, b in model.named_buffers())
    awp.restore()
    back = max(float((p.detach() - weights[n]).abs().max() / weights[n].abs().max().clamp_min(1e-30)) for n, p in model.named_parameters())
    return [check(f"perturb ({label}): BatchNorm running statistics unchanged", same_bn, "bit-identical", same_bn),
            check(f"perturb ({label}): every .grad unchanged", same_grad, "bit-identical", same_grad),
            check(f"perturb ({label}): weights moved, then restore gives them back (max rel. diff)", back, "<= 1e-6",
                  moved > 0 and back <= 1e-6)]


def _no_host_syncs(device: torch.device, quick: bool) -> list[dict]:
    if device.type != "cuda":
        return [check("no host sync in a training step (torch.cuda.set_sync_debug_mode)", "not applicable on the CPU "
                      "(tests/test_host_syncs.py counts the Python-level reads instead)", "", True)]
    out = []
    for method in ("at", "trades", "mart"):
        for gamma in (0.0, 0.01):
            model, x, y = _problem(quick, torch.float32, 32)
            model, x, y = model.to(device), x.to(device), y.to(device)
            fwd = accelerate(model, device, amp="bf16", channels_last="on")
            objective = create_objective(method, AttackConfig(steps=2))
            opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
            awp = AWP(fwd, gamma=gamma) if gamma else None
            g = torch.Generator(device=device).manual_seed(0)
            monitor = StepMonitor(device)
            monitor.start(0)
            train_step(fwd, objective, opt, x, y, awp=awp, generator=g)  # first step: lazy state, cuDNN plans
            torch.cuda.synchronize(device)
            error = None
            torch.cuda.set_sync_debug_mode("error")
            try:
                for _ in range(3):
                    r = train_step(fwd, objective, opt, x, y, awp=awp, generator=g)
                    monitor.add(r.loss, r.correct, len(y), r.finite, awp.layer_finite if awp is not None else None)
            except RuntimeError as e:
                error = str(e).splitlines()[0]
            finally:
                torch.cuda.set_sync_debug_mode(0)
            name = f"no host sync in 3 {method.upper()}{'-AWP' if gamma else ''} steps (set_sync_debug_mode('error'))"
            out.append(check(name, error or "none", "none", error is None))
    return out


def data_placement(device: torch.device, quick: bool, out_dir: Path) -> dict:
    """fit() with the data on the device and in pinned host memory: the same run."""
    from flatrobust.config import load_config
    from flatrobust.train import fit

    root = Path(__file__).resolve().parents[1]
    finals = {}
    for where in ("on", "off"):
        over = ["awp.warmup=0", "data.train_subset=256", "data.eval_subset=32", "batch_size=64", "attack.steps=2",
                "eval.steps=2", "epochs=1", f"device={device.type}", f"data.on_device={where}", f"out_dir={out_dir}",
                f"name=placement_{where}", "log.interval=2"]
        run = fit(load_config(root / "recipes" / "digits_at_awp.yaml", over), overwrite=True, progress=False)
        finals[where] = torch.load(run / "last.pt", weights_only=True)["model"]
    rel = max(float((finals["off"][k].double() - v.double()).abs().max() / v.double().abs().max().clamp_min(1e-30))
              for k, v in finals["on"].items() if v.is_floating_point())
    return {"checks": [check("digits AT-AWP, 1 epoch: data.on_device=off (pinned, non-blocking) vs on: final weights (max rel. diff)",
                             rel, "<= 1e-5 (0 expected: same batches, same noise)", rel <= 1e-5)]}


# ----------------------------------------------------------------------------------------------------- speed


def speed(device: torch.device, quick: bool, deadline: float, compile_all: bool) -> dict:
    if quick:
        configs = [("smallcnn", 16, (1, 8, 8))]
        modes = {k: v for k, v in MODES.items() if not v[2]}  # CPU compile takes about a minute: left out of --quick
        warmup, repeats, attack_steps = 1, 2, 2
    else:
        configs = [("preactresnet18", 128, (3, 32, 32)), ("preactresnet18", 512, (3, 32, 32)), ("wrn34_10", 128, (3, 32, 32))]
        modes, warmup, repeats, attack_steps = MODES, 2, 5, 10
    rows, skipped, failures = [], [], []
    # As bench/step_time.py: nondeterministic algorithms allowed (fit() in an earlier section turned them on),
    # PyTorch's default TF32 for convolutions in "fp32".
    torch.use_deterministic_algorithms(False)
    for mode, (amp, cl, compiled) in modes.items():
        for model_name, batch, shape in configs:
            if compiled and not compile_all and (model_name, batch) != ("preactresnet18", 128):
                skipped.append(f"{model_name} b{batch} {mode}: compile only for PreActResNet-18 b128 (pass --compile-all)")
                continue
            if time.time() > deadline:
                skipped.append(f"{model_name} b{batch} {mode}: time budget spent")
                continue
            _log(f"speed: {model_name} b{batch} {mode}")
            try:
                rows.append(_time_config(device, model_name, batch, shape, mode, amp, cl, compiled, warmup, repeats, attack_steps))
            except Exception as e:  # noqa: BLE001 - e.g. a compile failure: recorded, the other configurations still run
                skipped.append(f"{model_name} b{batch} {mode}: failed ({type(e).__name__}: {str(e).splitlines()[0][:200]})")
                failures.append(check(f"speed {model_name} b{batch} {mode} ran", f"{type(e).__name__}", "no exception", False))
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return {"rows": rows, "skipped_configs": skipped, "targets": _targets(rows, quick), "checks": failures,
            "settings": {"deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
                         "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32, "matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
                         "cudnn_benchmark": torch.backends.cudnn.benchmark, "warmup": warmup, "repeats": repeats,
                         "attack": f"PGD-{attack_steps} L-inf 8/255 step 2/255"}}


def _time_config(device, model_name, batch, shape, mode, amp, cl, compiled, warmup, repeats, attack_steps) -> dict:
    args = SimpleNamespace(amp=amp, channels_last=cl, compile=compiled, eps=8 / 255, alpha=2 / 255, attack_steps=attack_steps)
    torch.manual_seed(0)
    base = models.create(model_name, num_classes=10, in_channels=shape[0])
    g = torch.Generator().manual_seed(1)
    x = torch.rand((batch, *shape), generator=g).to(device)
    y = torch.randint(0, 10, (batch,), generator=g).to(device)
    names = [m for m in SPEED_METHODS if not (compiled and m.startswith("official"))]
    methods = {m: step_time.Method(m, base, args, x, y, device) for m in names}
    at = methods["at"]
    fns = {m: methods[m].step for m in names}
    fns["attack"] = lambda: at.objective.attack(at.forward, x, y, generator=at.generator)
    t0 = time.time()
    times = common.interleaved(fns, device=device, warmup=warmup, repeats=repeats)
    med = {m: common.median(t["wall"]) for m, t in times.items()}
    row = {"model": model_name, "batch": batch, "mode": mode, "seconds": round(time.time() - t0, 1),
           "images_per_s": {m: batch / med[m] for m in names}, "median_s_per_step": {m: med[m] for m in fns},
           "awp_over_at": common.ratio_stats(times["at_awp"]["wall"], times["at"]["wall"])["median"],
           "attack_share_of_at": common.ratio_stats(times["attack"]["wall"], times["at"]["wall"])["median"],
           "attack_share_of_at_awp": common.ratio_stats(times["attack"]["wall"], times["at_awp"]["wall"])["median"],
           "peak_memory_bytes": {}}
    if "official_at_awp" in times:
        row["official_over_at_awp"] = common.ratio_stats(times["official_at_awp"]["wall"], times["at_awp"]["wall"])["median"]
    for m, meth in methods.items():
        row["peak_memory_bytes"][m] = common.peak_bytes(meth.step_with_fresh_helper, device)[0]
    return row


def _targets(rows: list[dict], quick: bool) -> list[dict]:
    prn = [r for r in rows if r["model"] == ("smallcnn" if quick else "preactresnet18")]
    if not prn:
        return []
    best = max(prn, key=lambda r: r["images_per_s"]["at_awp"])
    out = [check(f"{best['model']} AT-AWP images/s (best: b{best['batch']}, {best['mode']})", best["images_per_s"]["at_awp"],
                 f">= {TARGETS['images_per_s']:,}", best["images_per_s"]["at_awp"] >= TARGETS["images_per_s"])]
    official = [r for r in prn if r["mode"] == "fp32 eager" and r["batch"] == best["batch"] and "official_at_awp" in r["images_per_s"]]
    if official:
        speedup = best["images_per_s"]["at_awp"] / official[0]["images_per_s"]["official_at_awp"]
        out.append(check(f"AT-AWP (b{best['batch']}, {best['mode']}) / official AT-AWP (fp32 eager), images/s", speedup,
                         f">= {TARGETS['vs_official_fp32']}", speedup >= TARGETS["vs_official_fp32"]))
    for r in prn:
        out.append(check(f"{r['model']} AT-AWP / AT step time, b{r['batch']}, {r['mode']}", r["awp_over_at"], f"<= {TARGETS['awp_over_at']}",
                         r["awp_over_at"] <= TARGETS["awp_over_at"]))
    return out


# -------------------------------------------------------------------------------------------------- training


def training(device: torch.device, quick: bool, data_root: Path, out_dir: Path) -> dict:
    """`flatrobust train` then `flatrobust eval` through the CLI's own entry point, in this process."""
    from flatrobust.cli import main as cli

    if quick:
        recipes = ["digits_at.yaml", "digits_at_awp.yaml"]
        over = ["epochs=1", "data.train_subset=128", "data.eval_subset=32", "attack.steps=1", "eval.steps=1", "awp.warmup=0"]
        eval_args = ["--attacks", "clean,pgd20", "--n", "32", "--no-checks"]
    else:
        raw = data_root / "FashionMNIST" / "raw"
        if not (raw / "train-images-idx3-ubyte.gz").exists() and not (raw / "train-images-idx3-ubyte").exists():
            return {"skipped": f"no Fashion-MNIST under {raw}: copy its four idx files there and carry {data_root}"}
        recipes = ["fashion_mnist_at.yaml", "fashion_mnist_at_awp.yaml"]
        over = ["model=preactresnet18", "epochs=3", "data.train_subset=20000", "data.eval_subset=500", "eval.batch_size=500",
                f"data.root={data_root}"]
        eval_args = ["--attacks", "clean,pgd20", "--n", "1000", "--batch-size", "500"]
    root = Path(__file__).resolve().parents[1]
    runs = []
    for recipe in recipes:
        name = Path(recipe).stem + "_device_check"
        _log(f"training: {name}")
        t0 = time.time()
        rc = cli(["train", str(root / "recipes" / recipe), *over, f"device={device.type}", f"out_dir={out_dir}", f"name={name}",
                  "--overwrite", "--quiet"])
        train_s = time.time() - t0
        run = out_dir / name
        if rc != 0:
            runs.append({"run": name, "failed": f"flatrobust train exited {rc}"})
            continue
        metrics = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
        t0 = time.time()
        rc = cli(["eval", str(run / "best.pt"), *eval_args, "--device", device.type, "--out", str(run / "eval.json")])
        record = {"run": name, "recipe": recipe, "train_wall_s": round(train_s, 1), "eval_wall_s": round(time.time() - t0, 1),
                  "epoch_time_s": [round(m["epoch_time_s"], 2) for m in metrics],
                  "images_per_s": [round(m["images_per_s"], 1) for m in metrics],
                  "test_robust_acc_per_epoch": [m["test_robust_acc"] for m in metrics]}
        if rc == 0:
            res = json.loads((run / "eval.json").read_text())["attacks"]
            record["eval"] = {k: v.get("accuracy") for k, v in res.items()}
        else:
            record["failed"] = f"flatrobust eval exited {rc}"
        runs.append(record)
    ok = all("failed" not in r for r in runs)
    return {"runs": runs, "checks": [check("train + eval through the CLI", "ok" if ok else "failed", "exit 0", ok)]}


# ------------------------------------------------------------------------------------------------------- ddp


class _NoBNNet(nn.Sequential):
    """A small BatchNorm-free CNN: with no batch statistics, DDP over shards equals one process."""

    def __init__(self, channels: int):
        super().__init__(nn.Conv2d(channels, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(128, 10))


DDP_STEPS, DDP_BATCH = 3, 32


def _ddp_data(channels: int):
    torch.manual_seed(0)
    net = _NoBNNet(channels)
    g = torch.Generator().manual_seed(1)
    x = torch.rand(DDP_STEPS, DDP_BATCH, channels, 16, 16, generator=g)
    y = torch.randint(0, 10, (DDP_STEPS, DDP_BATCH), generator=g)
    return net, x, y


def ddp_worker(out: str) -> None:
    """One torchrun rank: DDP_STEPS AT-AWP steps with train_step on its shard of each global batch."""
    import torch.distributed as dist

    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    net, x, y = _ddp_data(3)
    net = net.to(device)
    ddp = nn.parallel.DistributedDataParallel(net, device_ids=[device.index] if cuda else None)
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    objective = create_objective("at", AttackConfig(eps=8 / 255, alpha=2 / 255, steps=3))
    awp = AWP(ddp, gamma=0.01)
    shard = DDP_BATCH // world
    for s in range(DDP_STEPS):
        xs, ys = x[s, rank * shard:(rank + 1) * shard].to(device), y[s, rank * shard:(rank + 1) * shard].to(device)
        with host_noise(1000 * s + rank):
            train_step(ddp, objective, opt, xs, ys, awp=awp)
    if rank == 0:
        torch.save({k: v.cpu() for k, v in net.state_dict().items()}, out)
    dist.destroy_process_group()


def _ddp_replay(world: int, device: torch.device) -> dict[str, torch.Tensor]:
    """The same steps in one process: shard r attacked with rank r's noise; ascent and training loss the
    mean over the shards of each shard's loss (the average DDP's all-reduce takes of the gradients)."""
    net, x, y = _ddp_data(3)
    net = net.to(device)
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    objective = create_objective("at", AttackConfig(eps=8 / 255, alpha=2 / 255, steps=3))
    awp = AWP(net, gamma=0.01)
    shard = DDP_BATCH // world
    for s in range(DDP_STEPS):
        parts = []
        for r in range(world):
            xs, ys = x[s, r * shard:(r + 1) * shard].to(device), y[s, r * shard:(r + 1) * shard].to(device)
            with host_noise(1000 * s + r):
                parts.append((xs, objective.attack(net, xs, ys), ys))
        awp.perturb(lambda m: sum(objective.ascent_loss(m, a, b, c) for a, b, c in parts) / world)
        loss = sum(objective.loss(net, a, b, c) for a, b, c in parts) / world
        opt.zero_grad()
        loss.backward()
        opt.step()
        awp.restore()
    return {k: v.cpu() for k, v in net.state_dict().items()}


def ddp(device: torch.device, force_cpu: bool, out_dir: Path) -> dict:
    gpus = torch.cuda.device_count() if device.type == "cuda" else 0
    if gpus < 2 and not force_cpu:
        return {"skipped": f"{gpus} GPU(s) visible: DDP needs 2 or more" if device.type == "cuda" else "CPU run: pass --ddp to check DDP on gloo"}
    world = gpus if gpus >= 2 else 2
    out = out_dir / "ddp_rank0.pt"
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={world}", f"--master_port={port}",
           str(Path(__file__).resolve()), "--ddp-worker", str(out)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    if device.type != "cuda":
        env["CUDA_VISIBLE_DEVICES"] = ""
    _log(f"ddp: torchrun --nproc_per_node={world}")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    if proc.returncode != 0:
        return {"checks": [check(f"torchrun DDP ({world} processes)", proc.stderr[-500:], "exit 0", False)]}
    got = torch.load(out, weights_only=True)
    ref = _ddp_replay(world, device)
    rel = _rel({k: v.double() for k, v in got.items()}, {k: v.double() for k, v in ref.items()})
    backend = "NCCL" if device.type == "cuda" else "gloo"
    return {"checks": [check(f"{DDP_STEPS} AT-AWP steps, torchrun DDP {world} processes ({backend}) vs one process (max rel. diff)",
                             rel, "<= 1e-5 (fp32, reduction order differs)", rel <= 1e-5)]}


# -------------------------------------------------------------------------------------------------- report


def markdown(res: dict) -> str:
    e = res["env"]
    out = [f"# device check ({'--quick, ' if res['quick'] else ''}{e.get('gpu', e['cpu'])}, torch {e['torch']}, {e['date']})", "",
           f"command: `{e['command']}`; {res['elapsed_s']:.0f} s; checks passed: {res['passed']} of {res['total']}", ""]
    for name, s in res["sections"].items():
        out += [f"## {name} ({s.get('seconds', 0):.0f} s)", ""]
        if "skipped" in s:
            out += [f"skipped: {s['skipped']}", ""]
        if s.get("checks"):
            out += [_checks_table(s["checks"], ["check", "value", "tolerance", "passed"]), ""]
        if s.get("runs"):
            rows = [[r["run"], ", ".join(f"{t:.1f}" for t in r.get("epoch_time_s", [])), ", ".join(f"{t:.0f}" for t in r.get("images_per_s", [])),
                     ", ".join(f"{k} {v:.2%}" for k, v in (r.get("eval") or {}).items() if v is not None), r.get("failed", "")] for r in s["runs"]]
            out += [common.markdown_table(["run", "epoch time s", "images/s", "flatrobust eval", "failure"], rows), ""]
        if s.get("rows"):
            out += ["images/s (median of interleaved rounds), ratios (median of per-round ratios), peak memory of one step", "",
                    _speed_table(s["rows"]), ""]
        if s.get("targets"):
            out += [_checks_table(s["targets"], ["target", "measured", "wanted", "met"]), ""]
        if s.get("settings"):
            out += ["settings: " + ", ".join(f"{k} {v}" for k, v in s["settings"].items()), ""]
        if s.get("skipped_configs"):
            out += ["not timed: " + "; ".join(s["skipped_configs"]), ""]
    return "\n".join(out)


def _checks_table(checks: list[dict], header: list[str]) -> str:
    rows = [[c["name"], _fmt(c["value"]), c["tolerance"], "yes" if c["passed"] else "**NO**"] for c in checks]
    return common.markdown_table(header, rows)


def _speed_table(rows: list[dict]) -> str:
    out = []
    for r in rows:
        ips, mem = r["images_per_s"], r["peak_memory_bytes"]
        out.append([r["model"], str(r["batch"]), r["mode"], *(f"{ips[m]:,.0f}" if m in ips else "-" for m in SPEED_METHODS),
                    f"{r['awp_over_at']:.3f}", f"{r['official_over_at_awp']:.2f}" if "official_over_at_awp" in r else "-",
                    f"{r['attack_share_of_at']:.0%} / {r['attack_share_of_at_awp']:.0%}",
                    " / ".join(f"{mem[m] / 2**20:,.0f}" if mem.get(m) is not None else "-" for m in SPEED_METHODS)])
    return common.markdown_table(["model", "batch", "mode", "AT", "AT-AWP", "TRADES-AWP", "official AT-AWP", "AT-AWP / AT",
                                  "official / AT-AWP", "attack share of AT / AT-AWP step",
                                  "peak MiB (AT / AT-AWP / TRADES-AWP / official)"], out)


def _fmt(v) -> str:
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1e4 else f"{v:,.0f}"
    return str(v)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--out", required=False, help="folder for device_check.json and device_check.md")
    p.add_argument("--quick", action="store_true", help="CPU, tiny shapes, the same code paths (seconds)")
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    p.add_argument("--data-root", default="data", help="where FashionMNIST/raw/ holds Fashion-MNIST's idx files (default ./data)")
    p.add_argument("--budget-s", type=float, default=330, help="speed timings stop starting new configurations after this many seconds")
    p.add_argument("--compile-all", action="store_true", help="also time torch.compile for PreActResNet-18 b512 and WRN-34-10")
    p.add_argument("--sections", default=",".join(SECTIONS), help="comma-separated subset")
    p.add_argument("--ddp", action="store_true", help="run the DDP check on the CPU (gloo, 2 processes) when fewer than 2 GPUs")
    p.add_argument("--ddp-worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.ddp_worker:
        ddp_worker(args.ddp_worker)
        return 0
    if not args.out:
        p.error("--out DIR is required")
    warnings.filterwarnings("ignore", message="Converting a tensor with requires_grad=True to a scalar")  # the baseline's float(loss)
    device = torch.device(args.device or ("cpu" if args.quick or not torch.cuda.is_available() else "cuda"))
    if device.type == "cuda":
        device = torch.device("cuda", torch.cuda.current_device())
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="device_check_"))  # run directories: not in OUT, which holds the two results
    t_start = time.time()
    wanted = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = [s for s in wanted if s not in SECTIONS]
    if unknown:
        p.error(f"unknown section(s) {', '.join(unknown)}: choose from {', '.join(SECTIONS)}")
    sections: dict = {}
    for name in wanted:
        _log(f"section {name}")
        t0 = time.time()
        try:
            if name == "correctness":
                sections[name] = correctness(device, args.quick)
            elif name == "data_placement":
                sections[name] = data_placement(device, args.quick, work)
            elif name == "speed":
                sections[name] = speed(device, args.quick, t_start + args.budget_s, args.compile_all)
            elif name == "training":
                sections[name] = training(device, args.quick, Path(args.data_root), work)
            else:
                sections[name] = ddp(device, args.ddp, work)
        except Exception as e:  # noqa: BLE001 - one broken section must not lose the others' results
            sections[name] = {"checks": [check(f"{name} ran", f"{type(e).__name__}: {e}", "no exception", False)]}
        sections[name]["seconds"] = round(time.time() - t0, 1)
    checks = [c for s in sections.values() for c in s.get("checks", [])]
    res = {"env": common.environment(device), "quick": args.quick, "device": str(device), "elapsed_s": time.time() - t_start,
           "passed": sum(c["passed"] for c in checks), "total": len(checks), "sections": sections}
    (out_dir / "device_check.json").write_text(json.dumps(res, indent=2) + "\n")
    (out_dir / "device_check.md").write_text(markdown(res) + "\n")
    print(markdown(res))
    _log(f"wrote {out_dir / 'device_check.json'} and {out_dir / 'device_check.md'} ({res['elapsed_s']:.0f} s)")
    shutil.rmtree(work, ignore_errors=True)
    return 0 if res["passed"] == res["total"] else 1


if __name__ == "__main__":
    sys.exit(main())
