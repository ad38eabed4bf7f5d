"""The fine-tuning AWP in the Hugging Face Trainer: flatrobust's AWPTrainer on a tiny BERT (CPU, well under a minute).

    pip install 'flatrobust[huggingface]'
    python examples/hf_trainer_awp.py [--steps 60] [--variant snippet|paper|off]

Nothing is downloaded: the model is a 2-layer BERT of width 32 built from a config with random weights, and the
task is synthetic (the label of a sequence of tokens is the range, 0-19, 20-39 or 40-59, of its first token), so the
script shows the mechanics, not an accuracy to compare with anything. `--variant snippet` is the AWP that
fine-tuning code copies (the word embeddings only, from the clean loss, elementwise bound, the weights restored
before the optimizer step; docs/AWP_VARIANTS.md), `paper` the paper's (every weight of dim > 1, the step at
w + v), `off` the plain Trainer.
"""
from __future__ import annotations

import argparse
import os
import tempfile

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a config, not a checkpoint: nothing to fetch

from transformers import BertConfig, BertForSequenceClassification, TrainingArguments  # noqa: E402

from flatrobust.integrations.huggingface import AWPTrainer  # noqa: E402

VARIANTS = {  # AWPTrainer's awp= and awp_restore= for each
    "snippet": ({"gamma": 0.01, "patterns": "word_embeddings", "eps_rel": 0.001, "ascent_steps": 1}, "before_step"),
    "paper": ({"gamma": 0.005}, "after_step"),
    "off": ({"gamma": 0.0}, "after_step"),
}
VOCAB, LENGTH = 60, 12


def synthetic(n: int, seed: int) -> list[dict[str, torch.Tensor]]:
    """Token sequences labelled by the range (0-19, 20-39, 40-59) of their first token."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (n, LENGTH), generator=g)
    labels = ids[:, 0] // 20
    mask = torch.ones(LENGTH, dtype=torch.long)
    return [{"input_ids": i, "attention_mask": mask, "labels": lab} for i, lab in zip(ids, labels)]


def accuracy(model: torch.nn.Module, data: list[dict[str, torch.Tensor]]) -> float:
    batch = {k: torch.stack([d[k] for d in data]) for k in data[0]}
    model.eval()
    with torch.no_grad():
        return (model(**batch).logits.argmax(1) == batch["labels"]).float().mean().item()


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--variant", choices=list(VARIANTS), default="snippet")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                        max_position_embeddings=LENGTH, num_labels=3)
    model = BertForSequenceClassification(config)
    awp, restore = VARIANTS[args.variant]
    with tempfile.TemporaryDirectory() as out:
        training = TrainingArguments(output_dir=out, max_steps=args.steps, per_device_train_batch_size=32, learning_rate=2e-3,
                                     warmup_steps=5, use_cpu=True, report_to="none", save_strategy="no", logging_strategy="no",
                                     disable_tqdm=True, seed=0)
        trainer = AWPTrainer(model=model, args=training, train_dataset=synthetic(2048, seed=0), awp=awp, awp_restore=restore)
        result = trainer.train()
    test = accuracy(model, synthetic(512, seed=1))
    what = "off" if args.variant == "off" else f"{len(trainer.awp.names)} tensors perturbed, e.g. {trainer.awp.names[0]!r}"
    print(f"{args.variant} AWP ({what}), {args.steps} steps: train loss {result.training_loss:.3f}, test accuracy {test:.1%}")
    return {"train_loss": result.training_loss, "test_accuracy": test}


if __name__ == "__main__":
    main()
