"""What the subcommands share, so that none imports another: the --trust-model-code consent (eval, landscape,
flatness, pseudolabel), `--eps`-style pixel values and `--data NAME[:ROOT]` specs (eval, import), and for `landscape`
and `flatness` their common arguments, the checkpoint with its evaluation examples and threat model, where results
go, and what a result file records about its origin.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import re
from fractions import Fraction
from pathlib import Path
from typing import Any

import torch

from ..errors import UserError
from ..rundir import checkpoint_file, result_file


_NUMBER = r"\s*[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?\s*"


def parse_pixels(text: str, what: str) -> float:
    """'8/255', '0.031', '128/255' -> float; UserError (one line) for anything else or a negative value."""
    m = re.fullmatch(f"({_NUMBER})(/({_NUMBER}))?", text)
    if not m:
        raise UserError(f"{what} must be a number or a fraction such as 8/255, got {text!r}")
    value = float(m.group(1))
    if m.group(6) is not None:
        den = float(m.group(6))
        if den == 0:
            raise UserError(f"{what} {text!r} divides by zero")
        value /= den
    if not math.isfinite(value) or value < 0:
        raise UserError(f"{what} must be >= 0, got {text!r}")
    return value


def data_from_arg(text: str) -> dict:
    """`--data`: NAME[:ROOT] or a recipe YAML (its data: section) -> the validated data section as a dict."""
    from ..config import config_from_dict, read_yaml

    if Path(text).suffix in (".yaml", ".yml"):
        tree = read_yaml(text)  # one-line UserError when missing or not YAML
        if not isinstance(tree.get("data"), dict):
            raise UserError(f"--data {text}: the recipe has no data: section (write e.g. data: {{name: imagefolder, root: DIR}})")
        tree = tree["data"]
    else:
        name, sep, root = text.partition(":")
        if not name or (sep and not root):
            raise UserError(f"--data {text!r}: write NAME[:ROOT], e.g. imagefolder:data/pets or cifar10:./data, or a recipe .yaml")
        tree = {"name": name, **({"root": root} if sep else {})}
    try:
        return dataclasses.asdict(config_from_dict({"data": tree}).data)
    except UserError as e:
        raise UserError(f"--data {text}: {e}") from None


def number(text: str) -> float:
    """A float, also written as a fraction ("8/255")."""
    try:
        return float(Fraction(text.strip())) if "/" in text else float(text)
    except (ValueError, ZeroDivisionError):
        raise UserError(f"{text!r} is not a number (write e.g. 0.031 or 8/255)") from None


def add_common_arguments(parser: argparse.ArgumentParser, n_default: int) -> None:
    parser.add_argument("checkpoint", help="a .pt file written by `flatrobust train`, or its run directory (best.pt, else last.pt)")
    parser.add_argument("--split", choices=("train", "test"), default="test", help="the run's split to measure on (default: test)")
    parser.add_argument("--data", dest="split", choices=("train", "test"), help=argparse.SUPPRESS)  # the former name of --split
    parser.add_argument("--n", type=int, default=n_default, help=f"examples: a fixed subset of N drawn with --seed (default: {n_default})")
    parser.add_argument("--seed", type=int, default=0, help="subset, random directions / draws and PGD random starts (default: 0)")
    parser.add_argument("--eps", default=None, help="attack radius, overrides the checkpoint's attack.eps (e.g. 8/255)")
    parser.add_argument("--norm", choices=("linf", "l2"), default=None, help="attack norm, overrides attack.norm (needs --eps)")
    parser.add_argument("--steps", type=int, default=None, help="PGD steps, overrides attack.steps")
    parser.add_argument("--step-size", default=None, help="PGD step size (e.g. 2/255); default: the checkpoint's attack.alpha, "
                                                          "or with --eps (or a run trained with attack.kind fgsm, free or none) the "
                                                          "default step for the radius (eps/4 for linf, eps*15/128 for l2)")
    parser.add_argument("--batch-size", type=int, default=256, help="examples per PGD batch (default: 256)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="default: cuda when available")
    parser.add_argument("--out", default=None, help="output folder, whose files keep the command's plain names (default: the "
                                                    "checkpoint's folder, with files named after the checkpoint, e.g. "
                                                    "flatness_best.json for best.pt)")
    parser.add_argument("--weights", choices=("raw", "ema"), default="raw",
                        help="the trained weights (default) or their moving average (runs with ema.decay > 0; files get an _ema suffix)")
    add_data_root_argument(parser)
    add_trust_argument(parser)
    add_quiet_argument(parser)


def add_quiet_argument(parser: argparse.ArgumentParser) -> None:
    """--quiet: no progress bar or heartbeat lines (results and errors are still printed), in every command."""
    parser.add_argument("--quiet", action="store_true", help="no progress bar or heartbeat lines")


def add_data_root_argument(parser: argparse.ArgumentParser) -> None:
    """--data-root: where the run's data is now, the same option in every command that reads a run's data."""
    parser.add_argument("--data-root", default=None, metavar="PATH",
                        help="the run's data at another place (a folder, or the .npz file); default: the checkpoint's data.root, "
                             "stored as an absolute path by `flatrobust train`")


def add_trust_argument(parser: argparse.ArgumentParser) -> None:
    """--trust-model-code: the user's consent to import the module of a model that a checkpoint's config names."""
    parser.add_argument("--trust-model-code", action="store_true",
                        help="import the module of a package.module:callable model that the checkpoint's config names (a "
                             "checkpoint never chooses code to run otherwise; docs/RELIABILITY.md)")


def resolve_attack(cfg: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """The checkpoint's threat model with the command line's overrides, as `attacks.AttackConfig` checks it (a dict).

    A new radius (--eps) without a step (--step-size) gets the default step for it, not the checkpoint's."""
    from ..attacks import AttackConfig

    base = cfg.get("attack") or {}
    if args.norm is not None and args.norm != base.get("norm") and args.eps is None:
        raise UserError(f"--norm {args.norm} differs from the checkpoint's norm {base.get('norm')!r}: give --eps for it too")
    attack = {
        "norm": args.norm or base.get("norm", "linf"),
        "eps": number(args.eps) if args.eps is not None else base.get("eps"),
        # an FGSM or standard training run's attack.alpha is no PGD step: its PGD takes the default step
        "alpha": number(args.step_size) if args.step_size is not None else None if args.eps is not None or base.get("kind", "pgd") != "pgd"
        else base.get("alpha"),
        "steps": args.steps if args.steps is not None else base.get("steps"),
    }
    for key, value in attack.items():
        if value is None and not (key == "alpha" and (args.eps is not None or base.get("kind", "pgd") != "pgd")):
            raise UserError(f"the checkpoint's config has no attack.{key}: give it on the command line")
    attack = {k: (number(v) if isinstance(v, str) and k in ("eps", "alpha") else v) for k, v in attack.items()}
    try:
        return AttackConfig.of(attack).as_dict()
    except ValueError as e:
        raise UserError(f"the attack {attack}: {e}") from None


def load_for_analysis(args: argparse.Namespace):
    """(model in eval mode, checkpoint dict, x, y, attack, device) from the arguments; the --out folder is created."""
    from ..checkpoint import checkpoint_split, model_from_checkpoint
    from ..machine import resolve_device

    if args.n < 1:
        raise UserError(f"--n must be >= 1, got {args.n}")
    if args.batch_size < 1:
        raise UserError(f"--batch-size must be >= 1, got {args.batch_size}")
    device = resolve_device(args.device, option="--device")
    model, ckpt = model_from_checkpoint(args.checkpoint, device, weights=args.weights, trust_code=args.trust_model_code)
    attack = resolve_attack(ckpt["config"], args)
    data = checkpoint_split(ckpt, args.split, root=args.data_root, download=False, progress=not args.quiet).subset(args.n, args.seed).to(device)
    if args.out:
        try:
            Path(args.out).mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UserError(f"cannot create the output folder {args.out}: {e.strerror}") from None
    return model, ckpt, data.x, data.y, attack, device


def header(args: argparse.Namespace, ckpt: dict[str, Any], n: int, device: torch.device) -> dict[str, Any]:
    """What a result file records about where its numbers come from."""
    from .. import __version__
    from ..data.builtin import WITHOUT_FILES

    cfg = ckpt["config"]
    path = Path(args.checkpoint).resolve()
    return {
        "checkpoint": str(checkpoint_file(args.checkpoint)),  # the file, also when a run directory was given
        "run": cfg.get("name") or (path.name if path.is_dir() else path.parent.name),
        "model": cfg.get("model"),
        "weights": args.weights,
        "epoch": ckpt.get("epoch"),
        "data": {"name": cfg["data"]["name"], "split": args.split, "n": n, "subset_seed": args.seed,
                 **({} if cfg["data"]["name"] in WITHOUT_FILES else {"root": args.data_root or cfg["data"].get("root")})},
        "device": str(device),
        "torch": torch.__version__,
        "flatrobust": __version__,
    }


def output_file(args: argparse.Namespace, kind: str, suffix: str) -> Path:
    """Where `landscape` and `flatness` write a result: beside the checkpoint, named after it as `flatrobust eval`
    names its file (`rundir.result_file`: landscape_best.json, flatness_last_ema.json), so analysing last.pt never
    overwrites best.pt's; inside an explicit --out folder, the plain name (kind + suffix, "_ema" before the suffix for
    --weights ema), as before (study/study.py gives each analysis its own folder)."""
    if args.out:
        return Path(args.out) / f"{kind}{'_ema' if args.weights == 'ema' else ''}{suffix}"
    return result_file(checkpoint_file(args.checkpoint), kind, args.weights, suffix)
