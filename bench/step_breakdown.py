"""Where the AT-AWP step's time goes, official procedure against ours, piece by piece.

    python bench/step_breakdown.py --model smallcnn --batch-size 128 --threads 1 --out bench/results/step_breakdown_smallcnn_b128_cpu.json

Times, interleaved in one run (round-robin, medians), the pieces that differ between the official AT-AWP
step (`flatrobust.reference`) and ours (`flatrobust.train.train_step` with `flatrobust.AWP`), and both
whole steps, so that what each optimization buys is a measured difference, not a pass count:

  - attack: PGD-10 with a full `loss.backward()` plus the restart-selection forward (official) against
    PGD-10 with `torch.autograd.grad` with respect to the input only (ours);
  - one no-grad forward (the official loop's restart-selection and logging forwards are each one);
  - AWP ascent: proxy `load_state_dict` + proxy forward/backward + proxy SGD step + `diff_in_weights` +
    add/subtract (official) against `AWP.perturb` + `AWP.restore` (ours); and, inside them, the proxy
    state_dict copy alone and the layer-wise normalize/add/subtract bookkeeping as a per-tensor Python loop
    against `torch._foreach_*` kernels (the same maths);
  - the main step (forward, backward, SGD step at w + v), the same in both.
"""
from __future__ import annotations

import argparse
import copy
import sys
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

from flatrobust import AWP, models, pgd  # noqa: E402
from flatrobust.objectives import AttackConfig, create_objective  # noqa: E402
from flatrobust.reference import OfficialAWP, add_into_weights, diff_in_weights, official_at_awp_step, official_pgd  # noqa: E402
from flatrobust.train import train_step  # noqa: E402

GAMMA = 0.01


def build_parts(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, a: AttackConfig, device: torch.device) -> dict:
    """name -> callable; every callable leaves the weights as it found them except the two steps and `main`."""
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    g = torch.Generator(device=device).manual_seed(0)
    x_adv = pgd(model, x, y, eps=a.eps, alpha=a.alpha, steps=a.steps, mode="train", generator=g)
    ours, official = AWP(model, gamma=GAMMA), OfficialAWP(model, gamma=GAMMA)
    objective = create_objective("at", a)
    step_model = copy.deepcopy(model)  # the whole steps train their own copies: the pieces see fixed weights
    step_opt = torch.optim.SGD(step_model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    step_awp = AWP(step_model, gamma=GAMMA)
    off_model = copy.deepcopy(model)
    off_opt = torch.optim.SGD(off_model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    off_awp = OfficialAWP(off_model, gamma=GAMMA)
    params = ours.params
    grads = [torch.randn_like(p) for p in params]  # stand-in ascent gradients for the bookkeeping pieces

    def attack_official():
        official_pgd(model, x, y, eps=a.eps, alpha=a.alpha, steps=a.steps, norm=a.norm, generator=g)

    def attack_ours():
        pgd(model, x, y, eps=a.eps, alpha=a.alpha, steps=a.steps, norm=a.norm, mode="train", generator=g)

    def forward_no_grad():
        with torch.no_grad():
            model(x)

    def ascent_official():
        diff = official.calc_awp(lambda m: F.cross_entropy(m(x_adv), y))
        official.perturb(diff)
        official.restore(diff)

    def ascent_ours():
        ours.perturb(lambda m: F.cross_entropy(m(x_adv), y))
        ours.restore()

    def proxy_copy():
        official.proxy.load_state_dict(model.state_dict())

    def bookkeeping_official():  # the official diff + add + subtract on an up-to-date proxy
        diff = diff_in_weights(model, official.proxy)
        add_into_weights(model, diff, GAMMA)
        add_into_weights(model, diff, -GAMMA)

    def bookkeeping_loop():  # our maths, one small kernel per tensor and per operation
        with torch.no_grad():
            vs = []
            for p, gr in zip(params, grads):
                v = gr * (GAMMA * p.norm() / (gr.norm() + 1e-20))
                p.add_(v)
                vs.append(v)
            for p, v in zip(params, vs):
                p.sub_(v)

    def bookkeeping_foreach():  # the same maths with torch._foreach_* kernels, as flatrobust.AWP does it
        with torch.no_grad():
            g_norm = torch.stack(torch._foreach_norm(grads))
            bool(torch.isfinite(g_norm).all())
            scale = GAMMA * torch.stack(torch._foreach_norm(params)) / (g_norm + 1e-20)
            vs = torch._foreach_mul(grads, list(scale.unbind()))
            torch._foreach_add_(params, vs)
            torch._foreach_sub_(params, vs)

    def main_step():
        loss = F.cross_entropy(model(x_adv), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def step_ours():
        train_step(step_model, objective, step_opt, x, y, awp=step_awp, generator=g)

    def step_official():
        official_at_awp_step(off_model, off_opt, off_awp, x, y, eps=a.eps, alpha=a.alpha, steps=a.steps, norm=a.norm, generator=g)

    return {
        "step_official": step_official, "step_ours": step_ours,
        "attack_official": attack_official, "attack_ours": attack_ours, "forward_no_grad": forward_no_grad,
        "ascent_official": ascent_official, "ascent_ours": ascent_ours, "proxy_copy": proxy_copy,
        "bookkeeping_official": bookkeeping_official, "bookkeeping_loop": bookkeeping_loop,
        "bookkeeping_foreach": bookkeeping_foreach, "main_step": main_step,
    }


LABELS = {
    "step_official": "whole step, official AT-AWP",
    "step_ours": "whole step, ours AT-AWP",
    "attack_official": "PGD-10, full backward + restart-selection forward (official)",
    "attack_ours": "PGD-10, input-only gradient (ours)",
    "forward_no_grad": "one no-grad forward (restart selection / logging)",
    "ascent_official": "AWP ascent + perturb + restore, proxy (official)",
    "ascent_ours": "AWP ascent + perturb + restore, autograd.grad + foreach (ours)",
    "proxy_copy": "  of which: proxy load_state_dict (official)",
    "bookkeeping_official": "  of which: diff_in_weights + add + subtract (official)",
    "bookkeeping_loop": "normalize/add/subtract, per-tensor loop",
    "bookkeeping_foreach": "normalize/add/subtract, torch._foreach_* (ours)",
    "main_step": "main step: forward + backward + SGD at w + v (both)",
}


def savings(m: dict[str, float]) -> list[tuple[str, float]]:
    """Each optimization's saving in seconds per step, from differences of the measured medians."""
    return [
        ("input-only attack gradient (no weight gradients in PGD)", m["attack_official"] - m["forward_no_grad"] - m["attack_ours"]),
        ("no wasted forwards (restart selection + logging: 2 no-grad forwards)", 2 * m["forward_no_grad"]),
        ("no proxy: autograd.grad at w instead of state_dict copy + proxy fwd/bwd + SGD step + diff", m["ascent_official"] - m["ascent_ours"]),
        ("  of which: the proxy state_dict copy", m["proxy_copy"]),
        ("  of which: diff_in_weights + add/subtract loops vs our foreach kernels", m["bookkeeping_official"] - m["bookkeeping_foreach"]),
        ("  foreach kernels vs a per-tensor loop of the same maths", m["bookkeeping_loop"] - m["bookkeeping_foreach"]),
    ]


def profile_attacks(parts: dict, top: int = 10) -> dict[str, dict[str, float]]:
    """Self CPU seconds per aten op of one call of each attack (torch.profiler): where the attack time goes."""
    from torch.profiler import ProfilerActivity, profile

    out: dict[str, dict[str, float]] = {}
    for name in ("attack_ours", "attack_official"):
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            parts[name]()
        out[name] = {e.key: e.self_cpu_time_total / 1e6 for e in prof.key_averages() if e.key.startswith("aten::")}
    ranked = sorted(set(out["attack_ours"]) | set(out["attack_official"]),
                    key=lambda k: -(out["attack_ours"].get(k, 0) + out["attack_official"].get(k, 0)))
    rows = [[k, f"{out['attack_ours'].get(k, 0) * 1e3:.1f}", f"{out['attack_official'].get(k, 0) * 1e3:.1f}"] for k in ranked[:top]]
    totals = {n: sum(v.values()) for n, v in out.items()}
    rows.append(["all aten ops", f"{totals['attack_ours'] * 1e3:.1f}", f"{totals['attack_official'] * 1e3:.1f}"])
    print("\none PGD-10 call under torch.profiler (self CPU ms per op; profiler overhead included):\n")
    print(common.markdown_table(["op", "input-only gradient (ours)", "full backward (official)"], rows))
    return out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 2)[2])
    p.add_argument("--model", default="smallcnn", choices=sorted(models.REGISTRY))
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--input", default=None, help="input shape CxHxW (default: 1x8x8 for smallcnn, 3x32x32 otherwise)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default=None)
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--profile", action="store_true", help="also profile one call of each attack, op by op")
    args = p.parse_args(argv)
    warnings.filterwarnings("ignore", message="Converting a tensor with requires_grad=True to a scalar")
    common.set_threads(args.threads)
    device = common.resolve_device(args.device)
    shape = tuple(int(s) for s in args.input.split("x")) if args.input else ((1, 8, 8) if args.model == "smallcnn" else (3, 32, 32))
    torch.manual_seed(0)
    model = models.create(args.model, num_classes=10, in_channels=shape[0]).to(device)
    gen = torch.Generator().manual_seed(1)
    x = torch.rand((args.batch_size, *shape), generator=gen).to(device)  # (B, C, H, W)
    y = torch.randint(0, 10, (args.batch_size,), generator=gen).to(device)
    attack = AttackConfig(eps=8 / 255, alpha=2 / 255, steps=10, norm="linf")
    parts = build_parts(model, x, y, attack, device)
    log = None if args.quiet else (lambda s: print(s, file=sys.stderr, flush=True))
    times = common.interleaved(parts, device=device, warmup=args.warmup, repeats=args.repeats, log=log)
    med = {k: common.median(v["wall"]) for k, v in times.items()}
    res = {"env": common.environment(device), "config": {"model": args.model, "input_shape": list(shape), "batch_size": args.batch_size,
           "warmup": args.warmup, "repeats": args.repeats, "gamma": GAMMA, "perturbed_tensors": len(AWP(model).params)},
           "median_s": med, "per_round": {k: v["wall"] for k, v in times.items()},
           "savings_s": dict(savings(med))}
    c, e = res["config"], res["env"]
    total = med["step_official"]
    rows = [[LABELS[k], f"{med[k] * 1e3:.2f}", f"{100 * med[k] / total:.1f}%"] for k in parts]
    sav = [[name, f"{s * 1e3:.2f}", f"{100 * s / total:.1f}%"] for name, s in savings(med)]
    predicted = total - sum(s for name, s in savings(med) if not name.startswith("  "))
    print(f"## step breakdown: {c['model']}, batch {c['batch_size']}, input {'x'.join(map(str, shape))}, {e['device']}: "
          f"{e['cpu']} ({e['cpu_capability']}), {e['torch_threads']} thread(s), torch {e['torch']}, {e['date']}\n"
          f"{c['repeats']} interleaved rounds; {c['perturbed_tensors']} perturbed tensors\ncommand: `{e['command']}`\n")
    print(common.markdown_table(["piece", "ms (median)", "of the official step"], rows))
    print()
    print(common.markdown_table(["optimization", "saves ms/step", "of the official step"], sav))
    print(f"\nofficial step minus the savings = {predicted * 1e3:.2f} ms; measured step of ours = {med['step_ours'] * 1e3:.2f} ms "
          "(indented rows are parts of the row above them and are not subtracted again)")
    if args.profile:
        res["profile_s"] = profile_attacks(parts)
    common.write_json(args.out, res)
    return res


if __name__ == "__main__":
    main()
