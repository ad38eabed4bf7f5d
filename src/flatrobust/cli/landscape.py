"""`flatrobust landscape CHECKPOINT`: the weight loss landscape of a checkpoint (AWP paper, Figure 1).

Writes the result (every number and the settings that produced it) and its figure beside the checkpoint, named
after it as `flatrobust eval` names its file (`rundir.result_file`): landscape_best.json and landscape_best.png for
best.pt, landscape_last.json for last.pt, plus landscape_2d_best.png with --2d, so the run directory holds each
checkpoint's analysis where `flatrobust report` finds it. `--weights ema` analyses the EMA weights into
landscape_best_ema.json/png. An explicit --out folder gets the plain names (landscape.json, landscape.png,
landscape_2d.png; landscape_ema.json/png with --weights ema). Built on `flatrobust.landscape.landscape_1d` / `landscape_2d`.

What it shares with `flatrobust flatness` (arguments, checkpoint, data and threat model) is in `cli/common.py`.
"""
from __future__ import annotations

import argparse
import math

from ..atomic import write_json
from ..errors import UserError
from .common import add_common_arguments, header, load_for_analysis, number, output_file


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
    model, ckpt, x, y, attack, device = load_for_analysis(args)
    result = header(args, ckpt, x.shape[0], device)
    t0 = time.perf_counter()
    result["1d"] = landscape_1d(model, x, y, attack=attack, alphas=alphas, directions=args.directions,
                                batch_size=args.batch_size, seed=args.seed, progress=not args.quiet)
    if args.two_d:
        result["2d"] = landscape_2d(model, x, y, attack=attack, alphas=alphas, batch_size=args.batch_size,
                                    seed=args.seed, progress=not args.quiet)
    result["seconds"] = round(time.perf_counter() - t0, 3)
    written = [output_file(args, "landscape", ".json"), output_file(args, "landscape", ".png")]
    write_json(written[0], result, indent=1)
    title = f"{result['run']}{' (EMA)' if args.weights == 'ema' else ''}: {result['data']['name']} {args.split}, n={x.shape[0]}, PGD-{attack['steps']} {attack['norm']} eps={format_eps(attack['eps'])}"
    plot_landscape_1d([(result["run"], result["1d"])], written[1], title=title)
    if args.two_d:
        written.append(output_file(args, "landscape_2d", ".png"))
        plot_landscape_2d(result["run"], result["2d"], written[2])
    r = result["1d"]
    print(f"rho(w) = {r['loss_at_w']:.4f} (robust accuracy {100 * r['accuracy_at_w']:.2f}%); "
          f"mean g at alpha={r['alphas'][0]:g}: {r['mean_loss'][0]:.4f}, at alpha={r['alphas'][-1]:g}: {r['mean_loss'][-1]:.4f}")
    print(f"wrote {', '.join(str(w) for w in written)}")
    return 0
