"""A flatrobust checkpoint in RobustBench's format (Croce et al., NeurIPS 2021 Datasets and Benchmarks):
the weights its model zoo loads, the model-info JSON its leaderboard reads, a safetensors copy.

    export_robustbench("runs/cifar10_wrn34_10_at_awp/best.pt", "rb", name="Me2026AWP")

writes, for a CIFAR-10 L-inf run:

    rb/cifar10/Linf/Me2026AWP.pt             state_dict that RobustBench's zoo architecture loads strictly
    rb/cifar10/Linf/Me2026AWP.safetensors    the same tensors in the safetensors format (no pickle)
    rb/model_info/cifar10/Linf/Me2026AWP.json   the fields of robustbench's ModelInfo (what `benchmark(...,
                                             to_disk=True)` writes and a "new model" submission asks for)
    rb/model_zoo/cifar10/Linf/Me2026AWP.py   the zoo entry to add to robustbench/model_zoo/cifar10.py

so that `robustbench.load_model("Me2026AWP", model_dir="rb", dataset="cifar10", threat_model="Linf")`
loads it once the entry is in the zoo. Architectures: flatrobust's WideResNets go into RobustBench's
`WideResNet` (same TRADES code: blocks renamed block1-3.layer.i, shortcut -> convShortcut, bn -> bn1), the
PreActResNet-18 (width 64, stem stride 1) into its `PreActResNet(PreActBlock, [2, 2, 2, 2],
bn_before_fc=True, out_shortcut=True)`, and a fine-tuned `robustbench:<Name>` back into the zoo
architecture of <Name> as it is. The input normalization is placed as the zoo places it: `mu` and `sigma`
buffers of a subclass that normalizes first in `forward` (as Rice2020OverfittingNet), none when the
model's normalization is the identity. When robustbench is installed, the export checks before writing
that the entry loads the state_dict strictly and gives the checkpoint's logits.

The AutoAttack accuracy is filled only from an eval.json of standard AutoAttack on the whole test split at
the leaderboard's radius, with every trust check passed, for these very weights; otherwise nothing is
written and the error says what to run. Fields flatrobust cannot know (paper link, name, authors,
venue, reported numbers) are left null for the author.
"""
from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from .checkpoint import model_from_checkpoint, write_atomic
from .errors import UserError
from .robustbench_import import LEADERBOARD_EPS

# robustbench 1.1.1's ModelInfo (robustbench/utils.py), in its order: the model-info JSON's fields.
MODEL_INFO_FIELDS = ("link", "name", "authors", "additional_data", "number_forward_passes", "dataset", "venue", "architecture",
                     "eps", "clean_acc", "reported", "corruptions_acc", "corruptions_acc_3d", "corruptions_mce",
                     "corruptions_mce_3d", "autoattack_acc", "footnote")
TO_FILL = ("link", "name", "authors", "venue", "reported")  # the paper's: left null for the author
NORM_THREATS = {"linf": "Linf", "l2": "L2"}
ZOO_DICTS = {"Linf": "linf", "L2": "l2"}  # the OrderedDict of robustbench/model_zoo/<dataset>.py per threat model
AA_STAGES = ["apgd-ce", "apgd-t", "fab-t", "square"]
_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_\-]*")


@dataclass(frozen=True)
class ZooForm:
    """A network in the form RobustBench's zoo loads it."""

    state_dict: dict[str, torch.Tensor]
    architecture: str  # for the model-info JSON, e.g. "WideResNet-34-10"
    entry_code: str  # Python source that defines ENTRY = (name, {'model': constructor, 'gdrive_id': None})


# ----------------------------------------------------------------------------------------- architectures

def _is_identity(mean: torch.Tensor, std: torch.Tensor) -> bool:
    return bool((mean == 0).all() and (std == 1).all())


def _floats(t: torch.Tensor) -> str:
    return "[" + ", ".join(repr(v) for v in t.flatten().tolist()) + "]"


def _entry(name: str, dataset: str, threat: str, imports: str, base: str, init: str | None, normalize: tuple | None) -> str:
    """The zoo entry: `base(init)` itself (init None: `base` is the constructor), or a subclass of `base` with
    mu/sigma buffers that normalizes first."""
    head = (f'"""RobustBench model-zoo entry for {name} (written by `flatrobust export`): add it to the {ZOO_DICTS[threat]} '
            f"OrderedDict of\nrobustbench/model_zoo/{dataset}.py and set gdrive_id to the id of the uploaded {name}.pt.\"\"\"\n")
    if normalize is None:
        constructor = base if init is None else f"lambda: {base}({init})"
        return f"{head}{imports}\n\nENTRY = ({name!r}, {{'model': {constructor}, 'gdrive_id': None}})\n"
    cls = re.sub(r"\W", "_", name) + "Net"
    mean, std = normalize
    return (f"{head}import torch\n\n{imports}\n\n\n"
            f"class {cls}({base}):\n"
            f"    \"\"\"{base} that normalizes its [0, 1] input first, with the statistics it was trained with.\"\"\"\n\n"
            f"    def __init__(self):\n"
            f"        super().__init__({init})\n"
            f"        self.register_buffer('mu', torch.tensor({_floats(mean)}).view(1, 3, 1, 1))\n"
            f"        self.register_buffer('sigma', torch.tensor({_floats(std)}).view(1, 3, 1, 1))\n\n"
            f"    def forward(self, x):\n"
            f"        x = (x - self.mu) / self.sigma\n"
            f"        return super().forward(x)\n\n\n"
            f"ENTRY = ({name!r}, {{'model': {cls}, 'gdrive_id': None}})\n")


def _with_normalization(state: dict, normalize: tuple | None) -> dict:
    if normalize is not None:
        state["mu"], state["sigma"] = (t.reshape(1, 3, 1, 1).clone() for t in normalize)
    return state


def _wideresnet(net: nn.Module, num_classes: int) -> tuple[dict, str, str, str, str]:
    """flatrobust's WideResNet -> RobustBench's WideResNet (both the TRADES code)."""
    n = len(net.blocks) // 3
    depth, widen = 6 * n + 4, net.blocks[0].conv1.out_channels // 16

    def key(k: str) -> str:  # blocks.{i} -> block{1,2,3}.layer.{j}, shortcut -> convShortcut, bn -> bn1
        if k.startswith("blocks."):
            i, rest = k.removeprefix("blocks.").split(".", 1)
            group, j = divmod(int(i), n)
            rest = "convShortcut." + rest.removeprefix("shortcut.") if rest.startswith("shortcut.") else rest
            return f"block{group + 1}.layer.{j}.{rest}"
        return "bn1." + k.removeprefix("bn.") if k.startswith("bn.") else k  # conv1, fc as they are

    state = {key(k): v.detach().cpu().clone() for k, v in net.state_dict().items()}
    imports = "from robustbench.model_zoo.architectures.wide_resnet import WideResNet"
    return state, f"WideResNet-{depth}-{widen}", imports, "WideResNet", f"depth={depth}, widen_factor={widen}, num_classes={num_classes}"


def _preactresnet(net: nn.Module, num_classes: int) -> tuple[dict, str, str, str, str]:
    """flatrobust's PreActResNet-18 -> RobustBench's PreActResNet (the projection shortcut sees the pre-activation)."""
    def key(k: str) -> str:  # layers.{i} -> layer{1..4}.{j}, shortcut (a conv) -> shortcut.0 (a Sequential of it)
        if k.startswith("layers."):
            i, rest = k.removeprefix("layers.").split(".", 1)
            stage, j = divmod(int(i), 2)
            rest = "shortcut.0." + rest.removeprefix("shortcut.") if rest.startswith("shortcut.") else rest
            return f"layer{stage + 1}.{j}.{rest}"
        return k  # conv1, bn, linear as they are

    state = {key(k): v.detach().cpu().clone() for k, v in net.state_dict().items()}
    imports = "from robustbench.model_zoo.architectures.resnet import PreActBlock, PreActResNet"
    init = f"PreActBlock, [2, 2, 2, 2], num_classes={num_classes}, bn_before_fc=True, out_shortcut=True"
    return state, "PreActResNet-18", imports, "PreActResNet", init


def zoo_form(model: nn.Module, cfg: Mapping[str, Any], name: str, dataset: str, threat: str, num_classes: int) -> ZooForm:
    """`model` (a models.create model) as RobustBench's zoo loads it; UserError for an architecture it has not."""
    from .models import PreActResNet18, WideResNet, robustbench_zoo

    if not _NAME.fullmatch(name):  # it becomes a string and a class name in the entry's code
        raise UserError(f"--name {name!r}: a RobustBench name starts with a letter and has letters, digits, '_' and '-' only "
                        "(e.g. Me2026Flatter_WRN-34-10)")
    net, mean, std = model.net, model.normalize.mean.detach().cpu(), model.normalize.std.detach().cpu()
    normalize = None if _is_identity(mean, std) else (mean, std)
    model_name = str(cfg.get("model"))
    if model_name.startswith(robustbench_zoo.PREFIX):  # fine-tuned from the zoo: its own architecture, as it is
        source = model_name[len(robustbench_zoo.PREFIX):]
        args = cfg.get("model_args") or {}
        src_dataset, src_threat = args.get("dataset", dataset), args.get("threat_model", threat)
        imports = ("from robustbench.model_zoo import model_dicts\n"
                   "from robustbench.model_zoo.enums import BenchmarkDataset, ThreatModel")
        constructor = f"model_dicts[BenchmarkDataset({src_dataset!r})][ThreatModel({src_threat!r})][{source!r}]['model']"
        code = _entry(name, dataset, threat, imports, constructor, None, None)
        state = {k: v.detach().cpu().clone() for k, v in net.state_dict().items()}
        return ZooForm(state, f"{type(net).__name__} (the architecture of RobustBench's {source})", code)
    if isinstance(net, WideResNet) and net.conv1.in_channels == 3:
        state, arch, imports, base, init = _wideresnet(net, num_classes)
    elif isinstance(net, PreActResNet18) and net.conv1.out_channels == 64 and net.conv1.stride == (1, 1) and net.conv1.in_channels == 3:
        state, arch, imports, base, init = _preactresnet(net, num_classes)
    else:
        raise UserError(f"model {model_name!r} has no architecture in RobustBench's zoo (flatrobust exports wrn34_10, wrn28_10, "
                        "preactresnet18 at width 64 and stem stride 1, and robustbench:<Name>): --format state_dict writes plain weights")
    return ZooForm(_with_normalization(state, normalize), arch, _entry(name, dataset, threat, imports, base, init, normalize))


def check_form(form: ZooForm, model: nn.Module, shape: tuple[int, ...]) -> float:
    """Build the entry's architecture with the installed robustbench, load the state_dict strictly, and return
    the largest |logit difference| with `model` on a random batch; UserError if it does not load."""
    from .models.robustbench_compat import import_robustbench

    import_robustbench()
    scope: dict[str, Any] = {}
    exec(compile(form.entry_code, "<zoo entry>", "exec"), scope)  # our own generated code (the name is checked)
    zoo_net = scope["ENTRY"][1]["model"]()
    try:
        zoo_net.load_state_dict(form.state_dict, strict=True)
    except RuntimeError as e:  # a bug of this module, not the user's: say so in one line
        raise UserError(f"the exported weights do not load into RobustBench's architecture ({str(e).splitlines()[1].strip()[:160]}): "
                        "please report this") from None
    x = torch.rand(2, *shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = model.eval().cpu()(x)
        theirs = zoo_net.eval()(x)
    return float((ours - theirs).abs().max())


# ----------------------------------------------------------------------------------------- model info

def _percent(correct: int, n: int) -> str:
    return str(round(100 * correct / n, 2))  # as robustbench's update_json writes it


def check_full_autoattack(report: Mapping[str, Any], *, where: Path, checkpoint: Path, epoch: Any, weights: str, dataset: str,
                          test_size: int, norm: str, eps: float) -> None:
    """UserError (one line, saying what to run) unless `report` (an eval.json) is standard AutoAttack on the
    whole test split of `dataset` at radius `eps`, with every trust check passed, for these weights."""
    from .attacks import format_eps

    run = (f"flatrobust eval {checkpoint} --attacks clean,autoattack --eps {format_eps(eps)}"
           f"{' --weights ema' if weights == 'ema' else ''} (the whole test split: no --n, and the trust checks on) and export again")
    lead = f"RobustBench's AutoAttack accuracy needs standard AutoAttack on the whole {dataset} test split at eps {format_eps(eps)} with every trust check passed"

    def refuse(why: str) -> UserError:
        return UserError(f"{where}: {why}; {lead}: run {run}")

    cfg = report.get("config") or {}
    data = cfg.get("data") or {}
    attacks = report.get("attacks") or {}
    if report.get("format") != "flatrobust-eval":
        raise refuse("is not an eval.json written by `flatrobust eval`")
    if Path(str(report.get("checkpoint", ""))).name != checkpoint.name or report.get("epoch") != epoch or cfg.get("weights", "raw") != weights:
        raise refuse(f"evaluates {Path(str(report.get('checkpoint'))).name} (epoch {report.get('epoch')}, {cfg.get('weights', 'raw')} weights), "
                     f"not {checkpoint.name} (epoch {epoch}, {weights} weights)")
    aa = attacks.get("autoattack")
    if aa is None:
        raise refuse("has no AutoAttack result")
    params = aa.get("params") or {}
    if params.get("version") != "standard" or list(params.get("stages") or []) != AA_STAGES:
        raise refuse(f"ran AutoAttack {params.get('version')!r} with stages {params.get('stages')}, not the standard four")
    if "clean" not in attacks:
        raise refuse("has no clean accuracy")
    if data.get("name") != dataset or data.get("split", "test") != "test" or data.get("n") is not None or report.get("n") != test_size:
        raise refuse(f"evaluated {report.get('n')} examples of {data.get('name')!r} {data.get('split', 'test')}, not the whole "
                     f"{dataset} test split ({test_size})")
    if cfg.get("norm") != norm or not math.isclose(float(cfg.get("eps", -1)), eps, rel_tol=1e-9, abs_tol=1e-12):
        raise refuse(f"is at {cfg.get('norm')} eps {format_eps(float(cfg.get('eps', float('nan'))))}, not {norm} {format_eps(eps)}")
    checks = report.get("checks")
    if not cfg.get("checks") or not checks:
        raise refuse("ran without the trust checks")
    failed = [c.get("name") for c in checks if not c.get("passed")]
    if failed:
        raise refuse(f"failed the trust check(s) {', '.join(map(str, failed))}: the AutoAttack number cannot be trusted "
                     "until they pass (docs/EVALUATION.md says what each one means)")


def model_info(report: Mapping[str, Any], cfg: Mapping[str, Any], *, dataset: str, eps: float, architecture: str) -> dict[str, Any]:
    """The model-info JSON: robustbench's ModelInfo fields, filled from a checked eval.json, plus where they come from."""
    from . import __version__
    from .attacks import format_eps

    attacks, n = report["attacks"], report["n"]
    from_zoo = str(cfg.get("model", "")).startswith("robustbench:")
    awp = (cfg.get("awp") or {}).get("gamma") or 0
    method = str(cfg.get("method", "at")).upper() + (f"-AWP (gamma {awp:g})" if awp else "")
    trained = (f"fine-tuned from RobustBench's {str(cfg['model']).split(':', 1)[1]} with {method}" if from_zoo else f"trained with {method}")
    info = dict.fromkeys(MODEL_INFO_FIELDS)
    info.update({
        # extra data: RST's pseudo-labeled set; unknown for a zoo model (its own training data counts too)
        "additional_data": None if from_zoo else bool((cfg.get("data") or {}).get("extra")),
        "number_forward_passes": 1,  # one deterministic network: ensembles and randomized models are never exported
        "dataset": dataset, "architecture": architecture, "eps": format_eps(eps),
        "clean_acc": _percent(attacks["clean"]["correct"], n), "autoattack_acc": _percent(attacks["autoattack"]["correct"], n),
        "footnote": f"{trained} in flatrobust {__version__}; standard AutoAttack (pyautoattack "
                    f"{(report.get('environment') or {}).get('pyautoattack') or '?'}) on the {n} test images, every trust check passed.",
    })
    info["flatrobust"] = {"eval": report.get("command"), "checkpoint": report.get("checkpoint"), "epoch": report.get("epoch"),
                          "weights": (report.get("config") or {}).get("weights", "raw"), "n_examples": n,
                          "trust_checks": f"{len(report['checks'])} passed", "to_fill": [k for k in MODEL_INFO_FIELDS if info[k] is None
                                                                                         and not k.startswith("corruptions")]}
    return info


# ----------------------------------------------------------------------------------------- files

def _refuse_existing(paths: list[Path], overwrite: bool) -> None:
    existing = [p for p in paths if p.exists()]
    if existing and not overwrite:
        raise UserError(f"{existing[0]} already exists: pass --overwrite to replace it, or another folder or --name")


def _safetensors_bytes(state: Mapping[str, torch.Tensor], metadata: dict[str, str]) -> bytes:
    try:
        from safetensors.torch import save
    except ImportError:
        raise UserError("the safetensors copy needs the safetensors package: pip install 'flatrobust[robustbench]' "
                        "(or pip install safetensors)") from None
    return save({k: v.detach().cpu().contiguous() for k, v in state.items()}, metadata=metadata)


def _write_weights(state: dict[str, torch.Tensor], pt: Path, st: Path, metadata: dict[str, str]) -> None:
    blob = _safetensors_bytes(state, metadata)  # before anything is written: a missing package writes nothing
    write_atomic(pt, lambda f: torch.save(state, f))
    write_atomic(st, lambda f: f.write(blob))


def export_robustbench(checkpoint: str | os.PathLike, out_dir: str | os.PathLike, *, name: str | None = None, weights: str = "raw",
                       eval_path: str | os.PathLike | None = None, overwrite: bool = False, verify: bool = True) -> dict[str, Any]:
    """Write checkpoint's model in RobustBench's layout under out_dir (module docstring); returns
    {"files": [paths], "model_info": dict, "max_logit_difference": float or None (robustbench not installed)}.

    UserError (one line), nothing written: a dataset or threat model without a RobustBench leaderboard, an
    architecture its zoo has not, a name that is not a valid zoo name or is taken, an eval.json that is not
    a full standard AutoAttack with every trust check passed, files already there (without overwrite).
    """
    from . import __version__
    from .data import info_from_checkpoint

    path = Path(checkpoint)
    if path.is_dir():
        path = path / ("best.pt" if (path / "best.pt").exists() else "last.pt")
    model, ckpt = model_from_checkpoint(path, "cpu", weights=weights)
    cfg = ckpt["config"]
    info = info_from_checkpoint(ckpt)
    dataset, norm = (cfg.get("data") or {}).get("name"), (cfg.get("attack") or {}).get("norm")
    threat = NORM_THREATS.get(norm)
    if (dataset, threat) not in LEADERBOARD_EPS or dataset == "imagenet":
        raise UserError(f"RobustBench has no leaderboard for {dataset!r} {threat or norm} that flatrobust exports to (it exports "
                        "cifar10 Linf, cifar10 L2, cifar100 Linf runs): --format state_dict writes plain weights")
    eps = LEADERBOARD_EPS[(dataset, threat)]
    name = name or str(cfg.get("name") or "")
    form = zoo_form(model, cfg, name, dataset, threat, info.num_classes)
    mangled = [k for k in form.state_dict if "module." in k or "model." in k]
    if mangled:  # load_model cuts these substrings from any key that contains them
        raise UserError(f"key {mangled[0]!r} contains 'module.' or 'model.', which robustbench's load_model would cut: not exportable")
    from .rundir import eval_file

    legacy = path.parent / ("eval.json" if weights == "raw" else "eval_ema.json")  # written before one file per checkpoint
    report_path = Path(eval_path) if eval_path else eval_file(path, weights)
    if not eval_path and not report_path.is_file() and legacy.is_file():
        report_path = legacy
    if not report_path.is_file():
        raise UserError(f"{report_path} does not exist: the model-info JSON needs the evaluation of {path.name}; run "
                        f"flatrobust eval {path} --attacks clean,autoattack --eps {'8/255' if threat == 'Linf' else '0.5'}"
                        f"{' --weights ema' if weights == 'ema' else ''} (the whole test split, trust checks on), or pass --eval FILE")
    try:
        report = json.loads(report_path.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{report_path} cannot be read as JSON ({type(e).__name__}): run flatrobust eval again") from None
    check_full_autoattack(report, where=report_path, checkpoint=path, epoch=ckpt.get("epoch"), weights=weights, dataset=dataset,
                          test_size=info.test_size, norm=norm, eps=eps)
    if verify:
        _refuse_zoo_name(name, dataset, threat)
    diff = check_form(form, model, (info.in_channels, info.image_size, info.image_size)) if verify and _robustbench_installed() else None
    if diff is not None and not diff <= 1e-4:
        raise UserError(f"RobustBench's architecture gives other logits than the checkpoint (max difference {diff:.3g}): please report this")
    record = model_info(report, cfg, dataset=dataset, eps=eps, architecture=form.architecture)
    out = Path(out_dir)
    pt, st = out / dataset / threat / f"{name}.pt", out / dataset / threat / f"{name}.safetensors"
    js, py = out / "model_info" / dataset / threat / f"{name}.json", out / "model_zoo" / dataset / threat / f"{name}.py"
    _refuse_existing([pt, st, js, py], overwrite)
    _write_weights(form.state_dict, pt, st, {"format": "pt", "written_by": f"flatrobust {__version__}", "robustbench_name": name,
                                             "dataset": dataset, "threat_model": threat, "architecture": form.architecture})
    write_atomic(js, lambda f: f.write((json.dumps(record, indent=2) + "\n").encode()))
    write_atomic(py, lambda f: f.write(form.entry_code.encode()))
    return {"files": [pt, st, js, py], "model_info": record, "max_logit_difference": diff}


def _robustbench_installed() -> bool:
    from .models.robustbench_compat import RobustBenchMissing, import_robustbench

    try:
        import_robustbench()
    except RobustBenchMissing:
        return False
    return True


def _refuse_zoo_name(name: str, dataset: str, threat: str) -> None:
    """UserError when RobustBench's zoo already has `name` for (dataset, threat): load_model would load that one."""
    if not _robustbench_installed():
        return
    from .models import robustbench_zoo

    if name in robustbench_zoo.zoo(dataset, threat):
        raise UserError(f"--name {name!r} is taken: RobustBench's zoo has a {dataset} {threat} model of that name; choose another")


def export_state_dict(checkpoint: str | os.PathLike, out: str | os.PathLike, *, weights: str = "raw", overwrite: bool = False) -> list[Path]:
    """The checkpoint's model.state_dict() (normalization layer included: `normalize.*`, then the network `net.*`)
    as OUT.pt and OUT.safetensors, for loading into `models.create(...)` in your own code."""
    from . import __version__

    out = Path(out)
    if out.suffix != ".pt":
        raise UserError(f"--out {str(out)!r} must end with .pt (the safetensors copy is written beside it)")
    model, ckpt = model_from_checkpoint(checkpoint, "cpu", weights=weights)
    st = out.with_suffix(".safetensors")
    _refuse_existing([out, st], overwrite)
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    cfg = ckpt["config"]
    _write_weights(state, out, st, {"format": "pt", "written_by": f"flatrobust {__version__}", "model": str(cfg.get("model")),
                                    "model_args": json.dumps(cfg.get("model_args") or {}, sort_keys=True)})
    return [out, st]
