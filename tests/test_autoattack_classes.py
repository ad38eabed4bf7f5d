"""AutoAttack on models with fewer than 4 classes (issue 29, item 1): the stages valid for the class count
run, eval.json and the report say so, and nothing raises pyautoattack's IndexError."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from flatrobust.errors import UserError
from flatrobust.evaluate import AUTOATTACK_STAGES, autoattack_stages, evaluate, format_table

pytest.importorskip("pyautoattack")


def _model(k: int) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, k)).eval()


def test_stages_per_class_count():
    assert autoattack_stages(10) == (AUTOATTACK_STAGES, None)
    assert autoattack_stages(4)[0] == AUTOATTACK_STAGES
    assert autoattack_stages(3)[0] == ("apgd-ce", "apgd-dlr", "fab-t", "square")
    assert autoattack_stages(2)[0] == ("apgd-ce", "fab-t", "square")
    assert "needs >= 4 classes" in autoattack_stages(2)[1]
    with pytest.raises(UserError, match="at least 2 classes"):
        autoattack_stages(1)


@pytest.mark.parametrize("k", [2, 3])
def test_autoattack_on_few_classes_says_what_ran(k):
    """A radius that APGD-CE breaks every point with: fast; the result names the stages run and why."""
    model = _model(k)
    x = torch.rand(6, 3, 4, 4, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        y = model(x).argmax(1)
    res = evaluate(model, x, y, attacks="clean,autoattack", norm="linf", eps=1.0, batch_size=6, checks=False, progress=False)
    aa = res["attacks"]["autoattack"]
    assert list(aa["stages"]) == aa["params"]["stages"] == list(autoattack_stages(k)[0])
    assert f"with {k} classes" in aa["note"] and aa["note"] in format_table(res)


@pytest.mark.slow
@pytest.mark.parametrize("k", [2, 3])
def test_autoattack_runs_every_stage_on_few_classes(k):
    """Every stage runs (a tiny radius leaves points robust for the later stages, Square's 5000 queries
    included: ~10 s), none raises."""
    model = _model(k)
    g = torch.Generator().manual_seed(1)
    x, y = torch.rand(4, 3, 4, 4, generator=g), torch.arange(4) % k
    with torch.no_grad():
        y = model(x).argmax(1)  # all correct, so every stage has points to attack
    res = evaluate(model, x, y, attacks="clean,autoattack", norm="linf", eps=1e-4, batch_size=4, checks=False,
                   progress=False)
    aa = res["attacks"]["autoattack"]
    assert list(aa["stages"]) == list(autoattack_stages(k)[0])
    assert aa["params"]["stages"] == list(autoattack_stages(k)[0]) and aa["params"]["target_classes"] == k - 1
    assert f"with {k} classes" in aa["note"] and aa["note"] in format_table(res)
    assert not any("not possible" in w for w in aa["warnings"])


@pytest.mark.parametrize("classes", [("cat", "dog"), ("cat", "dog", "emu")])
def test_cli_eval_default_attacks_on_a_small_image_folder(tmp_path, capsys, monkeypatch, classes):
    """The reported case: `flatrobust eval` of a 2- or 3-class image folder with AutoAttack exits 0 (was an
    IndexError traceback), and the result file and the printed table say which stages ran."""
    import json

    from fixtures_owndata import write_folder

    from flatrobust import models
    from flatrobust.cli import main

    import pyautoattack

    standard = pyautoattack.AutoAttack._set_version

    def fewer_queries(self, version="standard"):  # Square's 5000 queries on the points left robust: ~50 s here
        standard(self, version)
        self.square.n_queries = 50

    monkeypatch.setattr(pyautoattack.AutoAttack, "_set_version", fewer_queries)
    monkeypatch.setenv("FLATROBUST_CACHE", str(tmp_path / "cache"))
    write_folder(tmp_path / "d", {"train": dict.fromkeys(classes, 2), "test": dict.fromkeys(classes, 2)})
    torch.manual_seed(0)
    torch.save(models.create("smallcnn", num_classes=len(classes), in_channels=3).state_dict(), tmp_path / "w.pt")
    assert main(["eval", str(tmp_path / "w.pt"), "--model", "smallcnn", "--data", f"imagefolder:{tmp_path / 'd'}",
                 "--eps", "1", "--attacks", "clean,autoattack", "--no-checks", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    aa = json.loads((tmp_path / "eval_w.json").read_text())["attacks"]["autoattack"]
    assert aa["params"]["stages"] == list(autoattack_stages(len(classes))[0])
    assert f"with {len(classes)} classes" in aa["note"] and "note (autoattack): " + aa["note"] in out
