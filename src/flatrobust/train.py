"""The training loop behind `flatrobust train`, built only on the public API (objectives, AWP, pgd).

`train_step` is one AT/TRADES/MART step with optional AWP, usable on its own; `fit` runs a whole
recipe: data on the device, batched augmentation, the lr schedule per iteration, per-epoch clean and
PGD-20 accuracy on fixed train and test subsets (the robust generalization gap), and a run directory
(config.yaml, metrics.jsonl, env.json, last.pt, best.pt) from which `--resume` continues exactly.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
import yaml
from torch import nn

from . import models
from .attacks import pgd, whole_box_warning
from .awp import AWP, perturbed_parameters
from .checkpoint import WriteError, load_checkpoint, load_weights, save_checkpoint, write_atomic
from .collapse import ChanceLevel, collapse_warning, top_class_share
from .config import RunConfig, config_from_dict
from .data import DATASETS, DataError, TensorData, augment, batches, load_extra, load_split, mixed_batch_sizes, mixed_batches
from .ema import EMA
from .errors import UserError
from .guard import Rollback, StepMonitor, kept_checkpoint, skip_failure, stop_message
from .machine import describe
from .objectives import AttackConfig, Objective, create_objective
from .progress import Progress
from .speed import accelerate
from .tblog import TensorBoardLog, require_tensorboard

TIMING_KEYS = ("epoch_time_s", "images_per_s", "elapsed_s")  # metrics that differ between identical runs


class NonFiniteError(FloatingPointError):
    """A non-finite loss or AWP gradient; the message names epoch, step and (for AWP) the layer."""


class StepResult(NamedTuple):
    """What `train_step` leaves on the device: nothing in it has been read by the host."""

    loss: torch.Tensor  # 0-dim, detached: the training loss at w + v
    correct: torch.Tensor  # 0-dim int64: adversarial examples classified correctly at w + v
    finite: torch.Tensor  # 0-dim bool: the loss and (with AWP) the ascent gradient were finite


def train_step(
    model: nn.Module,
    objective: Objective,
    optimizer: torch.optim.Optimizer,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    awp: AWP | None = None,
    generator: torch.Generator | None = None,
    rollback: Rollback | None = None,
) -> StepResult:
    """One step (PAPER.md steps 1-4): x_adv at w, w <- w + v, step at w + v, w <- w - v.

    No host synchronization: the result stays on the device, and so does the verdict on finiteness
    (`finite`). A non-finite step is applied like any other (its weights become non-finite; a loop stops
    at its next read of `finite`), unless `rollback` is given: then weights, buffers and optimizer state are
    put back on the device as they were before the step (`nonfinite=skip`).
    """
    if rollback is not None:
        rollback.save()
    x_adv = objective.attack(model, x, y, generator=generator)  # 1. at the unperturbed weights
    if awp is not None:
        awp.perturb(lambda m: objective.ascent_loss(m, x, x_adv, y))  # 2.-3. w <- w + v
    try:
        model.train()
        loss, logits_adv = objective.loss_and_logits(model, x, x_adv, y)  # the training loss at w + v
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()  # momentum and weight decay act at w + v, as in the official code
    finally:
        if awp is not None and awp.active:
            awp.restore()  # 4. w <- w - v: net effect w <- w - lr * grad L(w + v)
    loss = loss.detach()
    finite = torch.isfinite(loss)
    if awp is not None and awp.finite is not None:
        finite = finite & awp.finite
    if rollback is not None:
        if torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
            flag = finite.to(torch.int32)  # every process keeps or undoes the same (all-reduced) update
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
            finite = flag.bool()
        rollback.apply(finite)
    return StepResult(loss, (logits_adv.detach().argmax(1) == y).sum(), finite)


def lr_at(step: int, total_steps: int, cfg: RunConfig) -> float:
    """Learning rate at iteration `step` (0-based) of `total_steps`."""
    base, progress = cfg.optim.lr, step / max(total_steps, 1)
    if cfg.optim.schedule == "piecewise":  # the official schedule: /10 at 50%, /100 at 75% of training
        return base if progress < 0.5 else base / 10 if progress < 0.75 else base / 100
    if cfg.optim.schedule == "cosine":
        return 0.5 * base * (1 + math.cos(math.pi * progress))
    return base


def resolve_device(spec: str, local_rank: int = 0) -> torch.device:
    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    if spec.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"device={spec} but no CUDA device is available: use device=cpu or device=auto")
    if spec == "cuda":  # one GPU per process under torchrun
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device(spec)


@dataclass
class Dist:
    """This process's place in a torchrun/DDP job (rank 0 of 1 when run alone)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    def all_sum(self, values: list[float], device: torch.device) -> list[float]:
        if self.world == 1:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=device)
        torch.distributed.all_reduce(t)
        return t.tolist()

    def gather(self, obj: Any) -> list[Any]:
        """Every process's `obj`, in rank order, on every process (a collective)."""
        if self.world == 1:
            return [obj]
        out: list[Any] = [None] * self.world
        torch.distributed.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()


def init_distributed(cfg: RunConfig) -> Dist:
    """Join the process group when started by torchrun (WORLD_SIZE > 1): NCCL on CUDA, gloo on CPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    if not torch.distributed.is_initialized():
        cuda = cfg.device != "cpu" and torch.cuda.is_available()
        torch.distributed.init_process_group("nccl" if cuda else "gloo")
    return Dist(torch.distributed.get_rank(), world, int(os.environ.get("LOCAL_RANK", "0")))


@torch.no_grad()
def _accuracy(model, x, y) -> float:
    return (model(x).argmax(1) == y).float().sum().item()


def robust_accuracy(model: nn.Module, data: TensorData, attack: AttackConfig, *, batch_size: int, seed: int,
                    dist: Dist | None = None) -> tuple[float, float]:
    """(clean, PGD) accuracy in eval mode on `data`, PGD with a fixed random start (seeded).

    Under DDP each process evaluates every `world`-th batch and the counts are summed.
    """
    dist = dist or Dist()
    model_was_training = model.training
    model.eval()
    g = torch.Generator(device=data.x.device).manual_seed(seed + dist.rank)
    clean = robust = 0.0
    for i in range(dist.rank * batch_size, len(data), batch_size * dist.world):
        xb, yb = data.x[i:i + batch_size], data.y[i:i + batch_size]
        clean += _accuracy(model, xb, yb)
        xa = pgd(model, xb, yb, eps=attack.eps, alpha=attack.alpha, steps=attack.steps, norm=attack.norm, generator=g)
        robust += _accuracy(model, xa, yb)
    model.train(model_was_training)
    clean, robust = dist.all_sum([clean, robust], data.x.device)
    return clean / len(data), robust / len(data)


def evaluate_weights(forward: nn.Module, run: "Run", attack: AttackConfig, prefix: str = "") -> dict[str, float]:
    """Per-epoch accuracies of one set of weights (the raw model, or with prefix "ema_" its EMA): clean and PGD
    accuracy on the fixed train and test subsets, and the gap (train robust - test robust)."""
    cfg = run.cfg
    test_clean, test_rob = robust_accuracy(forward, run.eval_test, attack, batch_size=cfg.eval.batch_size, seed=cfg.seed, dist=run.dist)
    train_clean, train_rob = robust_accuracy(forward, run.eval_train, attack, batch_size=cfg.eval.batch_size, seed=cfg.seed + 1, dist=run.dist)
    return {f"{prefix}train_clean_acc": train_clean, f"{prefix}train_robust_acc": train_rob, f"{prefix}test_clean_acc": test_clean,
            f"{prefix}test_robust_acc": test_rob, f"{prefix}gap": train_rob - test_rob}


def environment(cfg: RunConfig, device: torch.device) -> dict[str, Any]:
    def git_commit() -> str | None:
        try:
            root = Path(__file__).resolve().parents[2]
            out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=5)
            return out.stdout.strip() or None
        except (OSError, subprocess.SubprocessError):
            return None

    import torchvision

    from . import __version__

    return {
        "flatrobust": __version__, "python": sys.version.split()[0], "torch": torch.__version__,
        "torchvision": torchvision.__version__, **describe(device),
        "cuda": torch.version.cuda, "threads": torch.get_num_threads(), "seed": cfg.seed, "git_commit": git_commit(),
        "argv": sys.argv,
    }


@dataclass
class Run:
    """Everything `fit` builds before the first step, so that bad input fails before a folder is made."""

    cfg: RunConfig
    device: torch.device
    train: TensorData
    eval_train: TensorData
    eval_test: TensorData
    model: nn.Module  # fp32 weights: optimized and saved
    forward: nn.Module  # what the loop calls: `model`, or it under autocast / channels_last / compile
    objective: Objective
    optimizer: torch.optim.Optimizer
    awp: AWP | None
    dist: Dist
    local_forward: nn.Module  # `forward` without DDP: evaluation runs per process with no collective in the forward
    n_labeled: int  # the first n_labeled examples of `train` are labeled; the rest is RST's extra data
    info: Any = None  # the training data's DatasetInfo: data.json and checkpoints (it rebuilds the model)
    ema: EMA | None = None  # ema.decay > 0: the moving average of `model`'s weights, updated after every step
    ema_forward: nn.Module | None = None  # what evaluates `ema.module` (under autocast / channels_last like `forward`)


def build(cfg: RunConfig, dist: Dist | None = None, *, progress: bool = False) -> Run:
    dist = dist or Dist()
    device = resolve_device(cfg.device, dist.local_rank)
    try:  # progress: a long first read (decoding an image folder) reports as the training loop does
        train = load_split(cfg.data, "train", progress=progress)
        test = load_split(cfg.data, "test", like=train.info, progress=progress)
    except DataError as e:
        raise UserError(str(e)) from None
    info = train.info  # built-in sets: their registry entry; image folders / npz: classes, channels, size, statistics
    if cfg.data.train_subset:
        train = train.subset(cfg.data.train_subset, seed=cfg.seed)
    n_labeled = len(train)
    if cfg.data.extra:  # RST: pseudo-labeled extra data after the labeled data, mixed into every batch
        try:
            extra = load_extra(cfg.data.extra, train)
        except DataError as e:
            raise UserError(str(e)) from None
        train_all = TensorData(torch.cat([train.x, extra.x]), torch.cat([train.y, extra.y]), train.info)
    else:
        train_all = train
    # Fixed subsets of the same size for the per-epoch robust accuracy (and so the gap) on train and test.
    n_eval = min(cfg.data.eval_subset, len(test), len(train))
    eval_test, eval_train = test.subset(n_eval, seed=0).to(device), train.subset(n_eval, seed=1).to(device)
    if cfg.log.tensorboard:
        require_tensorboard()  # one line now, not after the first epoch
    torch.manual_seed(cfg.seed)
    try:
        model = models.create(cfg.model, num_classes=info.num_classes, in_channels=info.in_channels, mean=info.mean, std=info.std,
                              input_size=info.image_size, search_path=[cfg.model_dir] if cfg.model_dir else [], **cfg.model_args).to(device)
    except ValueError as e:  # one line that names the model
        raise UserError(str(e) if cfg.model in str(e) else f"model {cfg.model!r}: {e}") from None
    if cfg.init_from:  # fine-tuning: pre-trained weights, fresh optimizer and schedule
        try:
            load_weights(model, cfg.init_from)
        except UserError as e:
            raise UserError(f"init_from: {e}") from None
    a = cfg.attack
    objective = create_objective(cfg.method, AttackConfig(eps=a.eps, alpha=a.alpha, steps=a.steps, norm=a.norm), beta=cfg.beta)
    o = cfg.optim
    optimizer = torch.optim.SGD(model.parameters(), lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay,
                                nesterov=o.nesterov and o.momentum > 0)
    local = accelerate(model, device, amp=cfg.speed.amp, channels_last=cfg.speed.channels_last)
    wrapped = local
    if dist.world > 1:  # AWP's ascent runs on wrapped.module (no reducer involved) and all-reduces its gradient
        wrapped = nn.parallel.DistributedDataParallel(local, device_ids=[device.index] if device.type == "cuda" else None)
    awp = None
    if cfg.awp.gamma > 0:
        try:  # chosen by the names of `model` (those of its checkpoints), whatever wraps it
            chosen = [p for _, p in perturbed_parameters(model, cfg.awp.params or None)]
        except ValueError as e:
            raise UserError(f"awp.params: {e}") from None
        awp = AWP(wrapped, gamma=cfg.awp.gamma, params=chosen, ascent_steps=cfg.awp.steps, eps_rel=cfg.awp.eps_rel or None,
                  start_step=cfg.awp.start_step)
    forward = torch.compile(wrapped) if cfg.speed.compile else wrapped
    # Evaluation runs in every process on its own share, with no collective inside the forward.
    eval_forward = forward if dist.world == 1 else (torch.compile(local) if cfg.speed.compile else local)
    ema = EMA(model, cfg.ema.decay) if cfg.ema.decay > 0 else None
    ema_forward = accelerate(ema.module, device, amp=cfg.speed.amp, channels_last=cfg.speed.channels_last) if ema else None
    return Run(cfg, device, _place_train_data(train_all, device, cfg.data.on_device), eval_train, eval_test, model, forward, objective,
               optimizer, awp, dist, eval_forward, n_labeled, info, ema, ema_forward)


def keep_on_device(nbytes: int, device: torch.device, on_device: str) -> bool:
    """`data.on_device`: whether training data of `nbytes` lives on `device` (auto: if it fits in half of
    the device's free memory; always on a CPU, where there is no other place)."""
    if device.type == "cpu" or on_device == "on":
        return True
    if on_device == "off":
        return False
    free = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else nbytes * 2
    return nbytes <= free // 2


def _place_train_data(data: TensorData, device: torch.device, on_device: str) -> TensorData:
    """The training data on `device`, or in pinned host memory, copied batch by batch without blocking (`_fetch`)."""
    if keep_on_device(data.x.nbytes + data.y.nbytes, device, on_device):
        return data.to(device)
    pin = device.type == "cuda"
    return TensorData(data.x.pin_memory() if pin else data.x, data.y.pin_memory() if pin else data.y, data.info)


def _epoch_generators(cfg: RunConfig, epoch: int, device: torch.device, rank: int = 0) -> tuple[torch.Generator, torch.Generator]:
    """(order, noise): the data order (on the CPU) and the augmentation/attack noise (on `device`) of one
    epoch, from (seed, epoch).

    Deriving them from (seed, epoch) instead of carrying one stream across epochs makes every epoch
    reproducible on its own, which is what exact resume needs. The order is drawn on the CPU so that it is
    the same on every device, and its indices reach the device once per epoch (`_to_data_device`).
    """
    base = (cfg.seed * 1_000_003 + epoch) % (2**63)
    order = torch.Generator().manual_seed(base)
    noise = torch.Generator(device=device).manual_seed(base ^ 0x5DEECE66D ^ (rank << 40))  # own noise per process
    return order, noise


def _to_data_device(index_batches: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    """An epoch's index batches (drawn on the CPU) on the device of the data, in one non-blocking copy."""
    if device.type == "cpu" or not index_batches:
        return index_batches
    flat = torch.cat(index_batches).pin_memory().to(device, non_blocking=True)
    return list(flat.split([len(i) for i in index_batches]))


def _fetch(data: TensorData, idx: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Batch `idx` of `data` on `device`: an index into data on the device, or (data kept in host memory,
    `data.on_device`) a gather into pinned memory and a non-blocking copy."""
    if data.x.device == device:
        return data.x[idx], data.y[idx]
    x = torch.empty((len(idx), *data.x.shape[1:]), dtype=data.x.dtype, pin_memory=device.type == "cuda")
    y = torch.empty(len(idx), dtype=data.y.dtype, pin_memory=device.type == "cuda")
    torch.index_select(data.x, 0, idx, out=x)
    torch.index_select(data.y, 0, idx, out=y)
    return x.to(device, non_blocking=True), y.to(device, non_blocking=True)


def _own_position(state: dict, dist: Dist) -> dict:
    """This process's noise state, epoch sums and RNG states from a checkpoint (its entry of `ranks` when
    it was taken inside an epoch under DDP). A checkpoint from inside an epoch resumes only with the
    number of processes that wrote it: every process's noise stream is part of the exact resume."""
    ranks, world = state.get("ranks"), state.get("world_size", 1)
    if state["batch"] > 0 and world != dist.world:
        raise UserError(f"the checkpoint was taken inside epoch {state['epoch'] + 1} by {world} process(es): resume it with "
                        f"{world} (torchrun --nproc_per_node={world}), or from an epoch-end checkpoint with any number")
    return ranks[dist.rank] if ranks is not None else state


def _check_weights_finite(model: nn.Module, where: str, run_dir: Path) -> None:
    """Refuse to checkpoint non-finite weights (one host sync, at checkpoint time only)."""
    tensors = [t for t in [*model.parameters(), *model.buffers()] if t.is_floating_point()]
    with torch.no_grad():
        ok = bool(torch.isfinite(torch.stack(torch._foreach_norm(tensors))).all())
    if not ok:
        raise NonFiniteError(f"weights are non-finite after {where} although every step's loss was finite; "
                             f"{kept_checkpoint(run_dir)}: lower optim.lr")


def _augment_args(cfg: RunConfig) -> dict[str, Any]:
    default = DATASETS[cfg.data.name].default_augment if cfg.data.name in DATASETS else "none"
    kind = default if cfg.data.augment == "default" else cfg.data.augment
    return {"crop_padding": 4, "flip": True} if kind == "crop_flip" else {"crop_padding": 0, "flip": False}


def _write_json_line(path: Path, record: dict) -> None:
    """Append one line; a failed write (disk full) is cut back off and raised as a one-line WriteError."""
    size = path.stat().st_size if path.exists() else 0
    try:
        with open(path, "a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        with contextlib.suppress(OSError):
            os.truncate(path, size)  # no half line left for the next reader
        raise WriteError(f"cannot write {str(path)!r}: {e.strerror or e}") from None


def _truncate_metrics(path: Path, epochs: int) -> list[dict]:
    """Keep the first `epochs` lines (those covered by the checkpoint) and return them."""
    if not path.exists():
        return []
    lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
    kept = []
    for ln in lines[:epochs]:
        try:
            kept.append(json.loads(ln))
        except json.JSONDecodeError:
            break
    path.write_text("".join(json.dumps(r) + "\n" for r in kept))
    return kept


def _check_state_fits(run: Run, state: dict[str, Any], path: Path) -> None:
    """UserError (one line) unless the checkpoint's tensors fit this run's model, optimizer and EMA (they are
    loaded into them here, as the loop loads them again)."""
    try:
        run.model.load_state_dict(state["model"])
        run.optimizer.load_state_dict(state["optimizer"])
        if run.ema is not None and state.get("ema") is not None:
            run.ema.load_state_dict(state["ema"])
    except (RuntimeError, ValueError, KeyError, TypeError) as e:
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        why = next((ln for ln in lines if ln.startswith(("size mismatch", "Missing key", "Unexpected key"))), lines[0] if lines else "")
        raise UserError(f"{str(path)!r} does not fit the model this config builds ({run.cfg.model!r}; {type(e).__name__}: "
                        f"{why[:160]}): resume with the config the run was trained with") from None


def _write_start_files(run_dir: Path, files: dict[str, str], *, fresh: bool) -> None:
    """Write the run's config.yaml, env.json and data.json, each atomically. If one cannot be written (disk
    full), a fresh run directory is removed again, so that nothing half-made blocks running the command again;
    a resumed run keeps its files (each is the old one or the new one, never half of one)."""
    made = not run_dir.exists()
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        for name, text in files.items():
            write_atomic(run_dir / name, lambda f, text=text: f.write(text.encode()))
    except (WriteError, OSError) as e:
        if fresh:
            for name in files:
                with contextlib.suppress(OSError):
                    (run_dir / name).unlink(missing_ok=True)
            if made:
                with contextlib.suppress(OSError):
                    run_dir.rmdir()
        why = str(e) if isinstance(e, WriteError) else f"cannot create {str(run_dir)!r}: {e.strerror or e}"
        raise WriteError(f"{why}: the run did not start{' (its run directory was removed again)' if fresh and made else ''}; "
                         "make room and run the command again") from None


def prepare_run_dir(cfg: RunConfig, *, overwrite: bool) -> Path:
    run_dir = Path(cfg.out_dir) / cfg.name
    if run_dir.exists() and any(run_dir.iterdir()):
        if not overwrite:
            raise UserError(f"run directory {run_dir} already exists: pass --overwrite to replace it, --resume {run_dir} to continue it, or name=NEW_NAME")
        shutil.rmtree(run_dir)
    return run_dir


def _finished(run_dir: Path, state: dict[str, Any], cfg: RunConfig) -> bool:
    """Whether the checkpoint already covers all `cfg.epochs`; UserError if it covers more (no shortening)."""
    done = state["epoch"]
    if done > cfg.epochs or (done == cfg.epochs and state["batch"] > 0):
        raise UserError(f"{run_dir} has trained {done} epochs, more than epochs={cfg.epochs}: a run cannot be shortened; "
                        f"resume with epochs={done} or more, or start a new run from it with init_from={run_dir}")
    return done == cfg.epochs


def awp_warmup_warning(cfg: RunConfig, total_steps: int | None = None) -> str | None:
    """One line when AWP is asked for (gamma > 0) but its warm-up (or awp.start_step, against the run's
    `total_steps` when known) leaves it off for every step of the run."""
    if cfg.awp.gamma > 0 and cfg.awp.warmup >= cfg.epochs:
        return (f"awp.warmup={cfg.awp.warmup} >= epochs={cfg.epochs}: AWP (gamma {cfg.awp.gamma:g}) is never active, "
                f"so this run trains plain {cfg.method.upper()}; lower awp.warmup (e.g. awp.warmup=0) or raise epochs")
    if cfg.awp.gamma > 0 and total_steps is not None and cfg.awp.start_step >= total_steps:
        return (f"awp.start_step={cfg.awp.start_step} >= the run's {total_steps} steps: AWP (gamma {cfg.awp.gamma:g}) is never "
                f"active, so this run trains plain {cfg.method.upper()}; lower awp.start_step or raise epochs")
    return None


def fit(cfg: RunConfig, *, resume_dir: str | Path | None = None, overwrite: bool = False, progress: bool = True,
        stop_after_steps: int | None = None) -> Path:
    """Train `cfg`; returns the run directory. `resume_dir` continues a stopped run from its last.pt."""
    if cfg.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    dist = init_distributed(cfg)
    run = build(cfg, dist, progress=progress and dist.main)  # everything that can fail on bad input fails here, before any file is written
    state: dict[str, Any] | None = None
    if resume_dir is not None:
        run_dir = Path(resume_dir)
        if (run_dir / "last.pt").exists():
            state = load_checkpoint(run_dir / "last.pt", map_location=run.device)
            _check_state_fits(run, state, run_dir / "last.pt")  # one line, before any file of the run is written
            if _finished(run_dir, state, cfg):
                if dist.main:
                    print(f"flatrobust: {run_dir} has finished its {cfg.epochs} epochs: nothing to do. To train it longer, "
                          f"resume with more epochs, e.g. flatrobust train --resume {run_dir} epochs={2 * cfg.epochs} "
                          "(the lr schedule is recomputed for the new length)", file=sys.stderr)
                if dist.world > 1 and torch.distributed.is_initialized():
                    torch.distributed.destroy_process_group()
                return run_dir
    elif dist.main:
        run_dir = prepare_run_dir(cfg, overwrite=overwrite)
    else:
        run_dir = Path(cfg.out_dir) / cfg.name
    numel = run.info.in_channels * run.info.image_size ** 2
    for warning in (awp_warmup_warning(cfg), whole_box_warning(cfg.attack.norm, cfg.attack.eps, numel)):
        if warning and dist.main:
            print(f"flatrobust: warning: {'attack.' if warning.startswith('eps=') else ''}{warning}", file=sys.stderr)
    if dist.main:  # one process writes files under torchrun
        env = environment(cfg, run.device) | {"world_size": dist.world}
        _write_start_files(run_dir, {  # What the model was built for: classes (names), channels, size, normalization.
            "config.yaml": yaml.safe_dump(cfg.to_dict(), sort_keys=False), "env.json": json.dumps(env, indent=2) + "\n",
            "data.json": json.dumps({"root": cfg.data.root, **run.info.to_dict()}, indent=1) + "\n"}, fresh=state is None)
        if progress:  # on stdout with the summary; stderr carries the epoch lines and the progress
            print(f"data: {cfg.data.name} {cfg.data.root if cfg.data.name != 'digits' else ''}".rstrip()
                  + f": {run.info.describe()}", flush=True)
    dist.barrier()
    try:
        return _loop(run, run_dir, state, progress=progress and dist.main, stop_after_steps=stop_after_steps)
    except WriteError as e:  # disk full: every checkpoint written so far is intact
        how = f"continue the run with flatrobust train --resume {run_dir}" if (run_dir / "last.pt").exists() else "start it again"
        raise WriteError(f"{e}: make room, then {how}") from None
    finally:
        if dist.world > 1 and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def _loop(run: Run, run_dir: Path, state: dict | None, *, progress: bool, stop_after_steps: int | None) -> Path:
    cfg, model, optimizer, device, dist = run.cfg, run.model, run.optimizer, run.device, run.dist
    n, n_extra = run.n_labeled, len(run.train) - run.n_labeled
    # Under DDP every process takes its share of each global batch of batch_size; the last, incomplete
    # batch is dropped so that no process is left without examples. With RST's extra data an epoch is one
    # pass over the labeled data, each batch completed with extra examples.
    drop_last = dist.world > 1
    per_batch = mixed_batch_sizes(cfg.batch_size, cfg.data.extra_fraction)[0] if n_extra else cfg.batch_size
    steps_per_epoch = n // per_batch if drop_last else math.ceil(n / per_batch)
    total_steps = cfg.epochs * steps_per_epoch
    late = awp_warmup_warning(cfg, total_steps) if cfg.awp.warmup < cfg.epochs else None  # (fit said the warm-up one)
    if late and dist.main:
        print(f"flatrobust: warning: {late}", file=sys.stderr)
    aug = _augment_args(cfg)
    eval_attack = AttackConfig(eps=cfg.attack.eps, alpha=cfg.eval.alpha or cfg.attack.alpha, steps=cfg.eval.steps, norm=cfg.attack.norm)
    metrics_path = run_dir / "metrics.jsonl"
    chance = ChanceLevel.of(run.eval_test.y)  # for the collapse check at epoch ends

    start_epoch, start_batch, best, skipped_total = 0, 0, -1.0, 0
    resume_noise, epoch_sums = None, None
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if run.ema is not None and state.get("ema") is not None:  # (EMA turned on at resume: it starts from here)
            run.ema.load_state_dict(state["ema"])
        start_epoch, start_batch, best = state["epoch"], state["batch"], state["best"]
        skipped_total = state.get("skipped", 0)
        own = _own_position(state, dist)
        resume_noise, epoch_sums = own.get("noise_state"), own.get("epoch_sums")
        torch.set_rng_state(own["torch_rng"])
        if device.type == "cuda" and own.get("cuda_rng") is not None:
            torch.cuda.set_rng_state(own["cuda_rng"], device)
        history = _truncate_metrics(metrics_path, start_epoch) if dist.main else []
    else:
        history = _truncate_metrics(metrics_path, 0) if dist.main else []
    tb = None
    if cfg.log.tensorboard and dist.main:
        tb = TensorBoardLog(run_dir / "tensorboard", resumed_at=start_epoch * steps_per_epoch + start_batch if state else None)

    def checkpoint(path: Path, epoch: int, batch: int, noise: torch.Generator | None, sums: dict | None) -> None:
        # epoch/batch as resume reads them: (e, 0) after epoch e (1-based), (e, b) after step b of epoch e + 1
        _check_weights_finite(model, f"epoch {epoch + 1}, step {batch}" if batch else f"epoch {epoch}", run_dir)
        position = {"noise_state": noise.get_state() if noise is not None else None, "epoch_sums": sums,
                    "torch_rng": torch.get_rng_state(), "cuda_rng": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}
        # Under DDP each process has its own noise, sums and RNG inside an epoch: all of them go into the file.
        ranks = dist.gather(position) if dist.world > 1 and batch else None
        if not dist.main:
            return
        save_checkpoint({
            "config": cfg.to_dict(), "model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "epoch": epoch, "batch": batch, "best": best, "skipped": skipped_total, **position,
            "world_size": dist.world, "ranks": ranks,
            "awp": run.awp.state_dict() if run.awp is not None else None,
            "ema": run.ema.state_dict() if run.ema is not None else None,
            "data_info": run.info.to_dict() if run.info is not None else None,
        }, path)

    rollback = Rollback(model, optimizer) if cfg.nonfinite == "skip" else None
    monitor = StepMonitor(device)  # per-step metrics and the non-finite flag stay on the device between reads
    awp_names = run.awp.names if run.awp is not None else None

    def read_metrics(epoch: int, sums: dict, step_end: int) -> None:
        """Bring the steps since the last read (up to global step `step_end`) to the host (one sync); stop here on a
        non-finite step."""
        nonlocal skipped_total, t_read
        r = monitor.read()
        bad = r.bad if dist.world == 1 else int(dist.all_sum([r.bad], device)[0])
        if bad and cfg.nonfinite == "stop":
            raise NonFiniteError(stop_message(r, epoch, awp_names, run_dir))
        sums["loss"] += r.loss_sum
        sums["correct"] += r.correct
        sums["seen"] += r.seen
        sums["skipped"] += r.bad
        skipped_total += r.bad
        gave_up = r.bad and skip_failure(r.longest_bad_run, sums["skipped"], step_end - epoch * steps_per_epoch, steps_per_epoch)
        if gave_up:  # nonfinite=skip, and skipping is all the run does
            raise NonFiniteError(stop_message(r, epoch, awp_names, run_dir, gave_up=gave_up))
        if tb is not None:  # a loss point every log.interval steps of the epoch and at its end
            in_epoch = step_end - epoch * steps_per_epoch
            tb.step(step_end, r.loss_sum, r.seen, write=in_epoch % cfg.log.interval == 0 or in_epoch == steps_per_epoch)
        now = time.time()
        sums["time"] += now - t_read  # wall time of the steps, read after the device has finished them
        t_read = now
        if progress:
            bar.set_postfix(loss=f"{sums['loss'] / max(sums['seen'], 1):.3f}", adv_acc=f"{sums['correct'] / max(sums['seen'], 1):.1%}", img_s=f"{sums['seen'] / max(sums['time'], 1e-9):.0f}")

    steps_done = 0
    t_run = time.time()
    for epoch in range(start_epoch, cfg.epochs):
        order, noise = _epoch_generators(cfg, epoch, device, dist.rank)
        if n_extra:
            epoch_batches = mixed_batches(n, n_extra, cfg.batch_size, cfg.data.extra_fraction, generator=order, drop_last=drop_last)
        else:
            epoch_batches = batches(n, cfg.batch_size, shuffle=True, generator=order, drop_last=drop_last)
        index_batches = _to_data_device([idx[dist.rank::dist.world] for idx in epoch_batches], run.train.x.device)
        first = 0
        sums = {"loss": 0.0, "correct": 0.0, "seen": 0, "skipped": 0, "time": 0.0}
        if epoch == start_epoch and start_batch > 0:  # continue inside the epoch where the checkpoint was taken
            first = start_batch
            noise.set_state(resume_noise)
            sums = dict(epoch_sums)
        # on for at least one step of the epoch (awp.start_step may fall inside it: AWP itself waits for it)
        awp_on = run.awp is not None and epoch >= cfg.awp.warmup and (epoch + 1) * steps_per_epoch > cfg.awp.start_step
        bar = Progress(range(first, len(index_batches)), total=len(index_batches), initial=first, enabled=progress,
                       desc=f"epoch {epoch + 1}/{cfg.epochs}", unit="batch")
        monitor.start(first)
        t_read = time.time()
        for b in bar:
            step = epoch * steps_per_epoch + b
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, total_steps, cfg)
            x, y = _fetch(run.train, index_batches[b], device)
            x = augment(x, generator=noise, **aug)
            awp = run.awp if awp_on else None
            if awp is not None:
                awp.step = step  # the global step, also after a resume: start_step compares with it
            result = train_step(run.forward, run.objective, optimizer, x, y, awp=awp, generator=noise, rollback=rollback)
            monitor.add(result.loss, result.correct, len(y), result.finite, awp)
            if run.ema is not None:
                run.ema.update(model)  # after train_step's awp.restore() (and rollback): the average never sees w + v
            steps_done += 1
            save = cfg.checkpoint_every and (b + 1) % cfg.checkpoint_every == 0 and b + 1 < len(index_batches)
            stop = stop_after_steps is not None and steps_done >= stop_after_steps
            if save or stop or (b + 1) % cfg.log.interval == 0:  # the only host syncs of the loop
                read_metrics(epoch, sums, step + 1)
            if save:
                checkpoint(run_dir / "last.pt", epoch, b + 1, noise, sums)
                t_read = time.time()  # the epoch's time counts steps, not checkpoint writes
            if stop:
                bar.close()
                if tb is not None:
                    tb.close()
                return run_dir
        read_metrics(epoch, sums, (epoch + 1) * steps_per_epoch)
        bar.close()
        t_eval = time.time()
        accs = evaluate_weights(run.local_forward, run, eval_attack)
        if run.ema is not None:
            accs |= evaluate_weights(run.ema_forward, run, eval_attack, prefix="ema_")
        test_clean, test_rob, train_rob = accs["test_clean_acc"], accs["test_robust_acc"], accs["train_robust_acc"]
        top_share = top_class_share(run.local_forward, run.eval_test.x, batch_size=cfg.eval.batch_size)  # collapse check
        sums["loss"], sums["correct"], sums["seen"] = dist.all_sum([sums["loss"], sums["correct"], sums["seen"]], device)
        record = {
            "epoch": epoch + 1, "step": (epoch + 1) * steps_per_epoch, "lr": lr_at((epoch + 1) * steps_per_epoch - 1, total_steps, cfg),
            "awp_active": awp_on, "train_loss": sums["loss"] / max(sums["seen"], 1),
            "train_batch_adv_acc": sums["correct"] / max(sums["seen"], 1),  # on the training batches, at w + v
            **accs,  # train/test clean and robust accuracy and the gap; with EMA the same again as ema_*
            "eval_n": len(run.eval_test),  # images in each of the fixed test and train monitoring subsets
            "test_top_class_share": top_share,  # share of test images given the most frequent class (collapse check)
            "skipped_batches": sums["skipped"], "epoch_time_s": sums["time"], "eval_time_s": time.time() - t_eval,
            "images_per_s": sums["seen"] / max(sums["time"], 1e-9),
        }
        history.append(record)
        warning = collapse_warning(history, chance=chance)  # AWP killed the model?
        if warning:
            record["warning"] = warning
        is_best = test_rob > best
        if is_best:
            best = test_rob
        # Order matters for a crash between writes: metrics, then best.pt, then last.pt. A resume starts
        # from last.pt, drops metric lines it does not cover and recomputes that epoch identically.
        if dist.main:
            _write_json_line(metrics_path, record)
        if tb is not None:
            tb.write_epoch(record)
        if is_best:
            checkpoint(run_dir / "best.pt", epoch + 1, 0, None, None)
        checkpoint(run_dir / "last.pt", epoch + 1, 0, None, None)
        if progress:
            warmup = "epoch 1" if cfg.awp.warmup == 1 else f"epochs 1-{cfg.awp.warmup}"
            awp_text = "" if run.awp is None else "  AWP on" if awp_on else f"  AWP off (warm-up: {warmup})"
            print(f"epoch {epoch + 1:>3}/{cfg.epochs}  loss {record['train_loss']:.4f}  test clean {test_clean:.2%}  "
                  f"test PGD-{cfg.eval.steps} {test_rob:.2%}  train PGD-{cfg.eval.steps} {train_rob:.2%}  gap {record['gap']:+.2%}{awp_text}"
                  + (f"  EMA: test clean {accs['ema_test_clean_acc']:.2%}  test PGD-{cfg.eval.steps} {accs['ema_test_robust_acc']:.2%}"
                     if run.ema is not None else "") + f"{'  (best)' if is_best else ''}", file=sys.stderr)
        if warning and dist.main and not (len(history) > 1 and history[-2].get("warning")):  # once per collapse
            print(f"flatrobust: warning: {warning}", file=sys.stderr)
    if tb is not None:
        tb.close()
    if progress:
        print_summary(run_dir, history, time.time() - t_run)
    return run_dir


def print_summary(run_dir: Path, history: list[dict], seconds: float) -> None:
    if not history:
        return
    rows = [("", "epoch", "test clean", "test robust", "train robust", "gap")]
    for weights, p in [("", "")] + ([("EMA ", "ema_")] if "ema_test_robust_acc" in history[-1] else []):
        best = max((r for r in history if f"{p}test_robust_acc" in r), key=lambda r: r[f"{p}test_robust_acc"])
        for label, r in ((f"best {weights}", best), (f"last {weights}", history[-1])):
            rows.append((label.strip(), str(r["epoch"]), f"{r[p + 'test_clean_acc']:.2%}", f"{r[p + 'test_robust_acc']:.2%}",
                         f"{r[p + 'train_robust_acc']:.2%}", f"{r[p + 'gap']:+.2%}"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    print(f"\nrun {run_dir} ({seconds:.0f} s)")
    for r in rows:
        print("  ".join(c.rjust(w) for c, w in zip(r, widths)))
    ema = " (each holds the raw and the EMA weights: --weights ema|raw)" if "ema_test_robust_acc" in history[-1] else ""
    print(f"checkpoints: {run_dir / 'best.pt'} (best test robust accuracy of the raw weights), {run_dir / 'last.pt'}{ema}")


def resume_config(run_dir: str | Path, overrides: list[str] | None = None) -> RunConfig:
    """The config of an existing run directory, with optional overrides (e.g. epochs=30 to train longer)."""
    from .config import _merge, parse_overrides

    run_dir = Path(run_dir)
    path, last = run_dir / "config.yaml", run_dir / "last.pt"
    if not path.is_file() and not last.is_file():
        raise UserError(f"{run_dir} is not a run directory (no config.yaml): pass the folder that `flatrobust train` created")
    try:
        tree = yaml.safe_load(path.read_text()) if path.is_file() else None
    except (yaml.YAMLError, OSError, UnicodeDecodeError):
        tree = None
    if not isinstance(tree, dict):  # e.g. emptied by a full disk (before writes were atomic): last.pt holds the config too
        if not last.is_file():
            raise UserError(f"{str(path)!r} is empty or damaged and {run_dir} holds no last.pt: there is nothing to resume; "
                            "start the run again (with --overwrite)")
        tree = load_checkpoint(last)["config"]
        print(f"flatrobust: warning: {str(path)!r} is missing, empty or damaged: resuming with the config saved in {str(last)!r}",
              file=sys.stderr)
    return config_from_dict(_merge(tree, parse_overrides(overrides or [])))
