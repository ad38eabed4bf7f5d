"""AWP in the trainers people use, one module each, imported on use (the extras they need are optional):

  - `flatrobust.integrations.lightning`: `AWPCallback`, AWP in PyTorch Lightning's automatic optimization
    (`pip install 'flatrobust[lightning]'`);
  - `flatrobust.integrations.huggingface`: `AWPTrainer`, a Hugging Face `Trainer` with AWP
    (`pip install 'flatrobust[huggingface]'`).

Both put `flatrobust.AWP` (and its fine-tuning options, docs/AWP_VARIANTS.md) where a hand-written loop puts it:
perturb at w before the training forward, restore after the optimizer step (or before it: `restore="before_step"`,
the fine-tuning snippet's order). What each does with mixed precision, gradient accumulation, clipping and
several processes: docs/TRAINERS.md.
"""
