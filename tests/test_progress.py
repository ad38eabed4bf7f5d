"""One progress rule everywhere: a tqdm bar on a terminal, heartbeat lines (never bar frames) otherwise."""
from __future__ import annotations

import gc
import inspect
import io
import threading
import time

import pytest

from flatrobust import progress as progress_module
from flatrobust.progress import Progress, format_duration


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def _heartbeat_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "flatrobust-heartbeat"]


def test_terminal_gets_a_tqdm_bar():
    tty = FakeTerminal()
    with Progress(total=20, desc="epoch 1/3", unit="batch", stream=tty) as bar:
        assert bar.mode == "bar"
        for _ in range(20):
            bar.update()
    out = tty.getvalue()
    assert "\r" in out and "epoch 1/3:   0%|" in out and "0/20" in out  # tqdm's frames, redrawn in place
    assert not _heartbeat_threads()


def test_not_a_terminal_gets_heartbeat_lines_and_no_bar_frames():
    log = io.StringIO()
    with Progress(total=40, desc="eval pgd20", unit="batch", stream=log, interval=0.05) as bar:
        assert bar.mode == "heartbeat"
        for _ in range(40):
            time.sleep(0.01)
            bar.update()
    lines = log.getvalue().splitlines()
    assert "\r" not in log.getvalue()
    # ~0.4 s of work at one line per 0.05 s: a handful of lines, not one per update
    assert 2 <= len(lines) <= 12, lines
    assert all(ln.startswith("[flatrobust] eval pgd20: ") and "/40 batch" in ln for ln in lines)
    assert not _heartbeat_threads()  # close() stopped the timer


def test_a_short_loop_off_a_terminal_writes_nothing():
    log = io.StringIO()
    with Progress(total=1000, desc="fast", stream=log) as bar:  # the default interval: 30 s
        for _ in range(1000):
            bar.update()
    assert log.getvalue() == ""


def test_one_long_step_is_not_silent():
    """A single long step (one AutoAttack batch) still gets heartbeats, with its current stage."""
    log = io.StringIO()
    with Progress(total=1, desc="eval autoattack", unit="batch", stream=log, interval=0.05) as bar:
        bar.set_postfix_str("apgd-t")
        time.sleep(0.3)
    lines = log.getvalue().splitlines()
    assert len(lines) >= 2
    assert lines[0].startswith("[flatrobust] eval autoattack: 0/1 batch (0%), 0.") and lines[0].endswith(" s (apgd-t)")


def test_disabled_writes_nothing_anywhere():
    for stream in (io.StringIO(), FakeTerminal()):
        with Progress(total=5, stream=stream, enabled=False, interval=0.01) as bar:
            assert bar.mode == "off"
            time.sleep(0.05)
            bar.update(5)
        assert stream.getvalue() == ""


def test_iteration_updates_and_a_dropped_bar_stops_beating():
    log = io.StringIO()
    bar = Progress(range(3), desc="draws", stream=log, interval=10)
    assert list(bar) == [0, 1, 2] and bar.n == 3
    assert not _heartbeat_threads()  # iterating to the end closes it
    Progress(total=3, stream=log, interval=0.01)  # never closed
    gc.collect()
    time.sleep(0.1)
    assert not _heartbeat_threads()


def test_heartbeat_line_has_eta_and_durations():
    bar = Progress(total=4, desc="epoch 2/30", unit="batch", stream=io.StringIO(), interval=100)
    bar._start -= 30  # pretend 30 s went by
    bar._phase_start -= 30
    bar.update(1)
    assert bar.line() == "[flatrobust] epoch 2/30: 1/4 batch (25%), 30 s, about 1 min 30 s left"
    bar.set_description("eval autoattack")  # a new phase: the pace of the previous one predicts nothing
    assert bar.line() == "[flatrobust] eval autoattack: 1/4 batch (25%), 30 s"
    bar.close()
    assert [format_duration(s) for s in (0.04, 4.9, 9.96, 65, 7260)] == ["0.0 s", "4.9 s", "10 s", "1 min 5 s", "2 h 1 min"]


def test_evaluate_default_matches_its_docstring(trained_cnn, digits, capsys, monkeypatch):
    """evaluate() reports progress by default; off a terminal that is heartbeat lines, AutoAttack included."""
    from flatrobust.evaluate import evaluate

    assert inspect.signature(evaluate).parameters["progress"].default is True
    assert "heartbeat" in evaluate.__doc__
    monkeypatch.setattr(progress_module, "HEARTBEAT_S", 0.02)
    _, _, xte, yte = digits
    evaluate(trained_cnn, xte[:40], yte[:40], norm="linf", eps=0.1, attacks=["clean", "pgd20"], batch_size=20, checks=False)
    err = capsys.readouterr().err
    assert "\r" not in err
    assert "[flatrobust] eval " in err


@pytest.mark.parametrize("quiet", [False, True])
def test_cli_train_log_has_epoch_lines_and_heartbeats_only(tmp_path, capsys, monkeypatch, quiet):
    from flatrobust.cli import main

    monkeypatch.setattr(progress_module, "HEARTBEAT_S", 0.05)
    args = ["train", "recipes/digits_at.yaml", "data.train_subset=256", "data.eval_subset=32", "batch_size=32",
            "attack.steps=2", "eval.steps=2", "epochs=2", f"out_dir={tmp_path}"]
    assert main(args + (["--quiet"] if quiet else [])) == 0
    err = capsys.readouterr().err
    assert "\r" not in err
    lines = err.splitlines()
    if quiet:
        assert lines == []
    else:
        assert sum(ln.startswith("epoch ") for ln in lines) == 2
        assert all(ln.startswith(("epoch ", "[flatrobust] epoch ")) for ln in lines), lines
        assert any(ln.startswith("[flatrobust] epoch 1/2: ") for ln in lines)  # the heartbeat inside an epoch


def test_phase_counts_and_estimates_on_its_own():
    """An evaluation's heartbeat (issue 29, item 6): the count is the current attack's batches, not attacks x
    batches, and the time left is this attack's, from its own pace; batches read back from disk (skip) and
    an earlier, faster attack do not enter it."""
    bar = Progress(total=20, desc="eval clean", unit="batch", enabled=False)
    bar.set_description("eval clean", phase_total=10, phase="attack 1 of 2")
    bar.update(10)  # instantly
    bar.set_description("eval autoattack", phase_total=10, phase="attack 2 of 2")
    bar.set_postfix_str("stage 2/4: apgd-t")
    line = bar.line()
    assert "eval autoattack: 0/10 batch (attack 2 of 2)" in line and "no estimate until its first batch ends" in line
    assert line.endswith("(stage 2/4: apgd-t)")
    bar.skip(4)  # kept by an interrupted run
    bar._phase_start -= 10.0  # noqa: SLF001 - two computed batches took 10 s
    bar.update(2)
    line = bar.line()
    assert "6/10 batch" in line and "about 20 s left in eval autoattack" in line  # 4 batches at 5 s
