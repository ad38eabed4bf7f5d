import copy

import pytest
import torch
import torch.nn.functional as F

from flatrobust import AT, AWP, MART, TRADES, AttackConfig, create_objective, models


@pytest.fixture
def batch():
    torch.manual_seed(0)
    model = models.create("smallcnn", in_channels=1).train()
    return model, torch.rand(16, 1, 8, 8), torch.randint(0, 10, (16,))


def test_trades_loss_matches_its_formula(batch):
    model, x, y = batch
    x_adv = (x + 0.03 * torch.randn_like(x)).clamp(0, 1)
    obj = TRADES(AttackConfig(eps=0.1), beta=6.0)
    m = copy.deepcopy(model)
    ln, la = m(x), m(x_adv)
    kl = (F.softmax(ln, 1) * (F.log_softmax(ln, 1) - F.log_softmax(la, 1))).sum(1).mean()
    expected = F.cross_entropy(ln, y) + 6.0 * kl
    assert torch.allclose(obj.loss(copy.deepcopy(model), x, x_adv, y), expected, atol=1e-6)


def test_trades_ascent_loss_does_not_detach_natural_logits(batch):
    """The AWP ascent for TRADES differentiates through the natural logits too (as the official TRADES-AWP code does)."""
    model, x, y = batch
    x_adv = (x + 0.03 * torch.randn_like(x)).clamp(0, 1)
    obj = TRADES(AttackConfig(eps=0.1), beta=6.0)
    w = model.net.fc2.weight
    g_full = torch.autograd.grad(obj.ascent_loss(model, x, x_adv, y), w)[0]
    ln = model(x).detach()
    la = model(x_adv)
    detached = F.cross_entropy(model(x), y) + 6 * F.kl_div(F.log_softmax(la, 1), F.softmax(ln, 1), reduction="batchmean")
    g_det = torch.autograd.grad(detached, w)[0]
    assert not torch.allclose(g_full, g_det)


def test_attack_modes_follow_official_code(batch, monkeypatch):
    model, x, y = batch
    seen = []
    orig = model.forward
    monkeypatch.setattr(model, "forward", lambda inp: (seen.append(model.training), orig(inp))[1])
    cfg = AttackConfig(eps=0.1, alpha=0.05, steps=1)
    for obj, mode in [(AT(cfg), True), (TRADES(cfg), False), (MART(cfg), False)]:
        seen.clear()
        obj.attack(model, x, y)
        assert seen and all(s == mode for s in seen[-1:]), obj.name
        assert model.training  # mode given back


@pytest.mark.parametrize("name", ["at", "trades", "mart"])
def test_every_objective_trains_with_awp(name, batch):
    model, x, y = batch
    obj = create_objective(name, AttackConfig(eps=0.1, alpha=0.05, steps=2))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    awp = AWP(model, gamma=0.01)
    before = copy.deepcopy(model.state_dict())
    x_adv = obj.attack(model, x, y)
    awp.perturb(lambda m: obj.ascent_loss(m, x, x_adv, y))
    loss = obj.loss(model, x, x_adv, y)
    opt.zero_grad()
    loss.backward()
    opt.step()
    awp.restore()
    assert torch.isfinite(loss)
    assert any(not torch.equal(before[n], p) for n, p in model.named_parameters())


def test_unknown_method():
    with pytest.raises(ValueError, match="unknown method 'fat'"):
        create_objective("fat")


@pytest.mark.parametrize("make", [lambda: TRADES(beta=6), lambda: MART(), lambda: AT(), lambda: create_objective("trades")])
def test_objectives_require_their_training_attack(make):
    """No silent 8/255: the radius depends on the data, so the objectives have no default attack."""
    with pytest.raises(TypeError, match=r"needs its training attack, e\.g\. \w+\(AttackConfig\(eps=8/255\)\)"):
        make()


def test_attack_config_needs_eps_and_derives_the_step_from_it():
    with pytest.raises(TypeError, match="eps"):
        AttackConfig()
    assert AttackConfig(eps=8 / 255).alpha == pytest.approx(2 / 255)  # the paper's eps / 4
    assert AttackConfig(eps=0.2).alpha == pytest.approx(0.05)
    assert AttackConfig(eps=128 / 255, norm="l2").alpha == pytest.approx(15 / 255)
    assert AttackConfig(eps=0.2, alpha=0.1, steps=3).alpha == 0.1
    for bad in (dict(eps=-0.1), dict(eps=0.1, norm="l1"), dict(eps=0.1, steps=0), dict(eps=float("nan"))):
        with pytest.raises(ValueError, match="AttackConfig"):
            AttackConfig(**bad)
