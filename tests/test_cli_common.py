"""What the commands share lives once: the device resolver, the atomic JSON writer, the checkpoint with its data
split, and the helpers of the two analysis commands (no subcommand imports another)."""
from __future__ import annotations

import argparse
import json

import pytest
import torch

from conftest import write_untrained_checkpoint
from flatrobust.atomic import write_json
from flatrobust.cli import COMMANDS, main
from flatrobust.errors import UserError
from flatrobust.machine import resolve_device


def test_one_device_resolver():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match=r"^--device=cuda but no CUDA device is available: use --device=cpu or --device=auto$"):
            resolve_device("cuda", option="--device")
        with pytest.raises(UserError, match=r"^device=cuda:1 but no CUDA device is available: use device=cpu or device=auto$"):
            resolve_device("cuda:1", 0)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the message is about a machine without CUDA")
@pytest.mark.parametrize("command", ["eval", "landscape", "flatness", "pseudolabel"])
def test_every_command_refuses_a_missing_gpu_alike(tmp_path, capsys, command):
    ckpt = write_untrained_checkpoint(tmp_path)
    extra = [str(tmp_path / "x.npz"), "--out", str(tmp_path / "y.npz")] if command == "pseudolabel" else []
    assert main([command, str(ckpt), *extra, "--device", "cuda"]) == 2
    err = capsys.readouterr().err
    assert err == "flatrobust: error: --device=cuda but no CUDA device is available: use --device=cpu or --device=auto\n"


def test_json_is_written_whole_or_not_at_all(tmp_path):
    path = tmp_path / "sub" / "r.json"
    write_json(path, {"a": [1, 2]}, indent=1)
    assert path.read_text() == '{\n "a": [\n  1,\n  2\n ]\n}\n'  # the folder is made; a final newline
    with pytest.raises(TypeError):
        write_json(path, {"a": object()})  # not JSON: the complete file stays, no temporary file is left
    assert json.loads(path.read_text()) == {"a": [1, 2]} and [p.name for p in path.parent.iterdir()] == ["r.json"]


def test_no_subcommand_imports_another():
    """flatness once imported landscape's helpers (and eval and pseudolabel its --trust-model-code): what the
    subcommands share is cli/common.py."""
    from test_imports import import_graph

    graph = import_graph()
    commands = {f"flatrobust.cli.{module}" for module, _ in COMMANDS.values()}
    for name in commands:
        assert not graph[name] & commands, name


def test_analysis_gives_a_new_radius_the_default_step(tmp_path):
    """`--eps` without `--step-size` takes the default step for that radius (one default everywhere), not the
    checkpoint's training step; without --eps the checkpoint's attack stands."""
    from flatrobust.cli.common import resolve_attack

    cfg = {"attack": {"norm": "linf", "eps": 8 / 255, "alpha": 1 / 255, "steps": 10}}
    args = argparse.Namespace(norm=None, eps=None, step_size=None, steps=None)
    assert resolve_attack(cfg, args) == cfg["attack"]
    assert resolve_attack(cfg, argparse.Namespace(**{**vars(args), "eps": "16/255"}))["alpha"] == pytest.approx(4 / 255)
    assert resolve_attack(cfg, argparse.Namespace(**{**vars(args), "eps": "16/255", "step_size": "1/255"}))["alpha"] == pytest.approx(1 / 255)
    with pytest.raises(UserError, match="steps must be an integer >= 1"):
        resolve_attack(cfg, argparse.Namespace(**{**vars(args), "steps": 0}))
