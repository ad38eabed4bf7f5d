"""Finished work of a long evaluation kept on disk, batch by batch, so that an interrupted evaluation continues.

A store is a folder (`flatrobust eval` uses `eval_best.parts/` beside `eval_best.json`, the result file's name with .parts):

    manifest.json        what the stored work was computed from: fingerprints (sha256) of the model's
                         weights and of the data, threat model, PGD step, seed, batch size, chunk size, device type
    ATTACK.CHUNK.pt      one finished chunk (consecutive batches) of one attack: which examples stayed robust,
                         seconds, largest perturbation, examples outside the threat model, AutoAttack's
                         per-stage masks and warnings, and the state of the attack's random generator after it
    ATTACK.CHUNK.part.pt the finished batches of the chunk in progress, one such record per batch, rewritten
                         after every batch; replaced by ATTACK.CHUNK.pt once the chunk is finished

The grain is one batch: every file is written atomically (`atomic.write_atomic`), so an interruption
at any moment loses at most the batch in progress. `open_store` refuses a folder whose manifest differs
from the evaluation asked for (one line naming what differs); records are per attack and an attack's
randomness depends only on (seed, attack name), so a rerun may add or drop attacks and still reuse the
others' records.
"""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .atomic import write_atomic, write_json
from .errors import UserError

MANIFEST = "manifest.json"


def fingerprint_tensors(tensors: list[tuple[str, torch.Tensor]]) -> str:
    """sha256 over names, dtypes, shapes and bytes of the tensors (moved to the CPU once)."""
    h = hashlib.sha256()
    for name, t in tensors:
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def fingerprint_model(model: nn.Module) -> str:
    return fingerprint_tensors(list(model.state_dict().items()))


class ChunkStore:
    def __init__(self, folder: Path):
        self.folder = folder

    def _path(self, attack: str, chunk: int, part: bool = False) -> Path:
        return self.folder / f"{attack}.{chunk:05d}{'.part' if part else ''}.pt"

    def _read(self, path: Path) -> Any:
        if not path.exists():
            return None
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception:  # noqa: BLE001 - a damaged file is recomputed, never trusted
            return None

    def load(self, attack: str, chunk: int) -> dict | None:
        """A finished chunk, or None if it is not there (or unreadable: it is then computed again)."""
        record = self._read(self._path(attack, chunk))
        return record if isinstance(record, dict) else None

    def load_part(self, attack: str, chunk: int) -> list[dict]:
        """The finished batches of an unfinished chunk, in order ([] if none, or unreadable)."""
        records = self._read(self._path(attack, chunk, part=True))
        ok = isinstance(records, list) and all(isinstance(r, dict) for r in records)
        return records if ok else []

    def save_part(self, attack: str, chunk: int, records: list[dict]) -> None:
        write_atomic(self._path(attack, chunk, part=True), lambda f: torch.save(records, f))

    def save(self, attack: str, chunk: int, record: dict) -> None:
        """The finished chunk; its batches' part file, now redundant, is removed after it is written."""
        write_atomic(self._path(attack, chunk), lambda f: torch.save(record, f))
        self._path(attack, chunk, part=True).unlink(missing_ok=True)


def open_store(folder: str | Path, key: dict[str, Any], *, restart: bool = False) -> ChunkStore:
    """The store in `folder` for an evaluation described by `key` (JSON values), created if needed.

    UserError (one line) if `folder` holds chunks of an evaluation with another key; `restart` deletes them first.
    """
    folder = Path(folder)
    manifest = folder / MANIFEST
    if restart and folder.exists():
        shutil.rmtree(folder)
    if manifest.exists():
        try:
            stored = json.loads(manifest.read_text())
        except (OSError, json.JSONDecodeError):
            stored = None
        if not isinstance(stored, dict) or stored != key:
            differs = [k for k in key if not isinstance(stored, dict) or stored.get(k) != key[k]] or ["its manifest"]
            raise UserError(f"{folder} holds partial results of an evaluation with other arguments ({', '.join(differs)} "
                            "differ): pass --restart (restart=True in Python) to delete them and start over, or write the results elsewhere")
    elif folder.exists() and any(folder.iterdir()):
        raise UserError(f"{folder} exists and is not a store of partial evaluation results (no {MANIFEST}): "
                        "move it away or write the results elsewhere")
    else:
        write_json(manifest, key)
    return ChunkStore(folder)
