"""`flatrobust flatness CHECKPOINT`: average- and worst-case flatness of the robust loss (Stutz et al. 2021).

Writes the numbers and their settings beside the checkpoint, named after it as `flatrobust eval` names its file
(`rundir.result_file`: flatness_best.json for best.pt, flatness_last.json for last.pt; flatness_best_ema.json
with `--weights ema`, the EMA weights), and prints a summary. An explicit --out folder gets the plain name
flatness.json (flatness_ema.json). Built on `flatrobust.flatness.average_flatness` / `worst_flatness`.
"""
from __future__ import annotations

import argparse

from ..errors import UserError
from ..atomic import write_json
from .common import add_common_arguments, header, load_for_analysis, number, output_file


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_common_arguments(parser, n_default=1000)
    parser.add_argument("--measure", choices=("both", "average", "worst"), default="both", help="which flatness to compute (default: both)")
    parser.add_argument("--xi-average", default="0.5", help="relative radius of the average-case sphere (default: 0.5)")
    parser.add_argument("--draws", type=int, default=10, help="random draws for the average case (default: 10)")
    parser.add_argument("--xi-worst", default="0.003", help="relative radius of the worst-case ball (default: 0.003)")
    parser.add_argument("--worst-steps", type=int, default=20, help="iterations of the joint weight + input attack (default: 20)")


def run(args: argparse.Namespace) -> int:
    import time

    from ..attacks import format_eps
    from ..flatness import average_flatness, worst_flatness

    xi_avg, xi_worst = number(args.xi_average), number(args.xi_worst)
    if not (xi_avg >= 0 and xi_worst >= 0):
        raise UserError(f"--xi-average and --xi-worst must be >= 0, got {args.xi_average} and {args.xi_worst}")
    if args.draws < 1 or args.worst_steps < 1:
        raise UserError(f"--draws and --worst-steps must be >= 1, got {args.draws} and {args.worst_steps}")
    model, ckpt, x, y, attack, device = load_for_analysis(args)
    result = header(args, ckpt, x.shape[0], device)
    t0 = time.perf_counter()
    if args.measure in ("both", "average"):
        result["average"] = average_flatness(model, x, y, attack=attack, xi=xi_avg, draws=args.draws,
                                             batch_size=args.batch_size, seed=args.seed, progress=not args.quiet)
    if args.measure in ("both", "worst"):
        result["worst"] = worst_flatness(model, x, y, attack=attack, xi=xi_worst, steps=args.worst_steps,
                                         batch_size=args.batch_size, seed=args.seed, progress=not args.quiet)
    result["seconds"] = round(time.perf_counter() - t0, 3)
    out = output_file(args, "flatness", ".json")
    write_json(out, result, indent=1)

    base = result.get("average") or result["worst"]
    print(f"flatness of {args.checkpoint}{' (EMA weights)' if args.weights == 'ema' else ''} on {result['data']['name']} {args.split} (n={x.shape[0]}, "
          f"PGD-{attack['steps']} {attack['norm']} eps={format_eps(attack['eps'])}):")
    print(f"  robust loss rho(w)      {base['robust_loss']:.4f} nats   robust accuracy {100 * base['robust_accuracy']:.2f}%")
    if "average" in result:
        a = result["average"]
        se = f" ± {a['standard_error']:.4f}" if a["standard_error"] is not None else ""
        print(f"  average-case flatness   {a['average_flatness']:.4f}{se} nats   (xi={a['xi']:g}, {a['draws']} draws, "
              f"mean rho(w + nu) = {a['perturbed_loss_mean']:.4f})")
    if "worst" in result:
        w = result["worst"]
        print(f"  worst-case flatness     {w['worst_flatness']:.4f} nats   (xi={w['xi']:g}, {w['steps']} joint steps, "
              f"rho(w + nu*) = {w['perturbed_loss']:.4f})")
    print(f"wrote {out}")
    return 0
