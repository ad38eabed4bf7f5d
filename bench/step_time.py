"""Time per training step of every training attack (PGD-10 AT, TRADES, MART; FGSM-RS AT; Free AT; standard training)
with and without AWP, and of the official AT-AWP procedure.

    python bench/step_time.py --model smallcnn --batch-size 128 --threads 1 --out bench/results/step_time_smallcnn_b128_cpu.json

One run times every method interleaved (round-robin, order rotated every round, `--warmup` untimed steps
per method first), so drift of a shared machine hits all methods alike; it reports the median seconds
per step and images/s per method, and the medians of the per-round ratios AT-AWP/AT (docs/PERFORMANCE.md,
"Why the targets": the lean step is 26F against AT's 23F, 1.13) and official/ours (the official procedure, 38F plus a
state_dict copy into a proxy, against our 26F: 1.46). The baseline is `flatrobust.reference`'s faithful
re-implementation of the official loop, run on the same forward module (same speed switches).

Every method trains its own copy of the same initial model with SGD (lr 0.01, momentum 0.9, weight decay
5e-4) on one fixed random batch of the model's input shape (data loading is not timed), attack PGD-10
L-inf 8/255 step 2/255 as in the paper. Memory: peak allocated during one step (CUDA: max_memory_allocated;
CPU: torch.profiler's allocation events), the extra of each AWP step over its plain step, against the
bytes of one copy of the perturbed weights (what AWP's `_v` holds).
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

from flatrobust import AWP, models  # noqa: E402
from flatrobust.attacks.spec import FREE_REPLAYS  # noqa: E402
from flatrobust.objectives import AttackConfig, create_objective  # noqa: E402
from flatrobust.reference import OfficialAWP, official_at_awp_step  # noqa: E402
from flatrobust.speed import accelerate  # noqa: E402
from flatrobust.train import train_step  # noqa: E402

# name -> (label, objective, AWP gamma or None, training attack kind); gammas as in the paper (0.01 AT, 0.005 TRADES/MART).
METHODS = {
    "at": ("AT", "at", None, "pgd"),
    "at_awp": ("AT-AWP", "at", 0.01, "pgd"),
    "trades": ("TRADES", "trades", None, "pgd"),
    "trades_awp": ("TRADES-AWP", "trades", 0.005, "pgd"),
    "mart": ("MART", "mart", None, "pgd"),
    "mart_awp": ("MART-AWP", "mart", 0.005, "pgd"),
    "fgsm": ("FGSM-RS AT", "at", None, "fgsm"),  # Wong et al. 2020: random start, step 1.25 eps
    "fgsm_awp": ("FGSM-RS AT-AWP", "at", 0.01, "fgsm"),
    # Shafahi et al. 2019, m = FREE_REPLAYS: a step is one replay (one SGD step); m does not change its cost, only how many
    # steps a batch gets (epochs are divided by m, so a run takes as many steps as standard training)
    "free": (f"Free AT (m={FREE_REPLAYS})", "at", None, "free"),
    "free_awp": (f"Free AT-AWP (m={FREE_REPLAYS})", "at", 0.01, "free"),
    "std": ("standard training", "at", None, "none"),  # attack.kind none
    "std_awp": ("standard training + AWP", "at", 0.01, "none"),
    "official_at_awp": ("official AT-AWP (baseline)", "official", 0.01, "pgd"),
    "official_at": ("official AT (no AWP)", "official", None, "pgd"),  # not in the default set: for breakdowns
}
DEFAULT_METHODS = "at,at_awp,trades,trades_awp,mart,mart_awp,fgsm,fgsm_awp,free,free_awp,std,std_awp,official_at_awp"
# (numerator, denominator, target, expected from the pass count of docs/PERFORMANCE.md) of the per-round ratios.
RATIOS = [
    ("at_awp", "at", ("<=", 1.15), 26 / 23),
    ("trades_awp", "trades", None, None),
    ("mart_awp", "mart", None, None),
    ("official_at_awp", "at_awp", (">=", 1.4), 38 / 26),
    # FGSM-RS: one attack step (2F) + the step (3F) = 5F, + AWP's ascent (3F) = 8F; standard training 3F, + AWP 6F
    ("fgsm_awp", "fgsm", None, 8 / 5),
    ("fgsm_awp", "at_awp", None, 8 / 26),
    # Free AT: a replay is one forward/backward pass (3F; the input gradient comes with it), + AWP's ascent (3F) = 6F
    ("free_awp", "free", None, 6 / 3),
    ("free_awp", "at_awp", None, 6 / 26),
    ("std_awp", "std", None, 6 / 3),
]
DEFAULT_SHAPES = {"smallcnn": (1, 8, 8)}  # digits; every other model: CIFAR (3, 32, 32)


class Method:
    """One method's model, optimizer and step, on its own copy of the initial weights."""

    def __init__(self, name: str, base: torch.nn.Module, args, x: torch.Tensor, y: torch.Tensor, device: torch.device):
        self.name = name
        self.label, kind, self.gamma, attack_kind = METHODS[name]
        self.kind = kind
        self.model = copy.deepcopy(base).to(device)
        self.forward = accelerate(self.model, device, amp=args.amp, channels_last=args.channels_last, compile=args.compile)
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
        alpha = None if attack_kind in ("fgsm", "free") else args.alpha  # FGSM: its own step, 1.25 eps; Free AT: eps
        self.attack = AttackConfig(eps=args.eps, alpha=alpha, steps=args.attack_steps, norm="linf", kind=attack_kind)
        self.objective = None if kind == "official" else create_objective(kind, self.attack)
        self.x, self.y = x, y
        self.generator = torch.Generator(device=device).manual_seed(0)
        self.helper = self.make_helper()

    def make_helper(self):
        if self.gamma is None:
            return None
        return OfficialAWP(self.forward, gamma=self.gamma) if self.kind == "official" else AWP(self.forward, gamma=self.gamma)

    def step(self, helper=None) -> None:
        helper = self.helper if helper is None else helper
        if self.kind == "official":
            a = self.attack
            official_at_awp_step(self.forward, self.optimizer, helper, self.x, self.y, eps=a.eps, alpha=a.alpha,
                                 steps=a.steps, norm=a.norm, generator=self.generator)
        else:
            train_step(self.forward, self.objective, self.optimizer, self.x, self.y, awp=helper, generator=self.generator)

    def step_with_fresh_helper(self) -> None:
        """Build the AWP object (the official one deep-copies a proxy) and take one step: what the memory
        measurement times, so that state AWP keeps between steps is counted too."""
        self.step(self.make_helper() if self.gamma is not None else None)

    def memory_facts(self) -> dict:
        """Bytes of one copy of the perturbed weights, of AWP's `_v` right after perturb, and of the state
        the official procedure keeps between steps (its proxy model and the proxy's gradients)."""
        facts: dict = {}
        if self.gamma is None:
            return facts
        if self.kind == "official":
            proxy = self.helper.proxy
            tensors = list(proxy.parameters()) + list(proxy.buffers()) + [p.grad for p in proxy.parameters() if p.grad is not None]
            facts["state_between_steps_bytes"] = sum(t.numel() * t.element_size() for t in tensors)
            return facts
        awp = self.helper
        facts["perturbed_weights_bytes"] = sum(p.numel() * p.element_size() for p in awp.params)
        x_adv = self.objective.attack(self.forward, self.x, self.y, generator=self.generator)
        awp.perturb(lambda m: self.objective.ascent_loss(m, self.x, x_adv, self.y))
        facts["awp_v_bytes"] = sum(v.numel() * v.element_size() for v in awp.perturbation())
        facts["awp_v_tensors"] = len(awp.perturbation())
        awp.restore()
        facts["state_between_steps_bytes"] = sum(v.numel() * v.element_size() for v in awp.perturbation())  # 0: _v is dropped
        return facts


def _mapping(text: str) -> dict:
    """--model-args: a JSON object."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        value = None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"{text!r} is not a JSON object such as '{{\"width\": 16}}'")
    return value


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 2)[2])
    p.add_argument("--model", default="smallcnn", choices=sorted(models.REGISTRY))
    p.add_argument("--model-args", default="{}", type=_mapping,
                   help='JSON keyword arguments of the model builder, e.g. \'{"width": 16, "stem_stride": 2}\'')
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--input", default=None, help="input shape CxHxW (default: 1x8x8 for smallcnn, 3x32x32 otherwise)")
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N | auto")
    p.add_argument("--steps", type=int, default=1, help="timed training steps per method per round")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per method before the first round")
    p.add_argument("--repeats", type=int, default=10, help="rounds (each runs every method --steps times)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    p.add_argument("--methods", default=DEFAULT_METHODS, help=f"comma-separated, from {', '.join(METHODS)}")
    p.add_argument("--eps", type=float, default=8 / 255)
    p.add_argument("--alpha", type=float, default=2 / 255)
    p.add_argument("--attack-steps", type=int, default=10)
    p.add_argument("--amp", default="off", choices=["auto", "off", "bf16"], help="speed.amp of the training loop")
    p.add_argument("--channels-last", default="off", choices=["auto", "on", "off"], help="speed.channels_last")
    p.add_argument("--compile", action="store_true", help="speed.compile (raise --warmup: the first steps compile)")
    p.add_argument("--no-memory", action="store_true", help="skip the memory measurement")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    p.add_argument("--quiet", action="store_true", help="no per-round lines on stderr")
    args = p.parse_args(argv)
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in args.methods if m not in METHODS]
    if unknown or not args.methods:
        p.error(f"unknown method(s) {unknown}: choose from {', '.join(METHODS)}")
    if min(args.steps, args.repeats, args.batch_size) < 1 or args.warmup < 0:
        p.error("--steps, --repeats and --batch-size must be >= 1 and --warmup >= 0")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    warnings.filterwarnings("ignore", message="Converting a tensor with requires_grad=True to a scalar")  # the baseline's float(loss)
    common.set_threads(args.threads)
    device = common.resolve_device(args.device)
    shape = tuple(int(s) for s in args.input.split("x")) if args.input else DEFAULT_SHAPES.get(args.model, (3, 32, 32))
    torch.manual_seed(0)
    try:
        base = models.create(args.model, num_classes=10, in_channels=shape[0], **args.model_args)
    except ValueError as e:  # a models.ModelError: one line
        print(f"step_time.py: --model-args: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    g = torch.Generator().manual_seed(1)
    x = torch.rand((args.batch_size, *shape), generator=g).to(device)  # (B, C, H, W) in [0, 1]
    y = torch.randint(0, 10, (args.batch_size,), generator=g).to(device)
    methods = {m: Method(m, base, args, x, y, device) for m in args.methods}
    log = None if args.quiet else (lambda s: print(s, file=sys.stderr, flush=True))

    times = common.interleaved({m: methods[m].step for m in methods}, device=device, warmup=args.warmup,
                               repeats=args.repeats, calls=args.steps, log=log)
    results: dict = {"env": common.environment(device), "config": {
        "model": args.model, "model_args": args.model_args, "input_shape": list(shape), "batch_size": args.batch_size, "steps_per_round": args.steps,
        "warmup": args.warmup, "repeats": args.repeats, "attack": {"norm": "linf", "eps": args.eps, "alpha": args.alpha,
        "steps": args.attack_steps}, "amp": args.amp, "channels_last": args.channels_last, "compile": args.compile,
        "parameters": sum(p.numel() for p in base.parameters())}, "methods": {}, "ratios": {}, "memory": {}}
    for m, t in times.items():
        q25, q75 = common.quartiles(t["wall"])
        results["methods"][m] = {
            "label": methods[m].label, "median_s_per_step": common.median(t["wall"]), "q25": q25, "q75": q75,
            "images_per_s": args.batch_size / common.median(t["wall"]), "median_cpu_s_per_step": common.median(t["cpu"]),
            "wall_per_round": t["wall"], "cpu_per_round": t["cpu"]}
    for num, den, target, expected in RATIOS:
        if num in times and den in times:
            r = common.ratio_stats(times[num]["wall"], times[den]["wall"])
            r["cpu_median"] = common.ratio_stats(times[num]["cpu"], times[den]["cpu"])["median"]
            r["expected_from_pass_count"] = expected
            if target is not None:
                op, bound = target
                r["target"] = f"{op} {bound}"
                r["met"] = r["median"] <= bound if op == "<=" else r["median"] >= bound
            results["ratios"][f"{num}/{den}"] = r

    if not args.no_memory:
        for m, meth in methods.items():
            peak, how = common.peak_bytes(meth.step_with_fresh_helper, device)
            results["memory"][m] = {"peak_step_bytes": peak, "how": how, **meth.memory_facts()}
        for m, rec in results["memory"].items():
            plain = {"at_awp": "at", "trades_awp": "trades", "mart_awp": "mart", "official_at_awp": "at", "fgsm_awp": "fgsm",
                     "free_awp": "free", "std_awp": "std"}.get(m)
            if plain in results["memory"] and rec["peak_step_bytes"] is not None and results["memory"][plain]["peak_step_bytes"] is not None:
                rec["extra_over"] = plain
                rec["extra_bytes"] = rec["peak_step_bytes"] - results["memory"][plain]["peak_step_bytes"]
        w = next((r["perturbed_weights_bytes"] for r in results["memory"].values() if "perturbed_weights_bytes" in r), None)
        if w is None and any(methods[m].gamma for m in methods):
            w = sum(p.numel() * p.element_size() for p in AWP(base).params)
        results["perturbed_weights_bytes"] = w

    print(report(results))
    common.write_json(args.out, results)
    return results


def _mb(b) -> str:
    return "n/a" if b is None else f"{b / 2**20:.3f} MiB"


def report(res: dict) -> str:
    c, e = res["config"], res["env"]
    dev = e.get("gpu", f"{e['cpu']} ({e['cpu_capability']}), {e['torch_threads']} thread(s)")
    out = [f"## step time: {c['model']} ({c['parameters'] / 1e6:.2f}M params), batch {c['batch_size']}, input "
           f"{'x'.join(map(str, c['input_shape']))}, {e['device']}: {dev}, torch {e['torch']}, {e['date']}",
           f"PGD-{c['attack']['steps']} L-inf eps {c['attack']['eps']:.4f} step {c['attack']['alpha']:.4f} (FGSM-RS: one step of 1.25 eps from a random start; Free AT: a step is one replay, one SGD step); "
           f"{c['repeats']} interleaved rounds x {c['steps_per_round']} step(s), {c['warmup']} warm-up step(s) per method; "
           f"amp={c['amp']} channels_last={c['channels_last']} compile={c['compile']}", f"command: `{e['command']}`", ""]
    rows = [[r["label"], f"{r['median_s_per_step'] * 1e3:.1f}", f"{r['q25'] * 1e3:.1f} - {r['q75'] * 1e3:.1f}",
             f"{r['images_per_s']:.1f}", f"{r['median_cpu_s_per_step'] * 1e3:.1f}"] for r in res["methods"].values()]
    out.append(common.markdown_table(["method", "ms/step (median)", "IQR ms", "images/s", "CPU ms/step (median)"], rows))
    if res["ratios"]:
        rows = []
        for k, r in res["ratios"].items():
            num, den = k.split("/")
            name = f"{res['methods'][num]['label']} / {res['methods'][den]['label']}"
            exp = f"{r['expected_from_pass_count']:.2f}" if r["expected_from_pass_count"] else ""
            tgt = f"{r['target']}: {'met' if r['met'] else 'MISSED'}" if "target" in r else ""
            rows.append([name, f"{r['median']:.3f}", f"{r['q25']:.3f} - {r['q75']:.3f}", f"{r['cpu_median']:.3f}", exp, tgt])
        out += ["", common.markdown_table(["ratio (per round)", "median", "IQR", "median of CPU-time ratios",
                                           "pass count", "target"], rows)]
    if res["memory"]:
        rows = []
        for m, r in res["memory"].items():
            extra = f"{_mb(r['extra_bytes'])} (vs {res['methods'][r['extra_over']]['label']})" if "extra_bytes" in r else ""
            rows.append([res["methods"][m]["label"], _mb(r["peak_step_bytes"]), extra, _mb(r.get("awp_v_bytes")) if "awp_v_bytes" in r else "",
                         _mb(r.get("state_between_steps_bytes")) if "state_between_steps_bytes" in r else ""])
        out += ["", f"one copy of the perturbed weights (conv/linear weights): {_mb(res.get('perturbed_weights_bytes'))}; "
                f"peak measured with {next(iter(res['memory'].values()))['how']}", "",
                common.markdown_table(["method", "peak during one step", "extra peak", "AWP _v after perturb",
                                       "AWP state kept between steps"], rows)]
    return "\n".join(out)


if __name__ == "__main__":
    main()
