"""AWP in the Hugging Face Trainer (flatrobust.integrations.huggingface): AWPTrainer's steps are a hand loop's."""
import os
import runpy
from pathlib import Path

import pytest
import torch

os.environ["HF_HUB_OFFLINE"] = "1"  # nothing is downloaded: the model is built from a config
transformers = pytest.importorskip("transformers")  # the extra [huggingface]; `make setup` installs it, so CI runs these

from flatrobust import AWP  # noqa: E402
from flatrobust.integrations.huggingface import AWPTrainer  # noqa: E402

N_STEPS, BATCH = 3, 8


def tiny_bert(seed=0):
    """A 2-layer BERT of width 32 with random weights (no dropout: the trainer and the hand loop then draw no noise)."""
    torch.manual_seed(seed)
    config = transformers.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=48, max_position_embeddings=16, num_labels=3,
                                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return transformers.BertForSequenceClassification(config)


def synthetic(n=N_STEPS * BATCH * 2, length=10):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 64, (n, length), generator=g)
    labels = ids[:, 0] % 3  # learnable from the first token
    return [{"input_ids": i, "attention_mask": torch.ones(length, dtype=torch.long), "labels": lab} for i, lab in zip(ids, labels)]


def _args(tmp_path, **kwargs):
    base = dict(output_dir=str(tmp_path), per_device_train_batch_size=BATCH, max_steps=N_STEPS, use_cpu=True, report_to="none",
                save_strategy="no", logging_strategy="no", disable_tqdm=True, train_sampling_strategy="sequential",
                lr_scheduler_type="constant", max_grad_norm=1.0, seed=0)
    return transformers.TrainingArguments(**(base | kwargs))


def _adamw(model):
    return torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.5)  # a strong decay: the restore order shows


def _batches(data, size):
    for i in range(0, len(data), size):
        chunk = data[i:i + size]
        yield {k: torch.stack([d[k] for d in chunk]) for k in chunk[0]}


def hand_loop(model, data, steps, *, awp=None, accumulate=1, restore="after_step", clip=1.0):
    """What AWPTrainer should do, written out: perturb from the first micro-batch, train every micro-batch at w + v,
    clip, restore before or after the optimizer step."""
    opt = _adamw(model)
    batches = list(_batches(data, BATCH))
    model.train()
    for s in range(steps):
        window = batches[s * accumulate:(s + 1) * accumulate]
        if awp is not None:
            awp.perturb(lambda m: m(**window[0]).loss)
        opt.zero_grad()
        for b in window:  # the Trainer's accumulation for this model: BERT's classification loss is a mean that ignores
            model(**b).loss.backward()  # num_items_in_batch, and the Trainer does not divide it by the steps (the sum)
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        if awp is not None and restore == "before_step":
            awp.restore()
        opt.step()
        if awp is not None and restore == "after_step":
            awp.restore()
    return model


def _assert_same(a, b, atol=1e-6):
    for (n, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.allclose(x, y, atol=atol, rtol=0), n


@pytest.mark.parametrize("awp_restore", ["after_step", "before_step"])
def test_awp_trainer_equals_a_hand_written_loop(tmp_path, awp_restore):
    """The fine-tuning AWP (word embeddings, bound, 2 ascent steps) in AWPTrainer == the hand loop, both orders,
    with clipping and AdamW's weight decay (which makes the order matter)."""
    data = synthetic()
    options = {"gamma": 0.5, "patterns": "word_embeddings", "eps_rel": 0.5, "ascent_steps": 2}
    model = tiny_bert()
    trainer = AWPTrainer(model=model, args=_args(tmp_path), train_dataset=data, optimizers=(_adamw(model), None),
                         awp=options, awp_restore=awp_restore)
    trainer.train()
    assert trainer.awp.names == ["bert.embeddings.word_embeddings.weight"] and not trainer.awp.active
    ref = tiny_bert()
    hand_loop(ref, data, N_STEPS, awp=AWP(ref, **options), restore=awp_restore)
    _assert_same(ref, model)
    other = tiny_bert()  # the order is seen: the other one ends elsewhere
    hand_loop(other, data, N_STEPS, awp=AWP(other, **options), restore={"after_step": "before_step"}.get(awp_restore, "after_step"))
    assert not all(torch.allclose(a, b, atol=1e-5) for a, b in zip(other.parameters(), model.parameters()))


def test_paper_awp_with_accumulation_and_start_step(tmp_path):
    """Every weight of dim > 1, 2 micro-batches per optimizer step (one perturbation per step), AWP from step 1."""
    data = synthetic()
    options = {"gamma": 0.01, "start_step": 1}
    model = tiny_bert()
    trainer = AWPTrainer(model=model, args=_args(tmp_path, gradient_accumulation_steps=2), train_dataset=data,
                         optimizers=(_adamw(model), None), awp=options)
    trainer.train()
    assert trainer.awp.step == N_STEPS
    ref = tiny_bert()
    hand_loop(ref, data, N_STEPS, awp=AWP(ref, **options), accumulate=2)
    _assert_same(ref, model)


def test_awp_off_is_the_plain_trainer(tmp_path):
    data = synthetic()
    plain, ours = tiny_bert(), tiny_bert()
    transformers.Trainer(model=plain, args=_args(tmp_path), train_dataset=data, optimizers=(_adamw(plain), None)).train()
    AWPTrainer(model=ours, args=_args(tmp_path), train_dataset=data, optimizers=(_adamw(ours), None), awp={"gamma": 0.0}).train()
    _assert_same(plain, ours, atol=0)


def test_bad_input(tmp_path):
    model = tiny_bert()
    with pytest.raises(ValueError, match="pattern 'position_ids' matches no trainable parameter"):
        AWPTrainer(model=model, args=_args(tmp_path), train_dataset=synthetic(), awp={"patterns": "position_ids"})
    with pytest.raises(ValueError, match="eps_rel must be a finite number > 0"):
        AWPTrainer(model=model, args=_args(tmp_path), awp={"eps_rel": -1})
    with pytest.raises(ValueError, match="awp_restore must be one of after_step, before_step"):
        AWPTrainer(model=model, args=_args(tmp_path), awp_restore="never")


def test_bf16_runs_the_ascent_under_the_trainers_autocast(tmp_path):
    """bf16=True on CPU: accelerate puts autocast on the model's forward, which the ascent pass calls too."""
    data = synthetic()
    model = tiny_bert()
    AWPTrainer(model=model, args=_args(tmp_path, bf16=True, max_steps=2), train_dataset=data, optimizers=(_adamw(model), None),
               awp={"gamma": 0.01}).train()
    ref = tiny_bert()
    forward = ref.forward
    ref.forward = lambda **kw: _autocast_bf16(forward, **kw)
    hand_loop(ref, data, 2, awp=AWP(ref, gamma=0.01))
    del ref.forward
    _assert_same(ref, model)


def _autocast_bf16(forward, **kwargs):
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = forward(**kwargs)
    out.loss = out.loss.float()
    return out


EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "hf_trainer_awp.py"


@pytest.mark.parametrize("variant", ["snippet", "paper"])
def test_example_runs(capsys, variant):
    """examples/hf_trainer_awp.py, shortened to 4 steps: it trains and reports."""
    result = runpy.run_path(str(EXAMPLE), run_name="example")["main"](["--steps", "4", "--variant", variant])
    assert set(result) == {"train_loss", "test_accuracy"} and 0 <= result["test_accuracy"] <= 1
    out = capsys.readouterr().out
    assert f"{variant} AWP (" in out and "4 steps: train loss" in out
    assert ("1 tensors perturbed, e.g. 'bert.embeddings.word_embeddings.weight'" in out) == (variant == "snippet")


def test_a_non_finite_ascent_gradient_stops_training_naming_the_layer(tmp_path):
    class Bad(AWPTrainer):
        def compute_loss(self, model, inputs, *args, **kwargs):
            loss = super().compute_loss(model, inputs, *args, **kwargs)
            return loss + model.classifier.weight.sum() * float("inf")

    model = tiny_bert()
    trainer = Bad(model=model, args=_args(tmp_path), train_dataset=synthetic(), awp={"gamma": 0.01})
    with pytest.raises(FloatingPointError, match="not finite in layer 'classifier.weight'"):
        trainer.train()
    assert not trainer.awp.active
