"""`flatrobust eval CHECKPOINT`: the evaluation protocol on a checkpoint's test set, with trust checks.

    flatrobust eval runs/at_awp/best.pt                          # full test set, every attack, checks
    flatrobust eval runs/at_awp/best.pt --attacks clean,pgd20 --n 1000 --eps 8/255
    flatrobust eval weights.pt --model preactresnet18 --data imagefolder:data/pets --eps 8/255   # a plain state_dict

The threat model (norm, eps) comes from the checkpoint's training config unless overridden; the PGD step is the
protocol's (eps/4 for L-inf, eps * 15/128 for L2), not training's, unless --step-size gives one.
A plain state_dict file (`torch.save(model.state_dict())`, as `init_from` takes) has no config: `--model`
(and `--model-args`) name the architecture, `--data` the data (`NAME[:ROOT]` or a recipe's data section),
`--eps` the radius. On a flatrobust checkpoint `--model` alone builds that model instead of the one the
config names; a config naming `package.module:callable` is imported only with `--trust-model-code`.
Writes one file per checkpoint next to it (or --out): eval_best.json for best.pt, eval_last.json for last.pt,
eval_<name>.json for a weights file <name>.pt, with the resolved evaluation config and the command that
reproduces it, the checkpoint and its epoch, the training config, per-attack results, the trust checks, and
the versions used. `--weights ema` evaluates the moving average of the weights (runs trained with
ema.decay > 0) and writes eval_best_ema.json (eval_<name>_ema.json). While it runs, every finished batch of
every attack is kept in eval_best.parts/ (the result file's name with .parts) beside it (`flatrobust.evalstore`): the same command run again after an interruption says
in one line what was kept, computes only the rest and gives the result it would have given uninterrupted;
other arguments are refused until `--restart`. The folder is deleted once the JSON is written. A thin
layer over `flatrobust.evaluate.evaluate`.
"""
from __future__ import annotations

import argparse
import platform
import shlex
import shutil
import sys
from datetime import datetime, timezone
from pathlib import Path

import torch

from ..attacks import format_eps, whole_box_warning
from ..errors import UserError
from ..atomic import write_json
from ..evaluate import PROTOCOL, default_alpha, evaluate, format_table, require_autoattack, resolve_attacks
from ..machine import describe, resolve_device
from .common import add_data_root_argument, add_quiet_argument, add_trust_argument, data_from_arg, parse_pixels  # noqa: F401 - parse_pixels: the tests import it from here
from ..rundir import checkpoint_file, eval_file

def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help="a .pt file written by `flatrobust train`, or its run directory (best.pt, else last.pt); "
                                      "with --model, a plain state_dict file")
    p.add_argument("--model", default=None, metavar="NAME",
                   help="build this model instead of the one the checkpoint's config names: a built-in name (smallcnn, "
                        "preactresnet18, wrn34_10, ...), timm:<name>, or package.module:callable (your own builder); for a plain "
                        "state_dict file, with --data and --eps")
    p.add_argument("--model-args", default=None, help="with --model: the builder's keyword arguments as a YAML mapping, e.g. '{width: 16}'")
    p.add_argument("--data", default=None, metavar="SPEC",
                   help="with --model: the dataset (not a split: eval always uses the test split), as NAME[:ROOT] (e.g. cifar10:./data, imagefolder:DIR, npz:FILE.npz) "
                        "or a recipe YAML whose data: section is used")
    p.add_argument("--attacks", default=",".join(PROTOCOL),
                   help=f"comma-separated attacks, default the paper's protocol: {','.join(PROTOCOL)}")
    p.add_argument("--n", type=int, default=None, help="examples: a fixed subset of N drawn with --seed (default: the whole test "
                                                        "set, as the protocol asks; landscape and flatness default to 1000)")
    p.add_argument("--eps", default=None, help="radius in pixel units, e.g. 8/255 or 0.5; default: the checkpoint's attack.eps")
    p.add_argument("--step-size", dest="alpha", default=None,
                   help="PGD step size (same syntax); default: eps/4 for linf, eps*15/128 for l2")
    p.add_argument("--alpha", dest="alpha", help=argparse.SUPPRESS)  # the former name of --step-size
    p.add_argument("--norm", choices=("linf", "l2"), default=None, help="threat model; default: the checkpoint's attack.norm")
    p.add_argument("--batch-size", type=int, default=256, help="examples per attack call (default 256)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="auto: cuda when available (default)")
    p.add_argument("--out", default=None, help="where to write the results (default: eval_<checkpoint name>.json next to the checkpoint, "
                                                      "e.g. eval_best.json for best.pt)")
    p.add_argument("--seed", type=int, default=0, help="seeds the subset and every attack's randomness (default 0)")
    p.add_argument("--checks-n", type=int, default=200, help="examples the trust checks run on (default 200)")
    p.add_argument("--no-checks", action="store_true", help="skip the trust checks")
    p.add_argument("--weights", choices=("raw", "ema"), default="raw",
                   help="the trained weights (default) or their moving average (runs with ema.decay > 0); ema writes eval_<checkpoint name>_ema.json")
    p.add_argument("--chunk-size", type=int, default=None,
                   help="examples per file of finished batches kept on disk (a multiple of --batch-size; default the multiple "
                        "nearest to 1000); it changes no number, and an interruption loses at most one batch")
    p.add_argument("--restart", action="store_true", help="delete the partial results of an earlier run (OUT's .parts folder) and start over")
    add_data_root_argument(p)
    add_trust_argument(p)
    add_quiet_argument(p)


def _threat_model(args, cfg: dict) -> tuple[str, float, float | None]:
    attack = cfg.get("attack") or {}
    norm = args.norm or attack.get("norm")
    if norm not in ("linf", "l2"):
        raise UserError(f"the checkpoint's config has no usable attack.norm ({norm!r}): pass --norm linf or --norm l2")
    if args.eps is not None:
        eps = parse_pixels(args.eps, "--eps")
    elif isinstance(attack.get("eps"), (int, float)):
        eps = float(attack["eps"])
    else:
        raise UserError("the checkpoint's config has no attack.eps: pass --eps, e.g. --eps 8/255")
    # The evaluation step is the protocol's (default_alpha), not training's: a training recipe may use
    # a step that makes a weak evaluation attack (FGSM-RS trains with 1.25 * eps).
    alpha = parse_pixels(args.alpha, "--step-size") if args.alpha is not None else None
    return norm, eps, alpha


def _environment(device: torch.device) -> dict:
    from importlib.metadata import PackageNotFoundError, version

    from .. import __version__

    try:
        aa = version("pyautoattack")
    except PackageNotFoundError:
        aa = None
    return {"flatrobust": __version__, "torch": torch.__version__, "pyautoattack": aa,
            "python": platform.python_version(), **describe(device)}


def _model_args(args: argparse.Namespace) -> dict | None:
    """--model-args as a dict (None when not given)."""
    import yaml

    if args.model_args is None:
        return None
    try:
        model_args = yaml.safe_load(args.model_args)
    except yaml.YAMLError:
        model_args = None
    if not isinstance(model_args, dict) or not all(isinstance(k, str) for k in model_args):
        raise UserError(f"--model-args must be a YAML mapping such as '{{width: 16}}', got {args.model_args!r}")
    return model_args


def _state_dict_model(args: argparse.Namespace, device: torch.device):
    """(model, data section, DatasetInfo, model_args, test split) for a plain state_dict file evaluated with --model and --data."""
    from .. import models
    from ..checkpoint import load_weights
    from ..data import DataError, dataset_info, load_split

    if args.data is None:
        raise UserError("--model needs --data: the data the weights were trained for, e.g. --data imagefolder:DIR or --data cifar10")
    if args.eps is None:
        raise UserError("a plain state_dict has no threat model: pass --eps (e.g. --eps 8/255) and, for L2, --norm l2")
    path = Path(args.checkpoint)
    if not path.is_file():
        raise UserError(f"{path} is not a file: with --model pass the weights file (torch.save(model.state_dict()))")
    model_args = _model_args(args) or {}
    data_cfg = data_from_arg(args.data)
    if args.data_root is not None:
        data_cfg["root"] = args.data_root
    try:
        info = dataset_info(data_cfg, progress=not args.quiet)
    except DataError as e:
        raise UserError(str(e)) from None
    search = [str(Path(args.data).parent)] if Path(args.data).suffix in (".yaml", ".yml") else []  # a recipe's own models
    try:  # the output shape is checked on one batch, so a model that does not fit the data fails here, in one line
        model = models.create(args.model, num_classes=info.num_classes, in_channels=info.in_channels, mean=info.mean,
                              std=info.std, input_size=info.image_size, search_path=search, **model_args)
    except ValueError as e:
        raise UserError(f"--model: {e}") from None
    load_weights(model, path)  # weights_only; one-line CheckpointError when the file does not fit the model
    try:
        test = load_split(data_cfg, "test", like=info, progress=not args.quiet)
    except DataError as e:
        raise UserError(str(e)) from None
    return model.to(device).eval(), data_cfg, info, model_args, test


def run(args: argparse.Namespace) -> int:
    from ..checkpoint import NotACheckpointError, UntrustedCodeError, checkpoint_split, model_from_checkpoint
    from ..data import info_from_checkpoint

    names = resolve_attacks(args.attacks)
    if "autoattack" in names:
        require_autoattack()
    if args.n is not None and args.n < 1:
        raise UserError(f"--n must be >= 1, got {args.n}")
    if args.batch_size < 1:
        raise UserError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.checks_n < 1:
        raise UserError(f"--checks-n must be >= 1, got {args.checks_n}")
    if args.chunk_size is not None and (args.chunk_size < 1 or args.chunk_size % args.batch_size):
        raise UserError(f"--chunk-size must be a positive multiple of --batch-size ({args.batch_size}), got {args.chunk_size}")
    if args.eps is not None:
        parse_pixels(args.eps, "--eps")  # fail on a bad value before loading anything
    device = resolve_device(args.device, option="--device")

    path = Path(args.checkpoint)
    if args.model is None and (args.data is not None or args.model_args is not None):
        raise UserError("--data and --model-args go with --model, for a plain state_dict file; a flatrobust checkpoint "
                        "knows its model and data (--data-root points it to another copy of its data)")
    if args.model is not None and args.data is not None:
        if args.weights == "ema":
            raise UserError("--weights ema needs a flatrobust checkpoint of a run trained with ema.decay > 0, not a plain state_dict")
        model, data_cfg, info, model_args, test = _state_dict_model(args, device)
        ckpt: dict = {}
        cfg = {"model": args.model, "model_args": model_args, "data": data_cfg, "attack": {"norm": args.norm or "linf"}}
    else:
        try:  # one-line CheckpointError if missing or corrupt, or if its config would choose code to import
            model, ckpt = model_from_checkpoint(path, device, weights=args.weights, trust_code=args.trust_model_code,
                                                model=args.model, model_args=_model_args(args))
        except NotACheckpointError as e:
            if args.model is not None:
                raise UserError("--model needs --data for a plain state_dict file: the data the weights were trained for, "
                                "e.g. --data imagefolder:DIR or --data cifar10") from None
            raise UserError(f"{e}; for a plain state_dict file give --model NAME and --data SPEC") from None
        except UntrustedCodeError as e:
            raise UserError(f"{e}, or build the model yourself with --model NAME") from None
        except UserError:
            raise
        except (KeyError, TypeError, ValueError) as e:  # a readable file whose config cannot rebuild the model
            raise UserError(f"{path}: its config does not describe a model and dataset ({type(e).__name__}: {e}): "
                            "pass a checkpoint written by `flatrobust train`") from None
        cfg = ckpt["config"] if args.model is None else {**ckpt["config"], "model": args.model,
                                                          "model_args": _model_args(args) or ckpt["config"].get("model_args") or {}}
        data_cfg = dict(cfg["data"])
        if args.data_root is not None:
            data_cfg["root"] = args.data_root
        info = info_from_checkpoint(ckpt)
    norm, eps, alpha = _threat_model(args, cfg)
    warning = whole_box_warning(norm, eps, info.in_channels * info.image_size ** 2)
    if warning:
        print(f"flatrobust: warning: {warning}", file=sys.stderr)
    ckpt_file = checkpoint_file(path)
    if ckpt:
        test = checkpoint_split(ckpt, "test", root=args.data_root, progress=not args.quiet)

    root = data_cfg.get("root")
    if args.n is not None:
        test = test.subset(args.n, seed=args.seed)

    out = Path(args.out) if args.out else eval_file(ckpt_file, args.weights)
    parts = out.with_suffix(".parts")
    print(f"evaluating {ckpt_file}{' (EMA weights)' if args.weights == 'ema' else ''} ({cfg['model']}, {data_cfg['name']} test, {len(test)} examples) "
          f"under {norm} eps={format_eps(eps)} on {device}; finished batches kept in {parts}", flush=True)
    result = evaluate(model, test.x, test.y, attacks=names, norm=norm, eps=eps, alpha=alpha, batch_size=args.batch_size,
                      seed=args.seed, device=device, progress=not args.quiet, checks=not args.no_checks, checks_n=args.checks_n,
                      resume_dir=parts, chunk_size=args.chunk_size, restart=args.restart)

    print(format_table(result))
    if result["checks"] is not None:
        from ..trust import format_checks

        failed = [c["name"] for c in result["checks"] if not c["passed"]]
        print(f"trust checks on {result['checks_n']} examples: "
              + (f"{len(failed)} FAILED ({', '.join(failed)})" if failed else "all passed"))
        print(format_checks(result["checks"]))

    command = ["flatrobust", "eval", str(ckpt_file), "--attacks", ",".join(names), "--norm", norm, "--eps", repr(eps),
               "--step-size", repr(result["alpha"]), "--seed", str(args.seed), "--batch-size", str(args.batch_size)]
    command += ["--n", str(args.n)] if args.n is not None else []
    command += ["--chunk-size", str(result["chunks"]["size"])]
    # the number of examples the checks ran on: --checks-n, or all n when that is fewer (so the command and
    # config.checks_n agree and the command repeats the same checks)
    command += ["--no-checks"] if args.no_checks else ["--checks-n", str(result["checks_n"])]
    command += ["--data-root", str(args.data_root)] if args.data_root is not None else []
    command += ["--weights", args.weights] if args.weights != "raw" else []
    if args.model is not None:
        command += ["--model", args.model] + (["--data", args.data] if args.data is not None else [])
        command += ["--model-args", args.model_args] if args.model_args else []
    command += ["--trust-model-code"] if args.trust_model_code else []
    report = {
        "format": "flatrobust-eval",
        "version": 1,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": shlex.join(command),
        "checkpoint": str(ckpt_file.resolve()),
        "epoch": ckpt.get("epoch") if isinstance(ckpt.get("epoch"), int) else None,
        "config": {"model": cfg["model"], "model_args": cfg.get("model_args") or {},
                   "data": {"name": data_cfg["name"], "root": root, "image_size": int(data_cfg.get("image_size") or 0),
                            "channels": int(data_cfg.get("channels") or 0), "classes": list(info.classes), "split": "test",
                            "n": args.n, "subset_seed": args.seed if args.n is not None else None},
                   "weights": args.weights, "attacks": names, "norm": norm, "eps": eps, "alpha": result["alpha"],
                   "alpha_default": default_alpha(norm, eps), "batch_size": args.batch_size, "seed": args.seed,
                   "checks": not args.no_checks, "checks_n": result["checks_n"], "chunk_size": result["chunks"]["size"]},
        "train_config": ckpt["config"] if ckpt else None,  # None for a plain state_dict
        "checkpoint_kind": "flatrobust" if ckpt else "state_dict",
        "environment": _environment(device),
        **{k: result[k] for k in ("n", "attacks", "worst_case", "checks", "seconds")},
    }
    write_json(out, report)
    shutil.rmtree(parts, ignore_errors=True)  # finished: the partial results have served their purpose
    print(f"wrote {out}")
    return 0
