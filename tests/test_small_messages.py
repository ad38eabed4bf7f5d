"""Small things a new user hit (issue 29, item 9): run times, values echoed as typed, the data's name."""
from __future__ import annotations

import json

from flatrobust.cli import main
from flatrobust.train import print_summary


def test_a_short_run_says_its_time_in_tenths(tmp_path, capsys):
    row = {"epoch": 1, "test_clean_acc": 0.5, "test_robust_acc": 0.2, "train_robust_acc": 0.3, "gap": 0.1}
    print_summary(tmp_path, [row], 4.9)
    assert f"run {tmp_path} (4.9 s)" in capsys.readouterr().out


def test_a_negative_eps_is_echoed_as_typed(capsys):
    assert main(["train", "recipes/digits_at.yaml", "attack.eps=-8/255"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "flatrobust: error: attack.eps must be >= 0, got -8/255"


def test_report_names_digits_without_a_root(tmp_path):
    from test_report import _fake_run

    run = _fake_run(tmp_path / "r", "r", [0.2], [0.3])
    (run / "data.json").write_text(json.dumps({"name": "digits", "root": "./data", "classes": list("0123456789"),
                                               "in_channels": 1, "image_size": 8, "train_size": 1000, "test_size": 797,
                                               "mean": [0.5], "std": [0.3], "stats_from": "registry"}))
    assert main(["report", str(run), "--out", str(tmp_path / "rep")]) == 0
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "| r | digits | 0, 1," in md and "./data" not in md
