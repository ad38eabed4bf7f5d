"""AWP in PyTorch Lightning: one callback, no change to the LightningModule.

    trainer = pl.Trainer(callbacks=[AWPCallback(gamma=0.01)])                        # the paper's AWP
    trainer = pl.Trainer(callbacks=[AWPCallback(gamma=1.0, patterns="word_embeddings", eps_rel=0.001,
                                                restore="before_step")])              # the fine-tuning snippet

In automatic optimization, for every optimizer step (Wu et al. 2020, Algorithm 1, lines 5-9):

  1. `on_train_batch_start` of the step's first micro-batch: w <- w + v, v from the gradient of the loss to
     ascend at w (`AWP.perturb`, BatchNorm statistics and `.grad` untouched), under the trainer's precision
     (bf16/fp16 autocast; with fp16 the trainer's GradScaler scales the ascent loss, see `AWP`'s `scaler`);
  2. Lightning's own step: `training_step` (the loss at w + v), backward, gradient clipping, optimizer step;
  3. `on_train_batch_end` of the micro-batch that stepped the optimizer: w <- w - v. With
     `restore="before_step"`, `on_before_optimizer_step` instead (after the backward and the GradScaler's
     unscale, before clipping and the step): the snippet's order.

The loss to ascend is the module's `awp_loss_fn(batch, batch_idx)` when it has one: it returns the function
`AWP.perturb` takes, `loss_fn(module) -> scalar`, and whatever it does before returning runs at w (an attack,
say, whose adversarial batch the training_step then uses). Without one it is the loss `training_step` returns
(called once more, at w, with `self.log` silenced): the fine-tuning AWP's clean loss.

Gradient accumulation: one perturbation per optimizer step, from the window's first micro-batch; every
micro-batch of the window is trained at the same w + v. Validation runs at w, also inside a window.
Several processes (DDP): each process takes the ascent gradient of its share and AWP averages it over the
processes, so every process adds the same v. docs/TRAINERS.md says what is tested.
"""
from __future__ import annotations

import contextlib
from collections.abc import Mapping
from typing import Any, Callable, Iterator

import torch
from torch import nn

from ..awp import AWP
from .options import check_options

try:
    import pytorch_lightning as pl
except ImportError as e:  # one line that says what to install
    raise ImportError("flatrobust.integrations.lightning needs PyTorch Lightning: pip install 'flatrobust[lightning]'") from e



@contextlib.contextmanager
def _silenced_logging(module: pl.LightningModule) -> Iterator[None]:
    """`self.log`/`self.log_dict` do nothing inside: the ascent pass is not a training step to log."""
    module.log = module.log_dict = lambda *args, **kwargs: None
    try:
        yield
    finally:
        del module.log, module.log_dict


class AWPCallback(pl.Callback):
    """Adds `flatrobust.AWP` to a Trainer's automatic optimization.

    Args:
        gamma: AWP's relative size, ||v_l|| = gamma * ||w_l|| (0: the trainer runs exactly as without the callback).
        restore: "after_step" (the paper: the optimizer steps at w + v, then w <- w - v) or "before_step"
            (the fine-tuning snippet: w <- w - v after the backward, and the step is taken at w).
        **awp_options: `AWP`'s other options (`patterns`, `ascent_steps`, `eps_rel`, `start_step`, `start_epoch`,
            `check_finite`); `start_step` and `start_epoch` compare with the trainer's global step and epoch.

    `awp` is the `AWP` object once the fit has started.
    """

    def __init__(self, gamma: float = 0.01, *, restore: str = "after_step", **awp_options: Any):
        check_options("AWPCallback", "restore", restore, awp_options, gamma, patterns_hint="patterns=",
                      scaler_source="the trainer's")
        self.gamma, self.restore, self.awp_options = gamma, restore, awp_options
        self.awp: AWP | None = None
        self._step_at_perturb = -1  # the global step when the weights were perturbed
        self._held: list[torch.Tensor] = []  # v, taken off for a validation inside an accumulation window

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if not pl_module.automatic_optimization:
            raise ValueError("AWPCallback works with automatic optimization; with manual optimization call "
                             "flatrobust.AWP's perturb/restore in your training_step")
        self.awp = AWP(pl_module, self.gamma, scaler=trainer.scaler, **self.awp_options)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        awp = self.awp
        if awp.active:  # a later micro-batch of the window: already at w + v
            return
        awp.step, awp.epoch = trainer.global_step, trainer.current_epoch
        self._step_at_perturb = trainer.global_step
        context = trainer.precision_plugin.train_step_context
        with context():  # the module's own preparation (an attack, say) runs at w, as training_step would
            loss_fn = self._loss_fn(pl_module, batch, batch_idx)

        def ascent_loss(module: nn.Module) -> torch.Tensor:
            with context():
                return loss_fn(module)

        awp.perturb(ascent_loss)

    @staticmethod
    def _loss_fn(pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> Callable[[nn.Module], torch.Tensor]:
        if hasattr(pl_module, "awp_loss_fn"):
            return pl_module.awp_loss_fn(batch, batch_idx)

        def training_loss(module: nn.Module) -> torch.Tensor:
            with _silenced_logging(pl_module):
                out = pl_module.training_step(batch, batch_idx)
            loss = out.get("loss") if isinstance(out, Mapping) else out
            if not isinstance(loss, torch.Tensor):
                raise ValueError("AWPCallback ascends the loss training_step returns, and it returned none: give the "
                                 "LightningModule an awp_loss_fn(batch, batch_idx) that returns the loss to ascend")
            return loss

        return training_loss

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        if self.restore == "before_step" and self.awp.active:
            self.awp.restore()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.awp.active and trainer.global_step > self._step_at_perturb:  # the optimizer stepped: w + v -> w
            self.awp.restore()
        if self.awp.scaler is None:  # a non-finite ascent gradient stops the run, naming the layer (one host read)
            self.awp.check()  # (under a GradScaler an overflow is the scaler's to handle: docs/AWP_VARIANTS.md)

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._held = self.awp.perturbation() if self.awp is not None and self.awp.active else []
        if self._held:  # validation inside an accumulation window: evaluate w, not w + v
            with torch.no_grad():
                torch._foreach_sub_(self.awp.params, self._held)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._held:
            with torch.no_grad():
                torch._foreach_add_(self.awp.params, self._held)
            self._held = []

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if self.awp is not None and self.awp.active:  # never leave the weights perturbed
            self.awp.restore()
