"""`flatrobust report RUN_DIR [RUN_DIR ...]`: one Markdown report with figures comparing runs.

Built on `flatrobust.report.write_report`; see that module for what the report contains.
"""
from __future__ import annotations

import argparse
import shlex


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run directories written by `flatrobust train`")
    parser.add_argument("--out", default="report", help="output folder for report.md and its figures (default: ./report)")
    parser.add_argument("--quiet", action="store_true", help="print nothing but errors")


def run(args: argparse.Namespace) -> int:
    from ..report import write_report

    command = shlex.join(["flatrobust", "report", *map(str, args.runs), "--out", str(args.out)])
    path = write_report(args.runs, args.out, command=command)
    if not args.quiet:
        print(f"wrote {path}")
    return 0
