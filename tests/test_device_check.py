"""bench/device_check.py, the one command a GPU session runs, stays runnable: `--quick` runs its code paths on
the CPU on tiny shapes (correctness checks, data placement, the CLI training and evaluation, the interleaved
speed table) and writes the JSON and the Markdown table."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(tmp_path, *extra):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT / "src"))
    cmd = [sys.executable, str(ROOT / "bench" / "device_check.py"), "--quick", "--out", str(tmp_path), *extra]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads((tmp_path / "device_check.json").read_text()), (tmp_path / "device_check.md").read_text()


def test_quick_device_check_runs_every_section(tmp_path):
    res, md = _run(tmp_path)
    s = res["sections"]
    assert list(s) == ["correctness", "data_placement", "training", "speed", "ddp"]
    assert res["passed"] == res["total"] > 15
    names = [c["name"] for c in s["correctness"]["checks"]]
    assert any("AT-AWP step, cpu float64 vs CPU float64" in n for n in names)
    assert any("TRADES-AWP step" in n for n in names)
    assert any("bf16 autocast + channels_last vs fp32" in n for n in names)
    assert any("every .grad unchanged" in n for n in names)
    assert [r["mode"] for r in s["speed"]["rows"]] == ["fp32 eager", "bf16 + channels_last"]
    for row in s["speed"]["rows"]:
        assert set(row["images_per_s"]) == {"at", "at_awp", "trades_awp", "official_at_awp"}
        assert all(v > 0 for v in row["images_per_s"].values()) and 0 < row["attack_share_of_at"]
    assert any("AT-AWP / AT step time" in t["name"] for t in s["speed"]["targets"])
    runs = s["training"]["runs"]
    assert [r["recipe"] for r in runs] == ["digits_at.yaml", "digits_at_awp.yaml"]
    assert all(set(r["eval"]) == {"clean", "pgd20"} and len(r["epoch_time_s"]) == 1 for r in runs)
    assert "skipped" in s["ddp"]  # one CPU process: DDP only with --ddp
    assert "## speed" in md and "| smallcnn | 16 | fp32 eager |" in md and "## correctness" in md
    assert list(tmp_path.iterdir()) == [tmp_path / "device_check.json", tmp_path / "device_check.md"] or \
        sorted(p.name for p in tmp_path.iterdir()) == ["device_check.json", "device_check.md"]


@pytest.mark.slow
def test_quick_device_check_ddp_on_gloo(tmp_path):
    res, _ = _run(tmp_path, "--ddp", "--sections", "ddp")
    (check,) = res["sections"]["ddp"]["checks"]
    assert check["passed"], check
