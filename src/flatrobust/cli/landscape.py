"""`flatrobust landscape CHECKPOINT`: the weight loss landscape of a checkpoint (AWP paper, Figure 1).

Writes landscape.json (every number and the settings that produced it) and landscape.png, plus
landscape_2d.png with --2d, into --out (default: the checkpoint's folder, i.e. the run directory, where
`flatrobust report` finds them); `--weights ema` analyses the EMA weights into landscape_ema.json/png. Built on `flatrobust.landscape.landscape_1d` / `landscape_2d`.

The helpers below (checkpoint, data and threat model from the command line) are shared with
`flatrobust flatness`.
"""
from __future__ import annotations

import argparse
import json
import math
from fractions import Fraction
from pathlib import Path
from typing import Any

import torch

from ..errors import UserError


def number(text: str) -> float:
    """A float, also written as a fraction ("8/255")."""
    try:
        return float(Fraction(text.strip())) if "/" in text else float(text)
    except (ValueError, ZeroDivisionError):
        raise UserError(f"{text!r} is not a number (write e.g. 0.031 or 8/255)") from None


def parse_alphas(text: str) -> list[float]:
    """"START:STOP:NUM" (NUM evenly spaced values, both ends included) or a comma list "-1,-0.5,0,0.5,1"."""
    text = text.strip()
    try:
        if ":" in text:
            start, stop, num = text.split(":")
            start, stop, num = number(start), number(stop), int(num)
            if num < 1:
                raise ValueError
            if num == 1:
                values = [start]
            else:  # rounded so that the middle of a symmetric range is exactly 0 (the unperturbed model)
                values = [round(start + (stop - start) * i / (num - 1), 12) + 0.0 for i in range(num)]
        else:
            values = [number(v) for v in text.split(",")]
    except (ValueError, UserError):
        raise UserError(f"--alphas {text!r}: write START:STOP:NUM (e.g. --alphas -1:1:21) or a comma list (e.g. --alphas -1,0,1)") from None
    if not values or not all(math.isfinite(v) for v in values):
        raise UserError(f"--alphas {text!r}: the values must be finite numbers")
    return values


def add_common_arguments(parser: argparse.ArgumentParser, n_default: int) -> None:
    parser.add_argument("checkpoint", help="a .pt file written by `flatrobust train`, or its run directory (best.pt, else last.pt)")
    parser.add_argument("--data", choices=("train", "test"), default="test", help="split to evaluate on (default: test)")
    parser.add_argument("--n", type=int, default=n_default, help=f"examples: a fixed subset drawn with --seed (default: {n_default})")
    parser.add_argument("--seed", type=int, default=0, help="subset, random directions / draws and PGD random starts (default: 0)")
    parser.add_argument("--eps", default=None, help="attack radius, overrides the checkpoint's attack.eps (e.g. 8/255)")
    parser.add_argument("--norm", choices=("linf", "l2"), default=None, help="attack norm, overrides attack.norm (needs --eps)")
    parser.add_argument("--steps", type=int, default=None, help="PGD steps, overrides attack.steps")
    parser.add_argument("--step-size", default=None, help="PGD step size, overrides attack.alpha (e.g. 2/255)")
    parser.add_argument("--batch-size", type=int, default=256, help="examples per PGD batch (default: 256)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="default: cuda when available")
    parser.add_argument("--out", default=None, help="output folder (default: the checkpoint's folder)")
    parser.add_argument("--weights", choices=("raw", "ema"), default="raw",
                        help="the trained weights (default) or their moving average (runs with ema.decay > 0; files get an _ema suffix)")
    add_trust_argument(parser)


def add_trust_argument(parser: argparse.ArgumentParser) -> None:
    """--trust-model-code: the user's consent to import the module of a model that a checkpoint's config names."""
    parser.add_argument("--trust-model-code", action="store_true",
                        help="import the module of a package.module:callable model that the checkpoint's config names (a "
                             "checkpoint never chooses code to run otherwise; docs/RELIABILITY.md)")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is available here (use --device cpu or auto)")
    return torch.device(name)


def resolve_attack(cfg: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """The checkpoint's threat model, with the command line's overrides."""
    base = cfg.get("attack") or {}
    if args.norm is not None and args.norm != base.get("norm") and args.eps is None:
        raise UserError(f"--norm {args.norm} differs from the checkpoint's norm {base.get('norm')!r}: give --eps for it too")
    attack = {
        "norm": args.norm or base.get("norm", "linf"),
        "eps": number(args.eps) if args.eps is not None else base.get("eps"),
        "alpha": number(args.step_size) if args.step_size is not None else base.get("alpha"),
        "steps": args.steps if args.steps is not None else base.get("steps"),
    }
    for key, value in attack.items():
        if value is None:
            raise UserError(f"the checkpoint's config has no attack.{key}: give it on the command line")
    attack = {k: (number(v) if isinstance(v, str) and k in ("eps", "alpha") else v) for k, v in attack.items()}
    if not (attack["eps"] >= 0 and attack["alpha"] >= 0 and int(attack["steps"]) >= 1):
        raise UserError(f"attack eps and step size must be >= 0 and steps >= 1, got {attack}")
    attack["steps"] = int(attack["steps"])
    return attack


def load_for_analysis(args: argparse.Namespace):
    """(model in eval mode, checkpoint dict, x, y, attack, device, default output folder) from the arguments."""
    from ..checkpoint import model_from_checkpoint
    from ..data import DataError, info_from_checkpoint, load_split

    if args.n < 1:
        raise UserError(f"--n must be >= 1, got {args.n}")
    if args.batch_size < 1:
        raise UserError(f"--batch-size must be >= 1, got {args.batch_size}")
    device = resolve_device(args.device)
    model, ckpt = model_from_checkpoint(args.checkpoint, device, weights=args.weights, trust_code=args.trust_model_code)
    cfg = ckpt["config"]
    attack = resolve_attack(cfg, args)
    data_cfg = cfg.get("data") or {}
    try:
        data = load_split({**data_cfg, "download": False}, args.data, like=info_from_checkpoint(ckpt), progress=True)
    except DataError as e:
        raise UserError(str(e)) from None
    data = data.subset(args.n, args.seed).to(device)
    path = Path(args.checkpoint)
    out = Path(args.out) if args.out else (path if path.is_dir() else path.parent)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create the output folder {out}: {e.strerror}") from None
    return model, ckpt, data.x, data.y, attack, device, out


def header(args: argparse.Namespace, ckpt: dict[str, Any], n: int, device: torch.device) -> dict[str, Any]:
    """What a result file records about where its numbers come from."""
    from .. import __version__

    cfg = ckpt["config"]
    path = Path(args.checkpoint).resolve()
    return {
        "checkpoint": str(args.checkpoint),
        "run": cfg.get("name") or (path.name if path.is_dir() else path.parent.name),
        "model": cfg.get("model"),
        "weights": args.weights,
        "epoch": ckpt.get("epoch"),
        "data": {"name": cfg["data"]["name"], "split": args.data, "n": n, "subset_seed": args.seed},
        "device": str(device),
        "torch": torch.__version__,
        "flatrobust": __version__,
    }


def output_name(args: argparse.Namespace, stem: str, suffix: str) -> str:
    """stem + suffix, with "_ema" before the suffix for --weights ema (the raw weights' files are kept)."""
    return f"{stem}{'_ema' if args.weights == 'ema' else ''}{suffix}"


def write_json(path: Path, obj: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=1) + "\n")
    tmp.replace(path)  # a half-written result never replaces a complete one


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_common_arguments(parser, n_default=1000)
    parser.add_argument("--alphas", default="-1:1:21",
                        help="START:STOP:NUM (both ends included) or a comma list, e.g. --alphas -0.5:0.5:11 (default: -1:1:21)")
    parser.add_argument("--directions", type=int, default=3, help="random filter-normalized directions for the 1-D curves (default: 3)")
    parser.add_argument("--2d", dest="two_d", action="store_true",
                        help="also compute the 2-D surface on the grid alphas x alphas (len(alphas)^2 PGD runs)")


def run(args: argparse.Namespace) -> int:
    import time

    from ..attacks import format_eps
    from ..landscape import landscape_1d, landscape_2d
    from ..report import plot_landscape_1d, plot_landscape_2d

    alphas = parse_alphas(args.alphas)
    if args.directions < 1:
        raise UserError(f"--directions must be >= 1, got {args.directions}")
    model, ckpt, x, y, attack, device, out = load_for_analysis(args)
    result = header(args, ckpt, x.shape[0], device)
    t0 = time.perf_counter()
    result["1d"] = landscape_1d(model, x, y, attack=attack, alphas=alphas, directions=args.directions,
                                batch_size=args.batch_size, seed=args.seed, progress=True)
    if args.two_d:
        result["2d"] = landscape_2d(model, x, y, attack=attack, alphas=alphas, batch_size=args.batch_size,
                                    seed=args.seed, progress=True)
    result["seconds"] = round(time.perf_counter() - t0, 3)
    write_json(out / output_name(args, "landscape", ".json"), result)
    title = f"{result['run']}{' (EMA)' if args.weights == 'ema' else ''}: {result['data']['name']} {args.data}, n={x.shape[0]}, PGD-{attack['steps']} {attack['norm']} eps={format_eps(attack['eps'])}"
    written = [output_name(args, "landscape", ".json"), output_name(args, "landscape", ".png")]
    plot_landscape_1d([(result["run"], result["1d"])], out / written[1], title=title)
    if args.two_d:
        written.append(output_name(args, "landscape_2d", ".png"))
        plot_landscape_2d(result["run"], result["2d"], out / written[2])
    r = result["1d"]
    print(f"rho(w) = {r['loss_at_w']:.4f} (robust accuracy {100 * r['accuracy_at_w']:.2f}%); "
          f"mean g at alpha={r['alphas'][0]:g}: {r['mean_loss'][0]:.4f}, at alpha={r['alphas'][-1]:g}: {r['mean_loss'][-1]:.4f}")
    print(f"wrote {', '.join(str(out / w) for w in written)}")
    return 0
