"""Messages that stay one line whatever a name holds, and warnings for an attack that cannot be resisted."""
from __future__ import annotations

import math

import pytest

from conftest import write_untrained_checkpoint
from flatrobust.attacks import whole_box_warning
from flatrobust.cli import main, one_line

TINY = ["data.train_subset=64", "data.eval_subset=16", "batch_size=64", "attack.steps=1", "eval.steps=1", "epochs=1",
        "awp.gamma=0"]


def test_a_name_holding_a_newline_never_prints_a_line_of_its_own(tmp_path, capsys):
    """The last line of defence (names are quoted with !r where they come from files; this catches the rest)."""
    assert main(["train", str(tmp_path / "x\nflatrobust: error: forged.yaml")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "x\\nflatrobust: error: forged.yaml" in err, err
    assert one_line("tab\there, é kept") == "tab\\there, é kept"


@pytest.mark.parametrize("norm, eps, warned", [("linf", 1.0, True), ("linf", 1e308, True), ("linf", 0.99, False),
                                               ("l2", 8.0, True), ("l2", 7.99, False), ("linf", math.nan, False)])
def test_an_eps_covering_the_whole_input_range_is_named(norm, eps, warned):
    warning = whole_box_warning(norm, eps, 64)  # an 8x8 greyscale image: its diagonal is 8
    assert (warning is not None) == warned
    if warned:
        assert f"({norm}) covers the whole input range" in warning


def test_train_and_eval_warn_when_eps_covers_the_whole_input_range(tmp_path, capsys):
    assert main(["train", "recipes/digits_at.yaml", *TINY, "attack.eps=1e308", f"out_dir={tmp_path}", "--quiet"]) == 0
    err = capsys.readouterr().err
    assert "flatrobust: warning: attack.eps=1e+308 (linf) covers the whole input range" in err, err
    assert main(["train", "recipes/digits_at.yaml", *TINY, "attack.eps=0.2", f"out_dir={tmp_path}", "name=ok", "--quiet"]) == 0
    assert "covers the whole input range" not in capsys.readouterr().err
    ckpt = write_untrained_checkpoint(tmp_path)
    assert main(["eval", str(ckpt), "--attacks", "clean", "--no-checks", "--eps", "1", "--n", "8"]) == 0
    assert "flatrobust: warning: eps=1 (linf) covers the whole input range" in capsys.readouterr().err
