"""The README's library example runs as written (on a tiny CIFAR-shaped batch), so the docs match the code."""
import re
from pathlib import Path

import pytest
import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_awp_loop_runs():
    block = re.search(r"## AWP in your own loop\s+```python\n(.*?)```", README.read_text(), re.S).group(1)
    g = torch.Generator().manual_seed(0)
    loader = [(torch.rand(4, 3, 32, 32, generator=g), torch.randint(0, 10, (4,), generator=g))]
    # The example builds PreActResNet-18 itself; 1 PGD step instead of 10 keeps this test at a second or two.
    namespace = {"loader": loader}
    torch.manual_seed(0)  # the example's model starts from the same weights as `fresh` below
    exec(compile(block.replace("steps=10", "steps=1"), "README.md", "exec"), namespace)  # noqa: S102
    model, awp = namespace["model"], namespace["awp"]
    torch.manual_seed(0)
    from flatrobust import models
    fresh = models.create("preactresnet18", num_classes=10, mean=(0.4914, 0.4822, 0.4465), std=(0.2471, 0.2435, 0.2616))
    old = dict(fresh.named_parameters())
    # parameters only (BN buffers move in any forward), beyond the rounding of (w + v) - v
    changed = [k for k, v in model.named_parameters() if not torch.allclose(v, old[k], rtol=0, atol=1e-5)]
    assert changed, "the example's optimizer step changed nothing"
    assert all(torch.isfinite(p).all() for p in model.parameters())
    with pytest.raises(RuntimeError):  # the loop ended with restore(): nothing is left perturbed
        awp.restore()
