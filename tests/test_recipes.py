"""Every recipe loads and validates, names what it reproduces and the command that runs it."""
from pathlib import Path

import pytest

from bench_scripts import load
from flatrobust.config import load_config, read_yaml

REPO = Path(__file__).resolve().parents[1]
RECIPES = sorted(REPO.joinpath("recipes").glob("*.yaml"))
STUDY = sorted(REPO.joinpath("recipes", "study").glob("*.yaml"))  # docs/RESULTS.md's rows (study/study.py)


def test_there_is_a_recipe_per_paper_row():
    names = {p.stem for p in RECIPES}
    for dataset in ("cifar10", "cifar10_l2", "cifar100", "svhn"):
        assert {f"{dataset}_preactresnet18_at", f"{dataset}_preactresnet18_at_awp"} <= names
    for method in ("at", "trades", "mart"):
        assert {f"cifar10_wrn34_10_{method}", f"cifar10_wrn34_10_{method}_awp"} <= names
    assert {"digits_at", "digits_at_awp", "fashion_mnist_at", "fashion_mnist_at_awp"} <= names
    assert {"cifar10_wrn28_10_rst", "cifar10_wrn28_10_rst_awp"} <= names


@pytest.mark.parametrize("path", RECIPES + STUDY, ids=lambda p: str(p.relative_to(REPO / "recipes")))
def test_recipe_validates(path):
    cfg = load_config(path)
    assert cfg.name == path.stem, "the run directory is named after the recipe"
    header = path.read_text().split("\n")
    assert any(f"flatrobust train {path.relative_to(REPO).as_posix()}" in line for line in header if line.startswith("#"))
    if path.stem.startswith(("cifar", "svhn")):
        assert any(line.startswith("# Reproduces:") for line in header)
        assert any(line.startswith("# Target (paper):") for line in header)
        assert cfg.epochs == 200 and cfg.batch_size == (256 if "_rst" in path.stem else 128)
    assert (cfg.awp.gamma > 0) == path.stem.endswith("_awp")
    assert set(read_yaml(path)) <= set(cfg.to_dict())


def test_study_rows_are_the_recipes():
    """study/study.py runs exactly the study recipes; every AWP row has its baseline (same recipe without AWP)."""
    study = load("study")
    assert {row.recipe for row in study.ROWS} == {p.stem for p in STUDY}
    for path in STUDY:
        if path.stem.endswith("_awp"):
            base, awp = read_yaml(path.with_name(path.stem[:-4] + ".yaml")), read_yaml(path)
            assert {k: v for k, v in base.items() if k not in ("name", "awp")} == {k: v for k, v in awp.items() if k not in ("name", "awp")}


def test_every_study_row_is_named_in_its_recipe_header():
    """A row that runs a recipe with overrides (the gamma curve) is named there, with its command."""
    study = load("study")
    for row in study.ROWS:
        header = [ln for ln in (REPO / "recipes" / "study" / f"{row.recipe}.yaml").read_text().splitlines() if ln.startswith("#")]
        for override in row.overrides:
            key, value = override.split("=")
            assert any(f"{key}=G" in ln for ln in header), (row.key, override)
            assert any(value in ln for ln in header if "G in" in ln), (row.key, override)
