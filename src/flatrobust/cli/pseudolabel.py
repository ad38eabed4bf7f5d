"""`flatrobust pseudolabel CHECKPOINT IMAGES.npz --out EXTRA.npz`: pseudo-labels for RST.

Robust self-training (Carmon et al. 2019) labels unlabeled images with a standard (non-robust) classifier
and mixes them into adversarial training (`data.extra=EXTRA.npz`, `data.extra_fraction=0.5`). This
command runs a checkpoint's model in eval mode on the images of IMAGES.npz (array `x`, or the only array
in the file; uint8 or floats in [0, 1], channels first or last) and writes `x` unchanged, `y` (the
predicted labels) and `confidence` (the top softmax probability), read back without pickle.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import UserError
from .common import add_quiet_argument, add_trust_argument


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="the labeling model: a .pt written by `flatrobust train`, or its run directory")
    parser.add_argument("images", help=".npz with the unlabeled images as array x (or its only array)")
    parser.add_argument("--out", required=True, help="the .npz to write (x, y, confidence): pass it as data.extra")
    parser.add_argument("--batch-size", type=int, default=512, help="images per forward pass (default: 512)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="default: cuda when available")
    add_trust_argument(parser)
    add_quiet_argument(parser)


def run(args: argparse.Namespace) -> int:
    import numpy as np
    import torch

    from ..checkpoint import model_from_checkpoint
    from ..data import DataError, images_to_tensor, info_from_checkpoint, read_npz
    from ..machine import resolve_device
    from ..progress import Progress

    if args.batch_size < 1:
        raise UserError(f"--batch-size must be >= 1, got {args.batch_size}")
    out = Path(args.out)
    if out.suffix != ".npz":
        raise UserError(f"--out must end in .npz, got {out}")
    device = resolve_device(args.device, option="--device")
    model, ckpt = model_from_checkpoint(args.checkpoint, device, trust_code=args.trust_model_code)
    info = info_from_checkpoint(ckpt)  # the images must have the training data's channels and size
    try:
        arrays = read_npz(args.images, "images", hint="an .npz holding the unlabeled images as array x")
        if "x" not in arrays and len(arrays) != 1:
            raise UserError(f"{args.images} holds {', '.join(arrays) or 'no arrays'}: name the images array x")
        x_np = arrays["x"] if "x" in arrays else next(iter(arrays.values()))
        images_to_tensor(x_np[:1], info, str(args.images))  # layout, size and dtype checked once, up front
        if len(x_np) == 0:
            raise UserError(f"{args.images} holds no images")
    except DataError as e:
        raise UserError(str(e)) from None
    labels, confidence = [], []
    with torch.no_grad():  # converted batch by batch: 500K CIFAR images as float32 would take 6 GiB
        for i in Progress(range(0, len(x_np), args.batch_size), desc="pseudo-labeling", unit="batch", enabled=not args.quiet):
            try:
                xb = images_to_tensor(x_np[i:i + args.batch_size], info, str(args.images))
            except DataError as e:  # a float image outside [0, 1] further down the file
                raise UserError(str(e)) from None
            p = model(xb.to(device)).float().softmax(1)
            c, y = p.max(1)
            labels.append(y.cpu())
            confidence.append(c.cpu())
    y = torch.cat(labels).numpy().astype(np.int64)
    conf = torch.cat(confidence).numpy().astype(np.float32)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp.npz")
    np.savez(tmp, x=x_np, y=y, confidence=conf)
    tmp.replace(out)
    counts = np.bincount(y, minlength=info.num_classes)
    print(f"labeled {len(y)} images with {args.checkpoint} ({ckpt['config']['model']}, {info.name}): "
          f"mean confidence {conf.mean():.3f}, per class {counts.min()}..{counts.max()}")
    print(f"wrote {out}: train with data.extra={out}")
    return 0
