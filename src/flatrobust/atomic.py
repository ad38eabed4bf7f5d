"""Files written atomically: a crash at any moment leaves the previous file or the new one, never half of one.

`write_atomic` is the primitive (checkpoints, the run directory's files, the evaluation store), `write_json` the one
JSON writer of the library and the CLI (eval_best.json, landscape_best.json, flatness_best.json, the store's manifest); a write that
fails (disk full, no permission) is one `WriteError` line naming the file.
"""
from __future__ import annotations

import errno
import json
import os
import secrets
from pathlib import Path
from typing import Any, BinaryIO, Callable

from .errors import UserError


class WriteError(UserError):
    """A file that could not be written (disk full, no permission, ...): one line naming it; the previous
    file at that path, if any, is kept and no temporary file is left."""


def _oserror(e: BaseException) -> OSError | None:
    """The OSError behind `e`: itself, or the one a writer (torch.save's "unexpected pos") raised from."""
    seen = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, OSError):
            return e
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return None


def write_atomic(path: str | os.PathLike, write: Callable[[BinaryIO], None]) -> None:
    """Call `write(f)` on a temporary file in `path`'s folder, fsync it, rename it to `path`, fsync the folder.

    A crash at any moment leaves either the previous file at `path` or the new one, never half of one,
    and no temporary file behind. The file gets the mode of any file the user creates (0666 less the umask),
    as `open` would give it. A write that fails for lack of space or permission raises `WriteError` (one
    line naming `path` and the reason).
    """
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(100):  # mkstemp's way to a fresh name, but with open()'s mode 0666 & ~umask, not 0600
            tmp = path.parent / f".{path.name}.{secrets.token_hex(4)}.tmp"
            try:
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
                break
            except FileExistsError:
                continue
        else:
            raise FileExistsError(f"no free temporary name beside {path}")
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        dir_fd = os.open(path.parent, os.O_RDONLY)  # make the rename itself durable
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except BaseException as e:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
        cause = _oserror(e) if isinstance(e, Exception) else None
        if cause is not None:
            full = " (the disk is full)" if cause.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", -1)) else ""
            raise WriteError(f"cannot write {str(path)!r}: {cause.strerror or cause}{full}; "
                             f"{'the previous file is kept' if path.exists() else 'nothing was written'}") from None
        raise


def write_json(path: str | os.PathLike, obj: Any, *, indent: int = 2) -> None:
    """`obj` as JSON (and a final newline) to `path`, atomically; the folder is created if needed."""
    text = json.dumps(obj, indent=indent) + "\n"
    write_atomic(path, lambda f: f.write(text.encode()))
