"""Long evaluations survive interruption: finished chunks are kept on disk, a rerun with the same arguments
continues and gives exactly the uninterrupted result, other arguments are refused with one line."""
from __future__ import annotations

import copy
import dataclasses
import json

import pytest
import torch

from conftest import write_digits_checkpoint
from flatrobust import evaluate as evaluate_module
from flatrobust.cli import main
from flatrobust.errors import UserError
from flatrobust.evaluate import evaluate

EPS = 0.2


def _strip_times(result: dict) -> dict:
    """Everything but wall-clock seconds and the count of reused chunks must repeat exactly."""
    result = copy.deepcopy(result)
    result.pop("seconds")
    result.pop("chunks", None)
    for r in result["attacks"].values():
        r.pop("seconds")
        for st in r.get("stages", {}).values():
            st.pop("seconds")
    return result


def _interrupt_after(monkeypatch, name: str, calls: int) -> None:
    """Make attack `name` raise KeyboardInterrupt on its (calls + 1)-th batch, as Ctrl-C or a kill would stop it."""
    attack = evaluate_module.ATTACKS[name]
    count = {"n": 0}

    def run(*args):
        count["n"] += 1
        if count["n"] > calls:
            raise KeyboardInterrupt
        return attack.run(*args)

    monkeypatch.setitem(evaluate_module.ATTACKS, name, dataclasses.replace(attack, run=run))


@pytest.mark.parametrize("attacks,stop_in,n,chunk", [("clean,pgd20,cw20", "cw20", 40, 16), ("pgd20,autoattack", "autoattack", 24, 8)])
def test_interrupted_then_resumed_equals_uninterrupted(trained_cnn, digits, tmp_path, monkeypatch, attacks, stop_in, n, chunk):
    _, _, x, y = digits
    x, y = x[:n], y[:n]
    args = dict(attacks=attacks, norm="linf", eps=EPS, batch_size=8, chunk_size=chunk, seed=3, progress=False, checks=False)
    full = evaluate(trained_cnn, x, y, resume_dir=tmp_path / "full", **args)
    if chunk > 8:  # chunks of several batches: the store changes nothing in the numbers
        assert _strip_times(full) == _strip_times(evaluate(trained_cnn, x, y, **args))

    _interrupt_after(monkeypatch, stop_in, 3 if chunk > 8 else 1)  # the last attack: chunk 0 done, chunk 1 not
    with pytest.raises(KeyboardInterrupt):
        evaluate(trained_cnn, x, y, resume_dir=tmp_path / "cut", **args)
    monkeypatch.undo()
    stored = sorted(p.name for p in (tmp_path / "cut").glob("*.pt"))
    assert f"{stop_in}.00000.pt" in stored and f"{stop_in}.00001.pt" not in stored
    assert not list((tmp_path / "cut").glob(".*.tmp"))  # no half-written file

    resumed = evaluate(trained_cnn, x, y, resume_dir=tmp_path / "cut", **args)
    assert _strip_times(resumed) == _strip_times(full)
    for path in sorted((tmp_path / "full").glob("*.pt")):  # chunk by chunk: same outcomes, same random stream
        a, b = (torch.load(d / path.name, weights_only=True) for d in (tmp_path / "full", tmp_path / "cut"))
        assert torch.equal(a["robust"], b["robust"]) and torch.equal(a["generator_state"], b["generator_state"]), path.name
    names = attacks.split(",")
    assert resumed["chunks"]["count"] == 3
    assert resumed["chunks"]["reused"] == {a: (3 if a != stop_in else 1) for a in names}
    again = evaluate(trained_cnn, x, y, resume_dir=tmp_path / "cut", **args)  # everything on disk: nothing recomputed
    assert again["chunks"]["reused"] == {a: 3 for a in names} and _strip_times(again) == _strip_times(full)


def test_other_arguments_refuse_to_mix(trained_cnn, digits, tmp_path):
    _, _, x, y = digits
    x, y = x[:16], y[:16]
    args = dict(attacks="pgd20", norm="linf", batch_size=8, chunk_size=8, seed=0, progress=False, checks=False)
    evaluate(trained_cnn, x, y, eps=EPS, resume_dir=tmp_path / "p", **args)
    with pytest.raises(UserError, match=r"other arguments \(eps, alpha differ\).*--restart"):
        evaluate(trained_cnn, x, y, eps=EPS / 2, resume_dir=tmp_path / "p", **args)
    other = copy.deepcopy(trained_cnn)
    with torch.no_grad():
        next(other.parameters()).add_(1e-3)
    with pytest.raises(UserError, match=r"\(model differ\)"):
        evaluate(other, x, y, eps=EPS, resume_dir=tmp_path / "p", **args)
    with pytest.raises(UserError, match=r"\(data, n differ\)"):
        evaluate(trained_cnn, x[:8], y[:8], eps=EPS, resume_dir=tmp_path / "p", **args)
    res = evaluate(trained_cnn, x, y, eps=EPS / 2, resume_dir=tmp_path / "p", restart=True, **args)
    assert res["chunks"]["reused"] == {"pgd20": 0}
    with pytest.raises(UserError, match="multiple of the batch size"):
        evaluate(trained_cnn, x, y, eps=EPS, **{**args, "chunk_size": 12})


@pytest.fixture
def checkpoint(tmp_path, trained_cnn):
    return write_digits_checkpoint(tmp_path / "run" / "best.pt", trained_cnn, EPS)


def test_cli_continues_and_refuses_other_arguments(checkpoint, capsys, monkeypatch):
    base = ["eval", str(checkpoint), "--attacks", "clean,pgd20", "--n", "40", "--batch-size", "8", "--chunk-size", "16", "--no-checks"]
    parts = checkpoint.parent / "eval.parts"
    assert main(base) == 0
    first = json.loads((checkpoint.parent / "eval.json").read_text())
    assert "--chunk-size 16" in first["command"] and first["config"]["chunk_size"] == 16
    assert not parts.exists()  # finished: the partial results are gone, a new evaluation starts afresh

    _interrupt_after(monkeypatch, "pgd20", 3)  # clean done, pgd20 chunk 0 done, chunk 1 half done
    assert main(base + ["--out", str(checkpoint.parent / "cut.json")]) == 130  # Ctrl-C: "flatrobust: interrupted"
    monkeypatch.undo()
    cut_parts = checkpoint.parent / "cut.parts"
    assert not (checkpoint.parent / "cut.json").exists() and (cut_parts / "manifest.json").exists()
    capsys.readouterr()
    assert main(base + ["--out", str(checkpoint.parent / "cut.json"), "--eps", "0.1"]) == 2  # other arguments: refused
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("flatrobust: error:") and "eps" in err and "--restart" in err
    assert main(base + ["--out", str(checkpoint.parent / "cut.json")]) == 0
    assert "continued an interrupted evaluation: 4 finished chunk(s) of 6" in capsys.readouterr().out
    resumed = json.loads((checkpoint.parent / "cut.json").read_text())
    assert _strip_times(resumed)["attacks"] == _strip_times(first)["attacks"]
    assert resumed["worst_case"] == first["worst_case"] and not cut_parts.exists()

    _interrupt_after(monkeypatch, "pgd20", 1)
    assert main(base) == 130
    monkeypatch.undo()
    assert main(base + ["--eps", "0.1", "--restart"]) == 0  # --restart: the other partial results are deleted first
    assert json.loads((checkpoint.parent / "eval.json").read_text())["config"]["eps"] == 0.1
    assert main(base[:-3] + ["--chunk-size", "12", "--no-checks"]) == 2
    assert "--chunk-size must be a positive multiple" in capsys.readouterr().err
