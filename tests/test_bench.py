"""The step-time benchmark runs end to end (so it never rots) and AWP's memory promise holds in it."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_METHODS = {"at", "at_awp", "trades", "trades_awp", "mart", "mart_awp", "fgsm", "fgsm_awp", "free", "free_awp", "std", "std_awp", "official_at_awp"}


def test_step_time_smoke(tmp_path):
    out = tmp_path / "step_time.json"
    cmd = [sys.executable, str(ROOT / "bench" / "step_time.py"), "--model", "smallcnn", "--batch-size", "8",
           "--steps", "1", "--repeats", "1", "--warmup", "0", "--threads", "1", "--quiet", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    res = json.loads(out.read_text())
    assert set(res["methods"]) == DEFAULT_METHODS
    for m in res["methods"].values():
        assert m["median_s_per_step"] > 0 and m["images_per_s"] > 0
    assert {"at_awp/at", "official_at_awp/at_awp", "fgsm_awp/fgsm", "fgsm_awp/at_awp", "std_awp/std"} <= set(res["ratios"])
    assert res["ratios"]["fgsm_awp/at_awp"]["expected_from_pass_count"] == 8 / 26
    assert res["ratios"]["free_awp/at_awp"]["expected_from_pass_count"] == 6 / 26 and "| Free AT (m=8) |" in proc.stdout
    assert "| AT-AWP |" in proc.stdout  # the Markdown table
    # AWP holds exactly one copy of the perturbed weights, and nothing between steps.
    mem = res["memory"]["at_awp"]
    assert mem["awp_v_bytes"] == mem["perturbed_weights_bytes"] == res["perturbed_weights_bytes"]
    assert mem["state_between_steps_bytes"] == 0
    if mem["peak_step_bytes"] is not None and "extra_bytes" in mem:  # the CPU profiler path is a private torch API
        assert mem["extra_bytes"] <= 1.05 * mem["perturbed_weights_bytes"]
