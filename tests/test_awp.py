"""What AWP promises (Wu et al. 2020, Section 4: the perturbation and restore around the step), checked against the maths and the official procedure."""
import copy

import pytest
import torch
import torch.nn.functional as F

from flatrobust import AWP, models
from flatrobust.reference import OfficialAWP


def _setup(seed=0, name="smallcnn"):
    torch.manual_seed(seed)
    model = models.create(name, num_classes=10, in_channels=1).train()
    x = torch.rand(16, 1, 8, 8)
    y = torch.randint(0, 10, (16,))
    return model, x, y


def _loss_fn(x, y):
    return lambda m: F.cross_entropy(m(x), y)


def test_perturbation_norm_and_direction():
    model, x, y = _setup()
    awp = AWP(model, gamma=0.01)
    # expected direction: the gradient of the loss at w in train mode (computed with BN stats frozen copy)
    ref = copy.deepcopy(model)
    loss = F.cross_entropy(ref(x), y)
    grads = torch.autograd.grad(loss, [p for p in ref.parameters() if p.dim() > 1])
    before = [p.detach().clone() for p in awp.params]
    awp.perturb(_loss_fn(x, y))
    for p, w, g, v in zip(awp.params, before, grads, awp.perturbation()):
        assert torch.equal(p.detach(), w + v)
        assert torch.allclose(v.norm(), 0.01 * w.norm(), rtol=1e-6)
        cos = F.cosine_similarity(v.flatten(), g.flatten(), dim=0)
        assert cos > 1 - 1e-5
    awp.restore()


def test_only_weights_with_dim_gt_1_are_perturbed():
    model, x, y = _setup()
    awp = AWP(model, gamma=0.05)
    assert all(p.dim() > 1 for p in awp.params)
    untouched = {n: p.detach().clone() for n, p in model.named_parameters() if p.dim() <= 1}
    assert untouched, "the model has biases / BN parameters to check"
    awp.perturb(_loss_fn(x, y))
    for n, p in model.named_parameters():
        if p.dim() <= 1:
            assert torch.equal(p, untouched[n]), n
    awp.restore()


def test_perturb_leaves_bn_stats_grads_and_mode_alone():
    model, x, y = _setup()
    model.eval()
    # give every parameter a .grad to check it is left as it was
    F.cross_entropy(model(x), y).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    awp = AWP(model, gamma=0.01)
    awp.perturb(_loss_fn(x, y))
    assert not model.training, "perturb must give the model its mode back"
    for n, b in model.named_buffers():
        assert torch.equal(b, buffers[n]), f"buffer {n} changed"  # running stats and num_batches_tracked
    for n, p in model.named_parameters():
        assert torch.equal(p.grad, grads[n]), f"{n}.grad changed"
    awp.restore()


def test_restore_gives_back_the_exact_weights():
    model, x, y = _setup()
    before = copy.deepcopy(model.state_dict())
    awp = AWP(model, gamma=0.02)
    awp.perturb(_loss_fn(x, y))
    assert any(not torch.equal(before[n], p) for n, p in model.named_parameters())
    awp.restore()
    for n, p in model.state_dict().items():
        assert torch.allclose(p, before[n], atol=1e-7), n


# PreActResNet-18 runs in float64: in float32 its deep BatchNorm stack on a batch of 8 amplifies the
# 1e-8 rounding difference between the two (equal) formulas of v into 1e-4 gradient differences; in
# float64 both procedures agree to 1e-15, which is what this test is about.
@pytest.mark.parametrize("name,dtype", [("smallcnn", torch.float32), ("preactresnet18", torch.float64)])
def test_one_at_awp_step_matches_official_proxy_procedure(name, dtype):
    """perturb, loss at w+v, SGD momentum + weight decay, restore == the official proxy-model step."""
    torch.manual_seed(0)
    in_ch = 1 if name == "smallcnn" else 3
    size = 8 if name == "smallcnn" else 16
    model = models.create(name, num_classes=10, in_channels=in_ch).train().to(dtype)
    x_adv = torch.rand(8, in_ch, size, size, dtype=dtype)
    y = torch.randint(0, 10, (8,))
    official = copy.deepcopy(model)
    opt_a = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    opt_b = torch.optim.SGD(official.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    awp = AWP(model, gamma=0.01)
    proxy = OfficialAWP(official, gamma=0.01)
    for _ in range(2):  # two steps so that momentum carries state from a perturbed step
        awp.perturb(_loss_fn(x_adv, y))
        loss = F.cross_entropy(model(x_adv), y)
        opt_a.zero_grad()
        loss.backward()
        opt_a.step()
        awp.restore()

        diff = proxy.calc_awp(_loss_fn(x_adv, y))
        proxy.perturb(diff)
        loss_b = F.cross_entropy(official(x_adv), y)
        opt_b.zero_grad()
        loss_b.backward()
        opt_b.step()
        proxy.restore(diff)
    for (n, a), b in zip(model.state_dict().items(), official.state_dict().values()):
        assert torch.allclose(a.float(), b.float(), atol=1e-5, rtol=0), n


def test_gamma_zero_is_an_exact_no_op():
    model, x, y = _setup()
    before = copy.deepcopy(model.state_dict())
    awp = AWP(model, gamma=0.0)
    awp.perturb(_loss_fn(x, y))
    for n, p in model.state_dict().items():
        assert torch.equal(p, before[n])
    awp.restore()
    for n, p in model.state_dict().items():
        assert torch.equal(p, before[n])


@pytest.mark.parametrize("gamma", [-0.01, float("nan"), float("inf")])
def test_bad_gamma(gamma):
    model, _, _ = _setup()
    with pytest.raises(ValueError, match="gamma"):
        AWP(model, gamma=gamma)


def test_pairing_errors():
    model, x, y = _setup()
    awp = AWP(model)
    with pytest.raises(RuntimeError, match="without a matching perturb"):
        awp.restore()
    awp.perturb(_loss_fn(x, y))
    with pytest.raises(RuntimeError, match="twice without restore"):
        awp.perturb(_loss_fn(x, y))
    awp.restore()


def test_non_finite_gradient_names_the_layer():
    """No host sync in perturb: the verdict stays on the device, the bad layer gets no perturbation (so the
    weights stay finite and restore is exact) and check() names it."""
    model, x, y = _setup()
    before = copy.deepcopy(model.state_dict())
    awp = AWP(model, gamma=0.05)
    bad = awp.params[-1]  # only this layer's ascent gradient is non-finite

    def bad_loss(m):
        return F.cross_entropy(m(x), y) + bad.sum() * float("inf")

    awp.perturb(bad_loss)
    assert awp.finite.device == x.device and not bool(awp.finite)
    assert awp.layer_finite.tolist() == [True] * (len(awp.params) - 1) + [False]
    v = awp.perturbation()
    assert torch.equal(v[-1], torch.zeros_like(bad))  # the bad layer is not perturbed
    assert all(torch.isfinite(t).all() for t in v) and all(torch.isfinite(p).all() for p in model.parameters())
    assert torch.allclose(v[0].norm(), 0.05 * before[awp.names[0]].norm(), rtol=1e-5)  # the others are
    with pytest.raises(FloatingPointError, match=rf"not finite in layer '{awp.names[-1]}'"):
        awp.check()
    awp.restore()
    for n, p in model.state_dict().items():
        assert torch.allclose(p, before[n], atol=1e-7), n
    awp.perturb(_loss_fn(x, y))  # a finite gradient clears the flag
    assert bool(awp.finite)
    awp.check()
    awp.restore()


def test_overflowing_perturbation_is_flagged_and_never_applied():
    """gamma = 1e308: gamma * ||w_l|| overflows. Those layers get no perturbation (weights finite, restore
    exact), `finite` is false and check() says it is the perturbation's size, not the gradient."""
    model, x, y = _setup()
    before = copy.deepcopy(model.state_dict())
    awp = AWP(model, gamma=1e308)
    awp.perturb(_loss_fn(x, y))
    assert not bool(awp.finite) and bool(awp.layer_finite.all()) and bool(awp.loss_finite)
    assert not bool(awp.perturbation_finite.any())
    assert all(torch.equal(v, torch.zeros_like(v)) for v in awp.perturbation())
    with pytest.raises(FloatingPointError, match=rf"AWP perturbation is not finite in layer '{awp.names[0]}': gamma=1e\+308"):
        awp.check()
    awp.restore()
    assert all(torch.equal(p, before[n]) for n, p in model.state_dict().items())


def test_context_manager_restores_on_exception():
    model, x, y = _setup()
    before = copy.deepcopy(model.state_dict())
    awp = AWP(model, gamma=0.05)
    with pytest.raises(KeyError):
        with awp.perturbed(_loss_fn(x, y)):
            raise KeyError("boom")
    assert not awp.active
    for n, p in model.state_dict().items():
        assert torch.allclose(p, before[n], atol=1e-7), n


def test_custom_param_selection():
    model, x, y = _setup()
    fc = model.net.fc2.weight
    awp = AWP(model, gamma=0.1, params=[fc])
    assert awp.names == ["net.fc2.weight"]
    conv_before = model.net.conv1.weight.detach().clone()
    awp.perturb(_loss_fn(x, y))
    assert torch.equal(model.net.conv1.weight, conv_before)
    awp.restore()


def test_uses_foreach_kernels_not_a_python_loop(monkeypatch):
    """Norms, perturbation and restore go through torch._foreach_*; no state_dict copy is made."""
    model, x, y = _setup()
    awp = AWP(model)
    calls = []
    for fn in ["_foreach_norm", "_foreach_mul_", "_foreach_add_", "_foreach_sub_"]:
        orig = getattr(torch, fn)
        monkeypatch.setattr(torch, fn, lambda *a, _o=orig, _n=fn, **k: (calls.append(_n), _o(*a, **k))[1])
    monkeypatch.setattr(type(model), "state_dict", lambda *a, **k: pytest.fail("state_dict copied"))
    awp.perturb(_loss_fn(x, y))
    awp.restore()
    assert calls == ["_foreach_norm", "_foreach_norm", "_foreach_mul_", "_foreach_add_", "_foreach_sub_"]


def test_one_definition_of_the_weights_awp_perturbs():
    """`perturbed_parameters` (trainable, dim > 1) is the set AWP perturbs, the landscape's direction moves and the
    flatness measures perturb: a frozen weight is left alone by all of them (the landscape once moved it)."""
    from flatrobust import perturbed_parameters
    from flatrobust.flatness import average_flatness, worst_flatness
    from flatrobust.landscape import filter_normalized_direction, landscape_1d

    torch.manual_seed(0)
    model = models.create("smallcnn", num_classes=10, in_channels=1).eval()
    frozen = next(p for n, p in model.named_parameters() if n.endswith("conv1.weight"))
    frozen.requires_grad_(False)
    names = [n for n, _ in perturbed_parameters(model)]
    assert names == [n for n, p in model.named_parameters() if p.dim() > 1 and p is not frozen] and len(names) >= 4
    assert AWP(model, gamma=0.01).names == names
    direction = filter_normalized_direction(model, torch.Generator().manual_seed(0))
    moved = [n for (n, _), d in zip(model.named_parameters(), direction) if d.abs().sum() > 0]
    assert moved == names
    x, y = torch.rand(8, 1, 8, 8), torch.arange(8)
    attack = dict(norm="linf", eps=0.05, alpha=0.02, steps=1)
    assert landscape_1d(model, x, y, attack=attack, alphas=[0, 1], directions=1)["perturbed"] == names
    assert average_flatness(model, x, y, attack=attack, draws=1)["perturbed"] == names
    worst = worst_flatness(model, x, y, attack=attack, steps=1)
    assert worst["perturbed"] == names and len(worst["relative_norms"]) == len(names)
