"""log.tensorboard: the event file holds metrics.jsonl's numbers and the interval training loss, the README's
list of tags is what a run writes, a resumed run repeats no point, and a missing tensorboard is one line."""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest

from flatrobust.cli import main
from flatrobust.config import load_config
from flatrobust.train import fit

# 4 steps of 64 digits per epoch, PGD-2, AWP and EMA on, a loss point every 2 steps
TINY = ["awp.warmup=0", "data.train_subset=256", "data.eval_subset=64", "batch_size=64", "attack.steps=2", "attack.eps=0.2",
        "attack.alpha=0.1", "eval.steps=2", "awp.gamma=0.01", "optim.lr=0.05", "ema.decay=0.9", "log.tensorboard=true",
        "log.interval=2"]
README = Path(__file__).resolve().parents[1] / "README.md"


def _scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})  # 0: keep every point
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def _metrics(run: Path) -> list[dict]:
    return [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]


def test_event_file_equals_metrics_jsonl(tmp_path):
    pytest.importorskip("tensorboard")
    run = fit(load_config("recipes/digits_at_awp.yaml", [*TINY, "epochs=2", f"out_dir={tmp_path}"]), progress=False)
    scalars, rows = _scalars(run / "tensorboard"), _metrics(run)
    numeric = [k for k in rows[0] if k != "step" and isinstance(rows[0][k], (int, float))]
    assert {t for t in scalars if t.startswith("epoch/")} == {f"epoch/{k}" for k in numeric}
    assert "epoch/ema_test_robust_acc" in scalars and "epoch/awp_active" in scalars
    for k in numeric:
        assert [s for s, _ in scalars[f"epoch/{k}"]] == [r["step"] for r in rows], k
        assert [v for _, v in scalars[f"epoch/{k}"]] == pytest.approx([float(r[k]) for r in rows], rel=1e-6, abs=1e-7), k
    loss = scalars["step/train_loss"]
    assert [s for s, _ in loss] == [2, 4, 6, 8]
    for e, r in enumerate(rows):  # two points of two equal batches each per epoch: their mean is the epoch's loss
        assert (loss[2 * e][1] + loss[2 * e + 1][1]) / 2 == pytest.approx(r["train_loss"], rel=1e-6)


def test_readme_lists_the_tags_a_run_writes(tmp_path):
    pytest.importorskip("tensorboard")
    block = re.search(r"### TensorBoard.*?```text\n(.*?)```", README.read_text(), re.S).group(1)
    documented = set(re.findall(r"^((?:epoch|step)/\w+)", block, re.M))
    run = fit(load_config("recipes/digits_at_awp.yaml", [*TINY, "epochs=1", f"out_dir={tmp_path}"]), progress=False)
    assert documented == set(_scalars(run / "tensorboard"))


def test_resumed_run_repeats_no_point(tmp_path):
    """The interrupted process wrote a loss point after its last checkpoint; the resumed one drops it (purge_step)
    and writes it again, so the events equal an uninterrupted run's, each step once."""
    pytest.importorskip("tensorboard")
    over = [*TINY, "log.interval=1", "epochs=3", "checkpoint_every=2", f"out_dir={tmp_path}"]
    full = fit(load_config("recipes/digits_at_awp.yaml", over + ["name=full"]), progress=False)
    cfg = load_config("recipes/digits_at_awp.yaml", over + ["name=cut"])
    cut = fit(cfg, progress=False, stop_after_steps=7)  # checkpoint after step 6, loss point at step 7
    assert max(s for s, _ in _scalars(cut / "tensorboard")["step/train_loss"]) == 7
    fit(cfg, resume_dir=cut, progress=False)
    a, b = _scalars(full / "tensorboard"), _scalars(cut / "tensorboard")
    assert a.keys() == b.keys()
    assert [s for s, _ in b["step/train_loss"]] == list(range(1, 13))
    assert b["step/train_loss"] == a["step/train_loss"]  # bit-identical training, so identical points
    for tag in a:
        if tag.startswith("epoch/") and not tag.endswith(("time_s", "images_per_s")):
            assert b[tag] == a[tag], tag


def test_missing_tensorboard_is_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # what an environment without it sees on import
    monkeypatch.delitem(sys.modules, "torch.utils.tensorboard", raising=False)
    rc = main(["train", "recipes/digits_at.yaml", "log.tensorboard=true", f"out_dir={tmp_path}", "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1
    assert "log.tensorboard=true needs the tensorboard package" in err and "pip install 'flatrobust[tensorboard]'" in err
    assert list(tmp_path.iterdir()) == []
