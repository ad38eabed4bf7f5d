"""flatrobust: adversarially robust training with Adversarial Weight Perturbation (AWP).

The public API, small enough to remember:
  - `AWP`: the weight perturbation, a SAM-like perturb/restore pair usable in any training loop (with the
    fine-tuning options of docs/AWP_VARIANTS.md); `perturbed_parameters`: the weights it perturbs;
  - `pgd`, `fgsm`, `fgsm_train`, `LinfBall`, `L2Ball`: attacks and threat models (inputs in [0, 1]); `fgsm_train` is FGSM
    as a training attack (Wong et al. 2020: a start, one step of alpha);
  - `AT`, `TRADES`, `MART`, `AttackConfig`, `create_objective`: the training objectives;
  - `models.create`: the model zoo with normalization inside the model;
  - `data.load_split`, `data.REGISTRY`: datasets as tensors (built-in sets, image folders, .npz arrays);
  - `train_step`: one AT/TRADES/MART step with optional AWP;
  - `EMA`: an exponential moving average of the weights for any training loop (update after each step);
  - `landscape_1d`, `landscape_2d`, `average_flatness`, `worst_flatness`: the analysis of the weight loss
    landscape (`flatrobust.report` and `flatrobust.evaluate` are imported on use);
  - RobustBench: `models.create("robustbench:<Name>", ...)`, and `flatrobust.robustbench_import` /
    `flatrobust.robustbench_export` (imported on use) for its models as checkpoints and yours in its format.
"""
from . import data, models
from .attacks import L2Ball, LinfBall, fgsm, fgsm_train, pgd
from .awp import AWP, perturbed_parameters
from .ema import EMA
from .flatness import average_flatness, worst_flatness
from .landscape import filter_normalized_direction, landscape_1d, landscape_2d
from .modes import frozen_bn_stats, train_mode
from .objectives import AT, MART, TRADES, AttackConfig, Objective, create_objective
from .train import train_step

__version__ = "0.1.0"

__all__ = [
    "AWP", "perturbed_parameters", "EMA", "pgd", "fgsm", "fgsm_train", "LinfBall", "L2Ball", "AT", "TRADES", "MART", "AttackConfig", "Objective",
    "create_objective", "data", "models", "frozen_bn_stats", "train_mode", "train_step", "landscape_1d", "landscape_2d",
    "filter_normalized_direction", "average_flatness", "worst_flatness", "__version__",
]
