"""Training guard: a non-finite loss or AWP gradient stops the run (naming epoch, step, layer) and keeps
the last good checkpoint, or, with nonfinite=skip, skips the batch and counts it."""
import json

import pytest
import torch

from flatrobust import objectives
from flatrobust.config import load_config
from flatrobust.train import NonFiniteError, fit

TINY = ["awp.warmup=0", "data.train_subset=128", "data.eval_subset=32", "batch_size=64", "attack.steps=1", "eval.steps=1",
        "attack.eps=0.2", "attack.alpha=0.2", "awp.gamma=0.01", "epochs=3"]


def _poison(monkeypatch, bad_calls: set[int]):
    """Make the AT training loss non-finite on the given (1-based) calls, i.e. training steps."""
    orig = objectives.AT.loss_and_logits
    calls = {"n": 0}

    def poisoned(self, model, x, x_adv, y):
        calls["n"] += 1
        loss, logits = orig(self, model, x, x_adv, y)
        return (loss * float("nan") if calls["n"] in bad_calls else loss), logits

    monkeypatch.setattr(objectives.AT, "loss_and_logits", poisoned)


def test_nonfinite_loss_stops_and_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    _poison(monkeypatch, {4})  # 2 steps per epoch: call 4 is epoch 2, step 2
    # gamma=0: with AWP on, the ascent also calls loss() and the calls would no longer count steps
    cfg = load_config("recipes/digits_at_awp.yaml", TINY + [f"out_dir={tmp_path}", "awp.gamma=0"])
    with pytest.raises(NonFiniteError, match=r"epoch 2, step 2 .*training loss is nan"):
        fit(cfg, progress=False)
    ckpt = torch.load(tmp_path / "digits_at_awp" / "last.pt", weights_only=True)
    assert ckpt["epoch"] == 1
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())


def test_nonfinite_awp_gradient_names_the_layer(tmp_path, monkeypatch):
    orig = objectives.AT.ascent_loss

    def bad_ascent(self, model, x, x_adv, y):
        return orig(self, model, x, x_adv, y) * float("inf")

    monkeypatch.setattr(objectives.AT, "ascent_loss", bad_ascent)
    cfg = load_config("recipes/digits_at_awp.yaml", TINY + [f"out_dir={tmp_path}"])
    with pytest.raises(NonFiniteError, match=r"epoch 1, step 1 .*AWP ascent gradient is not finite in layer '[\w.]+weight'"):
        fit(cfg, progress=False)


def test_skip_mode_counts_skipped_batches(tmp_path, monkeypatch):
    _poison(monkeypatch, {2, 3})
    cfg = load_config("recipes/digits_at_awp.yaml", TINY + [f"out_dir={tmp_path}", "nonfinite=skip", "awp.gamma=0"])
    run = fit(cfg, progress=False)
    rows = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped_batches"] for r in rows] == [1, 1, 0]
    assert torch.load(run / "last.pt", weights_only=True)["skipped"] == 2
