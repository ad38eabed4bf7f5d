"""`flatrobust export CHECKPOINT`: a checkpoint in RobustBench's format, or as a plain state_dict.

    flatrobust export runs/cifar10_wrn34_10_at_awp/best.pt --robustbench rb --name Me2026AWP
    flatrobust export runs/cifar10_wrn34_10_at_awp/best.pt --format state_dict --out awp_wrn34_10.pt

--robustbench DIR writes DIR/<dataset>/<threat>/<Name>.pt (the state_dict RobustBench's zoo architecture
loads strictly), a .safetensors copy beside it, DIR/model_info/<dataset>/<threat>/<Name>.json (filled from
the checkpoint's evaluation (eval_best.json for best.pt; an older eval.json is read too), which must be standard AutoAttack on the whole test split with every trust
check passed) and DIR/model_zoo/<dataset>/<threat>/<Name>.py (the zoo entry to add to robustbench).
--format state_dict writes OUT.pt (model.state_dict(), normalization layer included) and OUT.safetensors.
A thin layer over `flatrobust.robustbench_export`.
"""
from __future__ import annotations

import argparse

from ..errors import UserError
from .common import add_quiet_argument


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help="a .pt file written by `flatrobust train` (or `flatrobust import`), or its run directory")
    p.add_argument("--format", choices=("robustbench", "state_dict"), default="robustbench",
                   help="robustbench (default): RobustBench's layout with --robustbench DIR; state_dict: plain weights with --out FILE.pt")
    p.add_argument("--robustbench", metavar="DIR", default=None, help="folder to write RobustBench's layout into (RobustBench's model_dir)")
    p.add_argument("--name", default=None, help="the model's RobustBench name, e.g. Me2026Flatter (default: the run's name)")
    p.add_argument("--eval", default=None, metavar="FILE",
                   help="the eval.json to fill the model info from (default: eval_<checkpoint name>.json, _ema with --weights ema, beside the checkpoint; else an older eval.json)")
    p.add_argument("--out", default=None, metavar="FILE.pt", help="with --format state_dict: where to write (a .safetensors copy goes beside it)")
    p.add_argument("--weights", choices=("raw", "ema"), default="raw", help="the trained weights (default) or their moving average")
    p.add_argument("--overwrite", action="store_true", help="replace files that exist")
    add_quiet_argument(p)  # nothing to quiet here (no progress): accepted so that one script can pass it to every command


def run(args: argparse.Namespace) -> int:
    from ..robustbench_export import export_robustbench, export_state_dict

    if args.format == "state_dict":
        if args.out is None or args.robustbench is not None or args.name is not None or args.eval is not None:
            raise UserError("--format state_dict takes --out FILE.pt (and --weights), not --robustbench, --name or --eval")
        for path in export_state_dict(args.checkpoint, args.out, weights=args.weights, overwrite=args.overwrite):
            print(f"wrote {path}")
        return 0
    if args.robustbench is None or args.out is not None:
        raise UserError("export in RobustBench's format takes --robustbench DIR (its model_dir); --out goes with --format state_dict")
    result = export_robustbench(args.checkpoint, args.robustbench, name=args.name, weights=args.weights, eval_path=args.eval,
                                overwrite=args.overwrite)
    for path in result["files"]:
        print(f"wrote {path}")
    info = result["model_info"]
    diff = result["max_logit_difference"]
    print(f"clean {info['clean_acc']}%, AutoAttack {info['autoattack_acc']}% at eps {info['eps']} ({info['dataset']}, {info['architecture']})")
    print("checked: RobustBench's architecture loads the weights strictly and gives the checkpoint's logits "
          f"(largest difference {diff:.1e})" if diff is not None else
          "not checked against RobustBench's architecture: robustbench is not installed here (pip install 'flatrobust[robustbench]')")
    print(f"fill in by hand before submitting: {', '.join(info['flatrobust']['to_fill'])} (in {result['files'][2]})")
    return 0
