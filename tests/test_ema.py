"""What the EMA of the weights promises: the update and its warm-up, BatchNorm buffers copied, AWP never in
the average, exact resume, the per-epoch metrics, and --weights ema|raw in eval, landscape and flatness."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from torch import nn

import flatrobust.train as train_module
from flatrobust import EMA
from flatrobust.awp import AWP
from flatrobust.checkpoint import CheckpointError, model_from_checkpoint
from flatrobust.cli import main
from flatrobust.config import load_config
from flatrobust.rundir import without_timing
from flatrobust.train import fit

TINY = ["awp.warmup=0", "data.train_subset=256", "data.eval_subset=64", "batch_size=64", "attack.steps=2", "attack.eps=0.2",
        "attack.alpha=0.1", "eval.steps=2", "awp.gamma=0.01", "optim.lr=0.05", "ema.decay=0.9"]
README = Path(__file__).resolve().parents[1] / "README.md"


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))


def test_update_formula_warmup_and_buffers():
    model = _net()
    ema = EMA(model, decay=0.9)
    assert [ema.decay_at(t) for t in range(4)] == [1 / 10, 2 / 11, 3 / 12, 4 / 13]
    assert ema.decay_at(80) == 0.9 and ema.decay_at(1000) == 0.9  # (1 + t) / (10 + t) passes 0.9 at t = 80
    assert EMA(model, decay=0.9, warmup=False).decay_at(0) == 0.9
    expected = {k: v.clone() for k, v in ema.module.state_dict().items()}
    for t in range(5):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        model.train()(torch.randn(8, 3))  # moves the BatchNorm running statistics
        ema.update(model)
        d = min(0.9, (1 + t) / (10 + t))
        for k, w in model.named_parameters():
            expected[k] = d * expected[k] + (1 - d) * w.detach()
            assert torch.allclose(ema.module.state_dict()[k], expected[k], rtol=1e-6, atol=1e-7), (t, k)
        for k, b in model.named_buffers():  # copied, not averaged
            assert torch.equal(ema.module.state_dict()[k], b), (t, k)
    assert ema.num_updates == 5
    assert not any(p.requires_grad for p in ema.module.parameters())
    with pytest.raises(ValueError, match=r"in \[0, 1\)"):
        EMA(model, decay=1.0)
    with pytest.raises(ValueError, match="not those the EMA was made from"):
        ema.update(nn.Linear(3, 2))


def test_state_dict_round_trip_loads_with_weights_only(tmp_path):
    model = _net()
    ema = EMA(model, decay=0.99)
    ema.update(model)
    torch.save(ema.state_dict(), tmp_path / "ema.pt")
    other = EMA(_net(), decay=0.5)
    other.load_state_dict(torch.load(tmp_path / "ema.pt", weights_only=True))
    assert other.decay == 0.99 and other.num_updates == 1
    assert all(torch.equal(a, b) for a, b in zip(other.module.state_dict().values(), ema.module.state_dict().values()))


def test_awp_never_leaks_into_the_average(tmp_path, monkeypatch):
    """With a huge gamma (1: w + v is as far from w as w from 0), every update sees the restored weights w, and the average in the
    checkpoint equals the average computed from those weights by the formula."""
    perturbed, restored, seen = [], [], []
    real_restore, real_update, real_step = AWP.restore, EMA.update, train_module.train_step

    def restore(self):
        perturbed.append({n: p.detach().clone() for n, p in zip(self.names, self.params)})  # w + v, before it is undone
        real_restore(self)

    def update(self, model):
        seen.append({k: p.detach().clone() for k, p in model.named_parameters()})
        real_update(self, model)

    def step(model, *args, **kwargs):
        out = real_step(model, *args, **kwargs)
        restored.append({k: p.detach().clone() for k, p in model.named_parameters()})  # what the step left
        return out

    monkeypatch.setattr(AWP, "restore", restore)
    monkeypatch.setattr(EMA, "update", update)
    monkeypatch.setattr(train_module, "train_step", step)
    cfg = load_config("recipes/digits_at_awp.yaml", [*TINY, "awp.gamma=1", "epochs=2", f"out_dir={tmp_path}"])
    run = fit(cfg, progress=False)
    assert len(seen) == len(restored) == len(perturbed) == 8
    for s, r, v in zip(seen, restored, perturbed):
        assert all(torch.equal(s[k], r[k]) for k in r)  # the update saw exactly the restored weights
        # ...which are far from w + v (so the test would notice an update at w + v)
        assert min((v[k] - r[k]).norm() / r[k].norm() for k in v) > 0.5
    ckpt = torch.load(run / "last.pt", weights_only=True)
    init = load_config("recipes/digits_at_awp.yaml", [*TINY, f"out_dir={tmp_path}"])
    torch.manual_seed(init.seed)
    start = train_module.build(init).model  # the initial weights: where the average starts
    expected = {k: p.detach().clone() for k, p in start.named_parameters()}
    for t, r in enumerate(restored):
        d = min(0.9, (1 + t) / (10 + t))
        expected = {k: d * expected[k] + (1 - d) * r[k] for k in expected}
    assert ckpt["ema"]["num_updates"] == 8
    for k, v in expected.items():
        assert torch.allclose(ckpt["ema"]["model"][k], v, rtol=1e-5, atol=1e-6), k


def _final(run_dir: Path):
    ckpt = torch.load(run_dir / "last.pt", weights_only=True)
    rows = [without_timing(json.loads(ln)) for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return ckpt, rows


def test_resume_with_ema_is_bit_identical(tmp_path):
    over = [*TINY, "epochs=3", "checkpoint_every=1", f"out_dir={tmp_path}"]
    full = fit(load_config("recipes/digits_at_awp.yaml", over + ["name=full"]), progress=False)
    cfg = load_config("recipes/digits_at_awp.yaml", over + ["name=cut"])
    cut = fit(cfg, progress=False, stop_after_steps=6)  # in the middle of epoch 2 (4 steps per epoch)
    assert torch.load(cut / "last.pt", weights_only=True)["ema"]["num_updates"] == 6
    fit(cfg, resume_dir=cut, progress=False)
    (a, rows_a), (b, rows_b) = _final(full), _final(cut)
    assert rows_a == rows_b and "ema_test_robust_acc" in rows_a[-1]
    assert a["ema"]["num_updates"] == b["ema"]["num_updates"] == 12
    for k in a["ema"]["model"]:
        assert torch.equal(a["ema"]["model"][k], b["ema"]["model"][k]), k
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k


def test_cli_reports_and_evaluates_the_ema(tmp_path, capsys):
    assert main(["train", "recipes/digits_at_awp.yaml", *TINY, "epochs=2", f"out_dir={tmp_path}", "name=e"]) == 0
    err = capsys.readouterr().err
    assert re.search(r"epoch   2/2 .*EMA: test clean \d+\.\d\d%  test PGD-2 \d+\.\d\d%", err), err
    run = tmp_path / "e"
    rows = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    for r in rows:
        assert r["ema_gap"] == r["ema_train_robust_acc"] - r["ema_test_robust_acc"]
        assert {"ema_train_clean_acc", "ema_test_clean_acc"} <= r.keys()
    ckpt = torch.load(run / "last.pt", weights_only=True)
    ema_model, _ = model_from_checkpoint(run / "last.pt", weights="ema")
    raw_model, _ = model_from_checkpoint(run / "last.pt")
    assert all(torch.equal(v, ckpt["ema"]["model"][k]) for k, v in ema_model.state_dict().items())
    assert any(not torch.equal(v, ckpt["ema"]["model"][k]) for k, v in raw_model.state_dict().items())

    assert main(["eval", str(run / "last.pt"), "--attacks", "clean", "--no-checks", "--weights", "ema"]) == 0
    result = json.loads((run / "eval_last_ema.json").read_text())
    assert result["config"]["weights"] == "ema" and "--weights ema" in result["command"]
    assert not (run / "eval_last.json").exists()
    # the per-epoch EMA clean accuracy on the 64-image subset is the full evaluation's on those images
    from flatrobust.data import load_dataset
    test = load_dataset("digits", "test").subset(64, seed=0)
    with torch.no_grad():
        assert (ema_model(test.x).argmax(1) == test.y).float().mean().item() == rows[-1]["ema_test_clean_acc"]

    args = ["--n", "16", "--steps", "1", "--weights", "ema", "--out", str(tmp_path / "analysis")]
    assert main(["landscape", str(run), "--alphas=-0.5,0,0.5", "--directions", "1", *args]) == 0
    assert main(["flatness", str(run), "--draws", "1", "--worst-steps", "1", *args]) == 0
    written = {p.name for p in (tmp_path / "analysis").iterdir()}
    assert {"landscape_ema.json", "landscape_ema.png", "flatness_ema.json"} <= written and "landscape.json" not in written
    assert json.loads((tmp_path / "analysis" / "flatness_ema.json").read_text())["weights"] == "ema"
    # without --out: beside the checkpoint, named after it as eval_best_ema.json
    assert main(["flatness", str(run), "--n", "8", "--measure", "worst", "--worst-steps", "1", "--steps", "1", "--weights", "ema"]) == 0
    assert json.loads((run / "flatness_best_ema.json").read_text())["weights"] == "ema" and not (run / "flatness_best.json").exists()

    capsys.readouterr()
    assert main(["report", str(run), "--out", str(tmp_path / "report")]) == 0
    report = (tmp_path / "report" / "report.md").read_text()
    assert "## EMA of the weights" in report and f"{100 * rows[-1]['ema_test_robust_acc']:.2f}" in report


def test_weights_ema_without_ema_is_one_line(tmp_path, capsys):
    assert main(["train", "recipes/digits_at.yaml", *TINY, "ema.decay=0", "epochs=1", f"out_dir={tmp_path}", "name=r", "--quiet"]) == 0
    assert "ema_test_robust_acc" not in (tmp_path / "r" / "metrics.jsonl").read_text()
    assert torch.load(tmp_path / "r" / "last.pt", weights_only=True)["ema"] is None
    with pytest.raises(CheckpointError, match="holds no EMA weights"):
        model_from_checkpoint(tmp_path / "r", weights="ema")
    capsys.readouterr()
    for cmd in (["eval", "--attacks", "clean"], ["landscape", "--n", "8"], ["flatness", "--n", "8"]):
        assert main([cmd[0], str(tmp_path / "r"), *cmd[1:], "--weights", "ema"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "holds no EMA weights (trained with ema.decay=0): use --weights raw" in err, err


def test_bad_decay_is_refused(tmp_path, capsys):
    for value, message in (("1", "ema.decay must be < 1"), ("-0.1", "ema.decay must be >= 0")):
        assert main(["train", "recipes/digits_at.yaml", f"ema.decay={value}", f"out_dir={tmp_path}", "--quiet"]) == 2
        assert message in capsys.readouterr().err


def test_readme_ema_snippet_runs():
    text = README.read_text()
    awp_loop = re.search(r"## AWP in your own loop\s+```python\n(.*?)```", text, re.S).group(1)
    snippet = re.search(r"### EMA of the weights.*?```python\n(.*?)```", text, re.S).group(1)
    g = torch.Generator().manual_seed(0)
    namespace = {"loader": [(torch.rand(4, 3, 32, 32, generator=g), torch.randint(0, 10, (4,), generator=g))]}
    exec(compile(awp_loop.replace("steps=10", "steps=1"), "README.md", "exec"), namespace)  # noqa: S102
    before = {k: v.clone() for k, v in namespace["model"].state_dict().items()}
    exec(compile(snippet.replace("steps=10", "steps=1"), "README.md", "exec"), namespace)  # noqa: S102
    model, ema = namespace["model"], namespace["ema"]
    assert ema.num_updates == 1
    for k, p in model.named_parameters():  # one update at d_0 = 0.1 from the weights it started from
        assert torch.allclose(ema.module.state_dict()[k], 0.1 * before[k] + 0.9 * p.detach(), atol=1e-6), k
    assert any(not torch.equal(before[k], p) for k, p in model.named_parameters())
