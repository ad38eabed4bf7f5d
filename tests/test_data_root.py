"""A run's data from any folder (issue 29, item 3): train stores data.root resolved (and as typed in data.json),
and every command that reads a run's data takes the same --data-root."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import yaml
from fixtures_owndata import write_npz

from flatrobust.cli import main

REPO = Path(__file__).resolve().parents[1]
TINY = ["epochs=1", "attack.steps=1", "eval.steps=1", "data.eval_subset=6", "batch_size=8", "--quiet"]


def test_a_relative_root_works_from_any_folder(tmp_path, monkeypatch, capsys):
    (tmp_path / "work").mkdir()
    write_npz(tmp_path / "work" / "d.npz")
    monkeypatch.chdir(tmp_path / "work")
    assert main(["train", str(REPO / "recipes/digits_at.yaml"), "data.name=npz", "data.root=d.npz", "out_dir=runs",
                 "name=r", *TINY]) == 0
    run = tmp_path / "work" / "runs" / "r"
    assert yaml.safe_load((run / "config.yaml").read_text())["data"]["root"] == str(tmp_path / "work" / "d.npz")
    data = json.loads((run / "data.json").read_text())
    assert data["root"] == str(tmp_path / "work" / "d.npz") and data["root_as_typed"] == "d.npz"

    monkeypatch.chdir(tmp_path)  # elsewhere: the stored root still finds the data
    assert main(["eval", str(run), "--attacks", "clean", "--no-checks"]) == 0
    assert main(["landscape", str(run), "--n", "4", "--alphas=-1,0,1", "--directions", "1", "--steps", "1"]) == 0
    assert main(["train", "--resume", str(run), "epochs=2", "--quiet"]) == 0

    shutil.move(tmp_path / "work" / "d.npz", tmp_path / "moved.npz")  # the data moved: --data-root, the same everywhere
    capsys.readouterr()
    assert main(["flatness", str(run), "--n", "4", "--draws", "1", "--worst-steps", "1", "--steps", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert "--data-root" in err and "data.root=" not in err and "\n" not in err, err
    moved = str(tmp_path / "moved.npz")
    assert main(["flatness", str(run), "--n", "4", "--draws", "1", "--worst-steps", "1", "--steps", "1", "--data-root", moved]) == 0
    assert json.loads((run / "flatness_best.json").read_text())["data"]["root"] == moved
    assert main(["landscape", str(run), "--n", "4", "--alphas=-1,0,1", "--directions", "1", "--steps", "1", "--data-root", moved]) == 0
    assert main(["eval", str(run), "--attacks", "clean", "--no-checks", "--data-root", moved]) == 0
    assert main(["train", "--resume", str(run), "epochs=3", "--quiet", "--data-root", moved]) == 0
    assert yaml.safe_load((run / "config.yaml").read_text())["data"]["root"] == moved


def test_a_run_that_stored_its_root_as_typed_still_resumes(tmp_path, monkeypatch):
    """Runs trained before the root was stored resolved keep a relative data.root in config.yaml and last.pt: a resume
    resolves it (data.root is in RESUME_SAFE: where the data is read from, not what the run trained on)."""
    import torch

    from flatrobust.config import RESUME_SAFE

    assert "data.root" in RESUME_SAFE
    write_npz(tmp_path / "d.npz")
    monkeypatch.chdir(tmp_path)
    assert main(["train", str(REPO / "recipes/digits_at.yaml"), "data.name=npz", "data.root=d.npz", "out_dir=runs",
                 "name=r", *TINY]) == 0
    run = tmp_path / "runs" / "r"
    state = torch.load(run / "last.pt", weights_only=True)
    state["config"]["data"]["root"] = "d.npz"  # as a run of the earlier version stored it
    torch.save(state, run / "last.pt")
    config = yaml.safe_load((run / "config.yaml").read_text())
    config["data"]["root"] = "d.npz"
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    assert main(["train", "--resume", str(run), "epochs=2", "--quiet"]) == 0
    assert yaml.safe_load((run / "config.yaml").read_text())["data"]["root"] == str(tmp_path / "d.npz")
