"""Fine-tuning (`init_from`): training starts from pre-trained weights, from any of the accepted files,
and a file that does not fit or is unsafe stops the command with one line."""
import pytest
import torch

from flatrobust import models
from flatrobust.checkpoint import CheckpointError, load_weights, save_checkpoint
from flatrobust.cli import main
from flatrobust.config import load_config
from flatrobust.train import build

CFG = {"model": "smallcnn", "data": {"name": "digits"}}
TINY = ["awp.warmup=0", "data.train_subset=128", "data.eval_subset=32", "batch_size=64", "attack.steps=2", "eval.steps=2", "epochs=1"]


def _digits_cnn(seed):
    torch.manual_seed(seed)
    from flatrobust.data import DATASETS
    info = DATASETS["digits"]
    return models.create("smallcnn", in_channels=1, mean=info.mean, std=info.std)


def _same(a, b):
    return all(torch.equal(a.state_dict()[k], b.state_dict()[k]) for k in a.state_dict())


@pytest.mark.parametrize("form", ["checkpoint", "run_dir", "state_dict", "ddp_state_dict", "nested"])
def test_training_starts_from_the_given_weights(tmp_path, form):
    src = _digits_cnn(123)
    sd = src.state_dict()
    if form in ("checkpoint", "run_dir"):
        save_checkpoint({"config": CFG, "model": sd}, tmp_path / "best.pt")
        path = tmp_path / "best.pt" if form == "checkpoint" else tmp_path
    else:
        obj = {"ddp_state_dict": {f"module.{k}": v for k, v in sd.items()}, "nested": {"state_dict": sd}}.get(form, sd)
        path = tmp_path / "w.pt"
        torch.save(obj, path)
    run = build(load_config("recipes/digits_at_awp.yaml", [*TINY, f"init_from={path}"]))
    assert _same(run.model, src)
    fresh = build(load_config("recipes/digits_at_awp.yaml", TINY))
    assert not _same(fresh.model, src)  # without init_from the seed's initialization is used


def test_fine_tuning_run_from_the_command_line(tmp_path, capsys):
    assert main(["train", "recipes/digits_at.yaml", *TINY, "awp.gamma=0", f"out_dir={tmp_path}", "name=pre", "--quiet"]) == 0
    assert main(["train", "recipes/digits_at_awp.yaml", *TINY, f"init_from={tmp_path / 'pre'}", f"out_dir={tmp_path}",
                 "name=ft", "--quiet"]) == 0
    assert (tmp_path / "ft" / "last.pt").exists()


def test_weights_that_do_not_fit_exit_2_one_line(tmp_path, capsys):
    torch.manual_seed(0)
    torch.save(models.create("smallcnn", num_classes=100, in_channels=1).state_dict(), tmp_path / "c100.pt")
    torch.save({"a": torch.zeros(1)}, tmp_path / "other.pt")
    for bad, message in [("c100.pt", "has shape"), ("other.pt", "does not fit the model"), ("missing.pt", "does not exist")]:
        rc = main(["train", "recipes/digits_at.yaml", *TINY, f"init_from={tmp_path / bad}", f"out_dir={tmp_path}", "name=x", "--quiet"])
        err = capsys.readouterr().err.strip()
        assert rc == 2 and message in err and "\n" not in err, err
        assert not (tmp_path / "x").exists()


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_unsafe_weights_file_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"w": _Payload(str(marker))}, path)  # torch's own format, carrying a pickled callable
    with pytest.raises(CheckpointError, match="refused for safety"):
        load_weights(_digits_cnn(0), path)
    assert not marker.exists()
