"""What the weight loss landscape promises (Wu et al. 2020, Figure 1; Li et al. 2018), and its CLI."""
import copy
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import write_best_and_last, write_untrained_checkpoint
from flatrobust import models
from flatrobust.cli import main
from flatrobust.landscape import filter_normalized_direction, landscape_1d, landscape_2d, robust_loss

ATTACK = dict(norm="linf", eps=0.1, alpha=0.025, steps=3)


@pytest.fixture(scope="module")
def data():
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images[:24], dtype=torch.float32).unsqueeze(1) / 16.0  # (24, 1, 8, 8) in [0, 1]
    return x, torch.tensor(d.target[:24])


def _smallcnn(seed=0):
    torch.manual_seed(seed)
    model = models.create("smallcnn", num_classes=10, in_channels=1)
    model.train()
    with torch.no_grad():  # non-trivial BatchNorm statistics, so that "unchanged" means something
        model(torch.rand(32, 1, 8, 8))
    return model.eval()


def _trained_mlp(data):
    """Linear-ReLU-Linear-ReLU-Linear without BatchNorm, fitted for a moment (a ReLU network to rescale)."""
    x, y = data
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 10))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(100):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def _rescaled(model, c):
    """The same function: layer 1 (weight and bias) times c, layer 2's weight divided by c (ReLU is 1-homogeneous)."""
    other = copy.deepcopy(model)
    with torch.no_grad():
        other[1].weight.mul_(c)
        other[1].bias.mul_(c)
        other[3].weight.div_(c)
    return other


def _snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _assert_same(model, before):
    after = model.state_dict()
    assert after.keys() == before.keys()
    for k, v in before.items():
        assert torch.equal(after[k], v), k


def test_filter_normalized_direction_norms_and_zeros():
    model = _smallcnn()
    d = filter_normalized_direction(model, torch.Generator().manual_seed(0))
    params = list(model.parameters())
    assert len(d) == len(params)
    zeros = 0
    for (name, w), di in zip(model.named_parameters(), d):
        assert di.shape == w.shape and di.dtype == w.dtype
        if w.dim() <= 1:  # biases and BatchNorm weight/bias
            assert torch.count_nonzero(di) == 0, name
            zeros += 1
        else:  # every filter (slice along dim 0) has the norm of the matching filter of w
            torch.testing.assert_close(di.flatten(1).norm(dim=1), w.detach().flatten(1).norm(dim=1), rtol=1e-5, atol=0)
            assert not torch.allclose(di, w), "a random direction, not w itself"
    assert zeros >= 6, "smallcnn has 3 BatchNorm layers (weight, bias) and 2 linear biases"
    again = filter_normalized_direction(model, torch.Generator().manual_seed(0))
    other = filter_normalized_direction(model, torch.Generator().manual_seed(1))
    assert all(torch.equal(a, b) for a, b in zip(d, again))
    assert not torch.equal(d[0], other[0])


def test_g0_is_the_robust_loss_at_w_and_results_repeat(data):
    model = _smallcnn()
    x, y = data
    res = landscape_1d(model, x, y, attack=ATTACK, alphas=[-0.5, 0.0, 0.5], directions=2, batch_size=10, seed=3)
    rho, acc = robust_loss(model, x, y, attack=ATTACK, batch_size=10, seed=3)
    assert res["loss_at_w"] == rho and res["accuracy_at_w"] == acc
    assert [row[1] for row in res["losses"]] == [rho, rho]
    assert len(res["losses"]) == 2 and all(len(row) == 3 for row in res["losses"])
    assert res["losses"][0] != res["losses"][1], "two directions give two curves"
    assert res["mean_loss"][0] == pytest.approx((res["losses"][0][0] + res["losses"][1][0]) / 2)
    again = landscape_1d(model, x, y, attack=ATTACK, alphas=[-0.5, 0.0, 0.5], directions=2, batch_size=10, seed=3)
    assert again == res
    json.dumps(res)  # JSON-ready


def test_adversarial_examples_are_regenerated_for_every_perturbed_model(data):
    # rho(w + alpha d) must be the robust loss of the PERTURBED model, i.e. PGD run against it.
    model = _smallcnn()
    x, y = data
    res = landscape_1d(model, x, y, attack=ATTACK, alphas=[0.7], directions=1, seed=0)
    moved = copy.deepcopy(model)
    d = filter_normalized_direction(moved, torch.Generator().manual_seed(0))
    with torch.no_grad():
        for p, di in zip(moved.parameters(), d):
            p.add_(0.7 * di)
    expected, _ = robust_loss(moved, x, y, attack=ATTACK, seed=0)
    assert res["losses"][0][0] == pytest.approx(expected, rel=1e-6)


def test_model_is_bit_identical_after_landscape(data):
    model = _smallcnn()
    model.train()  # the caller's mode must come back too
    x, y = data
    before = _snapshot(model)
    landscape_1d(model, x, y, attack=ATTACK, alphas=[-1, 0, 1], directions=2, seed=0)
    res = landscape_2d(model, x, y, attack=ATTACK, alphas=[-1, 0, 1], betas=[-0.5, 0.5], seed=0)
    _assert_same(model, before)
    assert model.training and all(p.grad is None for p in model.parameters())
    assert len(res["loss"]) == 3 and all(len(row) == 2 for row in res["loss"])
    rho, _ = robust_loss(model.eval(), x, y, attack=ATTACK, seed=0)
    assert res["loss_at_w"] == rho  # (0, 0) is not on this grid: w itself is evaluated


def test_landscape_is_invariant_to_relu_rescaling(data):
    model = _trained_mlp(data)
    x, y = data
    for c in (4.0, 0.3):
        other = _rescaled(model, c)
        torch.testing.assert_close(other(x), model(x), rtol=1e-5, atol=1e-5)
        a = landscape_1d(model, x, y, attack=ATTACK, alphas=[-0.5, 0.5], directions=1, seed=0)
        b = landscape_1d(other, x, y, attack=ATTACK, alphas=[-0.5, 0.5], directions=1, seed=0)
        assert b["losses"][0] == pytest.approx(a["losses"][0], rel=1e-4)


# --------------------------------------------------------------------------------------------- CLI


def test_cli_writes_json_and_png(tmp_path, capsys):
    ckpt = write_untrained_checkpoint(tmp_path)
    code = main(["landscape", str(ckpt), "--n", "12", "--alphas=-1:1:3", "--directions", "2", "--2d", "--steps", "1"])
    assert code == 0
    run = ckpt.parent  # named after best.pt, as eval names eval_best.json
    assert sorted(p.name for p in run.iterdir()) == ["best.pt", "landscape_2d_best.png", "landscape_best.json", "landscape_best.png"]
    assert (run / "landscape_best.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    res = json.loads((run / "landscape_best.json").read_text())
    assert res["checkpoint"] == str(ckpt)
    assert res["1d"]["alphas"] == [-1.0, 0.0, 1.0]
    assert res["1d"]["attack"] == {"norm": "linf", "eps": 0.1, "alpha": 0.025, "steps": 1}  # --steps overrides
    assert res["data"] == {"name": "digits", "split": "test", "n": 12, "subset_seed": 0}
    assert len(res["2d"]["loss"]) == 3
    out = capsys.readouterr().out
    assert "rho(w)" in out and f"wrote {run / 'landscape_best.json'}, {run / 'landscape_best.png'}" in out


def test_cli_out_folder_and_comma_alphas(tmp_path):
    ckpt = write_untrained_checkpoint(tmp_path)
    out = tmp_path / "elsewhere"
    assert main(["landscape", str(ckpt.parent), "--n", "8", "--alphas", "0,0.5", "--directions", "1",
                 "--eps", "4/255", "--out", str(out), "--data", "train"]) == 0
    res = json.loads((out / "landscape.json").read_text())
    assert res["1d"]["alphas"] == [0.0, 0.5] and res["1d"]["attack"]["eps"] == pytest.approx(4 / 255)
    assert res["data"]["split"] == "train"


def test_cli_one_result_per_checkpoint(tmp_path, capsys):
    """Analysing last.pt after best.pt keeps best.pt's landscape: each checkpoint's files are named after it, as
    `flatrobust eval` names eval_best.json (a run directory stands for its best.pt)."""
    best, last = write_best_and_last(tmp_path)
    run = best.parent
    args = ["--n", "8", "--alphas=-0.5,0,0.5", "--directions", "1", "--steps", "1"]
    assert main(["landscape", str(run), *args]) == 0
    assert main(["landscape", str(last), *args]) == 0
    assert sorted(p.name for p in run.glob("landscape*")) == ["landscape_best.json", "landscape_best.png",
                                                              "landscape_last.json", "landscape_last.png"]
    res_best, res_last = (json.loads((run / f"landscape_{s}.json").read_text()) for s in ("best", "last"))
    assert (res_best["checkpoint"], res_best["epoch"]) == (str(best), 1)
    assert (res_last["checkpoint"], res_last["epoch"]) == (str(last), 3)
    assert res_best["1d"]["loss_at_w"] != res_last["1d"]["loss_at_w"]
    assert f"wrote {run / 'landscape_last.json'}, {run / 'landscape_last.png'}" in capsys.readouterr().out


def test_cli_out_folder_keeps_the_plain_names(tmp_path):
    """An explicit --out folder gets landscape.json and landscape.png whichever checkpoint (study/study.py gives
    each checkpoint its own folder), and nothing is written beside the checkpoint."""
    best, last = write_best_and_last(tmp_path)
    for ckpt in (best, last):
        out = tmp_path / f"landscape_{ckpt.stem}"
        assert main(["landscape", str(ckpt), "--n", "8", "--alphas=0,0.5", "--directions", "1", "--steps", "1", "--2d",
                     "--out", str(out)]) == 0
        assert sorted(p.name for p in out.iterdir()) == ["landscape.json", "landscape.png", "landscape_2d.png"]
        assert json.loads((out / "landscape.json").read_text())["epoch"] == (1 if ckpt == best else 3)
    assert sorted(p.name for p in best.parent.iterdir()) == ["best.pt", "last.pt"]


@pytest.mark.parametrize("alphas, expected", [("-1:1:3", [-1.0, 0.0, 1.0]), ("-.5,0.5", [-0.5, 0.5])])
def test_cli_alphas_starting_with_a_minus_work_with_a_space(tmp_path, alphas, expected):
    ckpt = write_untrained_checkpoint(tmp_path)
    results = []
    for form in (["--alphas", alphas], [f"--alphas={alphas}"]):
        out = tmp_path / form[0]
        assert main(["landscape", str(ckpt), "--n", "8", *form, "--directions", "1", "--steps", "1", "--out", str(out)]) == 0
        results.append(json.loads((out / "landscape.json").read_text())["1d"])
    assert results[0]["alphas"] == expected and results[0]["mean_loss"] == results[1]["mean_loss"]


def test_only_options_that_take_a_value_get_the_minus_value_attached():
    import argparse

    from flatrobust.cli import _attach_dash_values

    p = argparse.ArgumentParser()
    p.add_argument("--alphas")
    p.add_argument("--two-d", action="store_true")
    p.add_argument("rest", nargs="*")
    assert _attach_dash_values(["--alphas", "-1:1:5", "--two-d", "-1"], p) == ["--alphas=-1:1:5", "--two-d", "-1"]
    assert _attach_dash_values(["--alphas", "--two-d"], p) == ["--alphas", "--two-d"]  # argparse's own error follows


@pytest.mark.parametrize("args, message", [
    (["--alphas", "1:2"], "--alphas"),
    (["--alphas", "a,b"], "--alphas"),
    (["--n", "0"], "--n"),
    (["--directions", "0"], "--directions"),
    (["--eps", "eight"], "not a number"),
    (["--norm", "l2"], "--norm"),
])
def test_cli_bad_input_exits_2_with_one_line(tmp_path, capsys, args, message):
    ckpt = write_untrained_checkpoint(tmp_path)
    assert main(["landscape", str(ckpt), *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("flatrobust: error:") and message in err and err.count("\n") == 1


def test_cli_missing_checkpoint_exits_2(tmp_path, capsys):
    assert main(["landscape", str(tmp_path / "missing.pt")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_the_attack_is_one_description_an_attack_config_or_its_dict(data):
    """landscape and flatness take `attacks.AttackConfig` (the training attack's own description) or its dict form,
    alike; alpha left out follows eps as everywhere else; a bad attack is a ValueError naming the field."""
    from flatrobust.attacks import AttackConfig
    from flatrobust.landscape import check_attack

    x, y = data
    model = _smallcnn()
    as_config = AttackConfig(eps=0.1, alpha=0.025, steps=3)
    assert check_attack(as_config) == check_attack(ATTACK) == ATTACK
    assert robust_loss(model, x, y, attack=as_config, seed=1) == robust_loss(model, x, y, attack=ATTACK, seed=1)
    assert check_attack(dict(eps=0.1, steps=3))["alpha"] == 0.025
    for bad, field in ((dict(ATTACK, steps=0), "steps"), (dict(ATTACK, norm="l1"), "norm"), (dict(steps=3), "eps")):
        with pytest.raises(ValueError, match=field):
            check_attack(bad)
