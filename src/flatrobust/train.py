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
import subprocess
import sys
import time
import dataclasses
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn

from . import models, rundir, runlock, schedules
from .attacks import pgd, whole_box_warning
from .awp import AWP, perturbed_parameters
from .checkpoint import WriteError, load_checkpoint, load_weights, save_checkpoint
from .catastrophic import CatastrophicOverfitting
from .collapse import ChanceLevel, collapse_warning, top_class_share
from .config import RunConfig, check_resume_config
from .data.builtin import WITHOUT_FILES
from .data import DATASETS, DataError, TensorData, augment, cutout, batches, load_extra, load_split, mixed_batch_sizes, mixed_batches
from .ema import EMA
from .mixup import Mixed, mixup
from .errors import UserError
from .guard import Rollback, StepMonitor, kept_checkpoint, skip_failure, stop_message
from .machine import describe, resolve_device
from .objectives import AttackConfig, Objective, create_objective
from .progress import Progress, format_duration
from .speed import accelerate
from .tblog import TensorBoardLog, require_tensorboard

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
    l1: float = 0.0,
) -> StepResult:
    """One AWP step (Wu, Xia, Wang, NeurIPS 2020, Section 4, in the order of its official code): 1. x_adv at w,
    2.-3. w <- w + v, the optimizer step at w + v, 4. w <- w - v.

    No host synchronization: the result stays on the device, and so does the verdict on finiteness
    (`finite`). A non-finite step is applied like any other (its weights become non-finite; a loop stops
    at its next read of `finite`), unless `rollback` is given: then weights, buffers and optimizer state are
    put back on the device as they were before the step (`nonfinite=skip`). `l1` > 0 adds l1 * sum |w| over the weights
    with dim > 1 to the training loss (the official script's --l1; the logged loss includes it).

    Free AT (`objective.free`, Shafahi et al. 2019): one replay. Step 1 is x + the carried perturbation, and the one
    backward pass at w + v gives the input gradient too, which moves the perturbation after the optimizer step.
    """
    if rollback is not None:
        rollback.save()
    x_adv = objective.attack(model, x, y, generator=generator)  # 1. at the unperturbed weights
    if awp is not None:
        awp.perturb(lambda m: objective.ascent_loss(m, x, x_adv, y))  # 2.-3. w <- w + v
    free = getattr(objective, "free", None)
    if free is not None:
        x_adv = x_adv.detach().requires_grad_(True)  # the step's backward gives the input gradient as well ("for free")
    try:
        model.train()
        loss, logits_adv = objective.loss_and_logits(model, x, x_adv, y)  # the training loss at w + v
        if l1 > 0:
            loss = loss + l1 * sum(p.abs().sum() for _, p in perturbed_parameters(model))
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
    if free is not None:  # delta <- P(x_adv + alpha * step(grad_x L(w + v))); an undone step leaves it too
        free.update(x, x_adv, x_adv.grad, keep=~finite if rollback is not None else None)
    labels = y.argmax(1) if y.dim() == 2 else y  # mixup's soft labels: their larger share
    return StepResult(loss, (logits_adv.detach().argmax(1) == labels).sum(), finite)


def schedule_epochs(cfg: RunConfig) -> int:
    """The epochs the lr schedule spans: `cfg.epochs`, or under Free AT the passes times m (ceil(epochs / m) * m: the
    epochs of standard training whose SGD steps the run takes, each replay one iteration)."""
    return cfg.attack.passes(cfg.epochs) * cfg.attack.batch_replays


def lr_at(step: int, total_steps: int, cfg: RunConfig) -> float:
    """Learning rate at iteration `step` (0-based) of `total_steps` (`schedule_epochs(cfg)` epochs of equal length):
    `optim.schedule` as `schedules.Schedule` defines it."""
    o = cfg.optim
    epochs = schedule_epochs(cfg)
    per_epoch = max(total_steps // max(epochs, 1), 1)
    if o.schedule in schedules.OWN:  # their rule reads total_steps itself (a run whose epochs do not divide it)
        return schedules.Schedule(o.schedule, o.lr, 1, max(total_steps, 1))(step)
    return schedules.Schedule(o.schedule, o.lr, epochs, per_epoch, o.lr_one_drop, o.lr_drop_epoch)(step)


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
    eval_val: TensorData | None = None  # data.val_subset: the held-out training images best.pt is chosen on
    val_indices: list[int] | None = None  # their indices in the training split as loaded (recorded in data.json)


def build(cfg: RunConfig, dist: Dist | None = None, *, progress: bool = False) -> Run:
    dist = dist or Dist()
    device = resolve_device(cfg.device, dist.local_rank)
    try:  # progress: a long first read (decoding an image folder) reports as the training loop does
        train = load_split(cfg.data, "train", progress=progress)
        test = load_split(cfg.data, "test", like=train.info, progress=progress)
    except DataError as e:
        raise UserError(str(e)) from None
    info = train.info  # built-in sets: their registry entry; image folders / npz: classes, channels, size, statistics
    train, val, val_indices = hold_out(train, cfg.data.train_subset, cfg.data.val_subset, cfg.seed)
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
    objective = create_objective(cfg.method, cfg.attack, beta=cfg.beta)
    o = cfg.optim
    params: Any = model.parameters()
    if o.l2 > 0:  # the official --l2: decay l2 on the weights with dim > 1, none on BatchNorm and biases
        decayed = {id(p) for _, p in perturbed_parameters(model)}
        params = [{"params": [p for p in model.parameters() if id(p) in decayed], "weight_decay": o.l2},
                  {"params": [p for p in model.parameters() if id(p) not in decayed], "weight_decay": 0.0}]
    optimizer = torch.optim.SGD(params, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay,
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
               optimizer, awp, dist, eval_forward, n_labeled, info, ema, ema_forward,
               val.to(device) if val is not None else None, val_indices)


def hold_out(train: TensorData, train_subset: int, val_subset: int, seed: int) -> tuple[TensorData, TensorData | None, list[int] | None]:
    """(training data, validation split or None, its indices in `train`): `data.train_subset` and `data.val_subset`.

    The training subset is drawn as it always was (`TensorData.subset(train_subset, seed)`); the validation images
    are `val_subset` of the images it leaves out (all of them when train_subset is 0, the rest then training),
    drawn by a generator seeded from `seed`. UserError (one line) when too few images are left to hold out.
    """
    n = len(train)
    g = torch.Generator().manual_seed(seed)
    train_idx = torch.randperm(n, generator=g)[:train_subset].sort().values if train_subset else None
    if not val_subset:
        return (train.subset(train_subset, seed=seed) if train_subset else train), None, None
    rest = torch.ones(n, dtype=torch.bool)
    if train_idx is not None:
        rest[train_idx] = False
    pool = rest.nonzero().squeeze(1)
    left = len(pool) - (0 if train_subset else 1)  # without a training subset, at least one image must train
    if val_subset > left:
        where = f"the {len(pool)} images data.train_subset={train_subset} leaves out" if train_subset else f"the {n}-image training set"
        raise UserError(f"data.val_subset={val_subset} must be smaller than {where}: lower it")
    pick = pool[torch.randperm(len(pool), generator=torch.Generator().manual_seed(seed + 7919))[:val_subset]].sort().values
    if train_idx is None:
        keep = torch.ones(n, dtype=torch.bool)
        keep[pick] = False
        train_idx = keep.nonzero().squeeze(1)
    return (TensorData(train.x[train_idx], train.y[train_idx], train.info), TensorData(train.x[pick], train.y[pick], train.info),
            pick.tolist())


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


# ----------------------------------------------------------------------------------- the epoch plan


@dataclass(frozen=True)
class EpochPlan:
    """Which examples, noise and learning rate every step of a run uses: a function of the config, the data sizes and
    the process's place in the job only, so that a resume and a replay (tools/awp_collapse.py) take `fit`'s steps.

    Under DDP every process takes its share of each global batch of batch_size, and the last, incomplete batch is
    dropped so that no process is left without examples. With RST's extra data an epoch is one pass over the
    labeled data, each batch completed with extra examples (`data.extra_fraction` of it).

    Free AT (Shafahi et al. 2019) replays each batch m times, one SGD step each: an epoch of the loop is one pass over
    the data of m * batches steps, and `epochs` (the loop's) is ceil(cfg.epochs / m), so that the run takes the SGD
    steps of cfg.epochs epochs of standard training (rounded up to whole passes, as Shafahi et al.'s code does). Steps
    (`step`, the lr schedule, awp.start_step, checkpoint_every, log.interval) count SGD steps, i.e. replays.
    """

    cfg: RunConfig
    n_labeled: int  # the first n_labeled examples of the training data are labeled; the rest is extra data
    n_extra: int = 0
    rank: int = 0
    world: int = 1

    @classmethod
    def of(cls, run: Run) -> EpochPlan:
        return cls(run.cfg, run.n_labeled, len(run.train) - run.n_labeled, run.dist.rank, run.dist.world)

    @cached_property
    def batches_per_epoch(self) -> int:
        cfg = self.cfg
        per_batch = mixed_batch_sizes(cfg.batch_size, cfg.data.extra_fraction)[0] if self.n_extra else cfg.batch_size
        return self.n_labeled // per_batch if self.world > 1 else math.ceil(self.n_labeled / per_batch)

    @property
    def replays(self) -> int:
        """SGD steps per batch: Free AT's m, else 1."""
        return self.cfg.attack.batch_replays

    @property
    def epochs(self) -> int:
        """The loop's epochs (passes over the data): cfg.epochs, or ceil(cfg.epochs / m) under Free AT."""
        return self.cfg.attack.passes(self.cfg.epochs)

    @property
    def steps_per_epoch(self) -> int:
        return self.batches_per_epoch * self.replays

    @property
    def total_steps(self) -> int:
        return self.epochs * self.steps_per_epoch

    @property
    def awp_start(self) -> int:
        """The global step AWP starts at: awp.start_step, or the first step of epoch awp.warmup if later. Under Free AT
        awp.warmup counts epochs of standard training like cfg.epochs does (warmup * batches SGD steps), so AWP may
        start inside a pass."""
        return max(self.cfg.awp.start_step, self.cfg.awp.warmup * self.batches_per_epoch)

    def step(self, epoch: int, batch: int, replay: int = 0) -> int:
        """The global step (0-based) of replay `replay` of batch `batch` of epoch `epoch` (all 0-based)."""
        return (epoch * self.batches_per_epoch + batch) * self.replays + replay

    def lr(self, step: int) -> float:
        return lr_at(step, self.total_steps, self.cfg)

    @cached_property
    def augment(self) -> dict[str, Any]:
        """`data.augment` as the keyword arguments of `data.augment` (the dataset's default for "default")."""
        cfg = self.cfg
        default = DATASETS[cfg.data.name].default_augment if cfg.data.name in DATASETS else "none"
        kind = default if cfg.data.augment == "default" else cfg.data.augment
        return {"crop_padding": 4, "flip": True} if kind == "crop_flip" else {"crop_padding": 0, "flip": False}

    def generators(self, epoch: int, device: torch.device) -> tuple[torch.Generator, torch.Generator]:
        """(order, noise): the data order (on the CPU) and the augmentation/attack noise (on `device`) of one epoch,
        from (seed, epoch).

        Deriving them from (seed, epoch) instead of carrying one stream across epochs makes every epoch
        reproducible on its own, which is what exact resume needs. The order is drawn on the CPU so that it is
        the same on every device, and its indices reach the device once per epoch (`index_batches`).
        """
        base = (self.cfg.seed * 1_000_003 + epoch) % (2**63)
        order = torch.Generator().manual_seed(base)
        noise = torch.Generator(device=device).manual_seed(base ^ 0x5DEECE66D ^ (self.rank << 40))  # own noise per process
        return order, noise

    def index_batches(self, order: torch.Generator, device: torch.device | None = None) -> list[torch.Tensor]:
        """This process's index batches of the epoch drawn by `order`, on `device` (the data's) in one non-blocking copy."""
        cfg, drop_last = self.cfg, self.world > 1
        if self.n_extra:
            epoch = mixed_batches(self.n_labeled, self.n_extra, cfg.batch_size, cfg.data.extra_fraction, generator=order,
                                  drop_last=drop_last)
        else:
            epoch = batches(self.n_labeled, cfg.batch_size, shuffle=True, generator=order, drop_last=drop_last)
        own = [idx[self.rank::self.world] for idx in epoch]
        if device is None or device.type == "cpu" or not own:
            return own
        flat = torch.cat(own).pin_memory().to(device, non_blocking=True)
        return list(flat.split([len(i) for i in own]))


def _mix(mixed: Mixed, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    return mixed.x, mixed.soft_targets(num_classes)


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


# ----------------------------------------------------------------------------------- the steps of the epoch loop


@dataclass
class Position:
    """Where a run stands: what a checkpoint records and a resume restores."""

    epoch: int = 0  # epochs finished
    batch: int = 0  # steps of epoch `epoch` + 1 taken (> 0: a checkpoint inside an epoch, checkpoint_every)
    best: float = -1.0  # the best monitored robust accuracy so far, on the validation split or else the test subset (best.pt's epoch)
    skipped: int = 0  # steps undone by nonfinite=skip, over the whole run
    noise_state: torch.Tensor | None = None  # inside an epoch: the state of its noise generator
    epoch_sums: dict | None = None  # inside an epoch: the sums of its steps so far (`new_sums`)
    catastrophic: dict | None = None  # the catastrophic overfitting check's state (`CatastrophicOverfitting.state_dict`)


def new_sums() -> dict[str, Any]:
    """An epoch's running sums over its steps (as a checkpoint inside the epoch stores them)."""
    return {"loss": 0.0, "correct": 0.0, "seen": 0, "skipped": 0, "time": 0.0}


def restore(run: Run, state: dict[str, Any]) -> Position:
    """Put weights, optimizer, EMA and random number generators back as checkpoint `state` holds them; where it stands."""
    run.model.load_state_dict(state["model"])
    run.optimizer.load_state_dict(state["optimizer"])
    if run.ema is not None and state.get("ema") is not None:  # (EMA turned on at resume: it starts from here)
        run.ema.load_state_dict(state["ema"])
    run.objective.load_state_dict(state.get("objective"))  # FGSM's previous perturbation (attack.init=previous)
    own = _own_position(state, run.dist)
    torch.set_rng_state(own["torch_rng"])
    if run.device.type == "cuda" and own.get("cuda_rng") is not None:
        torch.cuda.set_rng_state(own["cuda_rng"], run.device)
    return Position(state["epoch"], state["batch"], state["best"], state.get("skipped", 0), own.get("noise_state"),
                    own.get("epoch_sums"), state.get("catastrophic"))


def _own_position(state: dict, dist: Dist) -> dict:
    """This process's noise state, epoch sums and RNG states from a checkpoint (its entry of `ranks` when
    it was taken inside an epoch under DDP). A checkpoint from inside an epoch resumes only with the
    number of processes that wrote it: every process's noise stream is part of the exact resume."""
    ranks, world = state.get("ranks"), state.get("world_size", 1)
    if state["batch"] > 0 and world != dist.world:
        raise UserError(f"the checkpoint was taken inside epoch {state['epoch'] + 1} by {world} process(es): resume it with "
                        f"{world} (torchrun --nproc_per_node={world}), or from an epoch-end checkpoint with any number")
    return ranks[dist.rank] if ranks is not None else state


def write_checkpoint(run: Run, run_dir: Path, name: str, at: Position) -> None:
    """RUN_DIR/`name` (last.pt or best.pt) at position `at`, with the RNG states to resume from there exactly.

    A collective under DDP inside an epoch (every process's noise, sums and RNG go into the file): every process
    calls it; only the main process writes.
    """
    where = f"epoch {at.epoch + 1}, step {at.batch}" if at.batch else f"epoch {at.epoch}"
    _check_weights_finite(run.model, where, run_dir)
    position = {"noise_state": at.noise_state, "epoch_sums": at.epoch_sums, "torch_rng": torch.get_rng_state(),
                "cuda_rng": torch.cuda.get_rng_state(run.device) if run.device.type == "cuda" else None}
    ranks = run.dist.gather(position) if run.dist.world > 1 and at.batch else None
    if not run.dist.main:
        return
    save_checkpoint({
        "config": run.cfg.to_dict(), "model": run.model.state_dict(), "optimizer": run.optimizer.state_dict(),
        "epoch": at.epoch, "batch": at.batch, "best": at.best, "skipped": at.skipped, **position,
        "world_size": run.dist.world, "ranks": ranks,
        "awp": run.awp.state_dict() if run.awp is not None else None,
        "ema": run.ema.state_dict() if run.ema is not None else None,
        "objective": run.objective.state_dict(), "catastrophic": at.catastrophic,
        "data_info": run.info.to_dict() if run.info is not None else None,
    }, run_dir / name)


def _check_weights_finite(model: nn.Module, where: str, run_dir: Path) -> None:
    """Refuse to checkpoint non-finite weights (one host sync, at checkpoint time only)."""
    tensors = [t for t in [*model.parameters(), *model.buffers()] if t.is_floating_point()]
    with torch.no_grad():
        ok = bool(torch.isfinite(torch.stack(torch._foreach_norm(tensors))).all())
    if not ok:
        raise NonFiniteError(f"weights are non-finite after {where} although every step's loss was finite; "
                             f"{kept_checkpoint(run_dir)}: lower optim.lr")


class StepReader:
    """The per-step monitoring: the steps' loss, accuracy and finiteness stay on the device (`StepMonitor`) until
    `read` brings them to the host (one sync, every log.interval steps), adds them to the epoch's sums, stops the
    run on a non-finite step (nonfinite=stop, or nonfinite=skip when skipping is all it does: `guard.skip_failure`),
    and feeds TensorBoard and the progress bar."""

    def __init__(self, run: Run, run_dir: Path, plan: EpochPlan, tb: TensorBoardLog | None, *, skipped: int):
        self.run, self.run_dir, self.plan, self.tb = run, run_dir, plan, tb
        self.monitor = StepMonitor(run.device)
        self.skipped = skipped  # non-finite steps over the whole run (nonfinite=skip undid them)
        self._clock = time.time()

    def start(self, first: int) -> None:
        """A new epoch (or the rest of one) starts at batch `first`."""
        self.monitor.start(first)
        self.restart_clock()

    def restart_clock(self) -> None:
        """An epoch's time counts its steps only (not evaluation or checkpoint writes)."""
        self._clock = time.time()

    def add(self, result: StepResult, n: int, awp: AWP | None) -> None:
        self.monitor.add(result.loss, result.correct, n, result.finite, awp)

    def read(self, epoch: int, sums: dict[str, Any], step_end: int, bar: Progress) -> None:
        """Bring the steps up to global step `step_end` to the host into `sums`; raise on a non-finite step."""
        cfg, dist, r = self.run.cfg, self.run.dist, self.monitor.read()
        awp_names = self.run.awp.names if self.run.awp is not None else None
        bad = r.bad if dist.world == 1 else int(dist.all_sum([r.bad], self.run.device)[0])
        if bad and cfg.nonfinite == "stop":
            raise NonFiniteError(stop_message(r, epoch, awp_names, self.run_dir))
        sums["loss"] += r.loss_sum
        sums["correct"] += r.correct
        sums["seen"] += r.seen
        sums["skipped"] += r.bad
        self.skipped += r.bad
        in_epoch, per_epoch = step_end - self.plan.step(epoch, 0), self.plan.steps_per_epoch
        gave_up = r.bad and skip_failure(r.longest_bad_run, sums["skipped"], in_epoch, per_epoch)
        if gave_up:  # nonfinite=skip, and skipping is all the run does
            raise NonFiniteError(stop_message(r, epoch, awp_names, self.run_dir, gave_up=gave_up))
        if self.tb is not None:  # a loss point every log.interval steps of the epoch and at its end
            self.tb.step(step_end, r.loss_sum, r.seen, write=in_epoch % cfg.log.interval < self.plan.replays or in_epoch == per_epoch)
        now = time.time()
        sums["time"] += now - self._clock  # wall time of the steps, read after the device has finished them
        self._clock = now
        seen = max(sums["seen"], 1)
        bar.set_postfix(loss=f"{sums['loss'] / seen:.3f}", adv_acc=f"{sums['correct'] / seen:.1%}",
                        img_s=f"{sums['seen'] / max(sums['time'], 1e-9):.0f}")


class Monitoring(NamedTuple):
    """The per-epoch evaluation of the weights on the fixed monitoring subsets."""

    accs: dict[str, float]  # `evaluate_weights` of the raw weights, and with EMA of the average (ema_*)
    top_class_share: float  # share of test monitoring images given the most frequent class (collapse check)
    seconds: float


def monitor_epoch(run: Run, attack: AttackConfig) -> Monitoring:
    """Clean and PGD accuracy on the fixed train and test subsets (raw weights, and EMA), and the collapse check."""
    t0 = time.time()
    accs = evaluate_weights(run.local_forward, run, attack)
    if run.eval_val is not None:  # data.val_subset: what best.pt is chosen on
        accs["val_clean_acc"], accs["val_robust_acc"] = robust_accuracy(run.local_forward, run.eval_val, attack,
                                                                        batch_size=run.cfg.eval.batch_size, seed=run.cfg.seed + 2, dist=run.dist)
    if run.ema is not None:
        accs |= evaluate_weights(run.ema_forward, run, attack, prefix="ema_")
    top_share = top_class_share(run.local_forward, run.eval_test.x, batch_size=run.cfg.eval.batch_size)
    return Monitoring(accs, top_share, time.time() - t0)


def epoch_record(plan: EpochPlan, epoch: int, sums: dict[str, Any], awp_on: bool, watch: Monitoring, eval_n: int) -> dict[str, Any]:
    """The epoch's line of metrics.jsonl (`sums` summed over every process)."""
    end = plan.step(epoch + 1, 0)
    seen = max(sums["seen"], 1)
    # Free AT: the replays per batch, and the SGD steps so far in epochs of standard training (the budget's unit)
    free = {"replays": plan.replays, "standard_epochs": (epoch + 1) * plan.replays} if plan.cfg.attack.kind == "free" else {}
    return {
        "epoch": epoch + 1, "step": end, "lr": plan.lr(end - 1), "awp_active": awp_on, "train_loss": sums["loss"] / seen,
        "train_batch_adv_acc": sums["correct"] / seen,  # on the training batches, at w + v
        **watch.accs,  # train/test clean and robust accuracy and the gap; with EMA the same again as ema_*
        "eval_n": eval_n,  # images in each of the fixed test and train monitoring subsets
        # the number best.pt is chosen on: the validation split's PGD accuracy (data.val_subset) or the test subset's
        "best_on": "val" if "val_robust_acc" in watch.accs else "test",
        "test_top_class_share": watch.top_class_share,
        "skipped_batches": sums["skipped"], "epoch_time_s": sums["time"], "eval_time_s": watch.seconds,
        "images_per_s": sums["seen"] / max(sums["time"], 1e-9),  # examples per second over the steps (replays count each time)
        **free,
    }


def save_epoch(run: Run, run_dir: Path, record: dict[str, Any], at: Position, *, is_best: bool, tb: TensorBoardLog | None) -> None:
    """The epoch's record and checkpoints. Order matters for a crash between writes: metrics, then best.pt, then
    last.pt. A resume starts from last.pt, drops metric lines it does not cover and recomputes that epoch identically."""
    if run.dist.main:
        rundir.append_metrics(run_dir, record)
    if tb is not None:
        tb.write_epoch(record)
    if is_best:
        write_checkpoint(run, run_dir, rundir.BEST, at)
    write_checkpoint(run, run_dir, rundir.LAST, at)


def epoch_line(cfg: RunConfig, record: dict[str, Any], *, has_awp: bool, has_ema: bool, is_best: bool) -> str:
    """The line printed at the end of an epoch."""
    warmup = "epoch 1" if cfg.awp.warmup == 1 else f"epochs 1-{cfg.awp.warmup}"
    if cfg.attack.kind == "free":  # awp.warmup counts epochs of standard training, as cfg.epochs does
        warmup = f"the SGD steps of {cfg.awp.warmup} standard epoch{'s' if cfg.awp.warmup != 1 else ''}"
    awp = "" if not has_awp else "  AWP on" if record["awp_active"] else f"  AWP off (warm-up: {warmup})"
    steps = cfg.eval.steps
    ema = (f"  EMA: test clean {record['ema_test_clean_acc']:.2%}  test PGD-{steps} {record['ema_test_robust_acc']:.2%}"
           if has_ema else "")
    return (f"epoch {record['epoch']:>3}/{cfg.attack.passes(cfg.epochs)}  loss {record['train_loss']:.4f}  test clean {record['test_clean_acc']:.2%}  "
            f"test PGD-{steps} {record['test_robust_acc']:.2%}  train PGD-{steps} {record['train_robust_acc']:.2%}  "
            f"gap {record['gap']:+.2%}{awp}{ema}{'  (best)' if is_best else ''}")


def _loop(run: Run, run_dir: Path, state: dict | None, *, progress: bool, stop_after_steps: int | None,
          started: float | None = None) -> Path:
    cfg, dist, plan = run.cfg, run.dist, EpochPlan.of(run)
    at = restore(run, state) if state is not None else Position()
    history = _kept_metrics(run_dir, at.epoch) if dist.main else []
    tb = (TensorBoardLog(run_dir / "tensorboard", resumed_at=plan.step(at.epoch, at.batch) if state else None)
          if cfg.log.tensorboard and dist.main else None)
    reader = StepReader(run, run_dir, plan, tb, skipped=at.skipped)
    rollback = Rollback(run.model, run.optimizer) if cfg.nonfinite == "skip" else None
    pgd_attack = cfg.attack.evaluation  # the training attack's threat model as PGD (its default step after FGSM)
    eval_attack = AttackConfig(eps=pgd_attack.eps, alpha=cfg.eval.alpha or pgd_attack.alpha, steps=cfg.eval.steps, norm=pgd_attack.norm)
    overfit = CatastrophicOverfitting(n=len(run.eval_test))
    if at.catastrophic is not None:
        overfit.load_state_dict(at.catastrophic)
    chance = ChanceLevel.of(run.eval_test.y)  # for the collapse check at epoch ends
    best, steps_done, t_run = at.best, 0, time.time()
    late = awp_warmup_warning(cfg, plan.total_steps) if cfg.awp.warmup < schedule_epochs(cfg) else None  # (fit said the warm-up one)
    if late and dist.main:
        print(f"flatrobust: warning: {late}", file=sys.stderr)
    m = plan.replays  # SGD steps per batch (Free AT's replays; 1 otherwise)
    if run.awp is not None:
        run.awp.start_step = plan.awp_start  # awp.warmup as a step (with m = 1 the same as "from epoch awp.warmup on")
    for epoch in range(at.epoch, plan.epochs):
        order, noise = plan.generators(epoch, run.device)
        index_batches = plan.index_batches(order, run.train.x.device)
        first, sums = 0, new_sums()
        if epoch == at.epoch and at.batch > 0:  # continue inside the epoch where the checkpoint was taken
            first, sums = at.batch, dict(at.epoch_sums)
            noise.set_state(at.noise_state)
        # on for at least one step of the epoch (its start may fall inside it: AWP itself waits for it)
        awp_on = run.awp is not None and (epoch + 1) * plan.steps_per_epoch > plan.awp_start
        awp = run.awp if awp_on else None
        bar = Progress(range(first, len(index_batches)), total=len(index_batches), initial=first, enabled=progress,
                       desc=f"epoch {epoch + 1}/{plan.epochs}", unit="batch")
        reader.start(first * m)
        for b in bar:
            x, y = _fetch(run.train, index_batches[b], run.device)
            x = augment(x, generator=noise, **plan.augment)
            if cfg.data.cutout:
                x = cutout(x, cfg.data.cutout, generator=noise)
            if cfg.data.mixup_alpha > 0:  # soft labels: the attack and the AT loss take them as they are (CE is linear in them)
                x, y = _mix(mixup(x, y, cfg.data.mixup_alpha), run.info.num_classes)
            for r in range(m):  # Free AT replays the batch m times, one SGD step each (the perturbation carried on)
                step = plan.step(epoch, b, r)
                for group in run.optimizer.param_groups:
                    group["lr"] = plan.lr(step)
                if awp is not None:
                    awp.step = step  # the global step, also after a resume: start_step compares with it
                result = train_step(run.forward, run.objective, run.optimizer, x, y, awp=awp, generator=noise, rollback=rollback,
                                    l1=cfg.optim.l1)
                reader.add(result, len(y), awp)
                if run.ema is not None:
                    run.ema.update(run.model)  # after train_step's awp.restore() (and rollback): the average never sees w + v
            steps_done += m
            # checkpoints and reads at the end of a batch whose steps reach a multiple of the setting (never between replays)
            save = cfg.checkpoint_every and _reaches(b, m, cfg.checkpoint_every) and b + 1 < len(index_batches)
            stop = stop_after_steps is not None and steps_done >= stop_after_steps
            if save or stop or _reaches(b, m, cfg.log.interval):  # the only host syncs of the loop
                reader.read(epoch, sums, step + 1, bar)
            if save:
                write_checkpoint(run, run_dir, rundir.LAST, Position(epoch, b + 1, best, reader.skipped, noise.get_state(), sums,
                                                                     overfit.state_dict()))
                reader.restart_clock()
            if stop:
                bar.close()
                if tb is not None:
                    tb.close()
                return run_dir
        reader.read(epoch, sums, plan.step(epoch + 1, 0), bar)
        bar.close()
        watch = monitor_epoch(run, eval_attack)
        sums["loss"], sums["correct"], sums["seen"] = dist.all_sum([sums["loss"], sums["correct"], sums["seen"]], run.device)
        record = epoch_record(plan, epoch, sums, awp is not None, watch, len(run.eval_test))
        history.append(record)
        warning = collapse_warning(history, chance=chance)  # AWP killed the model?
        if warning:
            record["warning"] = warning
        chosen_on = record.get("val_robust_acc", record["test_robust_acc"])
        is_best = chosen_on > best
        if is_best:
            best = chosen_on
        overfitting = overfit.check(epoch + 1, record["test_robust_acc"], record["train_batch_adv_acc"])
        if overfitting:
            rolled = cfg.guard.catastrophic == "rollback" and not is_best and (run_dir / rundir.BEST).exists()
            then = {"warn": "training goes on", "stop": "the run stops here (resume continues it)",
                    "rollback": "weights and optimizer rolled back to best.pt's epoch" if rolled else "no better epoch to roll back to"}
            record["catastrophic"] = f"{overfitting}; guard.catastrophic={cfg.guard.catastrophic}: {then[cfg.guard.catastrophic]}"
            if rolled:  # before last.pt is written, so that a resume continues from the rolled-back weights
                roll_back(run, run_dir / rundir.BEST)
        save_epoch(run, run_dir, record, Position(epoch + 1, 0, best, reader.skipped, catastrophic=overfit.state_dict()),
                   is_best=is_best, tb=tb)
        if progress:
            print(epoch_line(cfg, record, has_awp=run.awp is not None, has_ema=run.ema is not None, is_best=is_best), file=sys.stderr)
        if warning and dist.main and not (len(history) > 1 and history[-2].get("warning")):  # once per collapse
            print(f"flatrobust: warning: {warning}", file=sys.stderr)
        if overfitting:
            if dist.main:
                print(f"flatrobust: warning: {record['catastrophic']}", file=sys.stderr)
            if cfg.guard.catastrophic == "stop":
                break
    if tb is not None:
        tb.close()
    if progress:
        print_summary(run_dir, history, time.time() - (t_run if started is None else started))
    return run_dir


def _reaches(batch: int, replays: int, every: int) -> bool:
    """Whether the SGD steps of an epoch up to the end of batch `batch` (0-based), `replays` per batch, pass a multiple
    of `every`: (batch + 1) % every == 0 with one step per batch."""
    return (batch + 1) * replays % every < replays


def val_record(run: Run) -> dict[str, Any]:
    """data.json's record of the validation split (data.val_subset): its size, seed and indices in the training split."""
    if run.val_indices is None:
        return {}
    return {"val_split": {"n": len(run.val_indices), "seed": run.cfg.seed, "train_subset": run.cfg.data.train_subset,
                          "indices": run.val_indices}}


def roll_back(run: Run, best: Path) -> None:
    """guard.catastrophic=rollback: weights, optimizer and EMA back to `best` (best.pt: the last good epoch); the run goes on
    from there with the next epoch's data order and noise. last.pt keeps the epoch as trained (its record says so)."""
    state = load_checkpoint(best, map_location=run.device)
    run.model.load_state_dict(state["model"])
    run.optimizer.load_state_dict(state["optimizer"])
    if run.ema is not None and state.get("ema") is not None:
        run.ema.load_state_dict(state["ema"])
    run.objective.load_state_dict(state.get("objective"))


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


def _finished(run_dir: Path, state: dict[str, Any], cfg: RunConfig) -> bool:
    """Whether the checkpoint already covers all the loop's epochs (`cfg.epochs`, or its passes under Free AT); UserError if it
    covers more (no shortening)."""
    done, epochs = state["epoch"], cfg.attack.passes(cfg.epochs)
    if done > epochs or (done == epochs and state["batch"] > 0):
        m = cfg.attack.batch_replays
        more = f"{done} epochs, more than epochs={cfg.epochs}" if m == 1 else \
            f"{done} passes of Free AT (m={m}), more than the {epochs} of epochs={cfg.epochs}"
        raise UserError(f"{run_dir} has trained {more}: a run cannot be shortened; "
                        f"resume with epochs={done * m} or more, or start a new run from it with init_from={run_dir}")
    return done == epochs


def free_note(cfg: RunConfig) -> str | None:
    """One line on what Free AT does with `epochs` (None for the other attacks)."""
    m = cfg.attack.batch_replays
    if cfg.attack.kind != "free":
        return None
    passes = cfg.attack.passes(cfg.epochs)
    rounded = f", rounded up from {cfg.epochs}" if passes * m != cfg.epochs else ""
    return (f"Free AT: every batch replayed {m} times (one SGD step each), so epochs={cfg.epochs} is {passes} pass"
            f"{'es' if passes != 1 else ''} over the data: the SGD steps of {passes * m} epochs of standard training{rounded}")


def awp_warmup_warning(cfg: RunConfig, total_steps: int | None = None) -> str | None:
    """One line when AWP is asked for (gamma > 0) but its warm-up (or awp.start_step, against the run's
    `total_steps` when known) leaves it off for every step of the run."""
    if cfg.awp.gamma > 0 and cfg.awp.warmup >= schedule_epochs(cfg):  # (Free AT: the passes' epochs of standard training)
        budget = f"epochs={cfg.epochs}" if cfg.attack.kind != "free" else \
            f"the {schedule_epochs(cfg)} epochs' SGD steps of Free AT with epochs={cfg.epochs}, attack.replays={cfg.attack.replays}"
        return (f"awp.warmup={cfg.awp.warmup} >= {budget}: AWP (gamma {cfg.awp.gamma:g}) is never active, "
                f"so this run trains plain {cfg.method.upper()}; lower awp.warmup (e.g. awp.warmup=0) or raise epochs")
    if cfg.awp.gamma > 0 and total_steps is not None and cfg.awp.start_step >= total_steps:
        return (f"awp.start_step={cfg.awp.start_step} >= the run's {total_steps} steps: AWP (gamma {cfg.awp.gamma:g}) is never "
                f"active, so this run trains plain {cfg.method.upper()}; lower awp.start_step or raise epochs")
    return None


def resolve_data_root(cfg: RunConfig) -> RunConfig:
    """`cfg` with data.root as an absolute path (a set that reads no file, digits, keeps its root): the run's
    config.yaml and checkpoints then find the data from any folder (eval, landscape, flatness, --resume), where a
    relative root worked only from the folder training ran in. data.json keeps the root as typed beside it."""
    if cfg.data.name in WITHOUT_FILES:
        return cfg
    root = os.path.abspath(os.path.expanduser(cfg.data.root))
    return cfg if root == cfg.data.root else dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, root=root))


def fit(cfg: RunConfig, *, resume_dir: str | Path | None = None, overwrite: bool = False, progress: bool = True,
        stop_after_steps: int | None = None) -> Path:
    """Train `cfg`; returns the run directory. `resume_dir` continues a stopped run from its last.pt.

    The main process holds the run directory's lock (`runlock`) from before it reads or writes anything there to
    the end: a second writer of the same run is refused in one line."""
    started = time.time()  # the summary's time: the whole command's, data and model set-up included
    typed_root, cfg = cfg.data.root, resolve_data_root(cfg)
    if cfg.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    dist = init_distributed(cfg)
    run = build(cfg, dist, progress=progress and dist.main)  # everything that can fail on bad input fails here, before any file is written
    run_dir = Path(resume_dir) if resume_dir is not None else Path(cfg.out_dir) / cfg.name
    made = not run_dir.exists()
    try:
        with runlock.hold(run_dir) if dist.main else contextlib.nullcontext():
            return _start(run, run_dir, resume=resume_dir is not None, made=made, overwrite=overwrite, progress=progress,
                          stop_after_steps=stop_after_steps, typed_root=typed_root, started=started)
    finally:
        if dist.world > 1 and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def _start(run: Run, run_dir: Path, *, resume: bool, made: bool, overwrite: bool, progress: bool,
           stop_after_steps: int | None, typed_root: str, started: float) -> Path:
    """`fit` with the run directory locked: check what a resume would continue (nothing in the run directory changes
    until the checkpoint is known to fit the config), write the start files, train."""
    cfg, dist = run.cfg, run.dist
    state: dict[str, Any] | None = None
    if resume:
        if (run_dir / rundir.LAST).exists():
            state = load_checkpoint(run_dir / rundir.LAST, map_location=run.device)
            check_resume_config(state.get("config"), cfg, run_dir / rundir.LAST)
            _check_state_fits(run, state, run_dir / rundir.LAST)  # one line, before any file of the run is written
            if _finished(run_dir, state, cfg):
                if dist.main:
                    print(f"flatrobust: {run_dir} has finished its {cfg.epochs} epochs: nothing to do. To train it longer, "
                          f"resume with more epochs, e.g. flatrobust train --resume {run_dir} epochs={2 * cfg.epochs} "
                          "(the lr schedule is recomputed for the new length)", file=sys.stderr)
                return run_dir
        elif dist.main:
            _refuse_lost_checkpoint(run_dir)
    elif dist.main:
        rundir.prepare(run_dir, overwrite=overwrite)
    numel = run.info.in_channels * run.info.image_size ** 2
    for warning in (awp_warmup_warning(cfg), whole_box_warning(cfg.attack.norm, cfg.attack.eps, numel)):
        if warning and dist.main:
            print(f"flatrobust: warning: {'attack.' if warning.startswith('eps=') else ''}{warning}", file=sys.stderr)
    if dist.main:  # one process writes files under torchrun
        removed = rundir.remove_temporary(run_dir)  # left by a process killed during a write
        if removed:
            print(f"flatrobust: removed {len(removed)} temporary file(s) an interrupted write left in {str(run_dir)!r}: "
                  f"{', '.join(map(repr, removed))}", file=sys.stderr)
        env = environment(cfg, run.device) | {"world_size": dist.world}
        # What the model was built for (data.json): classes (names), channels, size, normalization.
        rundir.write_start_files(run_dir, config=cfg.to_dict(), env=env,
                                 data={"root": cfg.data.root, "root_as_typed": typed_root, **run.info.to_dict(), **val_record(run)},
                                 fresh=state is None and not resume, made=made)
        if progress:  # on stdout with the summary; stderr carries the epoch lines and the progress
            print(f"data: {cfg.data.name} {cfg.data.root if cfg.data.name != 'digits' else ''}".rstrip()
                  + f": {run.info.describe()}", flush=True)
            note = free_note(cfg)
            if note:
                print(note, flush=True)
    dist.barrier()
    try:
        return _loop(run, run_dir, state, progress=progress and dist.main, stop_after_steps=stop_after_steps, started=started)
    except WriteError as e:  # disk full: every checkpoint written so far is intact
        how = f"continue the run with flatrobust train --resume {run_dir}" if (run_dir / "last.pt").exists() else "start it again"
        raise WriteError(f"{e}: make room, then {how}") from None


def _refuse_lost_checkpoint(run_dir: Path) -> None:
    """UserError (one line) when a run to resume has no last.pt but records of trained epochs beyond the first:
    resuming would start again from epoch 0 and drop them. A record of epoch 1 alone is what a run stopped between
    writing that record and its first last.pt leaves (the write order is metrics, best.pt, last.pt): it starts again,
    with a warning. With no record at all it stopped before its first checkpoint and starts again."""
    metrics = run_dir / rundir.METRICS
    epochs = {r["epoch"] for r in _valid_records(metrics)}
    if epochs - {1}:
        raise UserError(f"{str(run_dir)!r} holds no last.pt to continue from, but its {rundir.METRICS} records {len(epochs)} "
                        f"trained epochs: resuming would start again from epoch 0 and lose them; put last.pt back, or start "
                        f"the run again with flatrobust train {run_dir / rundir.CONFIG} --overwrite (its records are then deleted)")
    if epochs:
        print(f"flatrobust: warning: {str(run_dir)!r} holds no last.pt: it stopped while writing epoch 1's checkpoints (or "
              "last.pt was deleted); training starts again from epoch 0 and replaces epoch 1's record", file=sys.stderr)


def _valid_records(path: Path) -> list[dict[str, Any]]:
    """The lines of a metrics file that are records of an epoch (damaged lines left out)."""
    rows = []
    for line in path.read_text(errors="replace").splitlines() if path.is_file() else []:
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and isinstance(row.get("epoch"), int):
            rows.append(row)
    return rows


def _kept_metrics(run_dir: Path, epochs: int) -> list[dict[str, Any]]:
    """The records of metrics.jsonl the checkpoint covers (`rundir.truncate_metrics`), saying in one line what was
    dropped as damaged and which covered epochs then have no record."""
    kept = rundir.truncate_metrics(run_dir, epochs)
    missing = sorted(set(range(1, epochs + 1)) - {r["epoch"] for r in kept.records})
    if kept.dropped or missing:
        lost = f"; epoch(s) {', '.join(map(str, missing))} of the checkpoint now have no record" if missing else ""
        print(f"flatrobust: warning: {str(run_dir / rundir.METRICS)!r} was damaged: dropped {', '.join(kept.dropped) or 'nothing'}; "
              f"kept the {len(kept.records)} valid record(s){lost}", file=sys.stderr)
    return kept.records


def print_summary(run_dir: Path, history: list[dict], seconds: float) -> None:
    if not history:
        return
    rows = [("", "epoch", "test clean", "test robust", "train robust", "gap")]
    on = "val" if history[-1].get("best_on") == "val" else "test"  # as the loop chose best.pt
    for weights, p in [("", "")] + ([("EMA ", "ema_")] if "ema_test_robust_acc" in history[-1] else []):
        key = f"{p}{on}_robust_acc" if f"{p}{on}_robust_acc" in history[-1] else f"{p}test_robust_acc"
        best = max((r for r in history if key in r), key=lambda r: r[key])
        for label, r in ((f"best {weights}", best), (f"last {weights}", history[-1])):
            rows.append((label.strip(), str(r["epoch"]), f"{r[p + 'test_clean_acc']:.2%}", f"{r[p + 'test_robust_acc']:.2%}",
                         f"{r[p + 'train_robust_acc']:.2%}", f"{r[p + 'gap']:+.2%}"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    print(f"\nrun {run_dir} ({format_duration(seconds)})")
    for r in rows:
        print("  ".join(c.rjust(w) for c, w in zip(r, widths)))
    ema = " (each holds the raw and the EMA weights: --weights ema|raw)" if "ema_test_robust_acc" in history[-1] else ""
    print(f"checkpoints: {run_dir / 'best.pt'} (best {'validation' if on == 'val' else 'test'} robust accuracy of the raw weights), {run_dir / 'last.pt'}{ema}")
