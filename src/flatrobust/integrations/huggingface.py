"""AWP in the Hugging Face `Trainer`: `AWPTrainer`, a `Trainer` whose every optimizer step is taken at w + v.

    trainer = AWPTrainer(model=model, args=args, train_dataset=data, awp={"gamma": 0.01})     # the paper's AWP
    trainer = AWPTrainer(model=model, args=args, train_dataset=data,                         # the fine-tuning snippet
                         awp={"gamma": 1.0, "patterns": "word_embeddings", "eps_rel": 0.001}, awp_restore="before_step")

For every optimizer step (Wu et al. 2020, Algorithm 1, lines 5-9):

  1. `training_step` of the step's first micro-batch: w <- w + v, v from the gradient of the model's own loss
     (`compute_loss`, the loss the Trainer trains on: for fine-tuning, the clean loss) at w, in train mode,
     under the Trainer's autocast (bf16/fp16; with fp16 the accelerator's GradScaler scales the ascent loss,
     see `AWP`'s `scaler`);
  2. the Trainer's own step: forward and backward at w + v, gradient clipping (`max_grad_norm`), optimizer step;
  3. right after `optimizer.step()` (the callback event `on_optimizer_step`): w <- w - v. With
     `awp_restore="before_step"`, at `on_pre_optimizer_step` instead (after clipping, before the step): the
     fine-tuning snippet's order.

Gradient accumulation: one perturbation per optimizer step, from the first micro-batch; every micro-batch of the
step is trained at the same w + v. Evaluation and checkpoints come after the step, at w. Several processes
(DDP through accelerate): the ascent runs on the unwrapped model of each process and AWP averages its gradient
over the processes, so every process adds the same v. docs/TRAINERS.md says what is tested.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..awp import AWP, perturbed_parameters
from .options import check_options

try:
    from transformers import Trainer, TrainerCallback
except ImportError as e:  # one line that says what to install
    raise ImportError("flatrobust.integrations.huggingface needs transformers: pip install 'flatrobust[huggingface]'") from e



class _Restore(TrainerCallback):
    """w + v -> w at the optimizer step (the Trainer has no hook method for it; its callbacks have)."""

    def __init__(self, trainer: "AWPTrainer"):
        self.trainer = trainer

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if self.trainer.awp_restore == "before_step":
            self.trainer._restore()

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.trainer._restore()


class AWPTrainer(Trainer):
    """A `transformers.Trainer` with `flatrobust.AWP`.

    Args (besides the Trainer's own):
        awp: `AWP`'s options as a dict: `gamma` (default 0.01; 0: exactly the plain Trainer), `patterns`,
            `ascent_steps`, `eps_rel`, `start_step` and `start_epoch` (compared with the Trainer's global step and
            epoch), `check_finite`.
        awp_restore: "after_step" (the paper: the optimizer steps at w + v, then w <- w - v) or "before_step"
            (the fine-tuning snippet: w <- w - v before the step, which is taken at w).

    `awp` is the `AWP` object once training has started.
    """

    def __init__(self, *args: Any, awp: dict | None = None, awp_restore: str = "after_step", **kwargs: Any):
        options = dict(awp or {})
        check_options("AWPTrainer", "awp_restore", awp_restore, options, patterns_hint="awp={'patterns': ...}",
                      scaler_source="the accelerator's")
        super().__init__(*args, **kwargs)
        if self.model is not None:
            perturbed_parameters(self.model, options.get("patterns"))  # a pattern that matches nothing fails here
        self.awp_options, self.awp_restore = options, awp_restore
        self.awp: AWP | None = None
        self.add_callback(_Restore(self))

    def train(self, *args: Any, **kwargs: Any):
        self.awp = None  # built at the first step, for the model being trained (model_init may make a new one)
        try:
            return super().train(*args, **kwargs)
        finally:
            self._restore(check=False)  # never leave the weights perturbed, also when training raised

    def training_step(self, model: nn.Module, inputs: dict[str, Any], num_items_in_batch: Any = None) -> torch.Tensor:
        if self.awp is None:
            self.awp = AWP(self.model, scaler=self.accelerator.scaler, **self.awp_options)
        awp = self.awp
        if not awp.active:  # the optimizer step's first micro-batch
            awp.step, awp.epoch = self.state.global_step, int(self.state.epoch or 0)
            prepared = self._prepare_inputs(inputs)

            def ascent_loss(unwrapped: nn.Module) -> torch.Tensor:  # AWP passes the model without its DDP wrapper
                with self.compute_loss_context_manager():
                    return self.compute_loss(unwrapped, dict(prepared))

            awp.perturb(ascent_loss)
        return super().training_step(model, inputs, num_items_in_batch)

    def _restore(self, check: bool = True) -> None:
        if self.awp is None or not self.awp.active:
            return
        self.awp.restore()
        if check and self.awp.scaler is None:  # a non-finite ascent gradient stops training, naming the layer (one host read)
            self.awp.check()  # (under a GradScaler an overflow is the scaler's to handle: docs/AWP_VARIANTS.md)
