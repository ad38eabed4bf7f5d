"""The AWP collapse check (flatrobust.collapse, docs/AWP_COLLAPSE.md): it names a model that predicts one class
under AWP, once, and stays silent on a run that trains."""
from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from flatrobust.cli import main
from flatrobust.collapse import PATIENCE, SHARE, ChanceLevel, collapse_warning, top_class_share

# As tests/test_train.py's TINY: 256 digits, PGD-2, a few seconds.
TINY = ["data.train_subset=256", "data.eval_subset=64", "batch_size=64", "attack.steps=2", "attack.eps=0.2",
        "attack.alpha=0.1", "eval.steps=2", "optim.lr=0.05"]


def _record(epoch, *, acc=0.10, share=1.0, awp=True):
    return {"epoch": epoch, "awp_active": awp, "test_clean_acc": acc, "test_top_class_share": share}


def test_chance_level_is_the_largest_class_share_plus_three_sigma():
    labels = torch.tensor([0] * 30 + [1] * 50 + [2] * 20)
    c = ChanceLevel.of(labels)
    assert c.share == 0.5 and c.n == 100
    assert c.ceiling == pytest.approx(0.5 + 3 * math.sqrt(0.25 / 100))


def test_warns_after_patience_collapsed_epochs_with_awp_active():
    chance = ChanceLevel(0.1, 359)
    history = [_record(e) for e in range(1, PATIENCE + 1)]
    msg = collapse_warning(history, chance=chance)
    assert msg is not None and "\n" not in msg
    assert f"epochs 1-{PATIENCE}" in msg and "awp.warmup=" in msg and "awp.gamma" in msg
    assert collapse_warning(history[:-1], chance=chance) is None  # not yet: one epoch short of the patience


@pytest.mark.parametrize("spoiler", [
    dict(awp=False),  # AWP off (warm-up): not AWP's doing
    dict(share=SHARE - 0.01),  # predictions spread over classes
    dict(acc=0.2),  # above chance (0.1 + 3 sigma on 359 images = 0.147)
])
def test_one_healthy_epoch_in_the_window_means_no_warning(spoiler):
    chance = ChanceLevel(0.1, 359)
    for i in range(PATIENCE):
        history = [_record(e) for e in range(1, PATIENCE + 1)]
        history[i] = _record(i + 1, **spoiler)
        assert collapse_warning(history, chance=chance) is None


def test_old_metrics_without_the_share_never_warn():
    history = [{"epoch": e, "awp_active": True, "test_clean_acc": 0.1} for e in range(1, 6)]
    assert collapse_warning(history, chance=ChanceLevel(0.1, 359)) is None


class _Constant(nn.Module):
    def __init__(self):
        super().__init__()
        self.bias = nn.Parameter(torch.tensor([0.0, 1.0, 0.0]))

    def forward(self, x):
        return self.bias.expand(len(x), 3)


def test_top_class_share_of_a_constant_and_of_a_trained_model(trained_cnn, digits):
    x = torch.rand(10, 1, 8, 8)
    const = _Constant().train()
    assert top_class_share(const, x, batch_size=3) == 1.0
    assert const.training  # mode restored
    _, _, xte, yte = digits
    share = top_class_share(trained_cnn, xte)
    assert share < 0.2  # a trained digit classifier spreads its predictions over the ten classes
    assert share == pytest.approx(torch.bincount(yte).max().item() / len(yte), abs=0.05)


def _run(tmp_path, capsys, recipe, args):
    rc = main(["train", recipe, *args, f"out_dir={tmp_path}", "name=run", "--quiet"])
    assert rc == 0
    rows = [json.loads(ln) for ln in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    return rows, [ln for ln in capsys.readouterr().err.splitlines() if "warning" in ln]


def test_a_collapsed_awp_run_is_named_in_one_line_and_in_metrics(tmp_path, capsys):
    # gamma = 1 (each weight moved by its own norm) collapses the net within an epoch: the cheap stand-in for
    # recipes/digits_at_awp.yaml seed=1 awp.warmup=0 (tests marked slow below)
    rows, warnings = _run(tmp_path, capsys, "recipes/digits_at_awp.yaml",
                          [*TINY, "awp.gamma=1", "awp.warmup=0", f"epochs={PATIENCE + 1}"])
    assert all(r["test_top_class_share"] == 1.0 for r in rows)
    assert ["warning" in r for r in rows] == [False] * (PATIENCE - 1) + [True, True]
    assert len(warnings) == 1  # printed once, when the collapse is first seen
    assert warnings[0].startswith("flatrobust: warning: epochs 1-3 with AWP active") and "awp.warmup=5" in warnings[0]


def test_a_training_awp_run_gets_no_warning(tmp_path, capsys):
    # the whole digits training set, one epoch of plain AT, then AWP: predictions spread over the classes
    rows, warnings = _run(tmp_path, capsys, "recipes/digits_at_awp.yaml",
                          [*TINY, "data.train_subset=0", "batch_size=128", "optim.lr=0.1", "awp.warmup=1", "epochs=4"])
    assert warnings == [] and not any("warning" in r for r in rows)
    assert rows[-1]["awp_active"] and rows[-1]["test_clean_acc"] > 0.5 and rows[-1]["test_top_class_share"] < 0.5


@pytest.mark.slow
@pytest.mark.parametrize("warmup,collapses", [(0, True), (5, False)])
def test_the_digits_recipe_collapse_is_detected(tmp_path, capsys, warmup, collapses):
    """The case of docs/AWP_COLLAPSE.md: seed 1 with AWP from epoch 0 collapses, with the recipe's warm-up it trains.
    epochs=12 keeps lr 0.1 for the first 6 epochs, as in the 30-epoch recipe."""
    rows, warnings = _run(tmp_path, capsys, "recipes/digits_at_awp.yaml", ["seed=1", f"awp.warmup={warmup}", "epochs=12"])
    assert bool(warnings) == collapses
    if collapses:
        assert rows[-1]["test_top_class_share"] == 1.0 and "warning" in rows[-1]
    else:
        assert rows[-1]["test_clean_acc"] > 0.8


def test_the_tool_replays_the_training_run(tmp_path, capsys):
    """tools/awp_collapse.py (the measurements of docs/AWP_COLLAPSE.md) follows `flatrobust train` exactly."""
    import subprocess
    import sys
    from pathlib import Path

    over = [*TINY, "awp.gamma=0.01", "awp.warmup=0", "epochs=2"]
    rows, _ = _run(tmp_path, capsys, "recipes/digits_at_awp.yaml", over)
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, str(root / "tools" / "awp_collapse.py"), "outcome", *over, "--epochs", "2"],
                         capture_output=True, text=True, check=True, timeout=300, cwd=root)
    replay = json.loads(out.stdout.splitlines()[-1])["epochs"]
    assert [e["train_loss"] for e in replay] == [round(r["train_loss"], 4) for r in rows]
    assert [e["test_clean_acc"] for e in replay] == [round(r["test_clean_acc"], 3) for r in rows]
    assert [e["top_class_share"] for e in replay] == [round(r["test_top_class_share"], 3) for r in rows]
