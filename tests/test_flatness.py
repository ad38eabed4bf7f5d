"""What the flatness measures promise (Stutz, Hein, Schiele, ICCV 2021), and their CLI."""
import copy
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import write_best_and_last, write_untrained_checkpoint
from flatrobust import models
from flatrobust.cli import main
from flatrobust.flatness import average_flatness, relative_sphere_sample, worst_flatness
from flatrobust.landscape import perturbed_parameters, robust_loss

ATTACK = dict(norm="linf", eps=0.1, alpha=0.025, steps=3)


@pytest.fixture(scope="module")
def data():
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images[:32], dtype=torch.float32).unsqueeze(1) / 16.0  # (32, 1, 8, 8) in [0, 1]
    return x, torch.tensor(d.target[:32])


@pytest.fixture(scope="module")
def mlp(data):
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


def _smallcnn():
    torch.manual_seed(0)
    model = models.create("smallcnn", num_classes=10, in_channels=1)
    model.train()
    with torch.no_grad():  # non-trivial BatchNorm statistics, so that "unchanged" means something
        model(torch.rand(32, 1, 8, 8))
    return model.eval()


def _rescaled(model, c):
    """The same function: layer 1 (weight and bias) times c, layer 2's weight divided by c (ReLU is 1-homogeneous)."""
    other = copy.deepcopy(model)
    with torch.no_grad():
        other[1].weight.mul_(c)
        other[1].bias.mul_(c)
        other[3].weight.div_(c)
    return other


def test_perturbed_tensors_are_the_conv_and_linear_weights():
    model = _smallcnn()
    names = [n for n, _ in perturbed_parameters(model)]
    assert names == ["net.conv1.weight", "net.conv2.weight", "net.conv3.weight", "net.fc1.weight", "net.fc2.weight"]


def test_sphere_sample_has_the_layerwise_relative_norm():
    weights = [p.detach() for _, p in perturbed_parameters(_smallcnn())]
    nu = relative_sphere_sample(weights, 0.5, torch.Generator().manual_seed(0))
    for w, v in zip(weights, nu):
        assert v.shape == w.shape
        assert float(v.norm()) == pytest.approx(0.5 * float(w.norm()), rel=1e-5)


def test_xi_zero_gives_exactly_zero(data):
    model = _smallcnn()
    x, y = data
    a = average_flatness(model, x, y, attack=ATTACK, xi=0.0, draws=2, seed=0)
    w = worst_flatness(model, x, y, attack=ATTACK, xi=0.0, steps=3, seed=0)
    assert a["average_flatness"] == 0.0 and w["worst_flatness"] == 0.0
    assert a["robust_loss"] == robust_loss(model, x, y, attack=ATTACK, seed=0)[0] == w["robust_loss"]


def test_results_repeat_and_model_is_bit_identical(data):
    model = _smallcnn()
    model.train()  # the caller's mode must come back too
    x, y = data
    before = {k: v.clone() for k, v in model.state_dict().items()}
    requires = [p.requires_grad for p in model.parameters()]
    runs = [(average_flatness(model, x, y, attack=ATTACK, xi=0.5, draws=3, batch_size=20, seed=1),
             worst_flatness(model, x, y, attack=ATTACK, xi=0.01, steps=4, batch_size=20, seed=1)) for _ in range(2)]
    assert runs[0] == runs[1]
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert model.training and all(p.grad is None for p in model.parameters())
    assert [p.requires_grad for p in model.parameters()] == requires
    json.dumps(runs[0])  # JSON-ready
    a, w = runs[0]
    assert len(a["perturbed_losses"]) == 3 and a["standard_error"] is not None
    assert a["average_flatness"] == pytest.approx(sum(a["perturbed_losses"]) / 3 - a["robust_loss"])


def test_worst_case_stays_in_the_ball_and_beats_random_draws(mlp, data):
    x, y = data
    xi = 0.02
    w = worst_flatness(mlp, x, y, attack=ATTACK, xi=xi, steps=10, seed=0)
    assert all(r <= xi * (1 + 1e-5) for r in w["relative_norms"])
    assert max(w["relative_norms"]) == pytest.approx(xi, rel=1e-3), "the ascent reaches the boundary"
    a = average_flatness(mlp, x, y, attack=ATTACK, xi=xi, draws=5, seed=0)
    # A random direction raises the loss only to second order, the ascent direction to first order.
    assert w["worst_flatness"] > 0
    assert w["worst_flatness"] > a["average_flatness"]


def test_flatness_is_invariant_to_relu_rescaling(mlp, data):
    x, y = data
    ref_avg = average_flatness(mlp, x, y, attack=ATTACK, xi=0.5, draws=3, seed=0)
    ref_worst = worst_flatness(mlp, x, y, attack=ATTACK, xi=0.01, steps=5, seed=0)
    assert ref_avg["average_flatness"] > 0.01 and ref_worst["worst_flatness"] > 0.001, "non-trivial numbers to compare"
    for c in (4.0, 0.3):
        other = _rescaled(mlp, c)
        torch.testing.assert_close(other(x), mlp(x), rtol=1e-5, atol=1e-5)  # the same function
        avg = average_flatness(other, x, y, attack=ATTACK, xi=0.5, draws=3, seed=0)
        worst = worst_flatness(other, x, y, attack=ATTACK, xi=0.01, steps=5, seed=0)
        # nu_l scales with ||w_l||, so w + nu is the rescaled w + nu of the original: equal up to rounding
        assert avg["average_flatness"] == pytest.approx(ref_avg["average_flatness"], rel=1e-4, abs=1e-6)
        assert worst["worst_flatness"] == pytest.approx(ref_worst["worst_flatness"], rel=1e-3, abs=1e-5)


# --------------------------------------------------------------------------------------------- CLI


def test_cli_writes_json_and_prints_summary(tmp_path, capsys):
    ckpt = write_untrained_checkpoint(tmp_path)
    assert main(["flatness", str(ckpt), "--n", "16", "--draws", "2", "--worst-steps", "3"]) == 0
    res = json.loads((ckpt.parent / "flatness_best.json").read_text())  # named after best.pt, as eval_best.json
    assert res["average"]["xi"] == 0.5 and res["average"]["draws"] == 2
    assert res["worst"]["xi"] == 0.003 and res["worst"]["steps"] == 3
    assert res["average"]["n"] == res["worst"]["n"] == 16
    out = capsys.readouterr().out
    assert "average-case flatness" in out and "worst-case flatness" in out and f"wrote {ckpt.parent / 'flatness_best.json'}" in out
    assert not (ckpt.parent / "flatness.json").exists()


def test_cli_one_measure(tmp_path):
    ckpt = write_untrained_checkpoint(tmp_path)
    assert main(["flatness", str(ckpt), "--n", "8", "--measure", "average", "--draws", "1", "--out", str(tmp_path / "o")]) == 0
    res = json.loads((tmp_path / "o" / "flatness.json").read_text())
    assert "average" in res and "worst" not in res and res["average"]["standard_error"] is None


def test_cli_one_result_per_checkpoint(tmp_path):
    """Measuring last.pt after best.pt keeps best.pt's numbers: flatness_best.json and flatness_last.json, named as
    `flatrobust eval` names eval_best.json (a run directory stands for its best.pt)."""
    best, last = write_best_and_last(tmp_path)
    run = best.parent
    args = ["--n", "8", "--draws", "1", "--worst-steps", "1", "--steps", "1"]
    assert main(["flatness", str(run), *args]) == 0
    assert main(["flatness", str(last), *args]) == 0
    assert sorted(p.name for p in run.glob("flatness*")) == ["flatness_best.json", "flatness_last.json"]
    res_best, res_last = (json.loads((run / f"flatness_{s}.json").read_text()) for s in ("best", "last"))
    assert (res_best["checkpoint"], res_best["epoch"]) == (str(best), 1)
    assert (res_last["checkpoint"], res_last["epoch"]) == (str(last), 3)
    assert res_best["average"]["robust_loss"] != res_last["average"]["robust_loss"]


def test_cli_out_folder_keeps_the_plain_name(tmp_path):
    """An explicit --out folder gets flatness.json whichever checkpoint (study/study.py and
    tools/robustbench_flatness.py give each measurement its own folder); nothing is written beside the checkpoint."""
    best, last = write_best_and_last(tmp_path)
    for ckpt in (best, last):
        out = tmp_path / f"flatness_{ckpt.stem}"
        assert main(["flatness", str(ckpt), "--n", "8", "--measure", "worst", "--worst-steps", "1", "--steps", "1",
                     "--out", str(out)]) == 0
        assert [p.name for p in out.iterdir()] == ["flatness.json"]
        assert json.loads((out / "flatness.json").read_text())["epoch"] == (1 if ckpt == best else 3)
    assert sorted(p.name for p in best.parent.iterdir()) == ["best.pt", "last.pt"]


@pytest.mark.parametrize("args, message", [
    (["--n", "0"], "--n"),
    (["--xi-average", "-1"], "--xi"),
    (["--draws", "0"], "--draws"),
])
def test_cli_bad_input_exits_2_with_one_line(tmp_path, capsys, args, message):
    ckpt = write_untrained_checkpoint(tmp_path)
    assert main(["flatness", str(ckpt), *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("flatrobust: error:") and message in err and err.count("\n") == 1


def test_cli_missing_checkpoint_exits_2(tmp_path, capsys):
    assert main(["flatness", str(tmp_path / "missing.pt")]) == 2
    assert "does not exist" in capsys.readouterr().err
