"""`flatrobust train RECIPE.yaml [key=value ...]` and `flatrobust train --resume RUN_DIR`."""
from __future__ import annotations

import argparse
import sys

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
    try:
        fit(cfg, resume_dir=args.resume, overwrite=args.overwrite, progress=not args.quiet)
    except NonFiniteError as e:  # not bad input: the run itself diverged (exit 3, checkpoints kept)
        print(f"flatrobust: error: {one_line(str(e))}", file=sys.stderr)
        return 3
    return 0
