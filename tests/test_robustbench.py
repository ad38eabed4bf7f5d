"""RobustBench round trip: `robustbench:<Name>` models (same logits as robustbench's own load_model, weights read
with weights_only, strictly, never downloaded), `flatrobust import`, and `flatrobust export` into RobustBench's
format (loaded back by robustbench's load_model). No network: small instances of the zoo's architectures with
random weights are registered in the installed zoo for the tests, and robustbench's download is made to fail."""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import re
import sys
from pathlib import Path

import pytest
import torch

from fixtures_owndata import write_npz
from flatrobust import models
from flatrobust.rundir import eval_file, result_file
from flatrobust.checkpoint import CheckpointError, model_from_checkpoint
from flatrobust.cli import main
from flatrobust.config import load_config
from flatrobust.models import robustbench_compat, robustbench_zoo


@pytest.fixture(scope="module")
def rb():
    try:
        return robustbench_compat.import_robustbench()
    except robustbench_compat.RobustBenchMissing as e:
        pytest.skip(str(e))


class _NoNetwork(AssertionError):
    pass


@pytest.fixture(scope="module")
def zoo(rb):
    """Small instances of the zoo's architectures, registered under test names (cifar10 Linf unless said):
    WideResNets 10-1 and 10-2, the 10-1 with the zoo's mu/sigma normalization inside (as Rice2020OverfittingNet),
    a PreActResNet (cifar100), an ensemble; and every download robustbench could start made to fail."""
    from robustbench.model_zoo.architectures.resnet import PreActBlock, PreActResNet
    from robustbench.model_zoo.architectures.wide_resnet import WideResNet
    from robustbench.model_zoo.enums import BenchmarkDataset, ThreatModel

    class NormWRN(WideResNet):
        def __init__(self):
            super().__init__(depth=10, widen_factor=1)
            self.register_buffer("mu", torch.tensor([0.4914, 0.4822, 0.4465]).view(1, 3, 1, 1))
            self.register_buffer("sigma", torch.tensor([0.2471, 0.2435, 0.2616]).view(1, 3, 1, 1))

        def forward(self, x):
            return super().forward((x - self.mu) / self.sigma)

    def refuse(*args, **kwargs):
        raise _NoNetwork(f"download attempted: {args} {kwargs}")

    import gdown
    import requests

    dicts = rb.model_zoo.model_dicts
    linf10, linf100 = dicts[BenchmarkDataset("cifar10")][ThreatModel("Linf")], dicts[BenchmarkDataset("cifar100")][ThreatModel("Linf")]
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(linf10, "TestTinyWRN", {"model": lambda: WideResNet(depth=10, widen_factor=1), "gdrive_id": "no-such-id"})
        mp.setitem(linf10, "TestTinyNormWRN", {"model": NormWRN, "gdrive_id": "no-such-id"})
        mp.setitem(linf10, "TestTinyWRN2", {"model": lambda: WideResNet(depth=10, widen_factor=2), "gdrive_id": "no-such-id"})
        mp.setitem(linf10, "TestTinyEnsemble", {"model": lambda: WideResNet(depth=10, widen_factor=1), "gdrive_id": ["a", "b"]})
        mp.setitem(linf100, "TestTinyPreAct", {"model": lambda: PreActResNet(PreActBlock, [1, 1, 1, 1], num_classes=100),
                                               "gdrive_id": "no-such-id"})
        for module, attr in ((rb.utils, "download_gdrive_new"), (rb.utils, "download_gdrive"), (gdown, "download"),
                             (requests.Session, "request")):
            mp.setattr(module, attr, refuse)
        yield {"cifar10": linf10, "cifar100": linf100}


def _random_weights(net: torch.nn.Module, seed: int = 0) -> dict[str, torch.Tensor]:
    """The network's state_dict with seeded random values at the scale of an initialization (so activations stay
    of order one through the depth), BatchNorm statistics included, so that eval mode is not trivial."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, v in net.state_dict().items():
        if k in ("mu", "sigma") or not v.is_floating_point():
            out[k] = v.clone()
        elif v.dim() > 1:  # conv / linear weights: std 1 / sqrt(fan-in)
            out[k] = torch.randn(v.shape, generator=g) / v[0].numel() ** 0.5
        elif k.endswith("running_var"):
            out[k] = torch.rand(v.shape, generator=g) + 0.5
        elif k.endswith("weight"):  # BatchNorm scale
            out[k] = 1 + 0.1 * torch.randn(v.shape, generator=g)
        else:  # biases, running means
            out[k] = 0.1 * torch.randn(v.shape, generator=g)
    return out


def _write_cache(model_dir: Path, zoo: dict, name: str, dataset: str = "cifar10", threat: str = "Linf", wrap: bool | str = True) -> dict:
    """Random weights for zoo entry `name` in RobustBench's cache layout, as published files often are: under
    'state_dict', with DataParallel's 'module.' prefix (wrap="last": also under 'last', as Andriushchenko2020Understanding's).
    Returns the (un-prefixed) state_dict."""
    state = _random_weights(zoo[dataset][name]["model"]())
    path = model_dir / dataset / threat / f"{name}.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    content = {"state_dict": {f"module.{k}": v for k, v in state.items()}} if wrap else state
    torch.save({"last": content, "best": {}} if wrap == "last" else content, path)
    return state


# ------------------------------------------------------------------------------------ importing robustbench

def test_robustbench_imports_here_without_the_names_it_needs(rb):
    """robustbench imports `autoattack` and `pkg_resources`; neither exists here under that name, and after our
    import nothing else sees the stand-ins (sys.modules keeps only robustbench's own modules)."""
    import pyautoattack

    assert importlib.util.find_spec("pkg_resources") is None and importlib.util.find_spec("autoattack") is None
    assert "autoattack" not in sys.modules and "pkg_resources" not in sys.modules
    import robustbench.eval
    import robustbench.loaders

    assert robustbench.eval.AutoAttack is pyautoattack.AutoAttack  # robustbench's benchmark runs PyPI's AutoAttack
    ids = robustbench.loaders.pkg_resources.resource_filename("robustbench.loaders", "helper_files/imagenet_test_image_ids.txt")
    assert Path(ids).is_file() and Path(ids).parent.parent == Path(robustbench.loaders.__file__).parent


def test_missing_robustbench_or_autoattack_is_one_line(rb, monkeypatch):
    monkeypatch.delitem(sys.modules, "robustbench.model_zoo")  # as in a fresh process: import_robustbench imports it again
    monkeypatch.setattr(robustbench_compat, "_found", lambda name: name != "robustbench")
    with pytest.raises(models.ModelError, match=r"'robustbench:Wu2020Adversarial': robustbench is not installed: pip install 'flatrobust\[robustbench\]'"):
        models.create("robustbench:Wu2020Adversarial")
    monkeypatch.setattr(robustbench_compat, "_found", lambda name: name == "robustbench")
    monkeypatch.setitem(sys.modules, "pyautoattack", None)
    with pytest.raises(models.ModelError, match="'robustbench:Wu2020Adversarial': robustbench needs AutoAttack \\(the pyautoattack package\\)"):
        models.create("robustbench:Wu2020Adversarial")


# ------------------------------------------------------------------------------------ robustbench:<Name>

@pytest.mark.parametrize("name,dataset,wrap", [
    ("TestTinyWRN", "cifar10", True), ("TestTinyNormWRN", "cifar10", True), ("TestTinyPreAct", "cifar100", True),
    # two real entries (PreActResNet-18s): one normalizing inside with the zoo's constants, one stored under 'last'
    ("Wong2020Fast", "cifar10", True), ("Andriushchenko2020Understanding", "cifar10", "last"),
])
def test_same_logits_as_robustbench_load_model(zoo, rb, tmp_path, name, dataset, wrap):
    _write_cache(tmp_path, zoo, name, dataset, wrap=wrap)
    theirs = rb.load_model(name, model_dir=tmp_path, dataset=dataset, threat_model="Linf")  # its local-file path
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.2, 0.2)  # the dataset's statistics, as train and eval pass them: not applied
    ours = models.create(f"robustbench:{name}", num_classes=robustbench_zoo.DATASETS[dataset], mean=mean, std=std, input_size=32,
                         dataset=dataset, pretrained=True, model_dir=str(tmp_path)).eval()
    assert ours.normalize.mean.abs().sum() == 0 and (ours.normalize.std == 1).all()  # never normalized twice
    assert type(ours.net) is type(theirs)
    x = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(ours(x), theirs(x))


def test_dataset_comes_from_the_classes_and_the_file_may_be_a_plain_state_dict(zoo, tmp_path):
    state = _write_cache(tmp_path, zoo, "TestTinyWRN", wrap=False)
    weights = tmp_path / "elsewhere.pt"
    torch.save({f"model.{k}": v for k, v in state.items()}, weights)  # 'model.' prefix (Chen2020Efficient's files)
    for kwargs in ({"pretrained": True, "model_dir": str(tmp_path)}, {"weights": str(weights)}):
        net = models.create("robustbench:TestTinyWRN", num_classes=10, **kwargs).net
        assert all(torch.equal(net.state_dict()[k], v) for k, v in state.items())


def test_normalization_constants_the_file_lacks_are_the_constructors(zoo, tmp_path):
    """Published files of zoo models with mu/sigma buffers often lack them (load_model's non-strict fallback)."""
    state = _write_cache(tmp_path, zoo, "TestTinyNormWRN", wrap=False)
    path = tmp_path / "cifar10" / "Linf" / "TestTinyNormWRN.pt"
    torch.save({k: v for k, v in state.items() if k not in ("mu", "sigma")}, path)
    net = models.create("robustbench:TestTinyNormWRN", num_classes=10, pretrained=True, model_dir=str(tmp_path)).net
    assert torch.allclose(net.mu.flatten(), torch.tensor([0.4914, 0.4822, 0.4465]))
    del state["fc.bias"]  # any other missing key is refused
    torch.save(state, path)
    with pytest.raises(models.ModelError, match=r"TestTinyNormWRN.pt does not fit the architecture: it lacks 'fc.bias'"):
        models.create("robustbench:TestTinyNormWRN", num_classes=10, pretrained=True, model_dir=str(tmp_path))


@pytest.mark.parametrize("change,message", [
    (lambda s: {**s, "extra.weight": torch.zeros(1)}, "it has 'extra.weight', which the network has not"),
    (lambda s: {**s, "fc.weight": torch.zeros(3, 64)}, "'fc.weight' has shape (3, 64), the network expects (10, 64)"),
    (lambda s: {k: v for k, v in s.items() if k != "conv1.weight"}, "it lacks 'conv1.weight'"),
    (lambda s: {"state_dict": {"a": 1}}, "holds no state_dict of tensors"),
])
def test_weights_that_do_not_fit_name_the_first_key(zoo, tmp_path, change, message):
    state = _write_cache(tmp_path, zoo, "TestTinyWRN", wrap=False)
    torch.save(change(state), tmp_path / "cifar10" / "Linf" / "TestTinyWRN.pt")
    with pytest.raises(models.ModelError, match=re.escape(message)):
        models.create("robustbench:TestTinyWRN", num_classes=10, pretrained=True, model_dir=str(tmp_path))


class _Payload:
    """Unpickling this runs Path.touch(marker): a stand-in for arbitrary code in a weights file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_a_pickle_payload_in_the_cache_layout_never_runs(zoo, tmp_path, capsys):
    marker = tmp_path / "payload_ran"
    path = tmp_path / "models" / "cifar10" / "Linf" / "TestTinyWRN.pt"
    path.parent.mkdir(parents=True)
    torch.save({"state_dict": {"conv1.weight": torch.zeros(1)}, "extra": _Payload(marker)}, path)
    with pytest.raises(models.ModelError, match=r"holds a pickled Python object \(.*\) and was refused for safety"):
        models.create("robustbench:TestTinyWRN", num_classes=10, pretrained=True, model_dir=str(tmp_path / "models"))
    rc = main(["import", "robustbench:TestTinyWRN", "--data", "cifar10", "--model-dir", str(tmp_path / "models"), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "refused for safety" in err
    assert not marker.exists() and not (tmp_path / "out").exists()


@pytest.mark.parametrize("name,kwargs,message", [
    ("TestTinyWRM", {}, "RobustBench has no model 'robustbench:TestTinyWRM' for cifar10 Linf (did you mean 'robustbench:TestTinyWRN'?)"),
    ("TestTinyWRN", {"threat_model": "L2"}, "has no 'robustbench:TestTinyWRN' for cifar10 L2, only for cifar10 Linf"),
    ("TestTinyWRN", {"dataset": "cifar100", "num_classes": 100, "threat_model": "L2"}, "RobustBench has no cifar100 L2 models"),
    ("TestTinyWRN", {"threat_model": "L3"}, "threat_model must be one of Linf, L2, corruptions"),
    ("TestTinyWRN", {"dataset": "svhn"}, "dataset must be one of cifar10, cifar100, imagenet"),
    ("TestTinyWRN", {"num_classes": 7}, "not for 7 classes: set model_args.dataset"),
    ("TestTinyWRN", {"dataset": "cifar100"}, "RobustBench's cifar100 models have 100 classes, the data has 10"),
    ("TestTinyWRN", {"in_channels": 1}, "RobustBench models take RGB images (3 channels)"),
    ("TestTinyEnsemble", {}, "is an ensemble or composite of 2 networks"),
    ("Chen2020Adversarial", {}, "is an ensemble or composite of 3 networks"),
    ("Debenedetti2022Light_XCiT-S12", {}, "serves these weights through timm's hub"),
    ("TestTinyWRN", {"pretrained": True, "model_dir": "nowhere"}, "no weights file at nowhere/cifar10/Linf/TestTinyWRN.pt: flatrobust never downloads"),
    ("TestTinyWRN", {"weights": "nowhere.pt"}, "the weights file nowhere.pt does not exist"),
])
def test_bad_robustbench_models_are_one_line_and_never_download(zoo, name, kwargs, message):
    kwargs = {"num_classes": 10, **kwargs}
    with pytest.raises(models.ModelError) as e:
        models.create(f"robustbench:{name}", **kwargs)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_a_run_config_picks_the_zoo_entry_of_its_data_and_threat_model():
    cfg = load_config(None, ["model=robustbench:Wu2020Adversarial", "data.name=cifar10", "attack.norm=l2", "attack.eps=0.5"])
    assert cfg.model_args == {"threat_model": "L2", "dataset": "cifar10"}
    cfg = load_config(None, ["model=robustbench:Wu2020Adversarial", "data.name=npz", "model_args={dataset: cifar100, threat_model: Linf}"])
    assert cfg.model_args == {"threat_model": "Linf", "dataset": "cifar100"}  # given explicitly: kept
    assert load_config(None, ["model=smallcnn"]).model_args == {}  # other sources take nothing from the run
    with pytest.raises(ValueError, match="write robustbench:<Name>"):
        load_config(None, ["model=robustbench:a b"])


# ------------------------------------------------------------------------------------ import, then every command

def _imported(tmp_path: Path, zoo, name: str = "TestTinyWRN") -> tuple[Path, Path]:
    """TestTinyWRN's random weights in the cache layout, imported on a 10-class 32x32 .npz set: (checkpoint, npz)."""
    _write_cache(tmp_path / "models", zoo, name)
    npz = tmp_path / "c10.npz"
    write_npz(npz, n_train=32, n_test=16, size=32, num_classes=10)
    rc = main(["import", f"robustbench:{name}", "--data", f"npz:{npz}", "--dataset", "cifar10", "--model-dir", str(tmp_path / "models"),
               "--out", str(tmp_path / "imported")])
    assert rc == 0
    return tmp_path / "imported" / "model.pt", npz


@pytest.fixture(scope="module")
def imported(zoo, tmp_path_factory) -> tuple[Path, Path]:
    """(checkpoint written by flatrobust import, .npz data) of TestTinyWRN; its weights file deleted afterwards."""
    tmp = tmp_path_factory.mktemp("imported")
    ckpt, npz = _imported(tmp, zoo)
    (tmp / "models" / "cifar10" / "Linf" / "TestTinyWRN.pt").unlink()  # every command rebuilds it from the checkpoint alone
    return ckpt, npz


def test_import_writes_a_checkpoint_of_the_zoo_network(imported):
    ckpt, _ = imported
    state = torch.load(ckpt, weights_only=True)
    assert state["config"]["model"] == "robustbench:TestTinyWRN"
    assert state["config"]["model_args"] == {"dataset": "cifar10", "threat_model": "Linf"}
    assert state["config"]["attack"]["eps"] == pytest.approx(8 / 255)  # RobustBench's leaderboard radius
    assert state["robustbench"]["name"] == "TestTinyWRN" and len(state["robustbench"]["sha256"]) == 64
    model, _ = model_from_checkpoint(ckpt)
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), model.net(x))  # the identity in front: RobustBench's convention


def test_imported_model_evaluates_with_the_trust_checks(imported):
    ckpt, _ = imported
    assert main(["eval", str(ckpt), "--attacks", "clean,pgd20", "--n", "8", "--checks-n", "4", "--batch-size", "8"]) == 0
    report = json.loads(eval_file(ckpt).read_text())
    assert report["config"]["model"] == "robustbench:TestTinyWRN" and report["n"] == 8 and report["checks"]


def test_imported_model_landscape_and_flatness(imported):
    ckpt, _ = imported
    assert main(["landscape", str(ckpt), "--n", "4", "--alphas", "-1:1:3", "--steps", "1"]) == 0
    assert main(["flatness", str(ckpt), "--n", "4", "--draws", "1", "--worst-steps", "1", "--steps", "1"]) == 0
    assert result_file(ckpt, "landscape").exists() and result_file(ckpt, "flatness").exists()


def test_imported_model_fine_tunes_with_awp_from_init_from(imported, tmp_path, capsys):
    ckpt, npz = imported
    rc = main(["train", "model=robustbench:TestTinyWRN", f"init_from={ckpt}", "data.name=npz", f"data.root={npz}",
               "model_args={dataset: cifar10}", "epochs=1", "batch_size=16", "data.eval_subset=4", "attack.steps=1",
               "eval.steps=1", "awp.gamma=0.01", f"out_dir={tmp_path}", "name=ft", "--quiet"])
    assert rc == 0, capsys.readouterr().err
    start, _ = model_from_checkpoint(ckpt)
    tuned, tuned_ckpt = model_from_checkpoint(tmp_path / "ft" / "last.pt")
    assert tuned_ckpt["config"]["awp"]["gamma"] == 0.01 and tuned_ckpt["config"]["model"] == "robustbench:TestTinyWRN"
    assert not all(torch.equal(a, b) for a, b in zip(tuned.state_dict().values(), start.state_dict().values()))


def test_flatness_across_robustbench_models_is_one_command(zoo, tmp_path, capsys):
    """tools/robustbench_flatness.py (Stutz et al.'s measurement): import, flatness on test and train, one table."""
    spec = importlib.util.spec_from_file_location("robustbench_flatness", Path(__file__).resolve().parents[1] / "tools" / "robustbench_flatness.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    names = ["TestTinyWRN", "TestTinyNormWRN", "robustbench:TestTinyWRN2"]
    for name in names:
        _write_cache(tmp_path / "models", zoo, name.removeprefix("robustbench:"))
    npz = tmp_path / "c10.npz"
    write_npz(npz, n_train=10, n_test=10, size=32, num_classes=10)
    out = tmp_path / "rb"
    assert tool.main([*names, "--data", f"npz:{npz}", "--dataset", "cifar10", "--model-dir", str(tmp_path / "models"), "--out", str(out),
                      "--n", "4", "--steps", "1", "--draws", "1", "--worst-steps", "1", "--device", "cpu"]) == 0
    result = json.loads((out / "flatness_table.json").read_text())
    assert [r["name"] for r in result["rows"]] == ["TestTinyWRN", "TestTinyNormWRN", "TestTinyWRN2"]
    for row in result["rows"]:  # every number is one of the flatness.json files beside it
        test = json.loads((out / row["name"] / "flatness.json").read_text())
        train = json.loads((out / row["name"] / "train" / "flatness.json").read_text())
        assert test["data"]["split"] == "test" and train["data"]["split"] == "train"
        assert row["average_flatness"] == test["average"]["average_flatness"] and row["worst_flatness"] == test["worst"]["worst_flatness"]
        assert row["robust_loss_gap"] == pytest.approx(test["average"]["robust_loss"] - train["average"]["robust_loss"])
    assert set(result["correlations"]) == {"average_flatness", "worst_flatness"}
    assert "| TestTinyNormWRN |" in (out / "flatness_table.md").read_text() and "Spearman" in capsys.readouterr().out


def test_model_dicts_entry_name_is_not_an_import_path():
    """robustbench:<Name> belongs to the robustbench source (a zoo entry by name), not to package.module:callable."""
    assert models.source_of("robustbench:Wu2020Adversarial").name == "robustbench"
    assert models.source_of("robustbench.model_zoo:x").name == "import"


def test_rebuilding_from_a_checkpoint_reads_no_pretrained_weights(monkeypatch):
    """model_args pretrained: true (a fine-tuning recipe) is what the run started from; a checkpoint brings its weights."""
    assert models.architecture_args("robustbench:X", {"pretrained": True, "weights": "w.pt", "dataset": "cifar10"}) == \
        {"pretrained": False, "dataset": "cifar10"}
    assert models.architecture_args("timm:resnet18", {"pretrained": True, "checkpoint_path": "w.pt"}) == {"pretrained": False}
    assert models.architecture_args("smallcnn", {"a": 1}) == {"a": 1}


def test_robustbench_file_as_init_from_says_how_to_use_it(zoo, tmp_path):
    from flatrobust.checkpoint import load_weights

    _write_cache(tmp_path, zoo, "TestTinyWRN", wrap=False)
    model = models.create("robustbench:TestTinyWRN", num_classes=10)
    with pytest.raises(CheckpointError, match="holds the weights of the network alone.*give it as model_args.weights"):
        load_weights(model, tmp_path / "cifar10" / "Linf" / "TestTinyWRN.pt")


@pytest.mark.parametrize("argv,message", [
    (["import", "wrn34_10", "--data", "cifar10"], "flatrobust import takes robustbench:<Name>"),
    (["import", "robustbench:TestTinyWRM", "--data", "cifar10"], "did you mean 'robustbench:TestTinyWRN'?"),
    (["import", "robustbench:TestTinyWRN", "--data", "cifar10", "--model-dir", "nowhere"], "no weights file at nowhere/cifar10/Linf/TestTinyWRN.pt"),
    (["import", "robustbench:TestTinyWRN", "--data", "npz:x.npz"], "does not exist"),
    (["import", "robustbench:TestTinyWRN", "--data", "cifar10", "--threat", "corruptions"], "threat model must be Linf or L2"),
    (["import", "robustbench:TestTinyWRN", "--data", "cifar100", "--threat", "L2"], "RobustBench has no cifar100 L2 models (it has cifar100 Linf, corruptions)"),
    (["import", "robustbench:TestTinyEnsemble", "--data", "cifar10"], "is an ensemble or composite of 2 networks"),
    (["import", "robustbench:TestTinyWRN", "--data", "cifar10", "--weights", "WRN2"], "it has 'block1.layer.0.convShortcut.weight', which the network has not"),
])
def test_import_errors_are_one_line_exit_2_nothing_written(zoo, tmp_path, monkeypatch, capsys, argv, message):
    monkeypatch.chdir(tmp_path)
    if "WRN2" in argv:  # the weights of another architecture (widen factor 2: its first block has a shortcut)
        _write_cache(tmp_path / "other", zoo, "TestTinyWRN2", wrap=False)
        argv = [str(tmp_path / "other" / "cifar10" / "Linf" / "TestTinyWRN2.pt") if a == "WRN2" else a for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err
    assert not (tmp_path / "runs").exists()


def test_train_reads_robustbench_weights_with_pretrained_true(zoo, tmp_path, capsys):
    """recipes/finetune_robustbench_awp.yaml's way: model_args pretrained: true reads the cache layout at build."""
    state = _write_cache(tmp_path / "models", zoo, "TestTinyWRN")
    write_npz(tmp_path / "c10.npz", n_train=16, n_test=8, size=32, num_classes=10)
    rc = main(["train", "model=robustbench:TestTinyWRN", f"model_args={{pretrained: true, model_dir: {tmp_path / 'models'}, dataset: cifar10}}",
               "data.name=npz", f"data.root={tmp_path / 'c10.npz'}", "epochs=1", "batch_size=16", "data.eval_subset=4", "attack.steps=1",
               "eval.steps=1", "awp.gamma=0.005", "optim.lr=1e-12", f"out_dir={tmp_path / 'runs'}", "name=ft", "--quiet"])
    assert rc == 0, capsys.readouterr().err
    (tmp_path / "models" / "cifar10" / "Linf" / "TestTinyWRN.pt").unlink()  # the checkpoint alone rebuilds it
    tuned, _ = model_from_checkpoint(tmp_path / "runs" / "ft" / "last.pt")
    weights = {k: v for k, v in tuned.net.state_dict().items() if "running" not in k and "num_batches" not in k}
    assert all(torch.allclose(v, state[k], atol=1e-6) for k, v in weights.items())  # lr 1e-12: the published weights, as read


def test_train_with_missing_robustbench_weights_is_one_line_before_any_file(zoo, tmp_path, capsys):
    write_npz(tmp_path / "c10.npz", size=32, num_classes=10)
    rc = main(["train", "model=robustbench:TestTinyWRN", "model_args={pretrained: true, model_dir: nowhere, dataset: cifar10}",
               "data.name=npz", f"data.root={tmp_path / 'c10.npz'}", f"out_dir={tmp_path / 'runs'}", "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and "no weights file at nowhere/cifar10/Linf/TestTinyWRN.pt" in err and err.count("\n") == 1, err
    assert not (tmp_path / "runs").exists()


# ------------------------------------------------------------------------------------ export

def _fake_full_eval(report: dict, ckpt: Path, dataset: str = "cifar10", test_size: int = 10000) -> dict:
    """A real eval.json (written by `flatrobust eval` on the .npz twin of the data) relabelled as the whole
    `dataset` test split: only the data's identity changes, every other field is what eval wrote."""
    out = json.loads(json.dumps(report))
    out["config"]["data"].update(name=dataset, n=None)
    out["n"] = test_size
    for a in out["attacks"].values():
        a["correct"] = round(a["accuracy"] * test_size)
    out["checkpoint"] = str(ckpt.resolve())
    return out


@pytest.fixture(scope="module")
def real_aa_eval(zoo, tmp_path_factory):
    """eval.json of `flatrobust eval --attacks clean,autoattack` with the trust checks, on 4 images."""
    tmp = tmp_path_factory.mktemp("aa")
    ckpt, _ = _imported(tmp, zoo)
    assert main(["eval", str(ckpt), "--attacks", "clean,autoattack", "--checks-n", "4", "--batch-size", "4", "--n", "4"]) == 0
    return json.loads(eval_file(ckpt).read_text())


def _cifar_checkpoint(tmp_path: Path, zoo, name: str = "TestTinyNormWRN") -> Path:
    """A checkpoint of zoo model `name` whose data is cifar10 (the data itself is not needed to export)."""
    _write_cache(tmp_path / "models", zoo, name)
    assert main(["import", f"robustbench:{name}", "--data", f"cifar10:{tmp_path / 'no_data'}", "--model-dir", str(tmp_path / "models"),
                 "--out", str(tmp_path / "run")]) == 0
    return tmp_path / "run" / "model.pt"


def _register_entry(zoo, code: str, monkeypatch, dataset: str = "cifar10") -> str:
    """Add the zoo entry that export wrote (Python source) to the installed zoo, as its author would."""
    scope: dict = {}
    exec(compile(code, "<entry>", "exec"), scope)
    name, entry = scope["ENTRY"]
    assert entry["gdrive_id"] is None  # the author fills it in when uploading
    monkeypatch.setitem(zoo[dataset], name, {**entry, "gdrive_id": "filled-in-by-the-author"})
    return name


def test_export_round_trip_loads_in_robustbench_load_model(zoo, rb, tmp_path, real_aa_eval, capsys, monkeypatch):
    import safetensors.torch

    ckpt = _cifar_checkpoint(tmp_path, zoo)
    (ckpt.parent / "eval.json").write_text(json.dumps(_fake_full_eval(real_aa_eval, ckpt)))
    capsys.readouterr()
    assert main(["export", str(ckpt), "--robustbench", str(tmp_path / "rb"), "--name", "Me2026Flat"]) == 0
    out = capsys.readouterr().out
    assert "checked: RobustBench's architecture loads the weights strictly" in out
    entry = (tmp_path / "rb" / "model_zoo" / "cifar10" / "Linf" / "Me2026Flat.py").read_text()
    name = _register_entry(zoo, entry, monkeypatch)
    theirs = rb.load_model(name, model_dir=tmp_path / "rb", dataset="cifar10", threat_model="Linf")
    ours, _ = model_from_checkpoint(ckpt)
    x = torch.rand(4, 3, 32, 32)
    with torch.no_grad():
        assert (ours(x) - theirs(x)).abs().max() <= 1e-5
    pt = torch.load(tmp_path / "rb" / "cifar10" / "Linf" / "Me2026Flat.pt", weights_only=True)
    st = safetensors.torch.load_file(tmp_path / "rb" / "cifar10" / "Linf" / "Me2026Flat.safetensors")
    assert pt.keys() == st.keys() and all(torch.equal(pt[k], st[k]) for k in pt)
    info = json.loads((tmp_path / "rb" / "model_info" / "cifar10" / "Linf" / "Me2026Flat.json").read_text())
    fields = [f.name for f in dataclasses.fields(rb.utils.ModelInfo)]
    assert list(info)[:len(fields)] == fields  # robustbench's ModelInfo, in its order
    report = json.loads((ckpt.parent / "eval.json").read_text())
    assert info["autoattack_acc"] == str(round(100 * report["attacks"]["autoattack"]["correct"] / 10000, 2))
    assert info["clean_acc"] == str(round(100 * report["attacks"]["clean"]["correct"] / 10000, 2))
    assert info["eps"] == "8/255" and info["dataset"] == "cifar10" and info["number_forward_passes"] == 1
    assert info["flatrobust"]["n_examples"] == 10000 and info["link"] is None


@pytest.mark.parametrize("arch", ["wrn", "preact"])
def test_flatrobust_architectures_load_into_the_zoos_strictly(rb, zoo, arch, monkeypatch, tmp_path):
    from flatrobust.models.preactresnet import PreActResNet18
    from flatrobust.models.wideresnet import WideResNet
    from flatrobust.robustbench_export import check_form, zoo_form

    torch.manual_seed(0)
    net = WideResNet(depth=10, widen_factor=2, num_classes=10) if arch == "wrn" else PreActResNet18(num_classes=10)
    net.load_state_dict(_random_weights(net))
    for mean, std in (((0.4914, 0.4822, 0.4465), (0.2471, 0.2435, 0.2616)), ((0.0,) * 3, (1.0,) * 3)):
        model = models.NormalizedModel(models.Normalize(mean, std), net).eval()
        form = zoo_form(model, {"model": "wrn28_10" if arch == "wrn" else "preactresnet18"}, "Me2026Arch", "cifar10", "Linf", 10)
        assert ("mu" in form.state_dict) == (mean[0] != 0)  # normalization as the zoo places it, only when there is one
        assert check_form(form, model, (3, 32, 32)) <= 1e-5
        name = _register_entry(zoo, form.entry_code, monkeypatch)
        assert form.architecture == ("WideResNet-10-2" if arch == "wrn" else "PreActResNet-18")
        path = tmp_path / f"{mean[0]}" / "cifar10" / "Linf" / f"{name}.pt"
        path.parent.mkdir(parents=True)
        torch.save(form.state_dict, path)  # what export writes there
        theirs = rb.load_model(name, model_dir=path.parents[2], dataset="cifar10", threat_model="Linf")  # loads strictly
        x = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(2))
        with torch.no_grad():
            assert (model(x) - theirs(x)).abs().max() <= 1e-5


def test_export_state_dict_loads_into_models_create(zoo, tmp_path):
    import safetensors.torch

    ckpt = _cifar_checkpoint(tmp_path, zoo, "TestTinyWRN")
    assert main(["export", str(ckpt), "--format", "state_dict", "--out", str(tmp_path / "w.pt")]) == 0
    model = models.create("robustbench:TestTinyWRN", num_classes=10, dataset="cifar10")
    model.load_state_dict(torch.load(tmp_path / "w.pt", weights_only=True), strict=True)
    ours, _ = model_from_checkpoint(ckpt)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), ours.state_dict().values()))
    st = safetensors.torch.load_file(tmp_path / "w.safetensors")
    assert all(torch.equal(st[k], v) for k, v in model.state_dict().items())


def _break(report: dict, what: str) -> dict:
    r = json.loads(json.dumps(report))
    if what == "no_aa":
        del r["attacks"]["autoattack"]
    elif what == "subset":
        r["config"]["data"]["n"], r["n"] = 1000, 1000
    elif what == "checks_failed":
        r["checks"][0]["passed"] = False
    elif what == "no_checks":
        r["config"]["checks"], r["checks"] = False, None
    elif what == "eps":
        r["config"]["eps"] = 4 / 255
    elif what == "other_checkpoint":
        r["checkpoint"] = "/somewhere/last.pt"
    return r


@pytest.mark.parametrize("what,message", [
    ("no_aa", "has no AutoAttack result"),
    ("subset", "evaluated 1000 examples of 'cifar10' test, not the whole cifar10 test split (10000)"),
    ("checks_failed", "failed the trust check(s)"),
    ("no_checks", "ran without the trust checks"),
    ("eps", "is at linf eps 4/255, not linf 8/255"),
    ("other_checkpoint", "evaluates last.pt"),
    ("missing", ".json does not exist"),
])
def test_export_without_a_full_trusted_autoattack_is_refused(zoo, tmp_path, real_aa_eval, capsys, what, message):
    ckpt = _cifar_checkpoint(tmp_path, zoo)
    if what != "missing":
        (ckpt.parent / "eval.json").write_text(json.dumps(_break(_fake_full_eval(real_aa_eval, ckpt), what)))
    capsys.readouterr()
    assert main(["export", str(ckpt), "--robustbench", str(tmp_path / "rb"), "--name", "Me2026Flat"]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err
    assert "flatrobust eval" in err and "--attacks clean,autoattack" in err  # what to run
    assert not (tmp_path / "rb").exists()


def test_real_eval_json_of_a_subset_is_refused(zoo, tmp_path, real_aa_eval, capsys):
    ckpt = _cifar_checkpoint(tmp_path, zoo)
    report = dict(real_aa_eval, checkpoint=str(ckpt.resolve()))
    (ckpt.parent / "eval.json").write_text(json.dumps(report))
    assert main(["export", str(ckpt), "--robustbench", str(tmp_path / "rb"), "--name", "Me2026Flat"]) == 2
    assert "evaluated 4 examples of 'npz' test, not the whole cifar10 test split (10000)" in capsys.readouterr().err


@pytest.mark.parametrize("argv,message", [
    (["--name", "1bad name"], "a RobustBench name starts with a letter"),
    (["--name", "Wu2020Adversarial"], "--name 'Wu2020Adversarial' is taken"),
    (["--out", "x.pt"], "--out goes with --format state_dict"),
])
def test_export_bad_arguments_are_one_line(zoo, tmp_path, real_aa_eval, capsys, argv, message):
    ckpt = _cifar_checkpoint(tmp_path, zoo)
    (ckpt.parent / "eval.json").write_text(json.dumps(_fake_full_eval(real_aa_eval, ckpt)))
    capsys.readouterr()
    assert main(["export", str(ckpt), "--robustbench", str(tmp_path / "rb"), *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err
    assert not (tmp_path / "rb").exists()


def test_export_of_a_run_robustbench_has_no_leaderboard_or_architecture_for(tmp_path, capsys):
    from conftest import write_untrained_checkpoint
    from flatrobust.checkpoint import save_checkpoint
    from flatrobust.data import DATASETS

    ckpt = write_untrained_checkpoint(tmp_path)
    assert main(["export", str(ckpt), "--robustbench", str(tmp_path / "rb")]) == 2
    assert "RobustBench has no leaderboard for 'digits' Linf" in capsys.readouterr().err
    info = DATASETS["cifar10"]
    model = models.create("smallcnn", 10, 3, info.mean, info.std)
    cfg = {"name": "cnn", "model": "smallcnn", "data": {"name": "cifar10"}, "attack": {"norm": "linf", "eps": 8 / 255}}
    save_checkpoint({"config": cfg, "model": model.state_dict(), "data_info": info.to_dict()}, tmp_path / "cnn.pt")
    assert main(["export", str(tmp_path / "cnn.pt"), "--robustbench", str(tmp_path / "rb")]) == 2
    err = capsys.readouterr().err
    assert "model 'smallcnn' has no architecture in RobustBench's zoo" in err and "--format state_dict" in err
    assert not (tmp_path / "rb").exists()
