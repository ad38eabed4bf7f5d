"""One writer per run directory: `flatrobust train` (a new run, `--overwrite`, `--resume`) holds RUN_DIR/.lock.

Two processes writing the same run interleave or duplicate its epochs in metrics.jsonl and overwrite each other's
checkpoints, so the second one is refused in one line naming the first one's PID. The lock is an advisory
`flock` on the file, which the kernel releases when its process ends however it ends (SIGKILL, a crash, a lost
session): a lock left by a dead process never blocks, and there is no staleness to guess. The file holds the PID
of its holder, for the message, and is removed when the holder lets go (a SIGKILLed holder leaves it, unlocked).
Without `fcntl` (Windows) nothing is locked.
"""
from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

from .errors import UserError

try:
    import fcntl
except ImportError:  # pragma: no cover - not on POSIX
    fcntl = None

__all__ = ["LOCK", "RunBusyError", "hold"]

LOCK = ".lock"


class RunBusyError(UserError):
    """Another live process holds the run directory's lock."""


def _holder(fd: int) -> str:
    """The PID written in a held lock file (what its holder wrote), or 'unknown'."""
    with contextlib.suppress(OSError, ValueError):
        return str(int(os.pread(fd, 32, 0).split()[0]))
    return "unknown"


def _same_file(fd: int, path: Path) -> bool:
    """Whether `path` still names the file open as `fd` (its holder may have removed it between our open and our lock)."""
    try:
        return os.stat(path).st_ino == os.fstat(fd).st_ino
    except FileNotFoundError:
        return False


@contextlib.contextmanager
def hold(run_dir: str | os.PathLike) -> Iterator[None]:
    """Hold RUN_DIR/.lock (the folder is created if needed, and removed again if it is left empty); RunBusyError
    (one line naming the holder's PID) if a live process holds it."""
    run_dir = Path(run_dir)
    made = not run_dir.exists()
    if fcntl is None:
        yield
        return
    path = run_dir / LOCK
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                pid = _holder(fd)
                os.close(fd)
                raise RunBusyError(f"{str(run_dir)!r} is being written by process {pid} (it holds {str(path)!r}): wait for it "
                                   f"to end or stop it (kill {pid}); two writers would mix their epochs and checkpoints") from None
            if _same_file(fd, path):
                break
            os.close(fd)  # we locked a file its holder had just removed: lock the one now at `path`
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    except OSError as e:
        raise UserError(f"cannot lock {str(path)!r}: {e.strerror or e}") from None
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            path.unlink()  # before letting go, so that a waiting process never locks a removed file (`_same_file`)
        os.close(fd)
        if made:
            with contextlib.suppress(OSError):
                run_dir.rmdir()  # only if empty: a run that did not start leaves no folder
