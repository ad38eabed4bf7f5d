import re

import pytest

from flatrobust.config import RunConfig, load_config, parse_overrides
from flatrobust.errors import UserError


def test_defaults_and_overrides(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("name: x\nattack:\n  eps: 8/255\n  steps: 7\nawp:\n  gamma: 0.01\n")
    cfg = load_config(recipe, ["awp.gamma=0.005", "epochs=3", "data.download=true", "optim.lr=1e-2"])
    assert isinstance(cfg, RunConfig)
    assert cfg.attack.eps == pytest.approx(8 / 255)
    assert cfg.attack.steps == 7
    assert cfg.awp.gamma == 0.005
    assert cfg.epochs == 3
    assert cfg.data.download is True
    assert cfg.optim.lr == 0.01


def test_parse_overrides_nests():
    assert parse_overrides(["a.b=1", "a.c=x", "d=8/255"]) == {"a": {"b": 1, "c": "x"}, "d": "8/255"}


@pytest.mark.parametrize(
    "overrides,match",
    [
        (["awp.gama=0.01"], r"unknown config key 'awp.gama' \(did you mean 'awp.gamma'\?\)"),
        (["epoch=3"], r"did you mean 'epochs'"),
        (["attack.eps=-0.1"], r"attack.eps must be >= 0, got -0.1"),
        (["awp.gamma=-1"], r"awp.gamma must be >= 0"),
        (["optim.lr=0"], r"optim.lr must be > 0"),
        (["batch_size=0"], r"batch_size must be >= 1"),
        (["batch_size=abc"], r"batch_size must be an integer, got 'abc'"),
        (["attack.eps=big"], r"attack.eps must be a number such as 0.03 or 8/255"),
        (["method=tardes"], r"method must be one of at, trades, mart, got 'tardes' \(did you mean 'trades'\?\)"),
        (["data.name=cifar"], r"data.name must be one of"),
        (["model=resnet"], r"unknown model .resnet."),
        (["attack.norm=l1"], r"attack.norm must be one of linf, l2"),
        (["data.download=maybe"], r"data.download must be true or false"),
        (["epochs"], r"must look like key=value"),
        (["name=../x"], r"name '../x' may only contain"),
    ],
)
def test_bad_values_one_line_error(overrides, match):
    with pytest.raises(UserError, match=match) as e:
        load_config(None, overrides)
    assert "\n" not in str(e.value)


def test_bad_recipe_files(tmp_path, monkeypatch):
    with pytest.raises(UserError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    (tmp_path / "recipes").mkdir()
    (tmp_path / "recipes" / "mine_trades.yaml").write_text("method: trades\n")
    monkeypatch.chdir(tmp_path)  # a recipe of the user's own ./recipes is suggested too
    with pytest.raises(UserError, match=r"^recipe mine_trade does not exist: did you mean recipes/mine_trades\.yaml\?$"):
        load_config("mine_trade")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n")
    with pytest.raises(UserError, match="not valid YAML"):
        load_config(bad)
    lst = tmp_path / "list.yaml"
    lst.write_text("- a\n- b\n")
    with pytest.raises(UserError, match="must be a mapping"):
        load_config(lst)


def test_attack_alpha_follows_eps_unless_given(tmp_path):
    """One default for the PGD step everywhere (`attacks.default_alpha`): a recipe or command line that sets eps
    but not alpha gets eps/4 (L-inf) or eps * 15/128 (L2), not a fixed 2/255; a given alpha is kept."""
    from flatrobust.attacks import AttackConfig, default_alpha

    assert load_config(None, []).attack.alpha == 2 / 255  # the default 8/255 L-inf
    assert load_config(None, ["attack.eps=16/255"]).attack.alpha == pytest.approx(4 / 255)
    assert load_config(None, ["attack.norm=l2", "attack.eps=128/255"]).attack.alpha == pytest.approx(15 / 255)
    assert load_config(None, ["attack.eps=0.2", "attack.alpha=null"]).attack.alpha == pytest.approx(0.05)
    recipe = tmp_path / "r.yaml"
    recipe.write_text("attack:\n  eps: 8/255\n  alpha: 1/255\n")
    assert load_config(recipe, ["attack.eps=16/255"]).attack.alpha == pytest.approx(1 / 255)  # written: kept
    cfg = load_config(None, ["attack.eps=0.1", "attack.steps=3"])
    assert cfg.attack == AttackConfig(eps=0.1, steps=3) and cfg.attack.alpha == default_alpha("linf", 0.1)
    assert list(cfg.to_dict()["attack"]) == ["norm", "eps", "alpha", "steps"]  # config.yaml's order, as before
    with pytest.raises(UserError, match=r"attack.alpha must be >= 0, got -0.1"):
        load_config(None, ["attack.alpha=-0.1"])


def test_every_recipe_keeps_the_step_it_writes():
    """The recipes write their step (the paper's, e.g. SVHN's 1/255 at 8/255): the default does not replace it."""
    from pathlib import Path

    import yaml

    from flatrobust.config import _coerce

    recipes = sorted(Path("recipes").rglob("*.yaml"))
    assert len(recipes) > 20
    for path in recipes:
        written = (yaml.safe_load(path.read_text()).get("attack") or {}).get("alpha")
        if written is not None:
            assert load_config(path).attack.alpha == _coerce("attack.alpha", written, float), path


def test_a_mapping_given_whole_replaces_the_recipes_a_dotted_key_sets_one_entry(tmp_path, capsys):
    """`model_args={}` on the command line once left the recipe's model_args as they were: a mapping given whole
    replaces the recipe's (also at --resume), a dotted key sets one entry, and a section given whole is refused."""
    import yaml

    from flatrobust.cli import main
    from flatrobust.config import resume_config

    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: preactresnet18\nmodel_args: {width: 16, stem_stride: 2}\n")
    assert load_config(recipe).model_args == {"width": 16, "stem_stride": 2}
    assert load_config(recipe, ["model_args={}"]).model_args == {}
    assert load_config(recipe, ["model_args={width: 8}"]).model_args == {"width": 8}
    assert load_config(recipe, ["model_args.width=8"]).model_args == {"width": 8, "stem_stride": 2}
    assert load_config(recipe, ["model_args={}", "model_args.width=8"]).model_args == {"width": 8}
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump(load_config(recipe).to_dict(), sort_keys=False))
    assert resume_config(run, ["model_args={}"]).model_args == {}
    assert resume_config(run, ["model_args.stem_stride=1"]).model_args == {"width": 16, "stem_stride": 1}
    for bad, example in (("data={}", "data.name=..."), ("optim={lr: 0.05}", "optim.lr=..."), ("attack={}", "attack.eps=...")):
        with pytest.raises(UserError, match=f"is a section: override its keys one by one \\(e.g. {re.escape(example)}\\)"):
            load_config(recipe, [bad])
    assert main(["train", "recipes/digits_at.yaml", "data={name: digits}", f"out_dir={tmp_path / 'o'}", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "data is a section" in err and err.count("\n") == 1 and not (tmp_path / "o").exists()
