"""Attacks and threat models: `pgd`, `fgsm`, Free AT's persistent perturbation (`FreePerturbation`), the `LinfBall` / `L2Ball` geometries, the protocol's PGD step `default_alpha`, and
`AttackConfig`, the one description of a PGD attack (threat model, step, steps) that training, analysis and the recipes share."""
from .losses import ce_loss, cw_loss, cw_margin, kl_loss
from .free import FreePerturbation
from .pgd import fgsm, fgsm_train, pgd
from .spec import AttackConfig
from .threat import L2Ball, LinfBall, default_alpha, format_eps, threat_model, whole_box_warning

__all__ = ["pgd", "fgsm", "fgsm_train", "FreePerturbation", "LinfBall", "L2Ball", "threat_model", "default_alpha", "format_eps", "whole_box_warning", "AttackConfig",
           "ce_loss", "cw_loss", "cw_margin", "kl_loss"]
