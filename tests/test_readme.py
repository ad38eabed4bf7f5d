"""The README's library example runs as written (on a tiny CIFAR-shaped batch), so the docs match the code."""
import re
from pathlib import Path

import pytest
import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_awp_loop_runs():
    block = re.search(r"## AWP in your own loop\s+```python\n(.*?)```", README.read_text(), re.S).group(1)
    g = torch.Generator().manual_seed(0)
    loader = [(torch.rand(4, 3, 32, 32, generator=g), torch.randint(0, 10, (4,), generator=g))]
    # The example builds PreActResNet-18 itself; 1 PGD step instead of 10 keeps this test at a second or two.
    namespace = {"loader": loader}
    torch.manual_seed(0)  # the example's model starts from the same weights as `fresh` below
    exec(compile(block.replace("steps=10", "steps=1"), "README.md", "exec"), namespace)  # noqa: S102
    model, awp = namespace["model"], namespace["awp"]
    torch.manual_seed(0)
    from flatrobust import models
    fresh = models.create("preactresnet18", num_classes=10, mean=(0.4914, 0.4822, 0.4465), std=(0.2471, 0.2435, 0.2616))
    old = dict(fresh.named_parameters())
    # parameters only (BN buffers move in any forward), beyond the rounding of (w + v) - v
    changed = [k for k, v in model.named_parameters() if not torch.allclose(v, old[k], rtol=0, atol=1e-5)]
    assert changed, "the example's optimizer step changed nothing"
    assert all(torch.isfinite(p).all() for p in model.parameters())
    with pytest.raises(RuntimeError):  # the loop ended with restore(): nothing is left perturbed
        awp.restore()


def _demo_tool():
    import importlib.util

    spec = importlib.util.spec_from_file_location("demo_readme", README.parent / "tools" / "demo_readme.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    return tool


def test_readme_demo_figures_are_the_rendering_of_the_committed_summary():
    """README's demo block is exactly what tools/demo_readme.py renders from docs/demo_summary.json (written by a
    real `make demo`), so the figures cannot be typed by hand or drift from the file."""
    import json

    tool = _demo_tool()
    summary = json.loads(tool.SUMMARY.read_text())
    assert summary["format"] == "flatrobust-demo-summary" and summary["wall_s"] > 0
    text = README.read_text()
    assert tool.replace_block(text, tool.render(summary)) == text
    assert tool.main(["check"]) == 0


def test_demo_summary_pipeline_from_run_directories(tmp_path):
    """make demo's last steps on two small run directories: report -> summary.json -> demo_summary.json -> block."""
    import json

    from test_report import _fake_run

    from flatrobust.report import write_report

    runs = tmp_path / "runs"
    at = _fake_run(runs / "digits_at", "at", [0.30, 0.42, 0.38, 0.33], [0.35, 0.50, 0.60, 0.70])
    awp = _fake_run(runs / "digits_at_awp", "at_awp", [0.31, 0.44, 0.45, 0.44], [0.33, 0.47, 0.50, 0.52], warmup=1)
    for run, (pgd, aa, flat) in ((at, (0.47, 0.40, 0.30)), (awp, (0.52, 0.41, 0.20))):
        (run / "eval.json").write_text(json.dumps({"n": 100, "seconds": 20.0, "checks": [{"name": "x", "passed": True}],
                                                   "attacks": {"clean": {"accuracy": 0.9}, "pgd20": {"accuracy": pgd},
                                                               "autoattack": {"accuracy": aa}}}))
        (run / "flatness.json").write_text(json.dumps({"seconds": 5.0, "average": {"n": 200, "average_flatness": flat,
                                                       "standard_error": 0.01}, "worst": {"n": 200, "worst_flatness": 0.05}}))
        (run / "landscape.json").write_text(json.dumps({"seconds": 7.0}))
    write_report([at, awp], runs / "report")
    (runs / "demo_started").write_text("1000\n")
    (runs / "demo_finished").write_text("1263\n")
    tool = _demo_tool()
    block = tool.render(tool.summarize(runs))
    assert "1970-01-01" in block and f"torch {torch.__version__}: 4 min 23 s in all (training 6 s and 6 s; evaluation 20 s and 20 s; landscapes 7 s and 7 s; flatness 5 s and 5 s;" in block
    assert "| AWP | off | gamma 0.01, warm-up 1 epoch: active 3 of 4 epochs |" in block
    assert "| best test PGD-20 (epoch), n=200 per epoch | 42.0% (2) | 45.0% (3) |" in block
    assert "| final clean / pgd20 / autoattack of best.pt, n=100 | 90% / 47% / 40% | 90% / 52% / 41% |" in block
    assert "| average-case flatness (nats), n=200 | 0.300 ± 0.010 | 0.200 ± 0.010 |" in block
    assert "of 8 expectations of the AWP paper, 3 held, 0 went the other way, 4 were within noise and 1 could not" in block
