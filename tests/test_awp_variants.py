"""The fine-tuning AWP (docs/AWP_VARIANTS.md): AWP's options reproduce the snippet people copy, leave the
paper's AWP unchanged when off, and refuse bad input."""
import copy
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from flatrobust import AWP, perturbed_parameters


class TinyText(nn.Module):
    """Embedding -> LayerNorm -> mean over tokens -> linear: the names of a text model ('word_embeddings',
    'LayerNorm.weight', 1-D parameters called 'weight')."""

    def __init__(self, vocab=50, width=16, classes=3):
        super().__init__()
        self.word_embeddings = nn.Embedding(vocab, width)
        self.LayerNorm = nn.LayerNorm(width)
        self.dense = nn.Linear(width, width)
        self.classifier = nn.Linear(width, classes)

    def forward(self, tokens):  # (B, T) -> (B, classes)
        h = self.LayerNorm(self.word_embeddings(tokens))
        return self.classifier(torch.tanh(self.dense(h)).mean(1))


def _setup(seed=0, dtype=torch.float64):
    torch.manual_seed(seed)
    model = TinyText().to(dtype)
    tokens = torch.randint(0, 50, (8, 6))
    y = torch.randint(0, 3, (8,))
    return model, tokens, y


def snippet_step(model, optimizer, loss_fn, *, adv_param, adv_lr, adv_eps, adv_step, start_epoch, epoch, e=1e-6):
    """One training step of the fine-tuning AWP snippet, written from its equations.

    The clean loss is back-propagated at w; then, for adv_step steps, every parameter whose name contains
    adv_param (and that has a gradient) moves by adv_lr * g / (||g|| + e) * (||w|| + e) (g its current .grad, w
    its current value; skipped when ||g|| is 0 or nan), is clamped elementwise to w0 -+ adv_eps * |w0| (w0: the
    weights before the step), and the loss at these weights is back-propagated after zero_grad. The weights go
    back to w0 before the optimizer step, which uses the last gradient (at w0 + v).
    """
    optimizer.zero_grad()
    loss_fn(model).backward()
    if adv_lr != 0 and epoch >= start_epoch:
        chosen = [(n, p) for n, p in model.named_parameters() if p.requires_grad and p.grad is not None and adv_param in n]
        backup = {n: p.data.clone() for n, p in chosen}
        bounds = {n: (backup[n] - adv_eps * p.detach().abs(), backup[n] + adv_eps * p.detach().abs()) for n, p in chosen}
        for _ in range(adv_step):
            for n, p in chosen:
                norm1, norm2 = torch.norm(p.grad), torch.norm(p.data.detach())
                if norm1 != 0 and not torch.isnan(norm1):
                    p.data.add_(adv_lr * p.grad / (norm1 + e) * (norm2 + e))
                    p.data = torch.min(torch.max(p.data, bounds[n][0]), bounds[n][1])
            adv_loss = loss_fn(model)
            optimizer.zero_grad()
            adv_loss.backward()
        for n, p in chosen:
            p.data = backup[n]
    optimizer.step()


def ours_step(model, optimizer, awp, loss_fn):
    """The same step with flatrobust's AWP: the ascent from the clean loss, restore before the step (as the snippet)."""
    awp.perturb(loss_fn)
    loss = loss_fn(model)
    optimizer.zero_grad()
    loss.backward()
    awp.restore()
    optimizer.step()


SNIPPET_CASES = [  # (adv_param, adv_lr, adv_eps, adv_step): bound active, inactive, several steps, embeddings only
    ("weight", 1.0, 0.001, 1),
    ("weight", 0.01, 0.5, 1),
    ("weight", 0.05, 0.02, 3),
    ("word_embeddings", 0.2, 0.1, 2),
]


@pytest.mark.parametrize("adv_param,adv_lr,adv_eps,adv_step", SNIPPET_CASES)
def test_options_reproduce_the_snippet(adv_param, adv_lr, adv_eps, adv_step):
    """patterns=adv_param, gamma=adv_lr, eps_rel=adv_eps, ascent_steps=adv_step, start_epoch=start_epoch, with the
    restore before the optimizer step: 4 AdamW steps (weight decay on) equal the snippet's to float64 rounding,
    with the snippet's 1e-6 guard set to ours (1e-20 added to ||g|| only: the one difference, docs/AWP_VARIANTS.md)."""
    model, tokens, y = _setup()
    snippet = copy.deepcopy(model)
    opt_a = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    opt_b = torch.optim.AdamW(snippet.parameters(), lr=1e-2, weight_decay=0.1)
    awp = AWP(model, gamma=adv_lr, patterns=adv_param, ascent_steps=adv_step, eps_rel=adv_eps, start_epoch=1)
    assert awp.names == [n for n, p in model.named_parameters() if adv_param in n]  # 1-D LayerNorm weights too

    def loss_fn(m):
        return F.cross_entropy(m(tokens), y)

    for epoch in range(4):  # epoch 0 is before start_epoch=1: plain steps on both sides
        awp.epoch = epoch
        ours_step(model, opt_a, awp, loss_fn)
        snippet_step(snippet, opt_b, loss_fn, adv_param=adv_param, adv_lr=adv_lr, adv_eps=adv_eps, adv_step=adv_step,
                     start_epoch=1, epoch=epoch, e=1e-20)
    for (n, a), b in zip(model.state_dict().items(), snippet.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-12, rtol=0), n
    plain, _, _ = _setup()  # the perturbation did something: plain AdamW steps end elsewhere
    opt_c = torch.optim.AdamW(plain.parameters(), lr=1e-2, weight_decay=0.1)
    for _ in range(4):
        opt_c.zero_grad()
        loss_fn(plain).backward()
        opt_c.step()
    assert any(not torch.allclose(a, b, atol=1e-6) for a, b in zip(model.parameters(), plain.parameters()))


def test_the_bound_holds_elementwise_and_steps_accumulate():
    model, tokens, y = _setup()
    w0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    awp = AWP(model, gamma=0.5, patterns="word_embeddings|dense", ascent_steps=3, eps_rel=0.01)
    awp.perturb(lambda m: F.cross_entropy(m(tokens), y))
    for n, v in zip(awp.names, awp.perturbation()):
        assert (v.abs() <= 0.01 * w0[n].abs() + 1e-15).all(), n
        assert (v.abs() >= 0.01 * w0[n].abs() - 1e-12).float().mean() > 0.5  # gamma 0.5: most elements at the bound
    awp.restore()
    for n, p in model.named_parameters():
        assert torch.allclose(p, w0[n], atol=1e-14), n
    # without a bound, K steps of gamma ||w + v|| each: ||v|| is about K gamma ||w|| when the gradient keeps its direction
    model, tokens, y = _setup()
    one = AWP(model, gamma=0.001, patterns="classifier.weight")
    one.perturb(lambda m: F.cross_entropy(m(tokens), y))
    v1 = one.perturbation()[0].clone()
    one.restore()
    three = AWP(model, gamma=0.001, patterns="classifier.weight", ascent_steps=3)
    three.perturb(lambda m: F.cross_entropy(m(tokens), y))
    v3 = three.perturbation()[0]
    assert 2.9 < float(v3.norm() / v1.norm()) < 3.1
    three.restore()


def test_ascent_from_the_clean_loss_is_a_loss_function():
    """The fine-tuning AWP ascends the clean loss: perturb(lambda m: loss(m(x), y)), no adversarial input anywhere."""
    model, tokens, y = _setup()
    awp = AWP(model, gamma=0.01, patterns="word_embeddings")
    g = torch.autograd.grad(F.cross_entropy(model(tokens), y), model.word_embeddings.weight)[0]
    awp.perturb(lambda m: F.cross_entropy(m(tokens), y))
    v = awp.perturbation()[0]
    assert torch.allclose(v, 0.01 * model.word_embeddings.weight.detach().sub(v).norm() * g / g.norm(), atol=1e-15)
    awp.restore()


def test_start_step_and_start_epoch_are_exact_no_ops_before_them():
    model, tokens, y = _setup()
    before = copy.deepcopy(model.state_dict())
    awp = AWP(model, gamma=0.05, start_step=2, start_epoch=1)
    calls = []

    def loss_fn(m):
        calls.append(1)
        return F.cross_entropy(m(tokens), y)

    for step in range(3):  # epoch 0: never, whatever the step
        awp.perturb(loss_fn)
        assert awp.perturbation() == [] and all(torch.equal(p, before[n]) for n, p in model.named_parameters())
        awp.restore()
    assert calls == [] and awp.step == 3
    awp.epoch = 1
    assert awp.started
    awp.perturb(loss_fn)
    assert calls == [1] and awp.perturbation()
    awp.restore()
    late = AWP(model, gamma=0.05, start_step=1)
    late.perturb(loss_fn)  # step 0: no-op
    assert late.perturbation() == []
    late.restore()
    late.perturb(loss_fn)  # step 1: perturbs
    assert late.perturbation()
    late.restore()
    state = late.state_dict()
    again = AWP(model, gamma=0.05, start_step=1)
    again.load_state_dict(state)  # a resumed run continues its count
    assert again.step == 2 and again.started


def test_defaults_leave_the_paper_update_unchanged():
    """Every option at its default gives the same v, bit for bit, as the paper's AWP (whose float64 equality
    with the official code is tests/test_awp.py)."""
    model, tokens, y = _setup()
    a = AWP(model, gamma=0.02)
    b = AWP(copy.deepcopy(model), gamma=0.02, patterns=None, ascent_steps=1, eps_rel=None, start_step=0, start_epoch=0, scaler=None)
    for awp in (a, b):
        awp.perturb(lambda m: F.cross_entropy(m(tokens), y))
    assert a.names == b.names and all(torch.equal(x, z) for x, z in zip(a.perturbation(), b.perturbation()))


def test_grad_scaler_unscales_before_the_norms():
    """With a GradScaler the ascent loss is scaled (2^16 here) and the gradients unscaled before the norms: the
    same v as without one (power-of-two scaling is exact), also with the bound (where the 1e-20 guard would
    otherwise meet scaled norms)."""
    model, tokens, y = _setup(dtype=torch.float32)
    for kwargs in ({}, {"patterns": "weight", "eps_rel": 0.05, "ascent_steps": 2}):
        plain = AWP(copy.deepcopy(model), gamma=0.02, **kwargs)
        plain.perturb(lambda m: F.cross_entropy(m(tokens), y))
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
        scaled = AWP(copy.deepcopy(model), gamma=0.02, scaler=scaler, **kwargs)
        scaled.perturb(lambda m: F.cross_entropy(m(tokens), y))
        assert all(torch.equal(a, b) for a, b in zip(plain.perturbation(), scaled.perturbation()))
        assert bool(scaled.finite)


def test_a_step_the_grad_scaler_skips_leaves_the_weights_as_they_were():
    """The defined behaviour when the scale is too high: the ascent gradient overflows, so AWP perturbs nothing and
    says so (`finite` False, `check()` names the layer); the training gradient overflows too, so the scaler skips
    the optimizer step and lowers its scale; restore leaves the weights exactly as they were."""
    model, tokens, y = _setup(dtype=torch.float32)
    before = copy.deepcopy(model.state_dict())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**127)
    awp = AWP(model, gamma=0.02, scaler=scaler)
    awp.perturb(lambda m: F.cross_entropy(m(tokens), y) * 4)  # * 4: loss * 2^127 overflows float32
    assert not bool(awp.finite) and all(torch.equal(v, torch.zeros_like(v)) for v in awp.perturbation())
    with pytest.raises(FloatingPointError, match="not finite in layer"):
        awp.check()
    loss = F.cross_entropy(model(tokens), y) * 4
    opt.zero_grad()
    scaler.scale(loss).backward()
    scaler.step(opt)  # skipped: the gradients are not finite
    scaler.update()
    awp.restore()
    assert scaler.get_scale() < 2.0**127
    for n, p in model.state_dict().items():
        assert torch.equal(p, before[n]), n


def test_perturbed_parameters_default_and_patterns():
    model, _, _ = _setup()
    assert [n for n, _ in perturbed_parameters(model)] == ["word_embeddings.weight", "dense.weight", "classifier.weight"]
    assert [n for n, _ in perturbed_parameters(model, "weight")] == [
        "word_embeddings.weight", "LayerNorm.weight", "dense.weight", "classifier.weight"]
    assert [n for n, _ in perturbed_parameters(model, ["^dense", "bias$"])] == [
        "LayerNorm.bias", "dense.weight", "dense.bias", "classifier.bias"]
    model.dense.weight.requires_grad_(False)  # frozen weights are never perturbed
    assert "dense.weight" not in [n for n, _ in perturbed_parameters(model, "dense")]


@pytest.mark.parametrize("kwargs,match", [
    ({"patterns": "position_embeddings"}, r"pattern 'position_embeddings' matches no trainable parameter"),
    ({"patterns": ["weight", "nothing_here"]}, r"'nothing_here' matches no"),
    ({"patterns": "(unclosed"}, r"'\(unclosed' is not a regular expression"),
    ({"patterns": []}, "patterns is empty"),
    ({"eps_rel": -0.1}, "eps_rel must be a finite number > 0"),
    ({"eps_rel": 0.0}, "eps_rel must be a finite number > 0"),
    ({"eps_rel": float("nan")}, "eps_rel must be"),
    ({"ascent_steps": 0}, "ascent_steps must be an integer >= 1"),
    ({"start_step": -1}, "start_step must be an integer >= 0"),
    ({"start_epoch": 1.5}, "start_epoch must be an integer >= 0"),
    ({"scaler": object()}, "scaler must be a torch.amp.GradScaler"),
])
def test_bad_options_are_one_clear_error(kwargs, match):
    model, _, _ = _setup()
    with pytest.raises(ValueError, match=match):
        AWP(model, gamma=0.01, **kwargs)


def test_frozen_only_match_is_an_error():
    model, _, _ = _setup()
    model.word_embeddings.weight.requires_grad_(False)
    with pytest.raises(ValueError, match="matches no trainable parameter"):
        AWP(model, patterns="word_embeddings")


def test_a_loss_that_raises_mid_ascent_gives_the_weights_back():
    model, tokens, y = _setup()
    before = copy.deepcopy(model.state_dict())
    awp = AWP(model, gamma=0.05, ascent_steps=3)
    calls = []

    def loss_fn(m):
        calls.append(1)
        if len(calls) == 2:
            raise KeyError("boom")
        return F.cross_entropy(m(tokens), y)

    with pytest.raises(KeyError):
        awp.perturb(loss_fn)
    assert not awp.active
    for n, p in model.state_dict().items():
        assert torch.allclose(p, before[n], atol=1e-14), n


# From the command line: the recipe keys awp.params, awp.steps, awp.eps_rel and awp.start_step.
TINY = ["data.train_subset=128", "data.eval_subset=32", "batch_size=64", "attack.steps=1", "attack.eps=0.2", "attack.alpha=0.2",
        "eval.steps=1", "awp.gamma=0.01", "awp.warmup=0", "epochs=2", "optim.lr=0.05"]  # 2 steps an epoch, 4 in all


def test_recipe_keys_reach_awp():
    from flatrobust.config import load_config
    from flatrobust.train import build

    cfg = load_config("recipes/digits_at_awp.yaml", [*TINY, "awp.params=fc", "awp.steps=3", "awp.eps_rel=0.05", "awp.start_step=7"])
    awp = build(cfg).awp
    assert awp.names == ["net.fc1.weight", "net.fc1.bias", "net.fc2.weight", "net.fc2.bias"]
    assert (awp.ascent_steps, awp.eps_rel, awp.start_step) == (3, 0.05, 7)
    plain = build(load_config("recipes/digits_at_awp.yaml", TINY)).awp
    assert (plain.ascent_steps, plain.eps_rel, plain.start_step) == (1, None, 0) and all(p.dim() > 1 for p in plain.params)


@pytest.mark.parametrize("override,message", [
    ("awp.params=position_embeddings", "awp.params: AWP pattern 'position_embeddings' matches no trainable parameter"),
    ("awp.params=(x", "awp.params: AWP patterns: '(x' is not a regular expression"),
    ("awp.eps_rel=-0.1", "awp.eps_rel must be >= 0, got -0.1"),
    ("awp.steps=0", "awp.steps must be >= 1, got 0"),
])
def test_bad_recipe_keys_are_one_line_and_write_nothing(tmp_path, capsys, override, message):
    from flatrobust.cli import main

    assert main(["train", "recipes/digits_at_awp.yaml", *TINY, override, f"out_dir={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not any(tmp_path.iterdir())


def test_start_step_from_the_command_line(tmp_path, capsys):
    """awp.start_step counts global steps: at the run's length AWP never acts (a warning says so, and the weights are
    plain AT's, bit for bit); at 2 (the second epoch) the run is AT for one epoch, then AT-AWP."""
    from flatrobust.config import load_config
    from flatrobust.train import fit

    def last(name, *extra):
        run = fit(load_config("recipes/digits_at_awp.yaml", [*TINY, f"out_dir={tmp_path}", f"name={name}", *extra]), progress=False)
        return torch.load(run / "last.pt", weights_only=True)["model"], [json.loads(ln) for ln in (run / "metrics.jsonl").open()]

    plain, _ = last("plain", "awp.gamma=0")
    never, rows = last("never", "awp.start_step=4")
    assert "awp.start_step=4 >= the run's 4 steps: AWP (gamma 0.01) is never active" in capsys.readouterr().err
    assert all(torch.equal(plain[k], never[k]) for k in plain) and [r["awp_active"] for r in rows] == [False, False]
    late, rows = last("late", "awp.start_step=2")
    assert [r["awp_active"] for r in rows] == [False, True]
    early, _ = last("early")
    assert not all(torch.equal(plain[k], late[k]) for k in plain) and not all(torch.equal(early[k], late[k]) for k in plain)
    half, _ = last("half", "awp.warmup=1")  # AWP from epoch 1 = from step 2 here: the same run
    assert all(torch.equal(half[k], late[k]) for k in plain)


def test_trainers_stay_out_of_the_library():
    """Only flatrobust.integrations imports Lightning or transformers, and nothing in flatrobust imports the
    integrations: `import flatrobust` (and AWP) never needs the extras."""
    import ast
    from pathlib import Path

    pkg = Path(__file__).resolve().parents[1] / "src" / "flatrobust"
    for path in pkg.rglob("*.py"):
        names = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                names.add(("." * node.level) + (node.module or ""))
        roots = {n.lstrip(".").split(".")[0] for n in names}
        if path.parent.name != "integrations":
            assert not roots & {"pytorch_lightning", "lightning", "transformers", "accelerate"}, path
            assert not any("integrations" in n for n in names), path
