"""A checkpoint is data: its config never chooses code to import without the user's consent on the command line.

The hostile checkpoint below passes the `weights_only` load (it holds only tensors and strings), but its config
names `package.module:callable` and a `model_dir` whose module writes a marker file when it is imported.
"""
from __future__ import annotations

import json
import sys
import textwrap
import uuid

import numpy as np
import pytest
import torch

from flatrobust import models
from flatrobust.checkpoint import UntrustedCodeError, model_from_checkpoint, save_checkpoint
from flatrobust.cli import main
from flatrobust.data import DATASETS

TINY = ["epochs=1", "data.train_subset=64", "data.eval_subset=16", "batch_size=64", "attack.steps=1", "eval.steps=1",
        "awp.gamma=0"]


@pytest.fixture
def hostile(tmp_path):
    """(checkpoint, marker): a digits checkpoint whose config names a module that creates `marker` on import."""
    name = f"payload_{uuid.uuid4().hex[:8]}"  # a fresh module name: nothing cached in sys.modules
    code_dir, marker = tmp_path / "attacker", tmp_path / "IMPORTED"
    code_dir.mkdir()
    (code_dir / f"{name}.py").write_text(textwrap.dedent(f"""
        from pathlib import Path
        Path({str(marker)!r}).write_text("the checkpoint ran code")
        from flatrobust.models.smallcnn import SmallCNN

        def build(num_classes, in_channels):
            return SmallCNN(num_classes, in_channels)
    """))
    info = DATASETS["digits"]
    torch.manual_seed(0)
    weights = models.create("smallcnn", info.num_classes, info.in_channels, info.mean, info.std).state_dict()
    cfg = {"name": "sent", "model": f"{name}:build", "model_dir": str(code_dir), "model_args": {}, "seed": 0,
           "data": {"name": "digits", "root": str(tmp_path / "data"), "download": False},
           "attack": {"norm": "linf", "eps": 0.1, "alpha": 0.025, "steps": 1}}
    run = tmp_path / "run"
    save_checkpoint({"config": cfg, "model": weights, "epoch": 0}, run / "best.pt")
    yield run / "best.pt", marker
    sys.modules.pop(name, None)


def _refused(argv, capsys, marker):
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 2, err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert "never chooses code to run" in err and "--trust-model-code" in err, err
    assert not marker.exists(), "the checkpoint's module was imported"
    return err


def test_library_refuses_to_import_what_a_checkpoint_names(hostile):
    ckpt, marker = hostile
    with pytest.raises(UntrustedCodeError, match=r"names model 'payload_\w+:build', code that building it would import"):
        model_from_checkpoint(ckpt)
    assert not marker.exists()
    model, _ = model_from_checkpoint(ckpt, trust_code=True)  # consent: imported from the checkpoint's model_dir
    assert marker.exists() and type(model.net).__module__ == "flatrobust.models.smallcnn"


def test_every_command_refuses_without_consent(hostile, tmp_path, capsys):
    ckpt, marker = hostile
    err = _refused(["eval", str(ckpt), "--attacks", "clean", "--no-checks"], capsys, marker)
    assert "or build the model yourself with --model NAME" in err
    _refused(["landscape", str(ckpt), "--n", "8", "--alphas", "-1,0,1", "--directions", "1", "--steps", "1"], capsys, marker)
    _refused(["flatness", str(ckpt), "--n", "8", "--measure", "average", "--draws", "1", "--steps", "1"], capsys, marker)
    np.savez(tmp_path / "images.npz", x=np.zeros((4, 1, 8, 8), np.float32))
    _refused(["pseudolabel", str(ckpt), str(tmp_path / "images.npz"), "--out", str(tmp_path / "extra.npz")], capsys, marker)
    assert sorted(p.name for p in ckpt.parent.iterdir()) == ["best.pt"]  # nothing written
    assert not (tmp_path / "extra.npz").exists()


def test_consent_on_the_command_line_works(hostile, tmp_path, capsys):
    ckpt, marker = hostile
    # the model given by hand: built from the user's name, the checkpoint's model_dir never searched
    assert main(["eval", str(ckpt), "--model", "smallcnn", "--attacks", "clean", "--no-checks", "--out", str(tmp_path / "a.json")]) == 0
    assert not marker.exists()
    report = json.loads((tmp_path / "a.json").read_text())
    assert report["config"]["model"] == "smallcnn" and report["train_config"]["model"].endswith(":build")
    assert "--model smallcnn" in report["command"] and "--data" not in report["command"]
    # --trust-model-code: the checkpoint's own model, imported
    assert main(["eval", str(ckpt), "--attacks", "clean", "--no-checks", "--trust-model-code", "--out", str(tmp_path / "b.json")]) == 0
    assert marker.exists()
    assert "--trust-model-code" in json.loads((tmp_path / "b.json").read_text())["command"]
    marker.unlink()
    assert main(["flatness", str(ckpt), "--n", "8", "--measure", "average", "--draws", "1", "--steps", "1", "--trust-model-code",
                 "--out", str(tmp_path / "f")]) == 0
    assert (tmp_path / "f" / "flatness.json").exists()


def test_report_and_init_from_never_read_code_from_a_checkpoint(hostile, tmp_path, capsys):
    """init_from loads weights into the recipe's model (the recipe is the user's own command: its `model` is
    consent); the checkpoint's config is never used to build anything. report reads JSON and YAML only."""
    ckpt, marker = hostile
    run = ckpt.parent
    (run / "config.yaml").write_text(json.dumps(torch.load(ckpt, weights_only=True)["config"]))
    (run / "metrics.jsonl").write_text(json.dumps({"epoch": 0, "test_robust_acc": 0.1, "train_robust_acc": 0.2}) + "\n")
    assert main(["report", str(run), "--out", str(tmp_path / "report")]) == 0
    assert main(["train", "recipes/digits_at.yaml", *TINY, f"init_from={ckpt}", f"out_dir={tmp_path}", "name=ft", "--quiet"]) == 0, \
        capsys.readouterr().err
    assert not marker.exists()


def test_timm_from_a_checkpoint_downloads_nothing(tmp_path, monkeypatch):
    """timm:<name> is one of timm's own architectures (no import of the checkpoint's choosing); the
    checkpoint's weights replace timm's, so pretrained weights or a checkpoint_path it names are never read."""
    timm = pytest.importorskip("timm")
    info = DATASETS["digits"]
    model = models.create("timm:test_resnet", info.num_classes, info.in_channels, info.mean, info.std)
    cfg = {"model": "timm:test_resnet", "model_args": {"pretrained": True, "checkpoint_path": "/nonexistent/x.pth"},
           "data": {"name": "digits"}}
    save_checkpoint({"config": cfg, "model": model.state_dict()}, tmp_path / "t.pt")
    calls = []
    create = timm.create_model
    monkeypatch.setattr(timm, "create_model", lambda *a, **kw: calls.append(kw) or create(*a, **kw))
    rebuilt, _ = model_from_checkpoint(tmp_path / "t.pt")
    assert calls and all(kw["pretrained"] is False and "checkpoint_path" not in kw for kw in calls)
    assert all(torch.equal(rebuilt.state_dict()[k], v) for k, v in model.state_dict().items())
