"""`flatrobust train` end to end on digits, bad input, the lr schedule, and exact resume."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from flatrobust.cli import main
from flatrobust.config import load_config
from flatrobust.rundir import without_timing
from flatrobust.train import EpochPlan, fit, lr_at

# A run that takes a few seconds: 256 digits, PGD-2, AWP on.
TINY = ["awp.warmup=0", "data.train_subset=256", "data.eval_subset=64", "batch_size=64", "attack.steps=2", "attack.eps=0.2",
        "attack.alpha=0.1", "eval.steps=2", "awp.gamma=0.01", "optim.lr=0.05"]


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_cli_train_writes_a_complete_run_directory(tmp_path, capsys):
    rc = main(["train", "recipes/digits_at_awp.yaml", *TINY, "epochs=2", f"out_dir={tmp_path}", "--quiet"])
    assert rc == 0
    run = tmp_path / "digits_at_awp"
    assert {"config.yaml", "metrics.jsonl", "env.json", "last.pt", "best.pt"} <= {p.name for p in run.iterdir()}
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    assert cfg["awp"]["gamma"] == 0.01 and cfg["data"]["train_subset"] == 256  # resolved, overrides included
    rows = _metrics(run)
    assert [r["epoch"] for r in rows] == [1, 2]
    for key in ("lr", "train_loss", "train_clean_acc", "train_robust_acc", "test_clean_acc", "test_robust_acc", "gap"):
        assert all(key in r for r in rows), key
    assert all(abs(r["gap"] - (r["train_robust_acc"] - r["test_robust_acc"])) < 1e-12 for r in rows)
    env = json.loads((run / "env.json").read_text())
    assert env["torch"] == torch.__version__ and env["seed"] == 0
    # what tells a rerun on another processor apart (its float results differ: study/study.py's restore says so)
    assert env["cpu_capability"] == torch.backends.cpu.get_cpu_capability() and env["cpu"] and env["device_name"] == env["cpu"]
    ckpt = torch.load(run / "last.pt", weights_only=True)
    assert ckpt["format"] == "flatrobust" and ckpt["epoch"] == 2


def test_training_improves_robust_accuracy(tmp_path):
    cfg = load_config("recipes/digits_at.yaml", [*TINY, "awp.gamma=0", "epochs=4", "data.train_subset=0",
                                                 "batch_size=128", "optim.lr=0.1", f"out_dir={tmp_path}"])
    rows = _metrics(fit(cfg, progress=False))
    assert rows[-1]["test_clean_acc"] > 0.5
    assert rows[-1]["test_robust_acc"] > rows[0]["test_robust_acc"]


def test_piecewise_schedule_per_iteration():
    cfg = load_config(None, ["optim.lr=0.1"])
    assert [lr_at(s, 100, cfg) for s in (0, 49, 50, 74, 75, 99)] == [0.1, 0.1, 0.01, 0.01, 0.001, 0.001]
    cos = load_config(None, ["optim.schedule=cosine"])
    assert lr_at(0, 100, cos) == pytest.approx(0.1) and lr_at(50, 100, cos) == pytest.approx(0.05)


def test_epoch_plan_shares_every_batch_among_processes_and_follows_the_schedule():
    """The epoch plan `fit` follows (public: tools/awp_collapse.py replays it): one process takes every batch, the last
    one short; under DDP the processes split each global batch and the short one is dropped; with RST's extra data
    an epoch is one pass over the labeled part; the lr is the schedule's at the global step."""
    cfg = load_config(None, ["batch_size=4", "epochs=3", "optim.lr=0.1"])
    one = EpochPlan(cfg, n_labeled=10)
    order, _ = one.generators(1, torch.device("cpu"))
    alone = one.index_batches(order)
    assert one.steps_per_epoch == len(alone) == 3 and [len(b) for b in alone] == [4, 4, 2]
    assert sorted(torch.cat(alone).tolist()) == list(range(10))
    ranks = [EpochPlan(cfg, n_labeled=10, rank=r, world=2) for r in range(2)]
    shares = [p.index_batches(p.generators(1, torch.device("cpu"))[0]) for p in ranks]
    assert ranks[0].steps_per_epoch == 2 and [len(b) for b in shares[0]] == [2, 2]
    assert [torch.cat([a, b]).sort().values.tolist() for a, b in zip(*shares)] == [b.sort().values.tolist() for b in alone[:2]]
    assert not torch.equal(one.generators(1, torch.device("cpu"))[1].get_state(), ranks[1].generators(1, torch.device("cpu"))[1].get_state())
    rst = EpochPlan(cfg, n_labeled=10, n_extra=30)  # half of every batch of 4 labeled: 5 steps cover the labeled part
    assert rst.steps_per_epoch == 5 and rst.total_steps == 15
    assert [one.lr(one.step(e, 0)) for e in range(3)] == [lr_at(s, 9, cfg) for s in (0, 3, 6)] == [0.1, 0.1, 0.01]


def test_tools_use_only_public_training_helpers():
    """The tools replay and read runs through the public API (the epoch plan, the run directory), not private helpers."""
    import ast

    for path in Path("tools").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("flatrobust"):
                assert not [a.name for a in node.names if a.name.startswith("_")], path


@pytest.mark.parametrize(
    "args,message",
    [
        (["recipes/digits_at.yaml", "awp.gama=0.01"], "unknown config key 'awp.gama' (did you mean 'awp.gamma'?)"),
        (["recipes/digits_at.yaml", "attack.eps=-1"], "attack.eps must be >= 0"),
        (["recipes/digits_at.yaml", "optim.lr=0"], "optim.lr must be > 0"),
        (["recipes/digits_at.yaml", "method=fat"], "method must be one of"),
        (["recipes/nope.yaml"], "recipe recipes/nope.yaml does not exist: pass a YAML file"),
        (["digits_at"], "recipe digits_at does not exist: did you mean recipes/digits_at.yaml?"),
        (["recipes/digits_atawp.yml"], "did you mean recipes/digits_at_awp.yaml?"),
        (["recipes/digits_at.yaml", "data.name=cifar10", "data.root=/nonexistent"], "not found"),
    ],
)
def test_bad_input_exit_2_one_line_and_no_run_dir(tmp_path, capsys, args, message):
    rc = main(["train", *args, f"out_dir={tmp_path}", "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2
    assert message in err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []


def test_existing_run_dir_is_not_overwritten(tmp_path, capsys):
    run = tmp_path / "digits_at"
    run.mkdir()
    (run / "keep.txt").write_text("precious")
    rc = main(["train", "recipes/digits_at.yaml", f"out_dir={tmp_path}", "--quiet"])
    assert rc == 2 and "already exists: pass --overwrite" in capsys.readouterr().err
    assert (run / "keep.txt").read_text() == "precious"


def _final(run_dir: Path):
    ckpt = torch.load(run_dir / "last.pt", weights_only=True)
    rows = [without_timing(r) for r in _metrics(run_dir)]
    return ckpt["model"], ckpt["optimizer"], rows


def _assert_same(a, b):
    (ma, oa, ra), (mb, ob, rb) = a, b
    assert ra == rb
    for k in ma:
        assert torch.equal(ma[k], mb[k]), k
    for s, t in zip(oa["state"].values(), ob["state"].values()):
        assert torch.equal(s["momentum_buffer"], t["momentum_buffer"])


def test_resume_in_process_equals_uninterrupted(tmp_path):
    over = [*TINY, "epochs=3", "checkpoint_every=1", f"out_dir={tmp_path}"]
    full = fit(load_config("recipes/digits_at_awp.yaml", over + ["name=full"]), progress=False)
    cfg = load_config("recipes/digits_at_awp.yaml", over + ["name=cut"])
    cut = fit(cfg, progress=False, stop_after_steps=6)  # stops in the middle of epoch 2 (4 steps per epoch)
    assert torch.load(cut / "last.pt", weights_only=True)["batch"] == 2
    fit(cfg, resume_dir=cut, progress=False)
    _assert_same(_final(full), _final(cut))


def test_sigkill_mid_epoch_then_resume_is_bit_identical(tmp_path):
    """A real training process killed with SIGKILL, restarted with --resume, ends exactly as an uninterrupted one."""
    # 8 epochs of 4 steps: an epoch takes ~0.1 s on an idle CPU, so the kill lands with most of the run ahead
    over = [*TINY, "epochs=8", "checkpoint_every=1", f"out_dir={tmp_path}", "--quiet"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "flatrobust", "train", "recipes/digits_at_awp.yaml"]
    subprocess.run(cmd + over + ["name=full"], check=True, env=env, timeout=300)
    proc = subprocess.Popen(cmd + over + ["name=killed"], env=env)
    run = tmp_path / "killed"
    deadline = time.time() + 600  # generous: on a loaded 2-core machine starting Python and torch alone takes long
    while time.time() < deadline:  # kill as soon as epoch 1 is done: somewhere in epoch 2 or 3
        if (run / "metrics.jsonl").exists() and (run / "metrics.jsonl").read_text().count("\n") >= 1:
            break
        time.sleep(0.01)
    assert proc.poll() is None, "the run finished before it could be killed: make it longer"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (run / "metrics.jsonl").read_text().count("\n") < 8
    subprocess.run(cmd[:4] + ["--resume", str(run), "--quiet"], check=True, env=env, timeout=300)
    _assert_same(_final(tmp_path / "full"), _final(run))


def test_awp_that_never_starts_is_warned_about_and_epoch_lines_show_awp(tmp_path, capsys):
    tiny = [a for a in TINY if not a.startswith("awp.warmup")]
    assert main(["train", "recipes/digits_at_awp.yaml", *tiny, "epochs=1", f"out_dir={tmp_path}"]) == 0  # warm-up 5
    err = capsys.readouterr().err.splitlines()
    assert err[0] == ("flatrobust: warning: awp.warmup=5 >= epochs=1: AWP (gamma 0.01) is never active, so this run "
                      "trains plain AT; lower awp.warmup (e.g. awp.warmup=0) or raise epochs")
    assert "AWP off (warm-up: epochs 1-5)" in err[1]
    assert _metrics(tmp_path / "digits_at_awp")[0]["awp_active"] is False
    assert main(["train", "recipes/digits_at_awp.yaml", *tiny, "epochs=2", "awp.warmup=1", f"out_dir={tmp_path}",
                 "name=w1"]) == 0
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith(("epoch", "flatrobust"))]
    assert len(err) == 2 and "AWP off (warm-up: epoch 1)" in err[0] and err[1].split("gap")[1].split()[1:3] == ["AWP", "on"]
    assert main(["train", "recipes/digits_at.yaml", *TINY, "awp.gamma=0", "epochs=1", f"out_dir={tmp_path}"]) == 0
    assert "AWP" not in capsys.readouterr().err  # no AWP asked, nothing said about it


def test_resume_of_a_finished_run_says_there_is_nothing_to_do(tmp_path, capsys):
    run = tmp_path / "digits_at_awp"
    assert main(["train", "recipes/digits_at_awp.yaml", *TINY, "epochs=2", f"out_dir={tmp_path}", "--quiet"]) == 0
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    capsys.readouterr()
    assert main(["train", "--resume", str(run)]) == 0
    out, err = capsys.readouterr()
    assert out == "" and err == (f"flatrobust: {run} has finished its 2 epochs: nothing to do. To train it longer, resume "
                                 f"with more epochs, e.g. flatrobust train --resume {run} epochs=4 (the lr schedule is "
                                 "recomputed for the new length)\n")
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before  # nothing rewritten
    assert main(["train", "--resume", str(run), "epochs=1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "has trained 2 epochs, more than epochs=1: a run cannot be shortened" in err
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before
