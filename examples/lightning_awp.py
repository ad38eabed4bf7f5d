"""AT-AWP in PyTorch Lightning: flatrobust's AWPCallback on a LightningModule (digits, CPU, well under a minute).

    pip install 'flatrobust[lightning]'
    python examples/lightning_awp.py [--epochs 4] [--gamma 0.01] [--warmup 1]

The module is an ordinary LightningModule; AWP is one callback. The one thing adversarial training adds is
`awp_loss_fn`: the callback calls it at the unperturbed weights w, so the attack runs there (Wu et al. 2020,
Algorithm 1: x' at w, then v from the loss at x', then the step at w + v), and it returns the loss to ascend.
For fine-tuning without an adversary leave it out: the callback then ascends the loss training_step returns.
AWP starts after a one-epoch warm-up (`start_epoch`): from the first step it can leave a network this small at
one class (docs/AWP_COLLAPSE.md).
"""
from __future__ import annotations

import argparse

import pytorch_lightning as pl
import torch
from sklearn.datasets import load_digits

from flatrobust import AT, AttackConfig, models, pgd
from flatrobust.integrations.lightning import AWPCallback


class DigitsAT(pl.LightningModule):
    def __init__(self, eps: float = 0.2, lr: float = 0.05):
        super().__init__()
        self.net = models.create("smallcnn", num_classes=10, in_channels=1)
        self.objective = AT(AttackConfig(eps=eps, alpha=eps / 3, steps=3))  # PGD-3: a quick example
        self.lr = lr
        self.x_adv = None  # the batch's adversarial examples, found at w by awp_loss_fn

    def awp_loss_fn(self, batch, batch_idx):
        x, y = batch
        self.x_adv = self.objective.attack(self.net, x, y)  # 1. at w
        return lambda module: self.objective.ascent_loss(self.net, x, self.x_adv, y)  # 2. the loss AWP ascends

    def training_step(self, batch, batch_idx):
        x, y = batch
        x_adv, self.x_adv = self.x_adv, None
        loss = self.objective.loss(self.net, x, x_adv, y)  # 3. at w + v
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.net.parameters(), lr=self.lr, momentum=0.9, weight_decay=5e-4)


def digits(train: bool, n: int = 1400) -> torch.utils.data.TensorDataset:
    """scikit-learn's digits (no download): the first n of 1,400 training images, or the 397 test images."""
    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0  # (N, 1, 8, 8) in [0, 1]
    y = torch.tensor(d.target)
    part = slice(0, min(n, 1400)) if train else slice(1400, None)
    return torch.utils.data.TensorDataset(x[part], y[part])


def accuracy(net: torch.nn.Module, data: torch.utils.data.TensorDataset, eps: float) -> tuple[float, float]:
    """(clean, PGD-10) accuracy on `data`, eval mode."""
    x, y = data.tensors
    net.eval()
    with torch.no_grad():
        clean = (net(x).argmax(1) == y).float().mean().item()
    x_adv = pgd(net, x, y, eps=eps, alpha=eps / 4, steps=10)
    with torch.no_grad():
        robust = (net(x_adv).argmax(1) == y).float().mean().item()
    return clean, robust


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--gamma", type=float, default=0.01, help="AWP's relative size (0: plain AT)")
    parser.add_argument("--warmup", type=int, default=1, help="epochs of plain AT before AWP starts")
    parser.add_argument("--n-train", type=int, default=1400, help="training images (at most 1,400)")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    module = DigitsAT()
    trainer = pl.Trainer(max_epochs=args.epochs, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_model_summary=False, enable_progress_bar=False, callbacks=[AWPCallback(gamma=args.gamma, start_epoch=args.warmup)])
    loader = torch.utils.data.DataLoader(digits(train=True, n=args.n_train), batch_size=128, shuffle=True,
                                         generator=torch.Generator().manual_seed(0))
    trainer.fit(module, loader)
    clean, robust = accuracy(module.net, digits(train=False), eps=0.2)
    print(f"AT-AWP (gamma {args.gamma:g} from epoch {args.warmup}), {args.epochs} epochs on {len(loader.dataset):,} digits: "
          f"test clean {clean:.1%}, PGD-10 {robust:.1%}")
    return {"clean": clean, "robust": robust}


if __name__ == "__main__":
    main()
