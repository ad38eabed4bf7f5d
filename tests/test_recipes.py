"""Every recipe loads and validates, names what it reproduces and the command that runs it."""
from pathlib import Path

import pytest

from flatrobust.config import load_config, read_yaml

RECIPES = sorted(Path(__file__).resolve().parents[1].joinpath("recipes").glob("*.yaml"))


def test_there_is_a_recipe_per_paper_row():
    names = {p.stem for p in RECIPES}
    for dataset in ("cifar10", "cifar10_l2", "cifar100", "svhn"):
        assert {f"{dataset}_preactresnet18_at", f"{dataset}_preactresnet18_at_awp"} <= names
    for method in ("at", "trades", "mart"):
        assert {f"cifar10_wrn34_10_{method}", f"cifar10_wrn34_10_{method}_awp"} <= names
    assert {"digits_at", "digits_at_awp", "fashion_mnist_at", "fashion_mnist_at_awp"} <= names
    assert {"cifar10_wrn28_10_rst", "cifar10_wrn28_10_rst_awp"} <= names


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_recipe_validates(path):
    cfg = load_config(path)
    assert cfg.name == path.stem, "the run directory is named after the recipe"
    header = path.read_text().split("\n")
    assert any(f"flatrobust train recipes/{path.name}" in line for line in header if line.startswith("#"))
    if path.stem.startswith(("cifar", "svhn")):
        assert any(line.startswith("# Reproduces:") for line in header)
        assert any(line.startswith("# Target (paper):") for line in header)
        assert cfg.epochs == 200 and cfg.batch_size == (256 if "_rst" in path.stem else 128)
    assert (cfg.awp.gamma > 0) == path.stem.endswith("_awp")
    assert set(read_yaml(path)) <= set(cfg.to_dict())
