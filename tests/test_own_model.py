"""Your own model: `timm:<name>` and `package.module:callable`, one mechanism with the built-in registry."""
from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import pytest
import torch

from flatrobust import models
from flatrobust.checkpoint import CheckpointError, model_from_checkpoint
from flatrobust.cli import main
from flatrobust.config import load_config

# 128 digits, PGD-1: one epoch takes about a second
TINY = ["epochs=1", "data.train_subset=128", "data.eval_subset=32", "batch_size=64", "attack.steps=1", "attack.eps=0.2",
        "attack.alpha=0.2", "eval.steps=1", "awp.gamma=0"]

USER_MODULE = """
import torch
from torch import nn


class Net(nn.Module):
    def __init__(self, num_classes, in_channels, width=8):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, width, 3, padding=1)
        self.bn = nn.BatchNorm2d(width)
        self.fc = nn.Linear(width, num_classes)

    def forward(self, x):
        return self.fc(torch.relu(self.bn(self.conv(x))).mean((2, 3)))


def build(num_classes, in_channels, **kw):
    return Net(num_classes, in_channels, **kw)


def wrong_shape(num_classes, in_channels):
    return nn.Sequential(nn.Flatten(), nn.LazyLinear(num_classes + 1))


def returns_tuple(num_classes, in_channels):
    class Two(Net):
        def forward(self, x):
            return super().forward(x), x
    return Two(num_classes, in_channels)


def not_a_module(num_classes, in_channels):
    return "a string"


def crashes(num_classes, in_channels):
    raise RuntimeError("out of ideas")


NOT_CALLABLE = 3
"""


def _module(folder: Path, name: str, text: str = USER_MODULE) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.py").write_text(textwrap.dedent(text))
    return name


# An example of every source, so that a new source cannot be added without being tested here:
# (name, search path, (classes, channels, size) of data it fits).
def _example(source: str, tmp_path: Path, monkeypatch) -> tuple[str, list[str], tuple[int, int, int]]:
    if source == "builtin":
        return "smallcnn", [], (7, 1, 8)
    if source == "timm":
        pytest.importorskip("timm")
        return "timm:test_resnet", [], (7, 1, 8)
    if source == "robustbench":  # a small instance of a zoo architecture, registered in the installed zoo
        from flatrobust.models.robustbench_compat import RobustBenchMissing, import_robustbench

        try:
            rb = import_robustbench()
        except RobustBenchMissing as e:
            pytest.skip(str(e))
        from robustbench.model_zoo.architectures.wide_resnet import WideResNet
        from robustbench.model_zoo.enums import BenchmarkDataset, ThreatModel

        zoo = rb.model_zoo.model_dicts[BenchmarkDataset("cifar10")][ThreatModel("Linf")]
        monkeypatch.setitem(zoo, "EverySourceWRN", {"model": lambda: WideResNet(depth=10, widen_factor=1), "gdrive_id": "none"})
        return "robustbench:EverySourceWRN", [], (10, 3, 32)
    if source == "import":
        return f"{_module(tmp_path, 'own_every_source')}:build", [str(tmp_path)], (7, 1, 8)
    raise AssertionError(f"no example for model source {source!r}: add one")


@pytest.mark.parametrize("source", [s.name for s in models.SOURCES])
def test_every_source_builds_a_normalized_model_that_trains(source, tmp_path, monkeypatch):
    name, path, (classes, channels, size) = _example(source, tmp_path, monkeypatch)
    assert models.source_of(name).name == source
    models.check_name(name)
    torch.manual_seed(0)
    model = models.create(name, num_classes=classes, in_channels=channels, mean=(0.3,) * channels, std=(0.4,) * channels,
                          input_size=size, search_path=path)
    assert isinstance(model, models.NormalizedModel)
    # a source whose networks normalize themselves (RobustBench's) gets the identity: never twice
    mean, std = (0.0, 1.0) if models.source_of(name).normalizes_inside else (0.3, 0.4)
    assert model.normalize.mean.flatten().tolist() == pytest.approx([mean] * channels)
    assert model.normalize.std.flatten().tolist() == pytest.approx([std] * channels)
    x = torch.rand(4, channels, size, size)
    with torch.no_grad():
        assert torch.equal(model(x), model.net((x - mean) / std))  # the normalization is the first layer
    out = model.train()(x)
    assert out.shape == (4, classes)
    out.logsumexp(1).sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_import_model_trains_and_is_rebuilt_from_the_recipe_folder(tmp_path, monkeypatch, capsys):
    recipes = tmp_path / "recipes"
    _module(recipes, "own_train")
    (recipes / "own.yaml").write_text("model: own_train:build\nmodel_args: {width: 6}\n")
    rc = main(["train", str(recipes / "own.yaml"), *TINY, f"out_dir={tmp_path / 'runs'}", "name=own", "--quiet"])
    assert rc == 0, capsys.readouterr().err
    run = tmp_path / "runs" / "own"
    cfg = load_config(None, ["model=own_train:build"])  # no recipe: the working directory
    assert cfg.model_dir == str(Path.cwd().resolve())
    ckpt = torch.load(run / "best.pt", weights_only=True)
    assert ckpt["config"]["model_dir"] == str(recipes.resolve())
    sys.modules.pop("own_train", None)  # as in a new process: found again through model_dir
    monkeypatch.chdir(tmp_path.parent)
    # A checkpoint never chooses code to import unasked (tests/test_untrusted_code.py): the user consents.
    model, _ = model_from_checkpoint(run / "best.pt", trust_code=True)
    assert model.net.conv.out_channels == 6 and model.net.__class__.__module__ == "own_train"
    capsys.readouterr()
    assert main(["eval", str(run), "--attacks", "clean", "--no-checks", "--trust-model-code"]) == 0
    assert "clean" in capsys.readouterr().out
    # The module gone: one line saying so, not a traceback.
    (recipes / "own_train.py").unlink()
    sys.modules.pop("own_train", None)
    with pytest.raises(CheckpointError, match="cannot rebuild its model: model 'own_train:build': cannot import 'own_train'"):
        model_from_checkpoint(run / "best.pt", trust_code=True)
    assert main(["eval", str(run), "--attacks", "clean", "--no-checks", "--trust-model-code"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot import 'own_train'" in err


@pytest.mark.parametrize("attr,message", [
    ("wrong_shape", "returns (2, 11) for a batch of shape (2, 1, 8, 8): it must return logits of shape (2, 10)"),
    ("returns_tuple", "returns tuple for a batch of shape (2, 1, 8, 8)"),
    ("not_a_module", "returned an object of type str, not a torch.nn.Module"),
    ("crashes", "could not be built (RuntimeError: out of ideas)"),
    ("NOT_CALLABLE", "NOT_CALLABLE is not callable (int)"),
    ("missing", "has no 'missing'"),
])
def test_bad_user_model_is_one_line_exit_2_before_training(attr, message, tmp_path, capsys):
    mod = _module(tmp_path, "own_bad")
    rc = main(["train", *TINY, f"model={mod}:{attr}", f"model_dir={tmp_path}", f"out_dir={tmp_path / 'runs'}", "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and message in err, err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("mod,text,message", [
    ("own_broken_syntax", "def build(:\n", "cannot import 'own_broken_syntax' (SyntaxError"),
    ("own_broken_dep", "import no_such_package_xyz\n", "No module named 'no_such_package_xyz'"),
    ("own_broken_raises", "raise KeyError('boom')\n", "(KeyError: 'boom')"),
])
def test_module_that_fails_to_import_is_one_line(mod, text, message, tmp_path, capsys):
    _module(tmp_path, mod, text)
    rc = main(["train", *TINY, f"model={mod}:build", f"model_dir={tmp_path}", f"out_dir={tmp_path / 'runs'}", "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and "cannot import" in err and message in err, err
    assert err.count("\n") == 1


@pytest.mark.parametrize("name,message", [
    ("resnt18", "unknown model 'resnt18' (did you mean 'preactresnet18'?)"),
    ("a:b:c", "write package.module:callable"),
    ("my-nets:build", "write package.module:callable"),
    ("timm:a/b", "write timm:<name>"),
])
def test_config_validation_knows_the_three_forms(name, message, tmp_path, capsys):
    assert main(["train", *TINY, f"model={name}", f"out_dir={tmp_path}", "--quiet"]) == 2
    assert message in capsys.readouterr().err
    for ok in ("smallcnn", "timm:resnet18", "pkg.mod:Cls.build"):
        models.check_name(ok)


def test_timm_missing_is_one_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)  # what an environment without timm sees on import
    with pytest.raises(models.ModelError, match=r"needs timm, which is not installed: pip install 'flatrobust\[timm\]'"):
        models.create("timm:resnet18")


def test_timm_model_trains_and_evaluates_without_download(tmp_path, monkeypatch, capsys):
    timm = pytest.importorskip("timm")
    calls = []
    create = timm.create_model
    monkeypatch.setattr(timm, "create_model", lambda *a, **kw: calls.append(kw) or create(*a, **kw))
    rc = main(["train", *TINY, "model=timm:test_resnet", f"out_dir={tmp_path}", "name=t", "--quiet"])
    assert rc == 0, capsys.readouterr().err
    assert calls and all(kw["pretrained"] is False and kw["in_chans"] == 1 and kw["num_classes"] == 10 for kw in calls)
    model, _ = model_from_checkpoint(tmp_path / "t")
    assert model.normalize.mean.flatten().tolist() == pytest.approx([0.3058])
    assert main(["eval", str(tmp_path / "t"), "--attacks", "clean", "--no-checks"]) == 0
    assert main(["train", *TINY, "model=timm:resnet_18x", f"out_dir={tmp_path}", "name=u", "--quiet"]) == 2
    assert "timm has no model 'resnet_18x' (did you mean 'timm:resnet18'?)" in capsys.readouterr().err


def test_timm_failed_pretrained_download_is_one_line(tmp_path, monkeypatch, capsys):
    pytest.importorskip("timm")
    hub = pytest.importorskip("huggingface_hub.constants")
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)  # no network: the download fails as without a connection
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path / "hub"))  # and nothing is in the cache
    rc = main(["train", *TINY, "model=timm:test_resnet", "model_args={pretrained: true}", f"out_dir={tmp_path}", "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1, err
    assert "the pretrained weights could not be downloaded" in err and "model_args.pretrained=false" in err


def test_module_on_the_python_path_needs_no_model_dir(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    _module(tmp_path, "own_on_path")
    model = models.create("own_on_path:Net", num_classes=3, in_channels=2, input_size=5, width=4)
    assert model(torch.rand(2, 2, 5, 5)).shape == (2, 3)


def test_readme_example_module_builds(tmp_path):
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    code = readme.split("`my_recipe.yaml` (`model: mynets:build`, `model_args: {width: 32}`), `mynets.py`:")[1]
    code = code.split("```python\n", 1)[1].split("```", 1)[0]
    _module(tmp_path, "readme_mynets", code)
    model = models.create("readme_mynets:build", num_classes=10, in_channels=3, input_size=32, search_path=[str(tmp_path)], width=32)
    assert model(torch.rand(2, 3, 32, 32)).shape == (2, 10)
