"""Detect catastrophic overfitting of single-step adversarial training (Wong, Rice and Kolter 2020, Section 5).

FGSM-based training can fail abruptly: within an epoch the model learns to defeat the single-step attack it is
trained on, its accuracy under that attack rises, and its accuracy under a multi-step attack (PGD) falls to about
zero. Wong et al. catch it by watching PGD accuracy and keeping the model from before the fall.

`CatastrophicOverfitting.check` reads the numbers the training loop already monitors every epoch: the test
monitoring subset's PGD accuracy and the training accuracy under the training attack (the loop's `train_acc`).
It fires at the first epoch whose test PGD accuracy has fallen below half of its best so far, by more than
`NOISE_SE` binomial standard errors of the subset (a fall, not noise), while the training-attack accuracy is at
least what it was at that best epoch (the single-step attack is being beaten, not the model failing as a
whole: a diverging run loses both).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

MODES = ("warn", "stop", "rollback")  # guard.catastrophic: what the training loop does when it fires
NOISE_SE = 3.0  # the fall must exceed this many binomial standard errors of the monitoring subset


@dataclass
class CatastrophicOverfitting:
    """State across epochs: the best test PGD accuracy so far, its epoch and training-attack accuracy."""

    n: int  # size of the test monitoring subset (the noise of its accuracy)
    best: float = -1.0
    best_epoch: int = 0
    best_train: float = 0.0
    fired: list[int] = field(default_factory=list)  # epochs it fired at

    def check(self, epoch: int, test_robust_acc: float, train_attack_acc: float) -> str | None:
        """One line naming the epoch when it is catastrophic overfitting, else None (and the best is updated)."""
        if test_robust_acc > self.best:
            self.best, self.best_epoch, self.best_train = test_robust_acc, epoch, train_attack_acc
            return None
        se = math.sqrt(max(self.best * (1 - self.best), 1 / max(self.n, 1)) / max(self.n, 1))
        fell = test_robust_acc < self.best / 2 and self.best - test_robust_acc > NOISE_SE * se
        if fell and train_attack_acc >= self.best_train:
            self.fired.append(epoch)
            return (f"catastrophic overfitting at epoch {epoch}: test PGD accuracy fell to {100 * test_robust_acc:.1f}% from "
                    f"{100 * self.best:.1f}% at epoch {self.best_epoch} while accuracy under the training attack rose to "
                    f"{100 * train_attack_acc:.1f}% (from {100 * self.best_train:.1f}%): the model beats the single-step "
                    "attack it trains on, not PGD (Wong et al. 2020)")
        return None

    def state_dict(self) -> dict:
        return {"best": self.best, "best_epoch": self.best_epoch, "best_train": self.best_train, "fired": list(self.fired)}

    def load_state_dict(self, state: dict) -> None:
        self.best, self.best_epoch, self.best_train = state["best"], state["best_epoch"], state["best_train"]
        self.fired = list(state["fired"])
