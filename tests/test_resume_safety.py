"""Resume continues the run that was started, and only that (issue 27, items 2-7): a resume that would change the run
is refused and changes nothing; damaged records are kept where valid; a lost last.pt never restarts the run silently;
one writer per run directory; SIGTERM and SIGINT say how to continue; temporary files of a killed write are removed."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from flatrobust import runlock
from flatrobust.cli import main
from flatrobust.config import RESUME_SAFE, resume_config
from flatrobust.train import fit

# 2 steps per epoch on 128 digits, PGD-1: an epoch takes about a second
TINY = ["data.train_subset=128", "data.eval_subset=16", "batch_size=64", "attack.steps=1", "eval.steps=1", "awp.gamma=0"]


def _train(tmp_path, *extra) -> int:
    return main(["train", "recipes/digits_at.yaml", *TINY, f"out_dir={tmp_path}", "name=r", "--quiet", *extra])


def _files(run) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(run.iterdir()) if p.is_file()}


def _one_line(capsys) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err


def _epochs(run) -> list[int]:
    return [json.loads(line)["epoch"] for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("change, key, old, new", [
    ("seed=1", "seed", "0", "1"),
    ("method=trades", "method", "'at'", "'trades'"),
    ("awp.gamma=0.01", "awp.gamma", "0.0", "0.01"),
    ("model=preactresnet18", "model", "'smallcnn'", "'preactresnet18'"),
])
def test_a_resume_that_changes_the_run_is_refused_and_changes_nothing(tmp_path, capsys, change, key, old, new):
    assert _train(tmp_path, "epochs=1") == 0
    run = tmp_path / "r"
    before = _files(run)
    capsys.readouterr()
    assert main(["train", "--resume", str(run), change, "epochs=2", "--quiet"]) == 2
    err = _one_line(capsys)
    assert f"--resume would change {key} from {old} to {new}, but '{run / 'last.pt'}' was trained with {key}={old}" in err, err
    assert _files(run) == before  # nothing rewritten: config.yaml still says what the run was trained with
    assert main(["train", "--resume", str(run), "epochs=2", "device=cpu", "--quiet"]) == 0  # safe changes still resume
    assert _epochs(run) == [1, 2]


def test_the_docs_name_exactly_the_keys_a_resume_may_change():
    readme = " ".join(Path("README.md").read_text().split())
    keys = [f"`{k}`" for k in RESUME_SAFE]
    assert f"only {', '.join(keys[:-1])} and {keys[-1]} may change" in readme
    row = next(ln for ln in Path("docs/RELIABILITY.md").read_text().splitlines() if "Only the keys of `flatrobust.config.RESUME_SAFE`" in ln)
    assert [k for k in re.findall(r"`([a-z_.]+)`", row.split("may change:")[1].split("A config saved")[0])] == list(RESUME_SAFE)


def test_an_edited_config_yaml_is_refused_too(tmp_path, capsys):
    assert _train(tmp_path, "epochs=1") == 0
    run = tmp_path / "r"
    text = (run / "config.yaml").read_text()
    (run / "config.yaml").write_text(text.replace("seed: 0", "seed: 7"))
    capsys.readouterr()
    assert main(["train", "--resume", str(run), "--quiet"]) == 2
    assert "--resume would change seed from 0 to 7" in _one_line(capsys)
    (run / "config.yaml").write_text(text)
    assert main(["train", "--resume", str(run), "epochs=2", "--quiet"]) == 0


def test_a_damaged_metrics_file_keeps_every_valid_record(tmp_path, capsys):
    assert _train(tmp_path, "epochs=2") == 0
    run = tmp_path / "r"
    lines = (run / "metrics.jsonl").read_text().splitlines(keepends=True)
    (run / "metrics.jsonl").write_text(lines[0] + "garbage\n" + lines[1] + lines[1][:40] + "\n")
    capsys.readouterr()
    assert main(["train", "--resume", str(run), "epochs=3", "--quiet"]) == 0
    err = capsys.readouterr().err
    assert (f"flatrobust: warning: '{run / 'metrics.jsonl'}' was damaged: dropped line 2 (not valid JSON: garbage), "
            "line 4 (not valid JSON: cut short); kept the 2 valid record(s)\n") == err, err
    kept = (run / "metrics.jsonl").read_text().splitlines(keepends=True)
    assert _epochs(run) == [1, 2, 3] and kept[:2] == lines


def test_a_run_whose_last_pt_was_deleted_is_never_restarted_silently(tmp_path, capsys):
    assert _train(tmp_path, "epochs=2") == 0
    run = tmp_path / "r"
    (run / "last.pt").unlink()
    before = _files(run)
    capsys.readouterr()
    assert main(["train", "--resume", str(run), "epochs=3", "--quiet"]) == 2
    err = _one_line(capsys)
    assert f"'{run}' holds no last.pt to continue from, but its metrics.jsonl records 2 trained epochs" in err, err
    assert f"flatrobust train {run / 'config.yaml'} --overwrite" in err
    assert _files(run) == before
    # Epoch 1's record alone is what a stop between it and the first last.pt leaves: start again, and say so.
    (run / "metrics.jsonl").write_text((run / "metrics.jsonl").read_text().splitlines(keepends=True)[0])
    assert main(["train", "--resume", str(run), "--quiet"]) == 0
    assert "holds no last.pt: it stopped while writing epoch 1's checkpoints" in capsys.readouterr().err
    assert _epochs(run) == [1, 2]


def test_a_second_writer_is_refused_and_a_stale_lock_does_not_block(tmp_path, capsys):
    assert _train(tmp_path, "epochs=1") == 0
    run = tmp_path / "r"
    capsys.readouterr()
    with runlock.hold(run):  # another writer (a lock is per open file: this process counts as one)
        before = _files(run)
        for argv in (["--resume", str(run), "epochs=2"], ["recipes/digits_at.yaml", *TINY, f"out_dir={tmp_path}", "name=r", "--overwrite"]):
            assert main(["train", *argv, "--quiet"]) == 2
            err = _one_line(capsys)
            assert f"'{run}' is being written by process {os.getpid()} (it holds '{run / '.lock'}')" in err, err
            assert _files(run) == before
    assert not (run / ".lock").exists()
    (run / ".lock").write_text("999999999\n")  # left by a process that was SIGKILLed: nobody holds it
    assert main(["train", "--resume", str(run), "epochs=2", "--quiet"]) == 0
    assert _epochs(run) == [1, 2] and not (run / ".lock").exists()


def test_a_new_run_that_fails_at_the_lock_leaves_no_folder(tmp_path, capsys):
    with runlock.hold(tmp_path / "r"):
        assert (tmp_path / "r").is_dir()
        assert _train(tmp_path, "epochs=1") == 2
        assert "is being written by process" in _one_line(capsys)
    assert not (tmp_path / "r").exists()  # the lock made the folder and removed it again


def _resume_line(run, sig) -> str:
    return f"flatrobust: interrupted by {sig.name}: the run can be resumed (from its last checkpoint, exactly) with: flatrobust train --resume {run}"


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_sigterm_and_sigint_say_how_to_resume(tmp_path, capsys, sig):
    """The signal is really delivered, to this process, while `flatrobust train` runs in it (once its first epoch is
    recorded); the subprocess variant below does the same from outside."""
    run, done = tmp_path / "r", threading.Event()

    def interrupt_after_the_first_epoch():
        while not done.is_set() and not ((run / "metrics.jsonl").exists() and (run / "last.pt").exists()):
            time.sleep(0.01)
        if not done.is_set():  # never signal this process once the training has ended (a failed test)
            os.kill(os.getpid(), sig)

    watcher = threading.Thread(target=interrupt_after_the_first_epoch, daemon=True)
    watcher.start()
    try:
        assert _train(tmp_path, "epochs=1000") == 128 + sig  # far longer than the wait: the signal lands while it trains
    finally:
        done.set()
    watcher.join()
    assert capsys.readouterr().err.splitlines()[-1] == _resume_line(run, sig)
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handlers are put back
    assert not (run / ".lock").exists() and not [p for p in run.iterdir() if p.name.endswith(".tmp")]
    fit(resume_config(run), resume_dir=run, progress=False, stop_after_steps=1)  # the command it names continues the run


@pytest.mark.slow
def test_sigterm_from_outside_says_how_to_resume(tmp_path):
    run = tmp_path / "r"
    cmd = [sys.executable, "-m", "flatrobust", "train", "recipes/digits_at.yaml", *TINY, "epochs=1000", f"out_dir={tmp_path}",
           "name=r", "--quiet"]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    deadline = time.time() + 600  # generous: on a loaded 2-core machine starting Python and torch alone takes long
    while time.time() < deadline and proc.poll() is None:  # once the first epoch is done
        if (run / "metrics.jsonl").exists() and (run / "last.pt").exists():
            break
        time.sleep(0.01)
    assert proc.poll() is None, "the run ended before it could be interrupted"
    os.kill(proc.pid, signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert err.strip().splitlines()[-1] == _resume_line(run, signal.SIGTERM), err
    assert not (run / ".lock").exists() and not [p for p in run.iterdir() if p.name.endswith(".tmp")]
    fit(resume_config(run), resume_dir=run, progress=False, stop_after_steps=1)


def test_temporary_files_of_a_killed_write_are_removed_on_the_next_start(tmp_path, capsys):
    assert _train(tmp_path, "epochs=1") == 0
    run = tmp_path / "r"
    (run / ".last.pt.0123abcd.tmp").write_bytes(b"half a checkpoint")  # what SIGKILL during torch.save leaves
    capsys.readouterr()
    assert main(["train", "--resume", str(run), "epochs=2", "--quiet"]) == 0
    assert "removed 1 temporary file(s) an interrupted write left in" in capsys.readouterr().err
    assert sorted(p.name for p in run.iterdir() if p.name.startswith(".")) == []
