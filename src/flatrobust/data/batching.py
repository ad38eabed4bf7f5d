"""Batching and augmentation on the training device: index batches (plain, or RST's labeled + extra mix)
and a random crop + flip of a whole batch in one gather, with no per-sample transforms or DataLoader.

    >>> g = torch.Generator("cuda").manual_seed(0)
    >>> for idx in batches(len(train), 128, shuffle=True, generator=g):
    ...     xb, yb = augment(train.x[idx], generator=g), train.y[idx]
"""
from __future__ import annotations

from typing import Iterator

import torch
import torch.nn.functional as F


def augment(
    x: torch.Tensor, *, crop_padding: int = 4, flip: bool = True, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Random crop (after zero padding by `crop_padding` pixels) and random horizontal flip.

    x: (N, C, H, W), any float dtype, on any device. Returns a new tensor of the same shape:
    sample i is the H x W window at a uniform offset (dy, dx) in [0, 2 * crop_padding] of its
    zero-padded image, mirrored left-right with probability 1/2 if `flip`. Pure tensor ops on
    x's device; deterministic given `generator`, which must live on x's device (None: the
    global RNG). With crop_padding=0 and flip=False, returns x itself.
    """
    if crop_padding < 0:
        raise ValueError(f"crop_padding must be >= 0, got {crop_padding}")
    if crop_padding == 0 and not flip:
        return x
    n, c, h, w = x.shape
    p = crop_padding
    dev = x.device
    offsets = torch.randint(0, 2 * p + 1, (2, n), generator=generator, device=dev)
    rows = offsets[0, :, None] + torch.arange(h, device=dev)  # (N, H): rows of the padded image
    cols = offsets[1, :, None] + torch.arange(w, device=dev)  # (N, W): columns of the padded image
    if flip:
        flipped = torch.rand(n, generator=generator, device=dev) < 0.5
        cols = torch.where(flipped[:, None], cols.flip(1), cols)  # read the window right-to-left
    # Pad once, then gather every sample's window through flat indices into the padded plane:
    # one gather for the whole batch instead of a Python loop over samples.
    padded = F.pad(x, (p, p, p, p)).flatten(2)  # (N, C, (H + 2p) * (W + 2p)), zeros outside
    flat = (rows[:, :, None] * (w + 2 * p) + cols[:, None, :]).flatten(1)  # (N, H * W)
    out = padded.gather(2, flat[:, None, :].expand(n, c, h * w))
    return out.view(n, c, h, w)


def cutout(x: torch.Tensor, length: int, *, generator: torch.Generator | None = None) -> torch.Tensor:
    """Cutout (DeVries and Taylor 2017) as the official training script applies it after crop and flip: a
    `length` x `length` square of zeros at a uniform position that lies wholly inside the image (top-left corner
    in [0, H - length] x [0, W - length]), one per image. x: (N, C, H, W); returns a new tensor; `generator`
    on x's device (None: the global RNG)."""
    n, _, h, w = x.shape
    if not 0 < length <= min(h, w):
        raise ValueError(f"cutout length must be in 1..{min(h, w)} for {h}x{w} images, got {length}")
    dev = x.device
    y0 = torch.randint(0, h - length + 1, (n,), generator=generator, device=dev)
    x0 = torch.randint(0, w - length + 1, (n,), generator=generator, device=dev)
    rows = torch.arange(h, device=dev)[None, :, None]  # (1, H, 1)
    cols = torch.arange(w, device=dev)[None, None, :]  # (1, 1, W)
    inside = ((rows >= y0[:, None, None]) & (rows < (y0 + length)[:, None, None])
              & (cols >= x0[:, None, None]) & (cols < (x0 + length)[:, None, None]))  # (N, H, W)
    return x.masked_fill(inside[:, None], 0.0)


def batches(
    n: int, batch_size: int, *, shuffle: bool, generator: torch.Generator | None, drop_last: bool = False
) -> Iterator[torch.Tensor]:
    """Yield int64 index tensors covering range(n) once, in batches of `batch_size`.

    With `shuffle`, the order is a permutation drawn from `generator` (on its device; the global
    CPU RNG if None); otherwise 0..n-1 in order. `drop_last` drops a final short batch.
    """
    device = generator.device if generator is not None else "cpu"
    order = torch.randperm(n, generator=generator, device=device) if shuffle else torch.arange(n, device=device)
    stop = n - n % batch_size if drop_last else n
    for start in range(0, stop, batch_size):
        yield order[start : start + batch_size]


def mixed_batch_sizes(batch_size: int, extra_fraction: float) -> tuple[int, int]:
    """(labeled, extra) examples per batch: round(batch_size * extra_fraction) extra, at least one labeled."""
    n_extra = min(int(round(batch_size * extra_fraction)), batch_size - 1)
    return batch_size - n_extra, n_extra


def mixed_batches(
    n_labeled: int, n_extra: int, batch_size: int, extra_fraction: float, *, generator: torch.Generator | None,
    drop_last: bool = False,
) -> list[torch.Tensor]:
    """One epoch of RST batches as index tensors into cat([labeled, extra]).

    Every labeled example appears once per epoch (shuffled, as `batches`); each batch is completed with
    extra examples (indices n_labeled + j) drawn without replacement from a shuffled order of the extra
    data, reshuffled whenever it runs out. Deterministic given `generator`.
    """
    per_lab, per_extra = mixed_batch_sizes(batch_size, extra_fraction)
    labeled = list(batches(n_labeled, per_lab, shuffle=True, generator=generator, drop_last=drop_last))
    device = generator.device if generator is not None else "cpu"
    need = len(labeled) * per_extra
    orders = [torch.randperm(n_extra, generator=generator, device=device) for _ in range(-(-need // n_extra))] if per_extra else []
    pool = torch.cat(orders) + n_labeled if orders else torch.empty(0, dtype=torch.int64, device=device)
    out, used = [], 0
    for lab in labeled:  # a short last batch gets extra examples in proportion
        k = per_extra if len(lab) == per_lab else int(round(len(lab) * per_extra / per_lab))
        out.append(torch.cat([lab, pool[used:used + k]]))
        used += k
    return out
