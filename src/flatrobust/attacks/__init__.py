"""Attacks and threat models: `pgd`, `fgsm`, and the `LinfBall` / `L2Ball` geometries."""
from .losses import ce_loss, cw_loss, cw_margin, kl_loss
from .pgd import fgsm, pgd
from .threat import L2Ball, LinfBall, format_eps, threat_model

__all__ = ["pgd", "fgsm", "LinfBall", "L2Ball", "threat_model", "format_eps", "ce_loss", "cw_loss", "cw_margin", "kl_loss"]
