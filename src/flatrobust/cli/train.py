"""`flatrobust train RECIPE.yaml [key=value ...]` and `flatrobust train --resume RUN_DIR`."""
from __future__ import annotations

import argparse
import shlex
import signal
import sys
import threading
from pathlib import Path

from ..errors import UserError
from . import one_line


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("recipe", nargs="?", help="YAML recipe (see recipes/); omit with --resume")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. awp.gamma=0.01 epochs=5 attack.eps=8/255")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue a stopped run from RUN_DIR/last.pt (overrides allowed, e.g. epochs=30)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run directory of the same name")
    p.add_argument("--quiet", action="store_true", help="no progress bar or per-epoch lines")
    p.add_argument("--data-root", default=None, metavar="PATH",
                   help="the data at this place (a folder, or the .npz file): the same as data.root=PATH, and with --resume "
                        "the run's data moved elsewhere")


def run(args: argparse.Namespace) -> int:
    from ..config import load_config, resume_config
    from ..train import NonFiniteError, fit

    overrides = list(args.overrides) + ([f"data.root={args.data_root}"] if args.data_root is not None else [])
    if args.resume:
        if args.recipe is not None:
            if "=" not in args.recipe:
                raise UserError("with --resume the run directory's own config.yaml is used: pass only key=value overrides")
            overrides.insert(0, args.recipe)
        cfg = resume_config(args.resume, overrides)
    else:
        if args.recipe is None:
            raise UserError("no recipe given: flatrobust train recipes/digits_at_awp.yaml [key=value ...]")
        if "=" in args.recipe and not args.recipe.endswith((".yaml", ".yml")):
            cfg = load_config(None, [args.recipe] + overrides)  # only overrides, no file
        else:
            cfg = load_config(args.recipe, overrides)
    run_dir = Path(args.resume) if args.resume else Path(cfg.out_dir) / cfg.name
    signals = _interruptible()
    try:
        with signals:
            fit(cfg, resume_dir=args.resume, overwrite=args.overwrite, progress=not args.quiet)
    except NonFiniteError as e:  # not bad input: the run itself diverged (exit 3, checkpoints kept)
        print(f"flatrobust: error: {one_line(str(e))}", file=sys.stderr)
        return 3
    except KeyboardInterrupt:
        name = signals.caught[0] if signals.caught else "SIGINT"
        if not (run_dir / "config.yaml").is_file():
            print(f"flatrobust: interrupted by {name} before the run started: nothing was written", file=sys.stderr)
        else:
            where = ("from its last checkpoint, exactly" if (run_dir / "last.pt").is_file()
                     else "no checkpoint was written yet: from epoch 0")
            print(f"flatrobust: interrupted by {name}: the run can be resumed ({where}) with: "
                  f"flatrobust train --resume {shlex.quote(str(run_dir))}", file=sys.stderr)
        return 128 + getattr(signal, name)
    return 0


class _interruptible:
    """SIGTERM (what `kill`, a scheduler or a closing session sends) ends training as Ctrl-C (SIGINT) does: a
    KeyboardInterrupt, which lets every write in flight finish or be undone (`atomic.write_atomic`) and the run's
    lock go; the signal's name is kept for the message. Handlers are installed in the main thread only."""

    def __init__(self) -> None:
        self.caught: list[str] = []  # the names of the signals received
        self.old: dict = {}

    def __enter__(self) -> _interruptible:
        def handler(signum, frame):
            self.caught.append(signal.Signals(signum).name)
            raise KeyboardInterrupt

        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self.old[sig] = signal.signal(sig, handler)
        return self

    def __exit__(self, *exc) -> None:
        for sig, old in self.old.items():
            signal.signal(sig, old)
