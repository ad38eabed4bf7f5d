"""`robustbench:<Name>`: a network of RobustBench's model zoo (Croce et al., NeurIPS 2021 Datasets and
Benchmarks), its weights read from a local file, never downloaded.

    models.create("robustbench:Wu2020Adversarial", num_classes=10, dataset="cifar10", threat_model="Linf",
                  pretrained=True)   # reads ./models/cifar10/Linf/Wu2020Adversarial.pt

The architecture is the zoo's entry for (dataset, threat model, name), built by the installed robustbench
package (the optional extra `[robustbench]`): a fixed constructor chosen by name among the zoo's entries,
not code a config or checkpoint supplies. Its model_args:

    dataset        cifar10 | cifar100 | imagenet; in a run config, data.name (cifar10, cifar100) unless given
    threat_model   Linf | L2 | corruptions; in a run config, attack.norm (linf -> Linf, l2 -> L2) unless given
    pretrained     false (default: the architecture, initialised as the zoo initialises it) | true: load
                   `weights`, else RobustBench's own cache layout <model_dir>/<dataset>/<threat_model>/<Name>.pt
    model_dir      default "models" (RobustBench's default ./models, relative to the working directory)
    weights        an explicit weights file (implies pretrained)

Weights are read with `torch.load(weights_only=True)` (robustbench's `load_model` unpickles the file; a
pickled object here is refused, never run), unwrapped and re-keyed as `load_model` does (a 'state_dict'
entry; the 'last' entry of Kireev2021Effectiveness* and Andriushchenko2020Understanding; the 'module.'
and then 'model.' prefix removed; for ImageNet the 'model.' prefix of its normalization wrapper added),
then loaded strictly: every key of the file must be a key of the network with the same shape, and every
key of the network must be in the file, except the normalization constants (mu, sigma, mean, std,
normalize.mean, normalize.std) that the zoo's constructor fixes and some published files leave out (the
files `load_model` loads non-strictly for that reason). A missing file is one line saying where to put it.

RobustBench networks take images in [0, 1] and normalize inside (or not at all), so `models.create` puts
the identity in front of them (`Source.normalizes_inside`): never twice. Refused, with the reason:
ensembles and composite models (several networks, several weights files: RobustBench counts more than
one forward pass), and the entries whose weights robustbench does not keep in its file layout (served
through timm's hub or torchvision's download).
"""
from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from .robustbench_compat import RobustBenchMissing, import_robustbench

PREFIX = "robustbench:"
DATASETS = {"cifar10": 10, "cifar100": 100, "imagenet": 1000}  # RobustBench's datasets and their classes
NORM_THREATS = {"linf": "Linf", "l2": "L2"}  # flatrobust's attack.norm -> RobustBench's threat model
# Normalization constants a zoo constructor fixes, which some published files lack (load_model's fallback).
NORMALIZATION_KEYS = ("mu", "sigma", "mean", "std", "normalize.mean", "normalize.std")
# ImageNet models whose file already holds the normalization wrapper's keys (load_model adds no 'model.').
_IMAGENET_OWN_NORMALIZATION = {
    "Singh2023Revisiting_ConvNeXt-T-ConvStem", "Singh2023Revisiting_ViT-B-ConvStem", "Singh2023Revisiting_ConvNeXt-S-ConvStem",
    "Singh2023Revisiting_ConvNeXt-B-ConvStem", "Singh2023Revisiting_ConvNeXt-L-ConvStem", "Peng2023Robust",
    "Chen2024Data_WRN_50_2", "Xu2024MIMIR_Swin-B", "Xu2024MIMIR_Swin-L",
}
_COMPOSITE_MODULES = ("robustbench.model_zoo.architectures.comp_model", "robustbench.model_zoo.architectures.mixing_net")
_NAME = re.compile(r"robustbench:[A-Za-z0-9][\w.\-]*")


class ZooError(ValueError):
    """A RobustBench model that cannot be had: one line naming it and saying why (models.ModelError wraps it)."""


def check(name: str) -> None:
    """Syntax only (imports nothing): robustbench:<Name>."""
    if not _NAME.fullmatch(name):
        raise ZooError(f"model {name!r}: write robustbench:<Name> with a name of RobustBench's model zoo, e.g. robustbench:Wu2020Adversarial")


def defaults(data_name: str, norm: str) -> dict[str, Any]:
    """model_args a run config fills in when it does not give them: the dataset and threat model of the run."""
    out: dict[str, Any] = {"threat_model": NORM_THREATS[norm]} if norm in NORM_THREATS else {}
    if data_name in DATASETS:
        out["dataset"] = data_name
    return out


def architecture_args(model_args: Mapping[str, Any]) -> dict[str, Any]:
    """model_args that build the architecture alone, reading no weights file (a checkpoint brings its weights)."""
    return {**{k: v for k, v in model_args.items() if k != "weights"}, "pretrained": False}


def _threat(threat_model: str) -> str:
    by_lower = {t.lower(): t for t in ("Linf", "L2", "corruptions")}
    if str(threat_model).lower() not in by_lower:
        raise ZooError(f"threat_model must be one of Linf, L2, corruptions (RobustBench's), got {threat_model!r}")
    return by_lower[str(threat_model).lower()]


def zoo(dataset: str, threat_model: str) -> Mapping[str, dict]:
    """RobustBench's entries {name: {'model': constructor, 'gdrive_id': ...}} for (dataset, threat model)."""
    rb = import_robustbench()
    from robustbench.model_zoo.enums import BenchmarkDataset, ThreatModel

    if dataset not in DATASETS:
        raise ZooError(f"dataset must be one of {', '.join(DATASETS)} (RobustBench's), got {dataset!r}")
    threat = _threat(threat_model)
    by_threat = rb.model_zoo.model_dicts[BenchmarkDataset(dataset)]
    if ThreatModel(threat) not in by_threat:
        has = ", ".join(t.value for t in by_threat)
        raise ZooError(f"RobustBench has no {dataset} {threat} models (it has {dataset} {has}): set model_args.threat_model "
                       "(or attack.norm) to one of those")
    return by_threat[ThreatModel(threat)]


def _where_else(name: str) -> list[str]:
    """'cifar10 Linf', ... : the (dataset, threat model) pairs whose zoo has `name`."""
    rb = import_robustbench()
    return [f"{d.value} {t.value}" for d, by_threat in rb.model_zoo.model_dicts.items() for t, models in by_threat.items()
            if name in models]


def entry(name: str, dataset: str, threat_model: str) -> dict:
    """The zoo entry of `name` (without the robustbench: prefix); ZooError (one line) when it is missing or refused."""
    models = zoo(dataset, threat_model)
    threat = _threat(threat_model)
    label = f"robustbench:{name}"
    if name not in models:
        elsewhere = _where_else(name)
        if elsewhere:
            raise ZooError(f"RobustBench has no {label!r} for {dataset} {threat}, only for {', '.join(elsewhere)}: set "
                           "model_args.dataset and model_args.threat_model (or data.name and attack.norm) to one of those")
        close = difflib.get_close_matches(name, list(models), n=1, cutoff=0.5)
        hint = f" (did you mean 'robustbench:{close[0]}'?)" if close else ""
        raise ZooError(f"RobustBench has no model {label!r} for {dataset} {threat}{hint}: the names are those of its "
                       "leaderboard, see robustbench.model_zoo.model_dicts")
    item = models[name]
    gid = item.get("gdrive_id")
    if isinstance(gid, (list, tuple)):
        raise ZooError(f"{label} is an ensemble or composite of {len(gid)} networks with a weights file each (RobustBench "
                       "counts more than one forward pass): flatrobust takes single networks only")
    import timm  # a dependency of robustbench: its load_model tries timm's registry first, under this name

    timm_name = f"{name.lower().replace('-', '_')}_{dataset}_{threat.lower()}"
    if gid is None or timm.is_model(timm_name):
        raise ZooError(f"{label}: robustbench serves these weights through timm's hub ({timm_name}), not as a file in its "
                       "layout, so flatrobust cannot read them: not supported")
    if dataset == "imagenet" and "Standard" in name:
        raise ZooError(f"{label}: robustbench builds it from torchvision's downloaded weights, not a file in its layout: "
                       "use torchvision's resnet50 as your own model (package.module:callable) instead")
    return item


def build(name: str, dataset: str, threat_model: str) -> nn.Module:
    """The zoo's network for `name` (no weights read); ZooError if it cannot be built or is refused."""
    item = entry(name, dataset, threat_model)
    try:
        net = item["model"]()
    except Exception as e:  # noqa: BLE001 - robustbench's constructors may raise anything: one line
        detail = (str(e).strip().splitlines() or [""])[0][:160]
        raise ZooError(f"robustbench:{name} could not be built by robustbench ({type(e).__name__}: {detail})") from None
    if type(net).__module__.startswith(_COMPOSITE_MODULES):
        raise ZooError(f"robustbench:{name} is a composite of several networks (RobustBench counts more than one forward "
                       "pass): flatrobust takes single networks only")
    return net


def weights_path(name: str, dataset: str, threat_model: str, model_dir: str | Path = "models") -> Path:
    """RobustBench's cache layout: <model_dir>/<dataset>/<threat model>/<Name>.pt."""
    return Path(model_dir) / dataset / _threat(threat_model) / f"{name}.pt"


def _read(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - every failure is one line
        found = re.search(r"GLOBAL ([\w.]+)", str(e))
        if found:  # the weights_only unpickler met a reference to Python code: refused, never executed
            raise ZooError(f"{path} holds a pickled Python object ({found.group(1)}) and was refused for safety (read with "
                           "weights_only=True): use a file that holds tensors only (a state_dict)") from None
        raise ZooError(f"{path} cannot be read as a weights file ({type(e).__name__}): is it truncated, or an HTML page "
                       "saved by a failed download? Download it again") from None


def state_dict_of(raw: Any, name: str, dataset: str, path: Path) -> dict[str, torch.Tensor]:
    """The file's tensors keyed as the zoo's network expects them, as robustbench's load_model re-keys them."""
    if isinstance(raw, dict) and ("Kireev2021Effectiveness" in name or name == "Andriushchenko2020Understanding") and "last" in raw:
        raw = raw["last"]  # load_model takes the last (not the best) of the two stored models
    if isinstance(raw, dict) and isinstance(raw.get("state_dict"), dict):
        raw = raw["state_dict"]
    if not isinstance(raw, dict) or not raw or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in raw.items()):
        raise ZooError(f"{path} holds no state_dict of tensors (a dict of names to tensors, optionally under 'state_dict'): "
                       "it is not a RobustBench weights file")
    out = {k.removeprefix("module.").removeprefix("model."): v for k, v in raw.items()}
    if dataset == "imagenet" and name not in _IMAGENET_OWN_NORMALIZATION:
        out = {f"model.{k}": v for k, v in out.items()}  # the zoo wraps ImageNet networks as (normalize, model)
    return out


def load_into(net: nn.Module, state: Mapping[str, torch.Tensor], where: str) -> None:
    """Load `state` into `net` strictly (keys and shapes), except the fixed normalization constants; ZooError
    naming the first key that does not fit."""
    own = net.state_dict()
    buffers = {k for k, _ in net.named_buffers()}
    missing = [k for k in own if k not in state and not (k in NORMALIZATION_KEYS and k in buffers)]
    unexpected = [k for k in state if k not in own]
    if missing:
        raise ZooError(f"{where} does not fit the architecture: it lacks {missing[0]!r}"
                       f"{f' (and {len(missing) - 1} more keys)' if len(missing) > 1 else ''}: is it the weights file of this model?")
    if unexpected:
        raise ZooError(f"{where} does not fit the architecture: it has {unexpected[0]!r}, which the network has not"
                       f"{f' (and {len(unexpected) - 1} more keys)' if len(unexpected) > 1 else ''}: is it the weights file of this model?")
    for k, v in state.items():
        if v.shape != own[k].shape:
            raise ZooError(f"{where} does not fit the architecture: {k!r} has shape {tuple(v.shape)}, the network expects "
                           f"{tuple(own[k].shape)}: is it the weights file of this model (and dataset)?")
    net.load_state_dict(state, strict=False)  # every key was checked above; the missing ones are the constants


def load_weights(net: nn.Module, name: str, dataset: str, path: str | Path) -> None:
    """Read RobustBench weights file `path` for zoo model `name` (weights_only) and load it into `net` strictly."""
    path = Path(path)
    load_into(net, state_dict_of(_read(path), name, dataset, path), str(path))


def _missing_file(label: str, path: Path, explicit: bool, dataset: str, threat: str) -> ZooError:
    if explicit:
        return ZooError(f"{label}: the weights file {path} does not exist: pass the path of the model's .pt file")
    name = label.removeprefix(PREFIX)
    return ZooError(f"{label}: no weights file at {path}: flatrobust never downloads; where there is a network, "
                    f"robustbench.load_model({name!r}, dataset={dataset!r}, threat_model={threat!r}) saves it as "
                    f"models/{dataset}/{threat}/{name}.pt: copy it to {path} (or set model_args.model_dir, or model_args.weights=FILE)")


def resolve(name: str):
    """builder(num_classes, in_channels, dataset=, threat_model=, pretrained=, model_dir=, weights=) for `name`."""
    check(name)
    zoo_name = name[len(PREFIX):]
    try:
        import_robustbench()
    except RobustBenchMissing as e:
        raise ZooError(f"model {name!r}: {e}") from None

    def builder(num_classes: int, in_channels: int, dataset: str | None = None, threat_model: str = "Linf",
                pretrained: bool = False, model_dir: str = "models", weights: str | None = None) -> nn.Module:
        if dataset is None:  # RobustBench's datasets differ in their number of classes
            by_classes = {n: d for d, n in DATASETS.items()}
            if num_classes not in by_classes:
                raise ZooError(f"model {name!r}: RobustBench has models for {', '.join(DATASETS)} (10, 100, 1000 classes), "
                               f"not for {num_classes} classes: set model_args.dataset")
            dataset = by_classes[num_classes]
        if dataset in DATASETS and DATASETS[dataset] != num_classes:
            raise ZooError(f"model {name!r}: RobustBench's {dataset} models have {DATASETS[dataset]} classes, the data has "
                           f"{num_classes}: train or evaluate them on {dataset}")
        if in_channels != 3:
            raise ZooError(f"model {name!r}: RobustBench models take RGB images (3 channels), the data has {in_channels}")
        threat = _threat(threat_model)
        net = build(zoo_name, dataset, threat)
        if pretrained or weights:
            path = Path(weights) if weights else weights_path(zoo_name, dataset, threat, model_dir)
            if not path.is_file():
                raise _missing_file(name, path, bool(weights), dataset, threat)
            load_weights(net, zoo_name, dataset, path)
        return net

    return builder
