"""Where a model name comes from: the built-in registry, timm, RobustBench's zoo, or a callable of the user's.

One mechanism for the four: a `Source` says which names it takes, checks a name's syntax without
importing anything (config validation), and resolves a name to a builder
`builder(num_classes, in_channels, **model_args) -> nn.Module` (the network without normalization).
`SOURCES` is the ordered tuple the tests enumerate; the first source whose `matches` is true owns a name.

    smallcnn, preactresnet18, ...   REGISTRY below (built in)
    timm:<name>                     timm.create_model(name, num_classes=, in_chans=, pretrained=False) unless
                                    model_args has pretrained: true (timm is the optional extra `[timm]`)
    robustbench:<Name>              the network of RobustBench's model zoo (`robustbench_zoo`; the optional extra
                                    `[robustbench]`), its weights from a local file with pretrained: true
    package.module:callable         callable(num_classes=, in_channels=, **model_args); the module is imported
                                    with `search_path` (the recipe's folder) in front of the Python path

A source may also fill model_args from the run (`defaults`: RobustBench's dataset and threat model), say
which model_args rebuild the architecture without fetching weights (`architecture_args`: a checkpoint
brings its own), and that its networks normalize their input themselves (`normalizes_inside`).

Every failure is a `ModelError` (a ValueError) with one line that names the model and says how to fix it.
"""
from __future__ import annotations

import difflib
import importlib
import logging
import re
import sys
from dataclasses import dataclass
from typing import Callable, Sequence

from torch import nn

from . import robustbench_zoo
from .preactresnet import PreActResNet18
from .smallcnn import SmallCNN
from .vgg import VGG19
from .wideresnet import WideResNet

Builder = Callable[..., nn.Module]


class ModelError(ValueError):
    """A model that cannot be had: one line naming it and saying how to fix it."""


# name -> builder(num_classes, in_channels, **model_args) returning the un-normalized network. A plain
# dict that the tests enumerate; add a model by adding an entry.
REGISTRY: dict[str, Builder] = {
    "preactresnet18": lambda num_classes, in_channels, **kw: PreActResNet18(num_classes, in_channels, **kw),
    "wrn34_10": lambda num_classes, in_channels: WideResNet(34, 10, num_classes, in_channels),
    "wrn28_10": lambda num_classes, in_channels: WideResNet(28, 10, num_classes, in_channels),
    "vgg19": lambda num_classes, in_channels: VGG19(num_classes, in_channels),
    "smallcnn": lambda num_classes, in_channels: SmallCNN(num_classes, in_channels),
}

_CHOICES = "timm:<name> for a timm model, robustbench:<Name> for RobustBench's, or package.module:callable for your own"
_IMPORT_PATH = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*")


@dataclass(frozen=True)
class Source:
    name: str
    syntax: str  # how a model of this source is written
    matches: Callable[[str], bool]
    check: Callable[[str], None]  # syntax only, imports nothing; ValueError
    resolve: Callable[[str, Sequence[str]], Builder]  # (model name, search path) -> builder; ValueError
    # Whether resolving a name imports code that the name chooses. A built-in name picks an entry of REGISTRY,
    # timm:<name> one of timm's own architectures (timm.is_model is checked first) and robustbench:<Name> an entry
    # of the installed robustbench's zoo (looked up by name in its model_dicts); package.module:callable imports
    # whatever module it names: a name read from a checkpoint (data) must not do that unasked.
    imports_code: bool = False
    defaults: Callable[[str, str], dict] = lambda data_name, norm: {}  # model_args a run fills in (data.name, attack.norm)
    architecture_args: Callable[[dict], dict] = dict  # model_args that build the architecture without reading weights
    normalizes_inside: bool = False  # the network normalizes its input itself: models.create adds the identity


# ------------------------------------------------------------------------------------------- built in

def _check_builtin(name: str) -> None:
    if name not in REGISTRY:
        close = difflib.get_close_matches(name, list(REGISTRY), n=1, cutoff=0.4)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ModelError(f"unknown model {name!r}{hint}: choose one of {', '.join(sorted(REGISTRY))}, or {_CHOICES}")


def _resolve_builtin(name: str, search_path: Sequence[str]) -> Builder:
    _check_builtin(name)
    return REGISTRY[name]


# ------------------------------------------------------------------------------------------------ timm

def _check_timm(name: str) -> None:
    if not re.fullmatch(r"timm:[\w.\-]+", name):
        raise ModelError(f"model {name!r}: write timm:<name>, e.g. timm:resnet18 (see timm.list_models())")


def _resolve_timm(name: str, search_path: Sequence[str]) -> Builder:
    _check_timm(name)
    arch = name.split(":", 1)[1]
    try:
        import timm
    except ImportError:
        raise ModelError(f"model {name!r} needs timm, which is not installed: pip install 'flatrobust[timm]' (or pip install timm)") from None
    if not timm.is_model(arch):
        close = difflib.get_close_matches(arch, timm.list_models(), n=1, cutoff=0.6)
        hint = f" (did you mean 'timm:{close[0]}'?)" if close else ""
        raise ModelError(f"timm has no model {arch!r}{hint}: see timm.list_models() for the names")

    def build(num_classes: int, in_channels: int, pretrained: bool = False, **kw) -> nn.Module:
        if not pretrained:
            return timm.create_model(arch, pretrained=False, num_classes=num_classes, in_chans=in_channels, **kw)
        hub = logging.getLogger("huggingface_hub")
        level = hub.level
        hub.setLevel(logging.ERROR)  # its retry messages would add a line per attempt
        try:
            return timm.create_model(arch, pretrained=True, num_classes=num_classes, in_chans=in_channels, **kw)
        except (OSError, RuntimeError, ValueError) as e:  # connection, hub and missing-file errors
            first = re.split(r"(?<=\.)\s", (str(e).strip().splitlines() or [""])[0])[0][:160]  # its first sentence
            raise ModelError(f"model {name!r}: the pretrained weights could not be downloaded ({type(e).__name__}: {first}): "
                             "connect to the internet or fill timm's cache once, or set model_args.pretrained=false") from None
        finally:
            hub.setLevel(level)

    return build


def _timm_architecture(model_args: dict) -> dict:
    """timm's architecture without its pretrained weights (nor a checkpoint_path to read them from)."""
    return {k: v for k, v in model_args.items() if k != "checkpoint_path"} | {"pretrained": False}


# ------------------------------------------------------------------------------------------- RobustBench

def _check_robustbench(name: str) -> None:
    try:
        robustbench_zoo.check(name)
    except robustbench_zoo.ZooError as e:
        raise ModelError(str(e)) from None


def _resolve_robustbench(name: str, search_path: Sequence[str]) -> Builder:
    try:
        zoo_builder = robustbench_zoo.resolve(name)
    except robustbench_zoo.ZooError as e:
        raise ModelError(str(e)) from None

    def build(num_classes: int, in_channels: int, **kw) -> nn.Module:
        try:
            return zoo_builder(num_classes, in_channels, **kw)
        except robustbench_zoo.ZooError as e:
            raise ModelError(str(e)) from None

    return build


# ------------------------------------------------------------------------------------- package.module:callable

def _check_import(name: str) -> None:
    if not _IMPORT_PATH.fullmatch(name):
        raise ModelError(f"model {name!r}: write package.module:callable (e.g. mynets:build_net), with the module "
                         "on the Python path or in the recipe's folder")


def _resolve_import(name: str, search_path: Sequence[str]) -> Builder:
    _check_import(name)
    module_name, attr = name.split(":")
    folders = [str(p) for p in search_path if p]
    saved = list(sys.path)
    sys.path[:0] = folders  # only while importing: the recipe's folder first, as for a script
    importlib.invalidate_caches()  # a module written after the folder was last listed
    try:
        module = importlib.import_module(module_name)
    except Exception as e:  # noqa: BLE001 - any error in the user's module is one line
        searched = f" (searched {', '.join(folders)} first)" if folders else ""
        detail = (str(e).strip().splitlines() or [""])[0][:160]
        raise ModelError(f"model {name!r}: cannot import {module_name!r} ({type(e).__name__}: {detail}){searched}: put the "
                         "module in the recipe's folder or on the Python path (PYTHONPATH), and fix any error in it") from None
    finally:
        sys.path[:] = saved
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ModelError(f"model {name!r}: {module_name} ({getattr(module, '__file__', '?')}) has no {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ModelError(f"model {name!r}: {attr} is not callable ({type(obj).__name__}): name a class or function "
                         "that takes num_classes and in_channels")

    def build(num_classes: int, in_channels: int, **kw) -> nn.Module:
        return obj(num_classes=num_classes, in_channels=in_channels, **kw)

    return build


SOURCES: tuple[Source, ...] = (
    Source("timm", "timm:<name>", lambda n: n.startswith("timm:"), _check_timm, _resolve_timm,
           architecture_args=_timm_architecture),
    Source("robustbench", "robustbench:<Name>", lambda n: n.startswith(robustbench_zoo.PREFIX), _check_robustbench,
           _resolve_robustbench, defaults=robustbench_zoo.defaults, architecture_args=robustbench_zoo.architecture_args,
           normalizes_inside=True),
    Source("import", "package.module:callable", lambda n: ":" in n, _check_import, _resolve_import, imports_code=True),
    Source("builtin", " | ".join(sorted(REGISTRY)), lambda n: True, _check_builtin, _resolve_builtin),
)


def source_of(name: str) -> Source:
    """The source that owns model name `name`."""
    return next(s for s in SOURCES if s.matches(name))


def imports_code(name: str) -> bool:
    """Whether building model `name` imports a module that the name chooses (`package.module:callable`)."""
    return source_of(name).imports_code


def check_name(name: str) -> None:
    """ValueError (one line) unless `name` is a well-formed model name; imports nothing."""
    source_of(name).check(name)


def resolve(name: str, search_path: Sequence[str] = ()) -> Builder:
    """builder(num_classes, in_channels, **model_args) for model `name`; ValueError (one line) if it cannot be had."""
    return source_of(name).resolve(name, search_path)


def run_args(name: str, model_args: dict, data_name: str, norm: str) -> dict:
    """`model_args` completed with what the source of `name` takes from the run (data.name, attack.norm):
    for robustbench:<Name> its dataset and threat model; model_args given explicitly win."""
    return {**source_of(name).defaults(data_name, norm), **model_args}


def architecture_args(name: str, model_args: dict) -> dict:
    """`model_args` that rebuild `name`'s architecture without reading or downloading pretrained weights
    (pretrained: false), for a checkpoint that brings its own."""
    return source_of(name).architecture_args(dict(model_args))
