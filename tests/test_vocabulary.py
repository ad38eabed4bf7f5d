"""One vocabulary across the subcommands (issue 29, item 7): the same option names mean the same, old
spellings still work, a bad option shows the subcommand's usage, and `flatrobust config` lists every key."""
from __future__ import annotations

import argparse

import pytest

from flatrobust.cli import _module, main
from flatrobust.config import RunConfig, _all_keys, describe_keys


def _parser(name: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"flatrobust {name}")
    _module(name).add_arguments(p)
    return p


def _options(name: str) -> set[str]:
    return {s for a in _parser(name)._actions for s in a.option_strings}  # noqa: SLF001


def test_every_command_takes_quiet():
    # import and export report no progress: they accept it so that one script can pass it to every command
    names = ("train", "eval", "landscape", "flatness", "pseudolabel", "report", "import", "export")
    assert all("--quiet" in _options(name) for name in names)


def test_the_same_names_everywhere():
    for name in ("eval", "landscape", "flatness"):
        assert {"--step-size", "--data-root", "--n", "--seed", "--eps", "--norm", "--weights", "--device", "--out"} <= _options(name)
    assert "--data-root" in _options("train")
    assert "--split" in _options("landscape") and "--split" in _options("flatness")


@pytest.mark.parametrize("name", ["landscape", "flatness"])
def test_old_spelling_of_split_still_works(name):
    p = _parser(name)
    assert p.parse_args(["ckpt", "--data", "train"]).split == "train" == p.parse_args(["ckpt", "--split", "train"]).split
    assert "--data " not in p.format_help()  # the alias is not offered any more


def test_eval_step_size_and_its_old_spelling():
    p = _parser("eval")
    assert p.parse_args(["c", "--step-size", "2/255"]).alpha == "2/255" == p.parse_args(["c", "--alpha", "2/255"]).alpha
    text = " ".join(p.format_help().split())
    assert "timm:<name>" in text and "package.module:callable" in text


def test_a_bad_option_shows_the_subcommands_usage(capsys):
    with pytest.raises(SystemExit) as e:
        main(["landscape", "run", "--bogus"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: flatrobust landscape") and "flatrobust landscape: error: unrecognized arguments: --bogus" in err


def test_top_level_help_points_at_the_docs_and_config(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert "docs/EVALUATION.md" in out and "flatrobust config" in out


def test_config_lists_every_key_with_default_and_meaning(capsys):
    rows = {key: (default, meaning) for key, default, meaning in describe_keys()}
    assert sorted(rows) == sorted(_all_keys(RunConfig))
    assert all(meaning for _, meaning in rows.values()), [k for k, (_, m) in rows.items() if not m]
    assert rows["awp.gamma"][0] == "0.0" and rows["attack.eps"][0] == "8/255" and "||v_l||" in rows["awp.gamma"][1]
    assert main(["config"]) == 0
    out = capsys.readouterr().out
    for key in _all_keys(RunConfig):
        assert any(line.split()[0] == key for line in out.splitlines()), key
    assert main(["config", "awp"]) == 0
    assert [line.split()[0] for line in capsys.readouterr().out.splitlines()] == [k for k in _all_keys(RunConfig) if k.startswith("awp")]
    assert rows["awp.warmup"][1].endswith("10 for TRADES)") and rows["log.interval"][1].endswith("since the last point")
    assert main(["config", "nokey"]) == 2
