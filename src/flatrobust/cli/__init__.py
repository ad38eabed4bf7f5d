"""The `flatrobust` command: one module per subcommand, each with `add_arguments(parser)` and `run(args) -> int`.

Every subcommand is a thin layer over the public library API. Bad input raises `UserError`, printed as
one line `flatrobust: error: ...` with exit status 2 (no traceback).
"""
from __future__ import annotations

import argparse
import importlib
import re
import sys

from ..errors import UserError

# subcommand -> (module, one-line help). Modules are imported lazily so `flatrobust --help` is fast.
COMMANDS = {
    "train": ("train", "train a model from a recipe (AT, TRADES, MART, with or without AWP)"),
    "eval": ("evaluate", "evaluate a checkpoint: clean, FGSM, PGD, CW, AutoAttack, with trust checks"),
    "landscape": ("landscape", "1-D / 2-D weight loss landscape of a checkpoint (filter-normalized)"),
    "flatness": ("flatness", "average- and worst-case flatness of a checkpoint (Stutz et al.)"),
    "report": ("report", "Markdown report with figures comparing run directories"),
    "pseudolabel": ("pseudolabel", "pseudo-label extra images with a checkpoint, for robust self-training (RST)"),
    "import": ("importer", "a RobustBench model (robustbench:<Name>, local weights file) as a flatrobust checkpoint"),
    "export": ("export", "a checkpoint in RobustBench's format (weights, model info, zoo entry) or as a plain state_dict"),
    "config": ("config", "list every recipe key with its default and meaning (flatrobust config awp: one section)"),
}


EPILOG = """\
`flatrobust COMMAND --help` shows a command's options; the same names mean the same everywhere (--split,
--n, --seed, --eps, --norm, --steps, --step-size, --data-root, --device, --out, --weights, --quiet).
`flatrobust config` lists every recipe key with its default and meaning.
Docs: README.md, docs/DATA.md (data), docs/EVALUATION.md (eval), docs/ANALYSIS.md (landscape, flatness, report),
docs/RELIABILITY.md (resume, errors, trust), docs/PERFORMANCE.md, in the source tree of flatrobust."""


def _module(name: str):
    return importlib.import_module(f"{__name__}.{COMMANDS[name][0]}")


_DASH_VALUE = re.compile(r"-\.?\d")  # a value such as -1:1:21, -1,0,1 or -.5 (argparse reads it as an option)


def _attach_dash_values(argv: list[str], parser: argparse.ArgumentParser) -> list[str]:
    """`--alphas -1:1:5` -> `--alphas=-1:1:5` for every option of `parser` that takes a value.

    argparse takes an argument that starts with '-' for an option unless it is a plain negative number.
    """
    out, i = [], 0
    while i < len(argv):
        action = parser._option_string_actions.get(argv[i])  # noqa: SLF001 - argparse has no public lookup
        if action is not None and action.nargs is None and i + 1 < len(argv) and _DASH_VALUE.match(argv[i + 1]):
            out.append(f"{argv[i]}={argv[i + 1]}")
            i += 2
        else:
            out.append(argv[i])
            i += 1
    return out


def one_line(text: str) -> str:
    """`text` with every control character escaped as Python writes it ("\\n"): a name that reached a message
    unquoted (a file called "x\\nflatrobust: error: ...") can never print a line of its own."""
    return text if text.isprintable() else "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="flatrobust", description="Adversarial training with Adversarial Weight Perturbation (AWP).",
                                     epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    from .. import __version__

    parser.add_argument("--version", action="version", version=f"flatrobust {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    wanted = argv[0] if argv and argv[0] in COMMANDS else None
    chosen = parser
    for name, (_, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == wanted:  # only the chosen subcommand's module is imported
            chosen = p  # a bad option is told with this subcommand's usage, not the top level's
            try:
                _module(name).add_arguments(p)
            except ModuleNotFoundError as e:
                if e.name == f"{__name__}.{COMMANDS[name][0]}":
                    parser.error(f"subcommand {name!r} is not available in this version")
                raise
            argv = _attach_dash_values(argv, p)
    args, extra = parser.parse_known_args(argv)
    # key=value overrides may come after options (`train r.yaml --quiet epochs=3`): argparse leaves them over
    overrides = [a for a in extra if "=" in a and not a.startswith("-")]
    if len(overrides) != len(extra) or (overrides and not hasattr(args, "overrides")):
        chosen.error(f"unrecognized arguments: {' '.join(a for a in extra if a not in overrides or not hasattr(args, 'overrides'))}")
    if overrides:
        args.overrides = list(args.overrides) + overrides
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return int(_module(args.command).run(args) or 0)
    except UserError as e:
        print(f"flatrobust: error: {one_line(str(e))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("flatrobust: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
