"""The run directory's format has one owner, `flatrobust.rundir`: what a run writes is what every reader reads."""
from __future__ import annotations

import json
import re

import pytest
import yaml

from flatrobust import rundir
from flatrobust.cli import main
from flatrobust.config import load_config, resume_config
from flatrobust.errors import UserError
from flatrobust.train import fit


def test_timing_keys_are_exactly_the_wall_clock_metrics_a_run_writes(tmp_path):
    cfg = load_config("recipes/digits_at.yaml", ["data.train_subset=64", "data.eval_subset=16", "batch_size=64", "attack.steps=1",
                                                 "eval.steps=1", "epochs=1", f"out_dir={tmp_path}"])
    run = fit(cfg, progress=False)
    (record,) = rundir.read_metrics(run)
    timings = {k for k in record if k.endswith("_s")}  # seconds and per second
    assert timings == set(rundir.TIMING_KEYS)
    assert rundir.without_timing(record) == {k: v for k, v in record.items() if k not in timings}
    assert rundir.finished(run) and rundir.read_config(run)["epochs"] == 1
    assert rundir.read_env(run)["seed"] == 0 and rundir.checkpoint_file(run) == run / "best.pt"


def _run_dir(path, epochs: int, lines: list[str]):
    path.mkdir()
    (path / "config.yaml").write_text(yaml.safe_dump({"name": path.name, "epochs": epochs}))
    (path / "metrics.jsonl").write_text("".join(lines))
    return path


def test_metrics_one_record_per_epoch_last_wins_half_written_line_left_out(tmp_path):
    lines = [json.dumps({"epoch": e, "acc": a}) + "\n" for e, a in ((1, 0.1), (2, 0.2), (2, 0.25))] + ['{"epoch": 3, "ac']
    run = _run_dir(tmp_path / "r", 3, lines)
    assert rundir.read_metrics(run) == [{"epoch": 1, "acc": 0.1}, {"epoch": 2, "acc": 0.25}]
    assert not rundir.finished(run)  # two epochs of three
    (run / "metrics.jsonl").write_text(lines[0] + "{oops\n" + lines[1])
    with pytest.raises(UserError, match=r"metrics.jsonl, line 2, is not valid JSON"):
        rundir.read_metrics(run)
    assert rundir.read_metrics(tmp_path) == [] and not rundir.finished(tmp_path)  # not a run directory


def test_truncate_keeps_the_epochs_a_checkpoint_covers(tmp_path):
    run = _run_dir(tmp_path / "r", 3, [json.dumps({"epoch": e}) + "\n" for e in (1, 2, 3)])
    assert rundir.truncate_metrics(run, 2) == ([{"epoch": 1}, {"epoch": 2}], [])
    assert (run / "metrics.jsonl").read_text() == '{"epoch": 1}\n{"epoch": 2}\n'
    rundir.append_metrics(run, {"epoch": 3, "x": 1})
    assert rundir.read_metrics(run)[-1] == {"epoch": 3, "x": 1} and rundir.finished(run)


@pytest.mark.parametrize("config, message", [
    (None, "is not a run directory (no config.yaml)"),
    ("epochs: [unclosed\n", "config.yaml' is empty or damaged and"),
    ("- a list\n", "config.yaml' is empty or damaged and"),
    ("", "config.yaml' is empty or damaged and"),
])
def test_resume_of_a_folder_that_is_no_run_directory_is_one_line(tmp_path, capsys, config, message):
    run = tmp_path / "r"
    run.mkdir()
    if config is not None:
        (run / "config.yaml").write_text(config)
    with pytest.raises(UserError, match=re.escape(message)):
        resume_config(run)
    assert main(["train", "--resume", str(run)]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_truncate_keeps_every_valid_record_and_names_each_damaged_line(tmp_path):
    """A garbage line or a line cut in half drops that line only, never the valid records after it (issue 27)."""
    lines = ['{"epoch": 1}\n', "garbage\n", '{"epoch": 2}\n', '{"epoch": 3, "lo\n', "[1, 2]\n", '{"epoch": 3}\n', '{"epoch": 4}\n']
    run = _run_dir(tmp_path / "r", 4, lines)
    kept = rundir.truncate_metrics(run, 3)
    assert kept.records == [{"epoch": 1}, {"epoch": 2}, {"epoch": 3}]
    assert kept.dropped == ["line 2 (not valid JSON: garbage)", "line 4 (not valid JSON: cut short)",
                            "line 5 (not the record of an epoch)"]
    assert (run / "metrics.jsonl").read_text() == '{"epoch": 1}\n{"epoch": 2}\n{"epoch": 3}\n'


def test_remove_temporary_removes_only_what_an_atomic_write_leaves(tmp_path):
    for name in (".last.pt.0a1b2c3d.tmp", ".config.yaml.ffffffff.tmp", "last.pt", ".last.pt.xyz.tmp", "a.0a1b2c3d.tmp"):
        (tmp_path / name).write_text("x")
    assert rundir.remove_temporary(tmp_path) == [".config.yaml.ffffffff.tmp", ".last.pt.0a1b2c3d.tmp"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".last.pt.xyz.tmp", "a.0a1b2c3d.tmp", "last.pt"]


def test_result_files_order_and_names(tmp_path):
    """`rundir.result_file` names every kind's file as eval's; `result_files` lists best.pt's first, old files last."""
    assert rundir.result_file(tmp_path / "best.pt", "landscape") == tmp_path / "landscape_best.json"
    assert rundir.result_file(tmp_path / "last.pt", "landscape_2d", "ema", ".png") == tmp_path / "landscape_2d_last_ema.png"
    assert rundir.result_file(tmp_path / "my.weights.pt", "flatness") == tmp_path / "flatness_my.weights.json"
    assert rundir.eval_file(tmp_path / "best.pt", "ema") == rundir.result_file(tmp_path / "best.pt", "eval", "ema") == tmp_path / "eval_best_ema.json"
    names = ["flatness.json", "flatness_ema.json", "flatness_last.json", "flatness_zz.json", "flatness_best_ema.json",
             "flatness_best.json", "flatnessx.json", "landscape_best.json", "flatness_last.parts"]
    for name in names:
        (tmp_path / name).write_text("{}")
    assert [p.name for p in rundir.result_files(tmp_path, "flatness")] == [
        "flatness_best.json", "flatness_best_ema.json", "flatness_last.json", "flatness_zz.json", "flatness.json",
        "flatness_ema.json"]
