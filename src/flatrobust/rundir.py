"""The run directory: the one place that knows what `flatrobust train` writes and how to read it back.

    RUN_DIR/
      config.yaml     the resolved config (`RunConfig.to_dict()`), written (atomically, as env.json and data.json)
                      when the run starts or resumes
      env.json        versions, device, processor, seed, git commit and argv of the process that trained
      data.json       the data the model was built for: root, classes, channels, size, normalization
      metrics.jsonl   one JSON object per finished epoch, appended and fsynced; a resume first drops the
                      lines its checkpoint does not cover
      last.pt         the checkpoint a resume starts from (end of the last epoch, or inside one with checkpoint_every)
      best.pt         the epoch with the best monitored test robust accuracy (of the raw weights)
      tensorboard/    with log.tensorboard: a view of metrics.jsonl
      .lock           while a process trains the run: its PID (`runlock`: one writer at a time)

and what the other commands add beside the checkpoints, one file per checkpoint named after it (`result_file`):
eval_best.json, eval_last.json (`flatrobust eval`), landscape_best.json with landscape_best.png
(`flatrobust landscape`; landscape_2d_best.png with --2d), flatness_best.json (`flatrobust flatness`), and _ema
before the suffix for --weights ema (eval_best_ema.json). Runs analysed before then have one eval.json,
landscape.json, flatness.json (landscape_ema.json, ... for the EMA weights), which `result_files` still lists. A run has
finished when metrics.jsonl covers every epoch of config.yaml: the checkpoints need not be there (a study
commits run directories without them). Every reader (`report`, the CLI, study/study*.py) goes through here.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
from pathlib import Path
from typing import Any, NamedTuple

import yaml

from .atomic import WriteError, write_atomic
from .errors import UserError
from .runlock import LOCK

__all__ = [
    "BEST", "CONFIG", "DATA", "ENV", "LAST", "METRICS", "TIMING_KEYS", "append_metrics", "checkpoint_file", "covers", "eval_file",
    "eval_files", "finished", "Kept", "prepare", "remove_temporary", "read_config", "read_env", "read_metrics", "result_file",
    "result_files", "truncate_metrics",
    "without_timing", "write_start_files",
]

CONFIG, ENV, DATA, METRICS, LAST, BEST = "config.yaml", "env.json", "data.json", "metrics.jsonl", "last.pt", "best.pt"
# The per-epoch metrics that differ between two runs that are otherwise bit-identical (wall-clock times).
TIMING_KEYS = ("epoch_time_s", "eval_time_s", "images_per_s")


def prepare(run_dir: str | os.PathLike, *, overwrite: bool) -> Path:
    """The folder a new run writes into: UserError (one line) if it holds files, unless `overwrite` deletes them.
    The lock file (`runlock`), held by the caller, is neither counted nor deleted."""
    run_dir = Path(run_dir)
    held = [p for p in run_dir.iterdir() if p.name != LOCK] if run_dir.is_dir() else []
    if held:
        if not overwrite:
            raise UserError(f"run directory {run_dir} already exists: pass --overwrite to replace it, --resume {run_dir} "
                            "to continue it, or name=NEW_NAME")
        for p in held:
            shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
    return run_dir


# write_atomic's temporary files: ".NAME.<8 hex digits>.tmp"
_TEMPORARY = re.compile(r"\..+\.[0-9a-f]{8}\.tmp")


def remove_temporary(run_dir: str | os.PathLike) -> list[str]:
    """Remove the temporary files an atomic write killed mid-way left in the run directory (SIGKILL leaves no time
    to clean them); the names removed. Call it with the run's lock held: no other writer's file is then in flight."""
    removed = []
    for p in sorted(Path(run_dir).iterdir()) if Path(run_dir).is_dir() else []:
        if _TEMPORARY.fullmatch(p.name) and p.is_file():
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
                removed.append(p.name)
    return removed


def write_start_files(run_dir: Path, *, config: dict[str, Any], env: dict[str, Any], data: dict[str, Any], fresh: bool,
                      made: bool | None = None) -> None:
    """Write config.yaml, env.json and data.json, each atomically. If one cannot be written (disk full), a fresh run
    directory is removed again, so that nothing half-made blocks running the command again; a resumed run keeps
    its files (each is the old one or the new one, never half of one). WriteError (one line) then. `made`: whether
    this run created the folder (default: whether it is missing now; the lock of `runlock.hold` creates it first and
    removes it when it is left empty)."""
    files = {CONFIG: yaml.safe_dump(config, sort_keys=False), ENV: json.dumps(env, indent=2) + "\n",
             DATA: json.dumps(data, indent=1) + "\n"}
    run_dir = Path(run_dir)
    made = not run_dir.exists() if made is None else made
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        for name, text in files.items():
            write_atomic(run_dir / name, lambda f, text=text: f.write(text.encode()))
    except (WriteError, OSError) as e:
        if fresh:
            for name in files:
                with contextlib.suppress(OSError):
                    (run_dir / name).unlink(missing_ok=True)
            if made:
                with contextlib.suppress(OSError):
                    run_dir.rmdir()  # (with the lock still in it, `runlock.hold` removes it)
        why = str(e) if isinstance(e, WriteError) else f"cannot create {str(run_dir)!r}: {e.strerror or e}"
        raise WriteError(f"{why}: the run did not start{' (its run directory was removed again)' if fresh and made else ''}; "
                         "make room and run the command again") from None


def read_config(run_dir: str | os.PathLike, *, required: bool = True) -> dict[str, Any]:
    """config.yaml as a dict ({} when empty); UserError (one line) if it is unreadable, not YAML or not a mapping, or is
    missing and `required` ({} when it is missing and not required)."""
    path = Path(run_dir) / CONFIG
    if not path.is_file():
        if required:
            raise UserError(f"{run_dir} is not a run directory (no {CONFIG}): pass the folder that `flatrobust train` created")
        return {}
    try:
        tree = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise UserError(f"{path} is not valid YAML ({str(e).splitlines()[0]})") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{path} cannot be read ({type(e).__name__})") from None
    if not isinstance(tree, dict):
        raise UserError(f"{path} does not hold a mapping: is this a flatrobust run directory?")
    return tree


def read_env(run_dir: str | os.PathLike) -> dict[str, Any]:
    """env.json, or {} when it is missing or unreadable (runs of older versions wrote less)."""
    try:
        env = json.loads((Path(run_dir) / ENV).read_text())
    except (OSError, ValueError):
        return {}
    return env if isinstance(env, dict) else {}


def append_metrics(run_dir: Path, record: dict[str, Any]) -> None:
    """One epoch's line, on disk (fsync) before the checkpoints that follow it are written; WriteError (one line) if
    it cannot be written, with no half line left."""
    path = Path(run_dir) / METRICS
    size = path.stat().st_size if path.exists() else 0
    try:
        with open(path, "a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:  # disk full: the half line is cut back off, for the next reader
        with contextlib.suppress(OSError):
            os.truncate(path, size)
        raise WriteError(f"cannot write {str(path)!r}: {e.strerror or e}") from None


def read_metrics(run_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """metrics.jsonl: one record per epoch, sorted by epoch, as written (no file: []).

    A resumed run may have logged an epoch again: the last record wins. A last line that does not parse is one
    still being written and is left out; any other bad line is a UserError (one line).
    """
    path = Path(run_dir) / METRICS
    if not path.is_file():
        return []
    lines = path.read_text().splitlines()
    by_epoch: dict[Any, dict[str, Any]] = {}
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            if i == len(lines) - 1:
                continue
            raise UserError(f"{path}, line {i + 1}, is not valid JSON: fix or delete that line") from None
        epoch = row.get("epoch") if isinstance(row, dict) else None
        if not (isinstance(epoch, (int, float)) and not isinstance(epoch, bool) and math.isfinite(epoch)):
            raise UserError(f"{path}, line {i + 1}, is not an object with a numeric 'epoch': is this a flatrobust metrics file?")
        by_epoch[epoch] = row
    return [by_epoch[e] for e in sorted(by_epoch)]


class Kept(NamedTuple):
    """What `truncate_metrics` kept of metrics.jsonl, and what it dropped as damaged."""

    records: list[dict[str, Any]]  # one per epoch 1..epochs that has a valid line, in epoch order
    dropped: list[str]  # "line N (why)" for each damaged line


def truncate_metrics(run_dir: Path, epochs: int) -> Kept:
    """Keep the records of epochs 1..`epochs` (those a checkpoint covers) and return them: what a resume starts from.

    Every valid record is kept, wherever it stands: a damaged line (not JSON, cut in half, not a record of an epoch)
    is dropped and named in `dropped`, and never takes the records after it along. An epoch logged twice keeps its
    last record (as `read_metrics` reads it). The file is rewritten atomically.
    """
    path = Path(run_dir) / METRICS
    if not path.exists():
        return Kept([], [])
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError as e:
        raise UserError(f"{str(path)!r} cannot be read: {e.strerror or e}") from None
    by_epoch: dict[int, dict[str, Any]] = {}
    dropped = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            dropped.append(f"line {i} (not valid JSON: {'cut short' if line.lstrip().startswith('{') else 'garbage'})")
            continue
        epoch = row.get("epoch") if isinstance(row, dict) else None
        if not (isinstance(epoch, int) and not isinstance(epoch, bool) and epoch >= 1):
            dropped.append(f"line {i} (not the record of an epoch)")
        elif epoch <= epochs:
            by_epoch[epoch] = row
    kept = [by_epoch[e] for e in sorted(by_epoch)]
    text = "".join(json.dumps(r) + "\n" for r in kept)
    write_atomic(path, lambda f: f.write(text.encode()))
    return Kept(kept, dropped)


def without_timing(record: dict[str, Any]) -> dict[str, Any]:
    """An epoch's record less its wall-clock times: what two bit-identical runs agree on."""
    return {k: v for k, v in record.items() if k not in TIMING_KEYS}


def loop_epochs(config: dict[str, Any]) -> int:
    """The epochs a run of `config` records: its `epochs`, or under Free AT (attack.kind free, m = attack.replays) the
    ceil(epochs / m) passes over the data it makes (`AttackConfig.passes`)."""
    attack = config.get("attack") if isinstance(config.get("attack"), dict) else {}
    m = attack.get("replays") if attack.get("kind") == "free" else 1
    return math.ceil(config["epochs"] / m) if isinstance(m, int) and m >= 1 else config["epochs"]


def covers(config: dict[str, Any], metrics: list[dict[str, Any]]) -> bool:
    """Whether the records of `read_metrics` cover every epoch of the config: the run has finished."""
    return len(metrics) >= loop_epochs(config)


def finished(run_dir: str | os.PathLike) -> bool:
    """Whether metrics.jsonl covers every epoch of config.yaml (False when either is missing)."""
    if not (Path(run_dir) / CONFIG).is_file():
        return False
    return covers(read_config(run_dir), read_metrics(run_dir))


def checkpoint_file(path: str | os.PathLike) -> Path:
    """The checkpoint a path names: the file itself, or in a run directory best.pt, else last.pt."""
    path = Path(path)
    if not path.is_dir():
        return path
    return path / (BEST if (path / BEST).exists() else LAST)


def result_file(checkpoint: str | os.PathLike, kind: str, weights: str = "raw", suffix: str = ".json") -> Path:
    """Where `flatrobust eval` (kind "eval"), `landscape` ("landscape", and its figures "landscape" and "landscape_2d"
    with suffix ".png") and `flatness` ("flatness") write their results of a checkpoint file by default: beside it,
    named after it (best.pt -> eval_best.json, last.pt -> landscape_last.json, my_weights.pt -> flatness_my_weights.json;
    with the moving average of the weights, eval_best_ema.json), so analysing one checkpoint never overwrites another's."""
    checkpoint = Path(checkpoint)
    return checkpoint.parent / f"{kind}_{checkpoint.stem}{'_ema' if weights == 'ema' else ''}{suffix}"


def result_files(run_dir: str | os.PathLike, kind: str) -> list[Path]:
    """The results of one kind ("eval", "landscape", "flatness") in a run directory, best.pt's first: KIND_best.json,
    KIND_best_ema.json, KIND_last.json, KIND_last_ema.json, the other KIND_*.json, then the KIND.json (KIND_ema.json)
    that runs analysed before there was one file per checkpoint have."""
    run_dir = Path(run_dir)
    found = [p for p in run_dir.glob(f"{kind}*.json") if p.is_file() and (p.name == f"{kind}.json" or p.name.startswith(f"{kind}_"))]
    rank = {f"{kind}_{name}.json": i for i, name in enumerate(("best", "best_ema", "last", "last_ema"))}
    rank.update({f"{kind}.json": 5, f"{kind}_ema.json": 6})
    return sorted(found, key=lambda p: (rank.get(p.name, 4), p.name))


def eval_file(checkpoint: str | os.PathLike, weights: str = "raw") -> Path:
    """`result_file` of `flatrobust eval`: eval_best.json for best.pt (eval_best_ema.json with the EMA weights)."""
    return result_file(checkpoint, "eval", weights)


def eval_files(run_dir: str | os.PathLike) -> list[Path]:
    """`result_files` of `flatrobust eval`: eval_best.json, eval_best_ema.json, eval_last.json, ..., eval.json."""
    return result_files(run_dir, "eval")
