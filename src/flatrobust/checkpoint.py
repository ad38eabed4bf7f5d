"""Checkpoints: written atomically (`atomic.write_atomic`), loaded safely (`weights_only=True`), recognisably ours.

A checkpoint is a plain dict of tensors and Python primitives:

    {"format": "flatrobust", "version": 1,
     "config": {...resolved run config...},
     "model": model.state_dict(),
     ... training state (optimizer, epoch, step, best, ...) when written by `flatrobust train`}

so it loads with `torch.load(path, weights_only=True)` anywhere, and a file carrying a pickled object
(arbitrary code) is refused by that loader.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .atomic import WriteError, write_atomic  # noqa: F401 - WriteError re-exported (its home was here)
from .errors import UserError
from .rundir import checkpoint_file

FORMAT = "flatrobust"
VERSION = 1


class CheckpointError(UserError):
    """A file that is missing, truncated, corrupted, unsafe or not a flatrobust checkpoint."""


class NotACheckpointError(CheckpointError):
    """A readable file that is not a flatrobust checkpoint (e.g. a plain state_dict)."""


def save_checkpoint(state: dict[str, Any], path: str | os.PathLike) -> None:
    """Write `state` to `path` atomically (`write_atomic`): a crash during the write leaves the previous
    file at `path` intact."""
    state = {"format": FORMAT, "version": VERSION, **state}
    write_atomic(path, lambda f: torch.save(state, f))


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a flatrobust checkpoint with `weights_only=True`; CheckpointError (one line) if it is not one."""
    folder, path = Path(path), checkpoint_file(path)
    if folder.is_dir() and not path.exists():
        raise CheckpointError(f"{folder} is a folder without best.pt or last.pt: pass a checkpoint file or a run directory")
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist: pass the path of a .pt file written by `flatrobust train`")
    return _check_ours(_read(path, map_location), path)


def _read(path: Path, map_location: str | torch.device = "cpu") -> Any:
    """torch.load with weights_only=True; any failure becomes one CheckpointError line."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 - every failure becomes one line
        found = re.search(r"GLOBAL ([\w.]+)", str(e))
        if found:  # the weights_only unpickler met a reference to Python code: never executed
            raise CheckpointError(f"{path} holds a pickled Python object ({found.group(1)}) and was refused for safety "
                                  "(loaded with weights_only=True): use a checkpoint written by `flatrobust train`") from None
        not_torch = _not_a_torch_file(path)
        if not_torch:
            raise CheckpointError(f"{path} is not a checkpoint: {not_torch}, not a file written by torch.save; "
                                  "pass a .pt file written by `flatrobust train` (or its run directory)") from None
        raise CheckpointError(f"{path} is truncated or corrupted and cannot be read ({type(e).__name__}): "
                              "use another checkpoint, e.g. the run's best.pt or last.pt") from None


def _not_a_torch_file(path: Path) -> str | None:
    """What the file is when its first bytes are not those of torch.save's formats (a zip archive since
    PyTorch 1.6, a pickle before), e.g. "it is a text file (first line 'hello')"; None when they are (or
    the file is empty or unreadable: then it is a damaged checkpoint)."""
    try:
        with open(path, "rb") as f:
            head = f.read(4096)
    except OSError:
        return None
    if not head or head.startswith(b"PK\x03\x04") or head[:1] == b"\x80":
        return None
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        text = None
    if text is not None and "\x00" not in text:
        first = text.strip().splitlines()[0][:40] if text.strip() else ""
        return f"it is a text file (first line {first!r})"
    return f"its first bytes are {head[:8]!r}"


def _check_ours(state: Any, path: Path) -> dict[str, Any]:
    """`state` if it is a complete flatrobust checkpoint this version can read; CheckpointError otherwise."""
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise NotACheckpointError(f"{path} is not a flatrobust checkpoint (no 'format': 'flatrobust' entry): pass a file written by `flatrobust train`")
    if state.get("version", 0) > VERSION:
        raise CheckpointError(f"{path} was written by a newer flatrobust (checkpoint version {state['version']}): upgrade flatrobust")
    for key in ("config", "model"):
        if key not in state:
            raise CheckpointError(f"{path} lacks its {key!r} entry: the file is incomplete")
    return state


WEIGHTS = ("raw", "ema")  # the weight sets a checkpoint may hold: the trained weights, their moving average


class UntrustedCodeError(CheckpointError):
    """A checkpoint whose config names code to import (`package.module:callable`), refused without consent."""


def model_from_checkpoint(path: str | os.PathLike, device: str | torch.device = "cpu", weights: str = "raw", *,
                          trust_code: bool = False, model: str | None = None,
                          model_args: dict[str, Any] | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the model stored in a checkpoint (eval mode, on `device`) and return it with the checkpoint dict.

    `weights`: "raw" (the trained weights) or "ema" (their exponential moving average, in checkpoints of runs
    with ema.decay > 0; CheckpointError otherwise).

    The model is built from the checkpoint's config: `config["model"]` names the architecture (built in,
    timm or RobustBench's zoo) with `config["model_args"]`, and `data_info` (else `config["data"]["name"]`)
    gives the classes, channels and normalization it uses. A checkpoint is data: its config never chooses code
    to import. A `package.module:callable` model is imported (its module looked for in `config["model_dir"]`
    first) only with `trust_code=True` (`--trust-model-code`), else UntrustedCodeError; or pass `model` (and
    optionally `model_args`), a name of your own, to build that model instead: its module is looked for in the
    working directory, then the Python path, never in the checkpoint's `model_dir`. The architecture alone is
    built (`models.architecture_args`: a timm model without pretrained weights, a RobustBench model without
    reading its weights file): the checkpoint's weights replace them, so nothing is downloaded or read.
    """
    from . import models
    from .data import info_from_checkpoint

    if weights not in WEIGHTS:
        raise CheckpointError(f"weights must be raw or ema, got {weights!r}")
    state = load_checkpoint(path, map_location=device)
    cfg = state["config"]
    if weights == "ema" and not (isinstance(state.get("ema"), dict) and "model" in state["ema"]):
        raise CheckpointError(f"{path} holds no EMA weights (trained with ema.decay=0): use --weights raw, or train "
                              "with ema.decay=0.999 (for example) to have them")
    name = model if model is not None else cfg.get("model") if isinstance(cfg, dict) else None
    args = model_args if model_args is not None else cfg.get("model_args") if isinstance(cfg, dict) else None
    args = {} if args is None else args
    if not isinstance(name, str) or not isinstance(args, dict) or not all(isinstance(k, str) for k in args):
        raise CheckpointError(f"{path}: its config does not name a model (model {name!r}, model_args {args!r}): "
                              "pass a checkpoint written by `flatrobust train`")
    if model is not None:  # the user's own choice: found as the command line finds a recipe-less model
        search = [str(Path.cwd())]
    elif models.imports_code(name):
        where = cfg.get("model_dir")
        if not trust_code:
            raise UntrustedCodeError(
                f"{path} names model {name!r}, code that building it would import{f' (from {where!r})' if where else ''}: "
                "a checkpoint is data and never chooses code to run; if you trust where it came from, pass "
                "--trust-model-code (trust_code=True)")
        search = [where] if isinstance(where, str) and where else []
    else:
        search = []  # a built-in, timm or RobustBench architecture: nothing chosen by the name is imported, model_dir is not read
    args = models.architecture_args(name, args)  # the checkpoint's weights replace pretrained ones: never fetch them
    info = info_from_checkpoint(state)  # the training data's classes, channels and normalization
    try:
        net = models.create(name, num_classes=info.num_classes, in_channels=info.in_channels, mean=info.mean,
                            std=info.std, search_path=search, **args)
    except models.ModelError as e:  # e.g. timm not installed here, or the module of a user's model not found
        raise CheckpointError(f"{path}: cannot rebuild its model: {e}") from None
    try:
        net.load_state_dict(state["ema"]["model"] if weights == "ema" else state["model"])
    except RuntimeError as e:
        raise CheckpointError(f"{path}: weights do not fit model {name!r} ({str(e).splitlines()[0][:120]})") from None
    return net.to(device).eval(), state


def checkpoint_split(state: dict[str, Any], split: str = "test", *, root: str | None = None, download: bool | None = None,
                     progress: bool = False):
    """Split `split` ("train" or "test", a `data.TensorData`) of the data checkpoint `state` was trained on, decoded as
    its model expects (the classes, channels, size and normalization of its `data_info`): its config's data section,
    with `root` pointing to another copy of the data and `download` (if given) replacing the config's. UserError (one
    line) when the data cannot be read."""
    from .data import DataError, info_from_checkpoint, load_split

    data = dict(state["config"].get("data") or {})
    if root is not None:
        data["root"] = root
    if download is not None:
        data["download"] = download
    try:
        return load_split(data, split, like=info_from_checkpoint(state), progress=progress)
    except DataError as e:  # the commands that read a run's data take --data-root, not a data.root= override
        text = str(e).replace("set data.root to", "point --data-root at").replace("data.root=", "--data-root ")
        raise UserError(text if "--data-root" in text else f"{text} (--data-root points the command at another copy)") from None


def load_weights(model: nn.Module, path: str | os.PathLike) -> None:
    """Load pre-trained weights into `model` (fine-tuning): a flatrobust checkpoint or run directory, or a
    plain state_dict file (optionally under a 'state_dict' or 'model' key, DDP's 'module.' prefix allowed).

    Always `weights_only=True`; the keys and shapes must match `model` exactly (CheckpointError otherwise).
    """
    p = Path(path)
    if p.is_dir() or not p.exists():
        weights = load_checkpoint(p)["model"]
    else:
        state = _read(p)  # the file is read once, whichever kind it is
        if isinstance(state, dict) and state.get("format") == FORMAT:
            state = _check_ours(state, p)
        weights = state.get("model", state.get("state_dict", state)) if isinstance(state, dict) else state
        if not isinstance(weights, dict) or not all(isinstance(v, torch.Tensor) for v in weights.values()):
            raise CheckpointError(f"{p} holds no state_dict of tensors: pass a flatrobust checkpoint or a file saved with torch.save(model.state_dict())")
        weights = {k.removeprefix("module."): v for k, v in weights.items()}
    missing, unexpected = sorted(set(model.state_dict()) - set(weights)), sorted(set(weights) - set(model.state_dict()))
    net = getattr(model, "net", None)
    if (missing or unexpected) and weights and isinstance(net, nn.Module) and set(net.state_dict()) >= {k.removeprefix("model.") for k in weights}:
        raise CheckpointError(f"{p} holds the weights of the network alone, without flatrobust's normalization layer (as "
                              "RobustBench's files do): for robustbench:<Name> give it as model_args.weights (or import it with "
                              "`flatrobust import`), for your own network load it into model.net")
    if missing or unexpected:
        raise CheckpointError(f"{p} does not fit the model: missing {missing[:3]}, unexpected {unexpected[:3]} "
                              "(same architecture and dataset needed)")
    own = model.state_dict()
    bad = [k for k, v in weights.items() if v.shape != own[k].shape]
    if bad:
        raise CheckpointError(f"{p} does not fit the model: {bad[0]} has shape {tuple(weights[bad[0]].shape)}, "
                              f"the model expects {tuple(own[bad[0]].shape)} (same architecture and number of classes needed)")
    model.load_state_dict(weights)
