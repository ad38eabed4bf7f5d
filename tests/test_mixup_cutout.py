"""Cutout and mixup as the official training script defines them."""
import torch
import torch.nn.functional as F

from flatrobust.data import cutout
from flatrobust.mixup import mixup


def test_cutout_zeroes_one_square_wholly_inside_each_image():
    x = torch.rand(64, 3, 8, 10) + 0.5  # no zero anywhere before
    out = cutout(x, 3, generator=torch.Generator().manual_seed(0))
    zero = (out == 0).all(1)  # (N, H, W): zeroed in every channel
    assert torch.equal(out[~zero[:, None].expand_as(out)], x[~zero[:, None].expand_as(x)])  # the rest untouched
    for img in zero:
        rows, cols = img.nonzero(as_tuple=True)
        assert len(rows) == 9 and rows.max() - rows.min() == 2 and cols.max() - cols.min() == 2  # one 3x3 square
    corners = {(int(img.nonzero()[0, 0]), int(img.nonzero()[0, 1])) for img in zero}
    assert max(r for r, _ in corners) <= 5 and max(c for _, c in corners) <= 7 and len(corners) > 10  # anywhere inside


def test_mixup_mixes_inputs_and_losses_with_one_weight_per_batch():
    torch.manual_seed(0)
    x, y = torch.rand(16, 3, 4, 4), torch.randint(0, 5, (16,))
    m = mixup(x, y, 1.0)
    assert 0 < m.lam < 1 and torch.equal(m.y_a, y)
    # y_b is a permutation of y, and x~ = lam x + (1 - lam) x[perm] for that permutation
    idx = torch.tensor([int(next(j for j in range(16) if torch.allclose(m.x[i], m.lam * x[i] + (1 - m.lam) * x[j]))) for i in range(16)])
    assert sorted(idx.tolist()) == list(range(16)) and torch.equal(m.y_b, y[idx])
    logits = torch.randn(16, 5)
    assert torch.allclose(m.loss(logits), m.lam * F.cross_entropy(logits, y) + (1 - m.lam) * F.cross_entropy(logits, y[idx]))
    plain = mixup(x, y, 0.0)  # alpha 0: no mixing (the official lam = 1)
    assert plain.lam == 1.0 and torch.equal(plain.x, x)
