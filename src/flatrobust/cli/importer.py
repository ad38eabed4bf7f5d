"""`flatrobust import robustbench:<Name>`: a RobustBench model as a flatrobust checkpoint (no download, ever).

    flatrobust import robustbench:Wu2020Adversarial --data cifar10:./data          # ./models/cifar10/Linf/Wu2020Adversarial.pt
    flatrobust import robustbench:Wu2020Adversarial --data cifar10 --threat L2 --weights wu_l2.pt --out runs/wu_l2
    flatrobust eval runs/robustbench/Wu2020Adversarial/model.pt                     # then every command takes it

Writes OUT/model.pt (default OUT: runs/robustbench/<Name>): the run config (`model: robustbench:<Name>`,
its dataset and threat model, the data, PGD at RobustBench's leaderboard radius unless --eps) and the
zoo network's weights. A thin layer over `flatrobust.robustbench_import.import_model`.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import UserError
from .common import add_quiet_argument


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", metavar="robustbench:NAME", help="a model of RobustBench's zoo, e.g. robustbench:Wu2020Adversarial")
    p.add_argument("--data", required=True, metavar="SPEC",
                   help="the data to analyse it on: NAME[:ROOT] (cifar10:./data, cifar100:./data, imagefolder:DIR) or a recipe YAML")
    p.add_argument("--threat", default="Linf", help="RobustBench's threat model: Linf (default) or L2")
    p.add_argument("--dataset", default=None, help="RobustBench's dataset (cifar10, cifar100, imagenet); default: --data's name")
    p.add_argument("--eps", default=None, help="attack radius of the analyses (e.g. 8/255); default: RobustBench's leaderboard radius")
    p.add_argument("--model-dir", default="models", help="RobustBench's cache folder: weights at DIR/<dataset>/<threat>/<Name>.pt (default: models)")
    p.add_argument("--weights", default=None, help="the weights file itself, instead of the cache layout")
    p.add_argument("--out", default=None, help="folder of the checkpoint (default: runs/robustbench/<Name>)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT/model.pt if it exists")
    add_quiet_argument(p)  # nothing to quiet here (no progress): accepted so that one script can pass it to every command


def run(args: argparse.Namespace) -> int:
    from ..models import robustbench_zoo
    from ..robustbench_import import import_model
    from .common import data_from_arg, parse_pixels

    if not args.model.startswith(robustbench_zoo.PREFIX):
        raise UserError(f"flatrobust import takes robustbench:<Name>, got {args.model!r} (e.g. robustbench:Wu2020Adversarial)")
    try:
        robustbench_zoo.check(args.model)
    except ValueError as e:
        raise UserError(str(e)) from None
    name = args.model[len(robustbench_zoo.PREFIX):]
    if args.model_dir != "models" and args.weights:
        raise UserError("give --model-dir (RobustBench's cache layout) or --weights (the file itself), not both")
    eps = parse_pixels(args.eps, "--eps") if args.eps is not None else None
    data = data_from_arg(args.data)
    out = Path(args.out) if args.out else Path("runs") / "robustbench" / name
    path = import_model(name, data, out=out, threat_model=args.threat, dataset=args.dataset, eps=eps, model_dir=args.model_dir,
                        weights=args.weights, overwrite=args.overwrite)
    print(f"wrote {path}: robustbench:{name} as a flatrobust checkpoint; next: flatrobust eval {path}")
    return 0
