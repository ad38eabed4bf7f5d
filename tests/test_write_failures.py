"""A full disk and a checkpoint that does not fit, during `flatrobust train`: one line, never a traceback, and
nothing half-written that blocks running the command again or resuming."""
from __future__ import annotations

import json
import os

import torch
import yaml

from flatrobust.checkpoint import save_checkpoint
from flatrobust.cli import main
from test_checkpoint import FullDisk

# 2 steps per epoch on 128 digits, PGD-1: an epoch takes about a second
TINY = ["data.train_subset=128", "data.eval_subset=16", "batch_size=64", "attack.steps=1", "eval.steps=1", "awp.gamma=0"]


def _train(tmp_path, *extra):
    return main(["train", "recipes/digits_at.yaml", *TINY, f"out_dir={tmp_path}", "name=r", "--quiet", *extra])


def _full_from(monkeypatch, n: int) -> None:
    """The n-th atomic write from now on (1-based) and every later one meets a full disk."""
    fdopen, calls = os.fdopen, {"n": 0}

    def opener(fd, *a, **k):
        calls["n"] += 1
        f = fdopen(fd, *a, **k)
        return FullDisk(f, 10) if calls["n"] >= n else f

    monkeypatch.setattr(os, "fdopen", opener)


def _one_line(capsys) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err


def test_disk_full_at_a_checkpoint_is_one_line_and_the_run_resumes(tmp_path, monkeypatch, capsys):
    _full_from(monkeypatch, 6)  # config.yaml, env.json, data.json, epoch 1's best.pt and last.pt; then epoch 2's
    assert _train(tmp_path, "epochs=2") == 2
    run = tmp_path / "r"
    err = _one_line(capsys)
    assert f"cannot write '{run}/best.pt'" in err or f"cannot write '{run}/last.pt'" in err, err
    assert "No space left on device (the disk is full); the previous file is kept" in err
    assert err.rstrip().endswith(f"make room, then continue the run with flatrobust train --resume {run}")
    assert not [p for p in run.iterdir() if p.name.endswith(".tmp")]
    assert torch.load(run / "last.pt", weights_only=True)["epoch"] == 1
    monkeypatch.undo()  # room made
    assert main(["train", "--resume", str(run), "--quiet"]) == 0
    assert [r["epoch"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())] == [1, 2]


def test_disk_full_at_the_start_leaves_nothing_that_blocks_a_rerun(tmp_path, monkeypatch, capsys):
    _full_from(monkeypatch, 1)  # config.yaml already
    assert _train(tmp_path, "epochs=1") == 2
    err = _one_line(capsys)
    assert f"cannot write '{tmp_path / 'r' / 'config.yaml'}': No space left on device (the disk is full)" in err, err
    assert "the run did not start (its run directory was removed again); make room and run the command again" in err
    assert not (tmp_path / "r").exists()
    monkeypatch.undo()
    assert _train(tmp_path, "epochs=1") == 0  # the same command, no --overwrite needed


def test_a_config_yaml_emptied_by_an_older_version_does_not_block_resume(tmp_path, capsys):
    """Before writes were atomic a full disk could leave config.yaml empty: last.pt holds the config too."""
    assert _train(tmp_path, "epochs=1") == 0
    run = tmp_path / "r"
    (run / "config.yaml").write_text("")
    capsys.readouterr()
    assert main(["train", "--resume", str(run), "epochs=2", "--quiet"]) == 0
    assert "is missing, empty or damaged: resuming with the config saved in" in capsys.readouterr().err
    assert yaml.safe_load((run / "config.yaml").read_text())["epochs"] == 2
    (run / "config.yaml").write_text("")
    (run / "last.pt").unlink()
    assert main(["train", "--resume", str(run), "--quiet"]) == 2
    err = _one_line(capsys)
    assert "config.yaml' is empty or damaged and" in err and "holds no last.pt: there is nothing to resume" in err, err


def test_a_checkpoint_that_does_not_fit_is_one_line_under_resume(tmp_path, capsys):
    assert _train(tmp_path, "epochs=1") == 0
    run = tmp_path / "r"
    state = torch.load(run / "last.pt", weights_only=True)
    name = next(k for k, v in state["model"].items() if v.dim() == 2)
    state["model"][name] = torch.zeros(3, 3)  # another architecture's tensor
    save_checkpoint(state, run / "last.pt")
    config = (run / "config.yaml").read_bytes()
    capsys.readouterr()
    assert main(["train", "--resume", str(run), "epochs=2", "--quiet"]) == 2
    err = _one_line(capsys)
    assert f"'{run / 'last.pt'}' does not fit the model this config builds ('smallcnn'; RuntimeError: size mismatch for {name}" in err
    assert (run / "config.yaml").read_bytes() == config  # refused before anything of the run was written
