"""Run configuration: typed dataclasses, YAML recipes, `key.sub=value` overrides, validation.

A recipe is a YAML file with the fields below (any subset: the rest take their defaults). Numbers that
are fractions of 255 may be written as strings, e.g. `eps: 8/255`. Every problem raises `UserError`
with one line that names the key and says how to fix it (unknown keys get the closest valid key).
"""
from __future__ import annotations

import dataclasses
import json
import difflib
import math
import re
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .attacks import AttackConfig
from .attacks.spec import INITS, KINDS
from .catastrophic import MODES as CATASTROPHIC_MODES
from .errors import UserError
from .objectives import FREE_MART
from .rundir import CONFIG, LAST, read_config


@dataclass
class DataConfig:
    name: str = "digits"  # cifar10 | cifar100 | svhn | fashion_mnist | digits | imagefolder | npz (flatrobust.data.REGISTRY)
    root: str = "./data"  # built-in sets: the torchvision root; imagefolder: DIR with train/<class>/*, test/<class>/* (or val/); npz: FILE.npz; `train` stores it resolved (absolute)
    image_size: int = 0  # imagefolder: resize every image to image_size x image_size (0: keep; all must agree)
    channels: int = 0  # imagefolder: 0 = as the images are (1 if all greyscale, else 3) | 1 (greyscale) | 3 (RGB)
    mean: list = field(default_factory=list)  # per-channel normalization, e.g. [0.5, 0.5, 0.5]; empty: the built-in set's, or computed from the training split
    std: list = field(default_factory=list)  # per-channel std, given together with mean
    download: bool = False  # built-in sets: fetch torchvision's files into root when missing (md5-checked)
    augment: str = "default"  # default (the dataset's usual: crop_flip for CIFAR) | crop_flip | none
    eval_subset: int = 1000  # fixed test subset AND train subset of this size, evaluated every epoch
    train_subset: int = 0  # > 0: train on a fixed subset of this many examples (quick experiments)
    val_subset: int = 0  # > 0: hold this many training images out as a validation split (fixed by the seed, indices in
    # data.json); best.pt is chosen on their PGD accuracy. With train_subset, they come from the images it leaves out
    mixup_alpha: float = 0.0  # > 0: mixup (Zhang et al. 2018) as the official --mixup --mixup-alpha: lam ~ Beta(a, a) per
    # batch, inputs mixed before the attack, attack and loss on the mixed labels; AT only; AWP's ascent takes the mixed loss
    cutout: int = 0  # > 0: Cutout (DeVries and Taylor 2017) of this side after crop and flip (official --cutout-len); 0 = off
    extra: str = ""  # RST: .npz of extra images with pseudo-labels (x, y), e.g. from `flatrobust pseudolabel`
    extra_fraction: float = 0.5  # RST: share of every batch drawn from `extra` (Carmon et al.: half)
    on_device: str = "auto"  # auto (on the GPU if it fits in half its free memory) | on | off (pinned host memory)


@dataclass
class EvalSpec:
    steps: int = 20  # PGD-20 on the fixed subsets every epoch
    alpha: float = 0.0  # 0 = the training attack's step size
    batch_size: int = 256  # examples per batch of the per-epoch monitoring attack


@dataclass
class AWPConfig:
    gamma: float = 0.0  # ||v_l|| = gamma ||w_l||; 0 = the plain method (paper: 0.01 AT, 0.005 TRADES)
    warmup: int = 0  # AWP is active from this epoch on (Free AT: epochs of standard training; 0-based; paper: 0 for AT, 10 for TRADES)
    # The fine-tuning AWP's options (docs/AWP_VARIANTS.md); the defaults are the paper's AWP.
    params: str = ""  # "" = every weight of dim > 1; else a regular expression searched in parameter names (e.g. conv1|fc)
    steps: int = 1  # ascent steps per training step (the snippet's adv_step)
    eps_rel: float = 0.0  # > 0: also bound every element, |v_ij| <= eps_rel * |w_ij| (the snippet's adv_eps); 0 = no bound
    start_step: int = 0  # AWP is active from this global step on (0-based), as well as from epoch `warmup`


@dataclass
class OptimConfig:
    lr: float = 0.1  # peak learning rate of SGD (the schedule scales it)
    momentum: float = 0.9  # SGD momentum
    weight_decay: float = 5e-4  # L2 weight decay of SGD
    nesterov: bool = False  # Nesterov momentum
    schedule: str = "piecewise"  # piecewise (lr/10 at 50%, lr/100 at 75%, per iteration) | cosine | constant, or the official
    # script's --lr-schedule names: superconverge | linear | onedrop | multipledecay | cyclic | official_piecewise |
    # official_cosine (flatrobust.schedules; docs/OFFICIAL_FLAGS.md)
    lr_one_drop: float = 0.01  # onedrop: the rate after lr_drop_epoch (official --lr-one-drop)
    lr_drop_epoch: int = 100  # onedrop: the epoch of the drop (official --lr-drop-epoch)
    l1: float = 0.0  # > 0: adds l1 * sum |w| over the weights with dim > 1 (no BatchNorm, no biases) to the loss (official --l1)
    l2: float = 0.0  # > 0: weight decay l2 on those weights and none on the others, replacing weight_decay (official --l2)


@dataclass
class SpeedConfig:
    amp: str = "auto"  # auto (bf16 on CUDA, off on CPU) | off | bf16: autocast for forward passes
    channels_last: str = "auto"  # auto (on for CUDA) | on | off
    compile: bool = False  # torch.compile the forward (slow start, faster steps on GPU)


@dataclass
class LogConfig:
    interval: int = 50  # every N steps of an epoch (and at its end): read the step metrics (and the non-finite flag)
    # from the device, and with tensorboard write the mean training loss since the last point
    tensorboard: bool = False  # also write metrics.jsonl's numbers and the loss to RUN_DIR/tensorboard (extra [tensorboard])


@dataclass
class EMAConfig:
    decay: float = 0.0  # > 0: also keep an EMA of the weights (e.g. 0.999), decay min(decay, (1+t)/(10+t)) at step t; 0 = off


@dataclass
class GuardConfig:
    catastrophic: str = "warn"  # on catastrophic overfitting (flatrobust.catastrophic, Wong et al. 2020): warn (a line,
    # recorded) | stop (the run ends after that epoch) | rollback (weights and optimizer go back to best.pt's epoch)


@dataclass
class RunConfig:
    name: str = "run"  # the run's name: its directory is out_dir/name
    seed: int = 0  # seeds the model's initialization, the data order, augmentation and attack noise
    device: str = "auto"  # auto (cuda if available) | cpu | cuda | cuda:N
    method: str = "at"  # at | trades | mart
    beta: float = 6.0  # TRADES / MART trade-off
    model: str = "smallcnn"  # built in (models.REGISTRY) | timm:<name> | robustbench:<Name> | package.module:callable (your own)
    model_args: dict = field(default_factory=dict)  # keyword arguments of the model's builder, e.g. {width: 16}
    model_dir: str = ""  # package.module:callable: folder searched first for the module (set to the recipe's folder)
    epochs: int = 10  # passes over the training data
    batch_size: int = 128  # training examples per step
    out_dir: str = "runs"  # the run directory is out_dir/name
    nonfinite: str = "stop"  # stop | skip: what a non-finite loss or AWP gradient does
    deterministic: bool = True  # torch.use_deterministic_algorithms (exact resume on CPU)
    checkpoint_every: int = 0  # > 0: also checkpoint every N steps inside an epoch
    init_from: str = ""  # fine-tuning: start from the weights of this checkpoint / run directory / state_dict file
    data: DataConfig = field(default_factory=DataConfig)
    # The training attack (`attacks.AttackConfig`: norm, eps, alpha, steps); the recipe default is CIFAR L-inf 8/255,
    # 10 steps, and alpha follows eps unless given (`attacks.default_alpha`: eps/4 for L-inf, eps * 15/128 for L2).
    attack: AttackConfig = field(default_factory=lambda: AttackConfig(eps=8 / 255))
    eval: EvalSpec = field(default_factory=EvalSpec)
    awp: AWPConfig = field(default_factory=AWPConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    speed: SpeedConfig = field(default_factory=SpeedConfig)
    log: LogConfig = field(default_factory=LogConfig)
    ema: EMAConfig = field(default_factory=EMAConfig)
    guard: GuardConfig = field(default_factory=GuardConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self) | {"attack": self.attack.as_dict()}  # attack keys in the recipe's order


CHOICES = {
    "method": ("at", "trades", "mart"),
    "data.augment": ("default", "crop_flip", "none"),
    "attack.norm": ("linf", "l2"),
    "attack.kind": KINDS,
    "attack.init": INITS,
    "guard.catastrophic": CATASTROPHIC_MODES,
    "nonfinite": ("stop", "skip"),
    "speed.amp": ("auto", "off", "bf16"),
    "speed.channels_last": ("auto", "on", "off"),
    "data.on_device": ("auto", "on", "off"),
}
# key -> (lowest allowed, whether the bound itself is allowed)
LOWER = {
    "epochs": (1, True), "batch_size": (1, True), "beta": (0, True), "checkpoint_every": (0, True),
    "data.eval_subset": (1, True), "data.train_subset": (0, True), "data.image_size": (0, True), "data.extra_fraction": (0, True),
    "attack.eps": (0, True), "attack.alpha": (0, True), "attack.steps": (1, True),
    "eval.steps": (1, True), "eval.alpha": (0, True), "eval.batch_size": (1, True),
    "awp.gamma": (0, True), "awp.warmup": (0, True), "awp.steps": (1, True), "awp.eps_rel": (0, True),
    "awp.start_step": (0, True), "ema.decay": (0, True),
    "optim.lr": (0, False), "optim.momentum": (0, True), "optim.weight_decay": (0, True),
    "log.interval": (1, True), "attack.restarts": (1, True), "attack.replays": (1, True), "data.val_subset": (0, True), "data.cutout": (0, True), "data.mixup_alpha": (0, True),
    "optim.l1": (0, True), "optim.l2": (0, True), "optim.lr_one_drop": (0, True), "optim.lr_drop_epoch": (0, True),
}

_FRACTION = re.compile(r"^\s*([0-9.eE+-]+)\s*/\s*([0-9.eE+-]+)\s*$")


def _coerce(key: str, value: Any, typ: Any) -> Any:
    if isinstance(typ, types.UnionType):  # `float | None`: None means "the default" (attack.alpha: follow eps)
        if value is None:
            return None
        typ = next(t for t in typing.get_args(typ) if t is not type(None))
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise UserError(f"{key} must be true or false, got {value!r}")
    if typ is int:
        if isinstance(value, bool):
            raise UserError(f"{key} must be an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        raise UserError(f"{key} must be an integer, got {value!r}")
    if typ is float:
        if isinstance(value, bool):
            raise UserError(f"{key} must be a number, got {value!r}")
        if isinstance(value, (int, float)):
            out = float(value)
        elif isinstance(value, str):
            m = _FRACTION.match(value)
            try:
                out = float(m.group(1)) / float(m.group(2)) if m else float(value)
            except (ValueError, ZeroDivisionError):
                raise UserError(f"{key} must be a number such as 0.03 or 8/255, got {value!r}") from None
        else:
            raise UserError(f"{key} must be a number, got {value!r}")
        if not math.isfinite(out):
            raise UserError(f"{key} must be finite, got {value!r}")
        return out
    if typ is dict:
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            raise UserError(f"{key} must be a mapping of names to values, e.g. {{width: 16}}, got {value!r}")
        return dict(value)
    if typ is list:  # a list of numbers (data.mean, data.std); a single number is a list of one
        items = value if isinstance(value, (list, tuple)) else [value]
        return [_coerce(f"{key}[{i}]", v, float) for i, v in enumerate(items)]
    if typ is str:
        if isinstance(value, (dict, list)) or value is None:
            raise UserError(f"{key} must be a string, got {value!r}")
        if isinstance(value, bool):  # YAML reads a bare off/on as a boolean
            return "on" if value else "off"
        return str(value)
    raise AssertionError(typ)


def _check_range(key: str, value: Any, typed: Any = None) -> None:
    """UserError (one line) when `value` of `key` is not one of its CHOICES or lies below its LOWER bound;
    the message echoes the value as the user typed it (`typed`, e.g. "-8/255", not -0.03137254901960784)."""
    if key in CHOICES and value not in CHOICES[key]:
        close = difflib.get_close_matches(str(value), CHOICES[key], n=1, cutoff=0.4)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise UserError(f"{key} must be one of {', '.join(CHOICES[key])}, got {value!r}{hint}")
    if key in LOWER and value is not None:
        low, inclusive = LOWER[key]
        if value < low or (not inclusive and value == low):
            raise UserError(f"{key} must be {'>=' if inclusive else '>'} {low}, got {typed if isinstance(typed, str) else value}")


def _unknown(key: str, valid: list[str]) -> UserError:
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    hint = f" (did you mean {close[0]!r}?)" if close else f" (valid keys: {', '.join(valid)})"
    return UserError(f"unknown config key {key!r}{hint}")


def _all_keys(cls, prefix="") -> list[str]:
    keys = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        t = hints[f.name]
        if dataclasses.is_dataclass(t):
            keys += _all_keys(t, f"{prefix}{f.name}.")
        else:
            keys.append(prefix + f.name)
    return keys


def _build(cls, values: dict[str, Any], prefix: str = "", default: Any = None):
    """A `cls` from the keys given (coerced and range-checked one by one), the rest from `cls`'s defaults; a field
    `cls` itself leaves without a default (attack.eps) takes its value from `default`, the section's default."""
    if not isinstance(values, dict):
        raise UserError(f"{prefix.rstrip('.') or 'the config'} must be a mapping of keys to values, got {values!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in values:
        if key not in names:
            raise _unknown(prefix + str(key), _all_keys(RunConfig))
    kwargs = {}
    for f in dataclasses.fields(cls):
        t, full = hints[f.name], prefix + f.name
        if f.name not in values:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING and default is not None:
                kwargs[f.name] = getattr(default, f.name)
            continue
        if dataclasses.is_dataclass(t):
            kwargs[f.name] = _build(t, values[f.name], full + ".", default=f.default_factory())
        else:
            kwargs[f.name] = _coerce(full, values[f.name], t)
            _check_range(full, kwargs[f.name], typed=values[f.name])
    return cls(**kwargs)


def _set_path(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for p in parts[:-1]:
        nxt = node.setdefault(p, {})
        if not isinstance(nxt, dict):
            raise UserError(f"cannot set {dotted!r}: {p!r} is not a section")
        node = nxt
    node[parts[-1]] = value


class _Whole(dict):
    """A mapping given whole on the command line (`model_args={width: 16}`): it replaces the recipe's, where a
    dotted key (`model_args.width=16`) sets one entry of it."""


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """['awp.gamma=0.01', 'epochs=5'] -> nested dict; values parsed as YAML scalars (8/255 stays a string). A value
    written as a mapping ({...}) replaces the recipe's mapping when merged (`_merge`), never merges into it."""
    tree: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise UserError(f"override {item!r} must look like key=value, e.g. awp.gamma=0.01")
        key, raw = item.split("=", 1)
        key = key.strip()
        if not key:
            raise UserError(f"override {item!r} has no key: use key=value, e.g. epochs=5")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        _set_path(tree, key, _Whole(value) if isinstance(value, dict) else value)
    return tree


def _command_line(overrides: list[str]) -> dict[str, Any]:
    """`parse_overrides`, refusing a section given whole (`data={...}`): merged into the recipe's section it would
    silently keep the recipe's other keys of it, and replacing the section would silently drop them."""
    tree = parse_overrides(overrides)
    hints = typing.get_type_hints(RunConfig)
    for key, value in tree.items():
        if isinstance(value, _Whole) and dataclasses.is_dataclass(hints.get(key)):
            name = next(iter(value), None) or dataclasses.fields(hints[key])[0].name
            raise UserError(f"{key} is a section: override its keys one by one (e.g. {key}.{name}=...), not {key} as a whole")
    return tree


def _merge(base: dict, extra: dict) -> dict:
    """`extra` over `base`: sections merge key by key; a mapping given whole on the command line replaces."""
    out = dict(base)
    for k, v in extra.items():
        if isinstance(v, _Whole):
            out[k] = dict(v)
        else:
            out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def validate(cfg: RunConfig) -> RunConfig:
    for key, value in _flatten(cfg).items():
        _check_range(key, value)
    from .models import check_name, run_args

    try:
        check_name(cfg.model)  # the syntax only: the model itself is built (and imported) by train.build
    except ValueError as e:
        raise UserError(str(e)) from None
    # what the model's source takes from the run (robustbench:<Name>: data.name and attack.norm pick the zoo
    # entry), written into the resolved config so that every later rebuild picks the same one
    cfg.model_args = run_args(cfg.model, cfg.model_args, cfg.data.name, cfg.attack.norm)
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?|mps", cfg.device):
        raise UserError(f"device must be auto, cpu, cuda or cuda:N, got {cfg.device!r}")
    if not re.fullmatch(r"[A-Za-z0-9._-]+", cfg.name):
        raise UserError(f"name {cfg.name!r} may only contain letters, digits, '.', '_' and '-' (it names the run directory)")
    _validate_data(cfg)
    if not cfg.data.extra_fraction < 1:
        raise UserError(f"data.extra_fraction must be < 1 (some labeled data in every batch), got {cfg.data.extra_fraction}")
    if cfg.ema.decay >= 1:
        raise UserError(f"ema.decay must be < 1 (e.g. 0.999; 0 turns the EMA off), got {cfg.ema.decay}")
    if cfg.optim.momentum >= 1:
        raise UserError(f"optim.momentum must be < 1, got {cfg.optim.momentum}")
    _validate_attack(cfg)
    from . import schedules

    why = schedules.check(cfg.optim.schedule, cfg.attack.passes(cfg.epochs) * cfg.attack.batch_replays)  # the epochs it spans
    if why:
        raise UserError(why)
    return cfg


def _validate_attack(cfg: RunConfig) -> None:
    """The training attack's kind fits the method (docs/OFFICIAL_FLAGS.md)."""
    a = cfg.attack
    if a.kind == "none" and cfg.method != "at":
        raise UserError(f"attack.kind=none is standard training, which has no {cfg.method.upper()} term: use method=at with it")
    if a.kind == "fgsm" and a.init == "zero" and cfg.method == "trades":
        raise UserError("attack.init=zero with method=trades: the KL attack's gradient vanishes at x, so FGSM from zero "
                        "does not move; use attack.init=random")
    if cfg.data.mixup_alpha > 0 and cfg.method != "at":
        raise UserError(f"data.mixup_alpha={cfg.data.mixup_alpha:g} with method={cfg.method}: mixup mixes labels, and "
                        f"{cfg.method.upper()}'s loss compares the model's own distributions (no soft-label form); use method=at")
    if a.restarts > 1 and a.kind != "pgd":
        raise UserError(f"attack.restarts={a.restarts} applies to the PGD training attack, not attack.kind={a.kind}")
    if a.replays is not None and a.kind != "free":
        raise UserError(f"attack.replays={a.replays} applies to Free AT (attack.kind=free), not attack.kind={a.kind}")
    if a.kind == "free" and a.init != "random":
        raise UserError(f"attack.init={a.init} is FGSM's start: Free AT's perturbation starts at zero and is carried from "
                        "batch to batch (Shafahi et al.); leave attack.init out")
    if a.kind == "free" and cfg.method == "mart":
        raise UserError(FREE_MART)


def _validate_data(cfg: RunConfig) -> None:
    """data.name is a registry entry; data.mean and data.std come together, one value per channel each."""
    from .data import REGISTRY

    d = cfg.data
    if d.name not in REGISTRY:
        close = difflib.get_close_matches(d.name, list(REGISTRY), n=1, cutoff=0.4)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise UserError(f"data.name must be one of {', '.join(REGISTRY)}, got {d.name!r}{hint}")
    if bool(d.mean) != bool(d.std) or len(d.mean) != len(d.std):
        raise UserError(f"data.mean and data.std go together, one value per channel each, got {d.mean} and {d.std}")
    if any(s <= 0 for s in d.std):
        raise UserError(f"data.std must be > 0 in every channel, got {d.std}")
    if d.channels not in (0, 1, 3):
        raise UserError(f"data.channels must be one of 0 (as the images are), 1 (greyscale), 3 (RGB), got {d.channels}")


def _flatten(section: Any, prefix: str = "") -> dict[str, Any]:
    """Dotted key -> value of every leaf of a config; sections are the dataclass fields, so a dict-valued
    key such as model_args stays one value."""
    out = {}
    for f in dataclasses.fields(section):
        v = getattr(section, f.name)
        if dataclasses.is_dataclass(v):
            out.update(_flatten(v, f"{prefix}{f.name}."))
        else:
            out[prefix + f.name] = v
    return out


def _close_recipe(path: Path) -> str | None:
    """The recipe file a missing `path` most likely meant ("digits_at" -> "recipes/digits_at.yaml"), looked
    for beside `path`, in ./recipes and in the recipes/ folder of this source tree; None if none is close."""
    folders = [path.parent, Path("recipes"), Path(__file__).resolve().parents[2] / "recipes"]
    found: dict[Path, Path] = {}
    for folder in folders:
        if folder.is_dir():
            for f in sorted(folder.glob("*.y*ml")):
                found.setdefault(f.resolve(), f)
    if not found:
        return None
    stem = path.name.removesuffix(".yaml").removesuffix(".yml")
    by_stem: dict[str, Path] = {}
    for f in found.values():
        by_stem.setdefault(f.stem, f)
    close = difflib.get_close_matches(stem, list(by_stem), n=1, cutoff=0.6)
    if not close:
        return None
    best = by_stem[close[0]]
    try:
        return str(best.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(best)


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        close = _close_recipe(path)
        hint = f"did you mean {close}?" if close else "pass a YAML file, e.g. recipes/digits_at_awp.yaml"
        raise UserError(f"recipe {path} does not exist: {hint}")
    try:
        tree = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        where = getattr(e, "problem_mark", None)
        at = f" at line {where.line + 1}" if where is not None else ""
        raise UserError(f"recipe {path} is not valid YAML{at}: fix the syntax") from None
    if not isinstance(tree, dict):
        raise UserError(f"recipe {path} must be a mapping of keys to values")
    return tree


def load_config(path: str | Path | None = None, overrides: list[str] | None = None, base: dict | None = None) -> RunConfig:
    """Recipe file (optional) + dotted overrides -> validated RunConfig."""
    tree = dict(base or {})
    if path is not None:
        tree = _merge(tree, read_yaml(path))
    tree = _merge(tree, _command_line(overrides or []))
    cfg = validate(_build(RunConfig, tree))
    from .models import source_of

    if not cfg.model_dir and source_of(cfg.model).name == "import":
        # a model of the user's is found in the recipe's folder (the working directory without a recipe), also
        # later: by --resume, eval, landscape and flatness, which read this absolute path from the run's config
        cfg.model_dir = str((Path(path).parent if path is not None else Path.cwd()).resolve())
    return cfg


def resume_config(run_dir: str | Path, overrides: list[str] | None = None) -> RunConfig:
    """The config of an existing run directory (its config.yaml), with optional overrides (e.g. epochs=30 to train
    longer). A config.yaml that is missing, empty or damaged (a full disk, before writes were atomic) is replaced
    by the config last.pt holds, with a warning."""
    run_dir = Path(run_dir)
    path, last = run_dir / CONFIG, run_dir / LAST
    if not path.is_file() and not last.is_file():
        raise UserError(f"{run_dir} is not a run directory (no config.yaml): pass the folder that `flatrobust train` created")
    try:
        tree = read_config(run_dir) if path.is_file() else None
    except UserError:
        tree = None
    if not tree:
        if not last.is_file():
            raise UserError(f"{str(path)!r} is empty or damaged and {run_dir} holds no last.pt: there is nothing to resume; "
                            "start the run again (with --overwrite)")
        from .checkpoint import load_checkpoint

        tree = load_checkpoint(last)["config"]
        print(f"flatrobust: warning: {str(path)!r} is missing, empty or damaged: resuming with the config saved in {str(last)!r}",
              file=sys.stderr)
    return config_from_dict(_merge(tree, _command_line(overrides or [])))


def config_from_dict(tree: dict[str, Any]) -> RunConfig:
    return validate(_build(RunConfig, tree))


# What a resume may change (`--resume RUN key=value`, or an edited config.yaml), and why that leaves the run the one
# that was started. Any other key differing from the config last.pt was trained with is refused (`check_resume_config`):
# config.yaml and the checkpoints would claim the new value for epochs trained with the old one.
RESUME_SAFE = {
    "epochs": "train longer (never shorter): the lr schedule is recomputed for the new length",
    "device": "where it runs (on another device type the numbers go on equally valid, not bit-identical)",
    "name": "where the run was first written: --resume names its folder",
    "out_dir": "where the run was first written: --resume names its folder",
    "data.root": "where the data is read from: it may move (--data-root; train stores it resolved, earlier runs as typed); "
                 "the model checks the class count, not the images: point it at the same data",
    "data.on_device": "where the training data is kept, not its values",
    "data.download": "whether a missing built-in dataset may be downloaded (md5-checked)",
    "log.tensorboard": "a view of metrics.jsonl, written beside it",
}


def _flat(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            out |= _flat(value, f"{prefix}{key}.")
        else:
            out[f"{prefix}{key}"] = value
    return out


def check_resume_config(saved: dict[str, Any] | None, cfg: RunConfig, checkpoint: str | Path) -> None:
    """UserError (one line naming the key and both values) if `cfg` changes a key of `saved` (the config `checkpoint`
    was trained with) that `RESUME_SAFE` does not list. A config saved by an older version gets today's defaults for
    the keys it lacks (what it was trained with); a key it has that no longer exists is not compared."""
    if not isinstance(saved, dict):
        return
    try:
        saved = config_from_dict(saved).to_dict()
    except UserError:
        pass  # a config this version no longer accepts: compare the keys it has
    new = _flat(cfg.to_dict())
    for key, old in _flat(saved).items():
        if key in new and new[key] != old and key not in RESUME_SAFE:
            raise UserError(f"--resume would change {key} from {old!r} to {new[key]!r}, but {str(checkpoint)!r} was trained with "
                            f"{key}={old!r}: a resume continues the run that was started (only {', '.join(RESUME_SAFE)} may "
                            f"change); resume without that change, or start a new run (init_from= to start from its weights)")


_FIELD_LINE = re.compile(r"^\s+(\w+):\s*[^=#]+?(?:=.*?)?(?:#\s*(.*))?$")


def _field_comments(cls) -> dict[str, str]:
    """Field name -> its end-of-line comment in the class's source (a comment line right below that starts in
    lower case continues it; one that starts a sentence introduces the next fields)."""
    import inspect

    out: dict[str, str] = {}
    last = None
    for line in inspect.getsource(cls).splitlines():
        stripped = line.strip()
        if stripped.startswith("#") and last is not None and out.get(last) and stripped.lstrip("# ")[:1].islower():
            out[last] += " " + stripped.lstrip("# ")
            continue
        m = _FIELD_LINE.match(line)
        last = None
        if m and not stripped.startswith(("def ", "class ", "@", '"""')) and "(" not in m.group(1):
            last = m.group(1)
            out[last] = (m.group(2) or "").strip()
    return out


def describe_keys() -> list[tuple[str, str, str]]:
    """(dotted key, default as a recipe writes it, meaning) of every config key, generated from the dataclasses
    above and their end-of-line comments (`flatrobust config` prints them)."""
    from .attacks import format_eps

    def show(key: str, value: Any) -> str:
        if key == "attack.alpha":
            return "follows eps"
        if key == "attack.eps":
            return format_eps(value)
        return json.dumps(value) if isinstance(value, (dict, list, str, bool)) or value is None else repr(value)

    rows = []

    def walk(cls, instance, prefix):
        comments = _field_comments(cls)
        for f in dataclasses.fields(cls):
            value = getattr(instance, f.name)
            if dataclasses.is_dataclass(value):
                walk(type(value), value, f"{prefix}{f.name}.")
            else:
                rows.append((prefix + f.name, show(prefix + f.name, value), comments.get(f.name, "")))

    walk(RunConfig, RunConfig(), "")
    return rows
