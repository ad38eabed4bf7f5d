"""A RobustBench model as a flatrobust checkpoint, so that every command takes it: eval (with the trust
checks), landscape, flatness, pseudolabel, and fine-tuning (`init_from`).

    from flatrobust.robustbench_import import import_model
    import_model("Wu2020Adversarial", {"name": "cifar10", "root": "./data"}, out="runs/robustbench/Wu2020Adversarial")

writes out/model.pt: the config of a run (`model: robustbench:<Name>` with its dataset and threat model,
the data, the attack at RobustBench's leaderboard radius) and the zoo network's weights, read from
RobustBench's cache layout <model_dir>/<dataset>/<threat>/<Name>.pt or an explicit file
(`models.robustbench_zoo`: weights_only, strict, never downloaded). The checkpoint is rebuilt from its
config like any other: the zoo's architecture by name, its weights from the checkpoint.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any, Mapping

from .checkpoint import save_checkpoint
from .errors import UserError

# RobustBench's leaderboard radius per (dataset, threat model), in pixel units ([0, 1] images).
LEADERBOARD_EPS = {("cifar10", "Linf"): 8 / 255, ("cifar100", "Linf"): 8 / 255, ("imagenet", "Linf"): 4 / 255,
                   ("cifar10", "L2"): 0.5}
THREAT_NORMS = {"Linf": "linf", "L2": "l2"}


def sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def import_model(name: str, data: Mapping[str, Any], *, out: str | os.PathLike, threat_model: str = "Linf",
                 dataset: str | None = None, eps: float | None = None, model_dir: str | os.PathLike = "models", weights: str | os.PathLike | None = None,
                 overwrite: bool = False) -> Path:
    """Write RobustBench model `name` (no robustbench: prefix) as the flatrobust checkpoint out/model.pt; returns its path.

    data: the data section of a run (`data.name` cifar10 or cifar100; for other data, e.g. an image folder
    of ImageNet, `dataset` names RobustBench's dataset); threat_model: Linf or L2 (the attack of the
    analyses: L-inf or L2 PGD at `eps`, default RobustBench's leaderboard radius). UserError (one line)
    for anything that cannot be had; nothing is written then.
    """
    from . import models
    from .attacks import default_alpha
    from .config import config_from_dict
    from .data import DataError, dataset_info

    threat = {t.lower(): t for t in THREAT_NORMS}.get(str(threat_model).lower())
    if threat is None:
        raise UserError(f"threat model must be Linf or L2 (the attacks flatrobust runs), got {threat_model!r}")
    norm = THREAT_NORMS[threat]
    path = Path(out) / "model.pt"
    if path.exists() and not overwrite:
        raise UserError(f"{path} already exists: pass --overwrite to replace it, or another --out")
    try:
        info = dataset_info(dict(data))
    except DataError as e:
        raise UserError(str(e)) from None
    dataset = dataset or data.get("name")
    if dataset not in models.robustbench_zoo.DATASETS:
        raise UserError(f"RobustBench has models for {', '.join(models.robustbench_zoo.DATASETS)}, and the data is "
                        f"{data.get('name')!r}: give the dataset the model was trained on (--dataset)")
    try:  # the name, the dataset/threat pair and the refusals first, in RobustBench's words
        models.robustbench_zoo.entry(name, dataset, threat)
    except ValueError as e:
        raise UserError(str(e)) from None
    if eps is None:
        if (dataset, threat) not in LEADERBOARD_EPS:
            raise UserError(f"RobustBench has no {dataset} {threat} leaderboard radius: give eps (--eps)")
        eps = LEADERBOARD_EPS[(dataset, threat)]
    model_name = f"robustbench:{name}"
    cfg = config_from_dict({
        "name": name, "model": model_name, "model_args": {"dataset": dataset, "threat_model": threat},
        "data": dict(data), "attack": {"norm": norm, "eps": eps, "alpha": default_alpha(norm, eps), "steps": 10},
    })
    source = Path(weights) if weights else models.robustbench_zoo.weights_path(name, dataset, threat, model_dir)
    try:
        model = models.create(model_name, num_classes=info.num_classes, in_channels=info.in_channels, mean=info.mean,
                              std=info.std, input_size=info.image_size, **cfg.model_args, pretrained=True,
                              **({"weights": str(weights)} if weights else {"model_dir": str(model_dir)}))
    except ValueError as e:
        raise UserError(str(e)) from None
    state = {"config": cfg.to_dict(), "model": model.state_dict(), "data_info": info.to_dict(), "epoch": None,
             "robustbench": {"name": name, "dataset": dataset, "threat_model": threat, "weights_file": str(source.resolve()),
                             "sha256": sha256(source)}}
    save_checkpoint(state, path)
    return path
