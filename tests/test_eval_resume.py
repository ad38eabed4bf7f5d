"""Long evaluations survive interruption: every finished batch is kept on disk, a rerun with the same arguments
recomputes only the batch that was in progress and gives exactly the uninterrupted result, other arguments
are refused with one line."""
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


def _instrument(monkeypatch, name: str, stop_after: int | None = None) -> dict:
    """Count the batches attack `name` is called on; with `stop_after`, raise KeyboardInterrupt on call
    stop_after + 1, as Ctrl-C or a kill would stop it after that many finished batches."""
    attack = evaluate_module.ATTACKS[name]
    count = {"n": 0}

    def run(*args):
        count["n"] += 1
        if stop_after is not None and count["n"] > stop_after:
            raise KeyboardInterrupt
        return attack.run(*args)

    monkeypatch.setitem(evaluate_module.ATTACKS, name, dataclasses.replace(attack, run=run))
    return count


def _interrupt_after(monkeypatch, name: str, calls: int) -> None:
    _instrument(monkeypatch, name, stop_after=calls)


@pytest.fixture
def cheap_autoattack(monkeypatch):
    """pyautoattack's AutoAttack with 5 APGD/FAB iterations and 20 Square queries (the same code path, at a
    cost a unit test can pay): more points survive APGD-CE, so every stage of the cascade runs."""
    import pyautoattack

    class Cheap(pyautoattack.AutoAttack):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.apgd.n_iter = self.apgd_targeted.n_iter = self.fab.n_iter = 5
            self.square.n_queries = 20

    monkeypatch.setattr(pyautoattack, "AutoAttack", Cheap)


def _records(folder) -> dict:
    return {p.name: torch.load(p, weights_only=True) for p in sorted(folder.glob("*.pt"))}


def test_autoattack_depends_on_the_partition_so_the_block_is_the_batch(trained_cnn, digits, tmp_path, cheap_autoattack):
    """pyautoattack reseeds torch with its seed at every call and draws its random starts for the whole
    call: the same seed on the same 16 images gives other adversarial points in one call than in two calls
    of 8. So the partition must be fixed: `evaluate` calls it once per batch (images [k*B, (k+1)*B)), and
    chunks or an interruption, which fall between batches, change nothing."""
    from pyautoattack import AutoAttack

    _, _, x, y = digits
    x, y, eps = x[:16], y[:16], 0.75 * EPS  # a point or two survive APGD-CE and go through every stage

    def apgd(xs, ys):
        aa = AutoAttack(trained_cnn, norm="Linf", eps=eps, version="standard", device="cpu", seed=5)
        aa.attacks_to_run = ["apgd-ce"]
        return aa.run_standard_evaluation(xs, ys, batch_size=len(ys))[0]

    one = apgd(x[:16], y[:16])
    assert torch.equal(one, apgd(x[:16], y[:16]))  # same call, same seed: same points
    assert not torch.equal(one, torch.cat([apgd(x[:8], y[:8]), apgd(x[8:16], y[8:16])]))  # split: other points

    args = dict(attacks="autoattack", norm="linf", eps=eps, batch_size=8, seed=5, progress=False, checks=False)
    chunked = evaluate(trained_cnn, x, y, chunk_size=8, resume_dir=tmp_path / "parts", **args)  # a file per batch
    assert _strip_times(chunked) == _strip_times(evaluate(trained_cnn, x, y, chunk_size=16, **args))  # one chunk
    assert chunked["attacks"]["autoattack"]["stages"]["square"]["correct"] > 0  # the whole cascade is compared


@pytest.mark.parametrize("attacks,stop_in,n,chunk,stop_after", [
    ("clean,pgd20,cw20", "cw20", 40, 16, 3),  # cw20: chunk 0 (2 batches) and 1 batch of chunk 1 finished
    ("pgd20,autoattack", "autoattack", 24, 24, 2),  # one chunk, as n <= 1000 is by default: 2 of its 3 batches
])
def test_interrupted_then_resumed_equals_uninterrupted(trained_cnn, digits, tmp_path, monkeypatch, cheap_autoattack,
                                                      capsys, attacks, stop_in, n, chunk, stop_after):
    _, _, x, y = digits
    x, y = x[:n], y[:n]
    args = dict(attacks=attacks, norm="linf", eps=EPS, batch_size=8, chunk_size=chunk, seed=3, checks=False)
    full = evaluate(trained_cnn, x, y, resume_dir=tmp_path / "full", progress=False, **args)
    assert _strip_times(full) == _strip_times(evaluate(trained_cnn, x, y, progress=False, **args))  # the store changes nothing
    assert full["chunks"]["resumed"] is None

    _interrupt_after(monkeypatch, stop_in, stop_after)  # the last attack: stop_after batches finished, then a kill
    with pytest.raises(KeyboardInterrupt):
        evaluate(trained_cnn, x, y, resume_dir=tmp_path / "cut", progress=False, **args)
    monkeypatch.undo()
    part = tmp_path / "cut" / f"{stop_in}.{stop_after * 8 // chunk:05d}.part.pt"
    assert len(torch.load(part, weights_only=True)) == stop_after % (chunk // 8)  # the chunk in progress: its finished batches
    assert not list((tmp_path / "cut").glob(".*.tmp"))  # no half-written file

    calls = _instrument(monkeypatch, stop_in)
    capsys.readouterr()
    resumed = evaluate(trained_cnn, x, y, resume_dir=tmp_path / "cut", progress=True, **args)
    assert calls["n"] == n // 8 - stop_after  # only the batches not finished before are computed
    assert _strip_times(resumed) == _strip_times(full)
    names = attacks.split(",")
    said = [line for line in capsys.readouterr().err.splitlines() if "resuming" in line]
    expect = "; ".join(f"{a}: all {n // 8} batches done" if a != stop_in else
                       f"{a}: {stop_after} of {n // 8} batches done, resuming at image {stop_after * 8}" for a in names)
    assert said == [f"flatrobust: resuming the evaluation kept in {tmp_path / 'cut'} ({n} images, batches of 8): {expect}"]
    assert resumed["chunks"]["batches_reused"] == {a: (n // 8 if a != stop_in else stop_after) for a in names}
    chunks = -(-n // chunk)
    assert resumed["chunks"]["reused"] == {a: (chunks if a != stop_in else stop_after * 8 // chunk) for a in names}
    full_records, cut_records = _records(tmp_path / "full"), _records(tmp_path / "cut")
    assert sorted(full_records) == sorted(cut_records) and not list((tmp_path / "cut").glob("*.part.pt"))
    for key, a in full_records.items():  # chunk by chunk: same outcomes, stages and random stream
        b = cut_records[key]
        assert torch.equal(a["robust"], b["robust"]) and torch.equal(a["generator_state"], b["generator_state"]), key
        assert a["stages"].keys() == b["stages"].keys() and a["warnings"] == b["warnings"], key
        assert all(torch.equal(a["stages"][k]["mask"], b["stages"][k]["mask"]) for k in a["stages"]), key
    again = evaluate(trained_cnn, x, y, resume_dir=tmp_path / "cut", progress=False, **args)  # all on disk: nothing recomputed
    assert calls["n"] == n // 8 - stop_after and again["chunks"]["reused"] == {a: chunks for a in names}
    assert _strip_times(again) == _strip_times(full)


def test_a_damaged_part_file_is_computed_again(trained_cnn, digits, tmp_path, monkeypatch):
    _, _, x, y = digits
    x, y = x[:24], y[:24]
    args = dict(attacks="pgd20", norm="linf", eps=EPS, batch_size=8, chunk_size=24, seed=1, progress=False, checks=False)
    full = evaluate(trained_cnn, x, y, **args)
    _interrupt_after(monkeypatch, "pgd20", 2)
    with pytest.raises(KeyboardInterrupt):
        evaluate(trained_cnn, x, y, resume_dir=tmp_path / "p", **args)
    monkeypatch.undo()
    part = tmp_path / "p" / "pgd20.00000.part.pt"
    part.write_bytes(part.read_bytes()[:100])  # a torn disk, not a torn write (writes are atomic)
    calls = _instrument(monkeypatch, "pgd20")
    resumed = evaluate(trained_cnn, x, y, resume_dir=tmp_path / "p", **args)
    assert calls["n"] == 3 and resumed["chunks"]["resumed"] is None and _strip_times(resumed) == _strip_times(full)


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
    parts = checkpoint.parent / "eval_best.parts"
    assert main(base) == 0
    first = json.loads((checkpoint.parent / "eval_best.json").read_text())
    assert "--chunk-size 16" in first["command"] and first["config"]["chunk_size"] == 16
    assert not parts.exists()  # finished: the partial results are gone, a new evaluation starts afresh

    _interrupt_after(monkeypatch, "pgd20", 3)  # clean done, pgd20 chunk 0 done, chunk 1 half done (its batch 2 kept)
    assert main(base + ["--out", str(checkpoint.parent / "cut.json")]) == 130  # Ctrl-C: "flatrobust: interrupted"
    monkeypatch.undo()
    cut_parts = checkpoint.parent / "cut.parts"
    assert not (checkpoint.parent / "cut.json").exists() and (cut_parts / "manifest.json").exists()
    capsys.readouterr()
    assert main(base + ["--out", str(checkpoint.parent / "cut.json"), "--eps", "0.1"]) == 2  # other arguments: refused
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("flatrobust: error:") and "eps" in err and "--restart" in err
    assert main(base + ["--out", str(checkpoint.parent / "cut.json")]) == 0
    said = [line for line in capsys.readouterr().err.splitlines() if "resuming" in line]
    assert said == [f"flatrobust: resuming the evaluation kept in {cut_parts} (40 images, batches of 8): clean: all 5 batches done; "
                    "pgd20: 3 of 5 batches done, resuming at image 24"]
    resumed = json.loads((checkpoint.parent / "cut.json").read_text())
    assert _strip_times(resumed)["attacks"] == _strip_times(first)["attacks"]
    assert resumed["worst_case"] == first["worst_case"] and not cut_parts.exists()

    _interrupt_after(monkeypatch, "pgd20", 1)
    assert main(base) == 130
    monkeypatch.undo()
    assert main(base + ["--eps", "0.1", "--restart"]) == 0  # --restart: the other partial results are deleted first
    assert json.loads((checkpoint.parent / "eval_best.json").read_text())["config"]["eps"] == 0.1
    assert main(base[:-3] + ["--chunk-size", "12", "--no-checks"]) == 2
    assert "--chunk-size must be a positive multiple" in capsys.readouterr().err
