"""AWP in PyTorch Lightning (flatrobust.integrations.lightning): the callback's steps are flatrobust's own."""
import copy
import runpy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

pl = pytest.importorskip("pytorch_lightning")  # the extra [lightning]; `make setup` installs it, so CI runs these

from flatrobust import AT, AWP, AttackConfig, models  # noqa: E402
from flatrobust.integrations.lightning import AWPCallback  # noqa: E402
from flatrobust.train import train_step  # noqa: E402

N_STEPS = 4


def _data(n=N_STEPS * 16):
    g = torch.Generator().manual_seed(0)
    return torch.rand(n, 1, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g)


def _loader(x, y, batch_size=16):
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=batch_size, shuffle=False)


def _net(seed=0):
    torch.manual_seed(seed)
    return models.create("smallcnn", num_classes=10, in_channels=1)


def _trainer(callbacks=(), devices=1, **kwargs):
    return pl.Trainer(accelerator="cpu", devices=devices, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, num_sanity_val_steps=0, callbacks=list(callbacks), **kwargs)


def _sgd(params):
    return torch.optim.SGD(params, lr=0.05, momentum=0.9, weight_decay=5e-4)


class ATModule(pl.LightningModule):
    """AT with flatrobust's objective: the attack at w happens in awp_loss_fn, before the callback's ascent."""

    def __init__(self, net, objective, seed=0):
        super().__init__()
        self.net, self.objective = net, objective
        self.g = torch.Generator().manual_seed(seed)
        self.x_adv = None

    def awp_loss_fn(self, batch, batch_idx):  # AWPCallback: runs at w; returns the loss to ascend
        x, y = batch
        self.x_adv = self.objective.attack(self.net, x, y, generator=self.g)
        return lambda module: self.objective.ascent_loss(self.net, x, self.x_adv, y)

    def training_step(self, batch, batch_idx):
        x, y = batch
        x_adv = self.x_adv if self.x_adv is not None else self.objective.attack(self.net, x, y, generator=self.g)
        self.x_adv = None
        return self.objective.loss(self.net, x, x_adv, y)

    def configure_optimizers(self):
        return _sgd(self.net.parameters())


class CleanModule(pl.LightningModule):
    """Plain fine-tuning: no awp_loss_fn, so the callback ascends the loss training_step returns."""

    def __init__(self, net, clip=None):
        super().__init__()
        self.net = net
        self.seen_weights = []  # what validation_step saw

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self.net(x), y)
        self.log("train_loss", loss)  # silenced in the callback's ascent pass
        return loss

    def validation_step(self, batch, batch_idx):
        self.seen_weights.append(self.net.net.fc2.weight.detach().clone())
        return None

    def configure_optimizers(self):
        return _sgd(self.net.parameters())


def test_n_trainer_steps_equal_n_train_steps():
    """AT-AWP: N steps of Trainer + AWPCallback == N steps of flatrobust.train.train_step, same data, seed, optimizer."""
    x, y = _data()
    objective = AT(AttackConfig(eps=0.1, alpha=0.05, steps=2))
    ours = _net()
    module = ATModule(copy.deepcopy(ours), objective)
    callback = AWPCallback(gamma=0.02)
    _trainer([callback], max_steps=N_STEPS).fit(module, _loader(x, y))

    opt = _sgd(ours.parameters())
    awp, g = AWP(ours, gamma=0.02), torch.Generator().manual_seed(0)
    for xb, yb in _loader(x, y):
        train_step(ours, objective, opt, xb, yb, awp=awp, generator=g)
    assert callback.awp.names == ["net." + n for n in awp.names] and not callback.awp.active
    for (n, a), b in zip(ours.state_dict().items(), module.net.state_dict().values()):
        assert torch.allclose(a.float(), b.float(), atol=1e-6, rtol=0), n
    plain = _net()  # and AWP moved the weights somewhere else than plain AT
    opt = _sgd(plain.parameters())
    g = torch.Generator().manual_seed(0)
    for xb, yb in _loader(x, y):
        train_step(plain, objective, opt, xb, yb, generator=g)
    assert not torch.allclose(plain.net.fc2.weight, ours.net.fc2.weight, atol=1e-4)


@pytest.mark.parametrize("callback_kwargs", [{"gamma": 0.0}, {"gamma": 0.05, "start_step": N_STEPS}])
def test_awp_off_is_plain_lightning(callback_kwargs):
    """gamma = 0, or a start_step after the run, is exactly a Trainer without the callback."""
    x, y = _data()
    plain, with_cb = CleanModule(_net()), CleanModule(_net())
    _trainer(max_steps=N_STEPS).fit(plain, _loader(x, y))
    _trainer([AWPCallback(**callback_kwargs)], max_steps=N_STEPS).fit(with_cb, _loader(x, y))
    for (n, a), b in zip(plain.state_dict().items(), with_cb.state_dict().values()):
        assert torch.equal(a, b), n


@pytest.mark.parametrize("restore", ["after_step", "before_step"])
def test_accumulation_clipping_and_the_restore_order_match_a_hand_loop(restore):
    """Fine-tuning AWP (clean loss, patterns, bound, 2 ascent steps, start_step 1) with 2 micro-batches per optimizer
    step and gradient clipping: one perturbation per optimizer step from the window's first micro-batch, both
    micro-batches trained at w + v, the gradient at w + v clipped, the step taken at w + v ("after_step") or at w
    ("before_step")."""
    x, y = _data(n=6 * 8)
    options = dict(gamma=0.05, patterns="fc", eps_rel=0.02, ascent_steps=2, start_step=1)
    module = CleanModule(_net())
    callback = AWPCallback(restore=restore, **options)
    _trainer([callback], max_steps=3, accumulate_grad_batches=2, gradient_clip_val=0.5).fit(module, _loader(x, y, 8))

    net = _net()
    opt = _sgd(net.parameters())
    awp = AWP(net, **options)
    batches = list(_loader(x, y, 8))
    for first, second in zip(batches[0::2], batches[1::2]):
        awp.perturb(lambda m: F.cross_entropy(m(first[0]), first[1]))
        opt.zero_grad()
        for xb, yb in (first, second):
            (F.cross_entropy(net(xb), yb) / 2).backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 0.5)
        if restore == "before_step":
            awp.restore()
        opt.step()
        if restore == "after_step":
            awp.restore()
    assert awp.step == 3 and callback.awp.names == ["net." + n for n in awp.names]
    for (n, a), b in zip(net.state_dict().items(), module.net.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-6, rtol=0), n


def test_bf16_mixed_runs_the_ascent_under_autocast():
    """precision="bf16-mixed": the ascent pass runs under the trainer's autocast, like training_step."""
    x, y = _data()
    module = CleanModule(_net())
    _trainer([AWPCallback(gamma=0.02)], max_steps=2, precision="bf16-mixed").fit(module, _loader(x, y))
    net = _net()
    opt = _sgd(net.parameters())
    awp = AWP(net, gamma=0.02)

    def loss_fn(xb, yb):
        with torch.autocast("cpu", dtype=torch.bfloat16, cache_enabled=False):
            return F.cross_entropy(net(xb), yb)

    for xb, yb in list(_loader(x, y))[:2]:
        awp.perturb(lambda m: loss_fn(xb, yb))
        opt.zero_grad()
        loss_fn(xb, yb).backward()
        opt.step()
        awp.restore()
    for (n, a), b in zip(net.state_dict().items(), module.net.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-6, rtol=0), n


def _fp16(init_scale):
    """Lightning's fp16 precision with its GradScaler. The Trainer's precision="16-mixed" is refused on a CPU, but the
    plugin itself runs there (CPU autocast to float16, a CPU GradScaler): the same code path as on a GPU."""
    from pytorch_lightning.plugins.precision import MixedPrecision

    return MixedPrecision("16-mixed", "cpu", torch.amp.GradScaler("cpu", init_scale=init_scale))


def test_fp16_with_grad_scaler_matches_a_hand_loop():
    """The trainer's GradScaler scales the ascent loss; the gradients are unscaled before the norms."""
    x, y = _data()
    module = CleanModule(_net())
    callback = AWPCallback(gamma=0.02)
    _trainer([callback], max_steps=2, plugins=[_fp16(2.0**16)]).fit(module, _loader(x, y))
    assert callback.awp.scaler is not None
    net = _net()
    opt = _sgd(net.parameters())
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    awp = AWP(net, gamma=0.02, scaler=scaler)

    def loss_fn(xb, yb):
        with torch.autocast("cpu", dtype=torch.float16, cache_enabled=False):
            return F.cross_entropy(net(xb), yb)

    for xb, yb in list(_loader(x, y))[:2]:
        awp.perturb(lambda m: loss_fn(xb, yb))
        opt.zero_grad()
        scaler.scale(loss_fn(xb, yb)).backward()
        scaler.unscale_(opt)
        scaler.step(opt)
        scaler.update()
        awp.restore()
    for (n, a), b in zip(net.state_dict().items(), module.net.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-6, rtol=0), n


def test_a_step_the_grad_scaler_skips_leaves_the_weights_as_they_were():
    """A scale so high that everything overflows: AWP perturbs nothing (its ascent gradient overflowed), the scaler
    skips the optimizer step and lowers its scale, the callback restores, and training goes on (under a scaler an
    overflow is not an error). One such step leaves every weight exactly where it was."""
    x, y = _data()
    module = CleanModule(_net())
    before = copy.deepcopy(module.net.state_dict())
    callback = AWPCallback(gamma=0.02)
    trainer = _trainer([callback], max_steps=1, plugins=[_fp16(2.0**127)])
    trainer.fit(module, _loader(x, y))
    assert not bool(callback.awp.finite) and not callback.awp.active and trainer.global_step == 1
    assert trainer.scaler.get_scale() < 2.0**127
    for n, p in module.net.state_dict().items():
        if p.is_floating_point():  # (BatchNorm's running statistics moved with the forward, as without AWP)
            assert torch.equal(p, before[n]) or "running" in n, n


class Recorder(pl.Callback):
    """Placed before AWPCallback (callbacks run in list order): the weights each micro-batch starts from."""

    def __init__(self):
        self.weights = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.weights.append(pl_module.net.net.fc2.weight.detach().clone())


def test_validation_inside_an_accumulation_window_sees_w():
    """Validation after micro-batch 0 of a 2-batch window runs at w; micro-batch 1 still trains at w + v."""
    x, y = _data(n=4 * 8)
    module = CleanModule(_net())
    recorder = Recorder()
    trainer = _trainer([recorder, AWPCallback(gamma=0.05)], max_steps=2, accumulate_grad_batches=2, val_check_interval=1,
                       limit_val_batches=1)
    trainer.fit(module, _loader(x, y, 8), _loader(x[:8], y[:8], 8))
    w, w_plus_v = recorder.weights[0], recorder.weights[1]
    assert not torch.allclose(w, w_plus_v, atol=1e-4)  # micro-batch 1 started at w + v
    assert torch.allclose(module.seen_weights[0], w, atol=1e-7)  # validation in between saw w


def test_bad_input():
    with pytest.raises(ValueError, match="restore must be one of after_step, before_step"):
        AWPCallback(restore="later")
    with pytest.raises(ValueError, match="eps_rel must be a finite number > 0"):
        AWPCallback(eps_rel=-0.1)
    with pytest.raises(ValueError, match="takes the trainer's GradScaler itself"):
        AWPCallback(scaler=object())
    x, y = _data()
    with pytest.raises(ValueError, match="pattern 'nothing' matches no trainable parameter"):
        _trainer([AWPCallback(patterns="nothing")], max_steps=1).fit(CleanModule(_net()), _loader(x, y))

    class Manual(CleanModule):
        def __init__(self, net):
            super().__init__(net)
            self.automatic_optimization = False

    with pytest.raises(ValueError, match="works with automatic optimization"):
        _trainer([AWPCallback()], max_steps=1).fit(Manual(_net()), _loader(x, y))


class MLPModule(CleanModule):
    """No BatchNorm: under DDP every process would keep its own batch statistics."""

    def configure_optimizers(self):
        return torch.optim.SGD(self.net.parameters(), lr=0.1)


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10))


@pytest.mark.slow
def test_ddp_on_two_cpu_processes_equals_one_process_on_the_whole_batch():
    """strategy="ddp_spawn", 2 CPU processes (gloo), 8 examples each: AWP averages the ascent gradient over the
    processes, so 3 steps equal 3 steps of one process on the 16 examples (about a minute: two processes start)."""
    x, y = _data(n=3 * 16)
    module = MLPModule(_mlp())
    _trainer([AWPCallback(gamma=0.05)], max_steps=3, strategy="ddp_spawn", devices=2).fit(module, _loader(x, y, 8))
    net = _mlp()
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    awp = AWP(net, gamma=0.05)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))  # Lightning's DistributedSampler, seed 0
    for xb, yb in _loader(x[order], y[order], 16):  # global batch k: process r takes its examples r, r + 2, ...
        awp.perturb(lambda m: F.cross_entropy(m(xb), yb))
        opt.zero_grad()
        F.cross_entropy(net(xb), yb).backward()
        opt.step()
        awp.restore()
    for (n, a), b in zip(net.state_dict().items(), module.net.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-6, rtol=0), n


EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "lightning_awp.py"


def test_example_runs(capsys):
    """examples/lightning_awp.py, shortened (2 epochs of 256 images, AWP in the second): it trains and reports."""
    result = runpy.run_path(str(EXAMPLE), run_name="example")["main"](["--epochs", "2", "--n-train", "256"])
    assert set(result) == {"clean", "robust"} and 0 <= result["robust"] <= result["clean"] <= 1
    assert "AT-AWP (gamma 0.01 from epoch 1), 2 epochs on 256 digits: test clean" in capsys.readouterr().out


def test_a_non_finite_ascent_gradient_stops_the_fit_naming_the_layer():
    class Bad(CleanModule):
        def awp_loss_fn(self, batch, batch_idx):
            return lambda module: F.cross_entropy(self.net(batch[0]), batch[1]) + self.net.net.fc2.weight.sum() * float("inf")

    x, y = _data()
    module = Bad(_net())
    callback = AWPCallback(gamma=0.02)
    with pytest.raises(FloatingPointError, match="not finite in layer 'net.net.fc2.weight'"):
        _trainer([callback], max_steps=2).fit(module, _loader(x, y))
    assert not callback.awp.active
