"""`flatrobust config [PREFIX]`: every config key of a recipe, its default and its meaning.

Generated from `flatrobust.config`'s dataclasses and their comments (`config.describe_keys`), so it cannot drift
from the code. A recipe sets any subset of them; `flatrobust train RECIPE key.sub=value` overrides one.
"""
from __future__ import annotations

import argparse

from ..errors import UserError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("prefix", nargs="?", default="", help="only the keys that start with this, e.g. awp or data.root")


def run(args: argparse.Namespace) -> int:
    from ..config import describe_keys

    rows = [r for r in describe_keys() if r[0].startswith(args.prefix)]
    if not rows:
        raise UserError(f"no config key starts with {args.prefix!r}: run `flatrobust config` for all of them")
    wk, wd = max(len(r[0]) for r in rows), min(max(len(r[1]) for r in rows), 24)
    for key, default, meaning in rows:
        print(f"{key:<{wk}}  {default:<{wd}}  {meaning}".rstrip())
    return 0
