"""`flatrobust report`: a Markdown report comparing run directories, every figure it references present."""
import json
import re

import pytest
import torch
import yaml

from flatrobust import models
from flatrobust.checkpoint import save_checkpoint
from flatrobust.cli import main
from flatrobust.report import load_run

PNG = b"\x89PNG\r\n\x1a\n"


def _fake_run(path, name, test_robust, train_robust, percent=False, with_eval=False, eval_n=200, warmup=0):
    """A run directory as `flatrobust train` writes it: config.yaml, metrics.jsonl, env.json, best.pt."""
    from flatrobust.data import DATASETS

    path.mkdir(parents=True)
    cfg = {"name": name, "model": "smallcnn", "seed": 0,
           "data": {"name": "digits", "root": str(path.parent / "data"), "download": False},
           "attack": {"norm": "linf", "eps": 0.1, "alpha": 0.025, "steps": 2},
           "eval": {"steps": 20}, "method": "at", "awp": {"gamma": 0.01 if "awp" in name else 0.0, "warmup": warmup}}
    (path / "config.yaml").write_text(yaml.safe_dump(cfg))
    scale = 100 if percent else 1
    with open(path / "metrics.jsonl", "w") as f:
        for epoch, (te, tr) in enumerate(zip(test_robust, train_robust), start=1):
            row = {"epoch": epoch, "lr": 0.1, "train_loss": 1.0, "train_clean_acc": 0.9 * scale,
                   "train_robust_acc": tr * scale, "test_clean_acc": 0.8 * scale, "test_robust_acc": te * scale,
                   "gap": (tr - te) * scale, "epoch_time_s": 1.0, "eval_time_s": 0.5,
                   "awp_active": "awp" in name and epoch > warmup}
            if eval_n is not None:
                row["eval_n"] = eval_n
            f.write(json.dumps(row) + "\n")
    (path / "env.json").write_text(json.dumps({"torch": torch.__version__}))
    info = DATASETS["digits"]
    torch.manual_seed(0)
    model = models.create("smallcnn", info.num_classes, info.in_channels, info.mean, info.std)
    save_checkpoint({"config": cfg, "model": model.state_dict()}, path / "best.pt")
    if with_eval:
        (path / "eval.json").write_text(json.dumps({
            "n": 100, "seconds": 12.5, "attacks": {"clean": {"accuracy": 0.81}, "pgd20": {"accuracy": 0.47}, "autoattack": {"accuracy": 0.44}},
            "checks": [{"name": "eps_monotone", "passed": True}, {"name": "huge_eps", "passed": False}]}))
    return path


def _referenced_images(md):
    return re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)


def test_report_compares_two_runs(tmp_path, capsys):
    at = _fake_run(tmp_path / "runs" / "at", "at", [0.30, 0.42, 0.38, 0.33], [0.35, 0.50, 0.60, 0.70])
    awp = _fake_run(tmp_path / "runs" / "at_awp", "at_awp", [0.31, 0.44, 0.45, 0.44], [0.33, 0.47, 0.50, 0.52],
                    percent=True, with_eval=True)
    # landscape and flatness written by their own commands, so the report reads the real formats
    for run in (at, awp):
        assert main(["landscape", str(run), "--n", "8", "--alphas=-1:1:3", "--directions", "2", "--steps", "1"]) == 0
    assert main(["flatness", str(awp), "--n", "8", "--draws", "2", "--worst-steps", "2", "--steps", "1"]) == 0
    out = tmp_path / "rep"
    assert main(["report", str(at), str(awp), "--out", str(out)]) == 0
    assert str(out / "report.md") in capsys.readouterr().out

    md = (out / "report.md").read_text()
    assert "at_awp" in md and re.search(r"\bat\b", md.replace("at_awp", ""))
    images = _referenced_images(md)
    assert {"fig_robust_accuracy.png", "fig_gap.png", "fig_landscape.png"} <= set(images)
    for image in images:
        assert (out / image).read_bytes()[:8] == PNG, image
    assert re.search(r"\| at_awp \| `[^`]+` \| smallcnn \| digits \| at \| gamma 0.01 \| PGD-2 linf eps=0.1 \| "
                     r"PGD-20 linf eps=0.1 \| 200 \| 4 \|", md)
    assert "| at | off |" in md.replace("smallcnn | digits | ", "")
    assert 'fixed subset of "monitoring n" test images' in md
    # best and last epochs, in percent whichever unit the run logged
    assert "| at | 2 | 42.00 | 4 | 33.00 | 9.00 | 70.00 | 37.00 | 80.00 |" in md
    assert "| at_awp | 3 | 45.00 | 4 | 44.00 | 1.00 | 52.00 | 8.00 | 80.00 |" in md
    # the final evaluation: eval.json where present (with its trust checks), metrics.jsonl otherwise
    # (an eval.json of a run evaluated before one file per checkpoint: still read, named by its file)
    assert "| at_awp | `eval.json` | 100 | 81.00 | 47.00 | 44.00 | 1/2 passed: failed huge_eps |" in md  # n: eval.json's
    assert "Runs without an evaluation file" in md and "## Flatness" in md and "## Weight loss landscape" in md


def test_report_names_the_checkpoint_of_every_evaluation(tmp_path):
    """One result file per checkpoint (issue 29, item 2): best.pt's and last.pt's numbers side by side, each
    row naming its checkpoint and epoch; AutoAttack's note on a reduced cascade is repeated."""
    run = _fake_run(tmp_path / "r", "r", [0.2, 0.3], [0.25, 0.4])
    for stem, epoch, acc, weights in (("best", 2, 0.3, "raw"), ("last", 2, 0.25, "raw"), ("best_ema", 2, 0.35, "ema")):
        (run / f"eval_{stem}.json").write_text(json.dumps({
            "checkpoint": str(run / f"{stem.split('_')[0]}.pt"), "epoch": epoch, "n": 50, "config": {"weights": weights},
            "attacks": {"clean": {"accuracy": 0.9}, "autoattack": {"accuracy": acc, "note": "with 3 classes this ran APGD-CE"}},
            "checks": []}))
    out = tmp_path / "rep"
    assert main(["report", str(run), "--out", str(out)]) == 0
    md = (out / "report.md").read_text()
    assert "| r | best.pt, epoch 2 | 50 | 90.00 | 30.00 | - |" in md
    assert "| r | best.pt, epoch 2, EMA weights | 50 | 90.00 | 35.00 | - |" in md
    assert "| r | last.pt, epoch 2 | 50 | 90.00 | 25.00 | - |" in md
    assert md.index("best.pt, epoch 2 |") < md.index("EMA weights |") < md.index("last.pt, epoch 2 |")
    assert "- r (last.pt, epoch 2), autoattack: with 3 classes this ran APGD-CE" in md
    summary = json.loads((out / "summary.json").read_text())
    assert summary["runs"][0]["final"]["checkpoint"] == "best.pt, epoch 2"
    assert summary["runs"][0]["final"]["attacks"]["autoattack"] == pytest.approx(30.0)


def _analysis(run, file, ckpt, epoch, loss, flat, weights="raw"):
    """A landscape_*.json or flatness_*.json (by `file`'s name) as `flatrobust landscape` / `flatness` write it, with
    rho(w) = `loss` and (average-case) flatness `flat`; `ckpt` is what it records as its checkpoint."""
    attack = {"norm": "linf", "eps": 0.1, "alpha": 0.025, "steps": 1}
    res = {"checkpoint": str(ckpt), "run": run.name, "model": "smallcnn", "weights": weights, "epoch": epoch,
           "data": {"name": "digits", "split": "test", "n": 8, "subset_seed": 0}, "seconds": 1.5}
    if file.startswith("landscape"):
        res["1d"] = {"alphas": [-1.0, 0.0, 1.0], "directions": 1, "n": 8, "attack": attack, "loss_at_w": loss,
                     "losses": [[loss + flat, loss, loss + 2 * flat]], "mean_loss": [loss + flat, loss, loss + 2 * flat],
                     "accuracies": [[0.1, 0.2, 0.1]], "mean_accuracy": [0.1, 0.2, 0.1]}
    else:
        res["average"] = {"n": 8, "attack": attack, "robust_loss": loss, "robust_accuracy": 0.25, "xi": 0.5, "draws": 2,
                          "average_flatness": flat, "standard_error": 0.01}
        res["worst"] = {"n": 8, "attack": attack, "robust_loss": loss, "worst_flatness": 2 * flat, "xi": 0.003, "steps": 1}
    (run / file).write_text(json.dumps(res))


def test_report_names_the_checkpoint_of_every_landscape_and_flatness(tmp_path):
    """landscape_best.json and landscape_last.json, flatness_best.json and flatness_last.json side by side (issue 29,
    item 2, as for eval): one row (and curve) each, naming its checkpoint and epoch, best.pt's first; a comparison
    names the checkpoints whose flatness it compares."""
    at = _fake_run(tmp_path / "at", "at", [0.30, 0.42, 0.38], [0.35, 0.50, 0.60])
    awp = _fake_run(tmp_path / "at_awp", "at_awp", [0.31, 0.44, 0.45], [0.33, 0.47, 0.50])
    for kind in ("landscape", "flatness"):  # written in the order eval would not sort them: last.pt's first
        _analysis(at, f"{kind}_last.json", at / "last.pt", 3, 1.5, 0.4)
        _analysis(at, f"{kind}_best.json", at / "best.pt", 2, 1.2, 0.1)
        _analysis(at, f"{kind}_best_ema.json", at / "best.pt", 2, 1.1, 0.05, weights="ema")
        _analysis(awp, f"{kind}_last.json", awp / "last.pt", 3, 1.3, 0.2)
    out = tmp_path / "rep"
    assert main(["report", str(at), str(awp), "--out", str(out)]) == 0
    md = (out / "report.md").read_text()
    land, flat = md.split("## Weight loss landscape")[1].split("## Flatness")
    assert "| at | best.pt, epoch 2 | test, n=8 | PGD-1 linf eps=0.1 | 1 | 1.2000 | 0.1000 (alpha=-1) | 0.2000 (alpha=1) |" in land
    assert "| at | best.pt, epoch 2, EMA weights | test, n=8 | PGD-1 linf eps=0.1 | 1 | 1.1000 |" in land
    assert "| at | last.pt, epoch 3 | test, n=8 | PGD-1 linf eps=0.1 | 1 | 1.5000 | 0.4000 (alpha=-1) |" in land
    assert "| at_awp | last.pt, epoch 3 | test, n=8 | PGD-1 linf eps=0.1 | 1 | 1.3000 |" in land
    assert land.index("best.pt, epoch 2 |") < land.index("EMA weights |") < land.index("| at | last.pt, epoch 3 |")
    assert "| at | best.pt, epoch 2 | test, n=8 | PGD-1 linf eps=0.1 | 1.2000 | 25.00 | 0.1000 ± 0.0100 (xi=0.5, 2 draws) | 0.2000 (xi=0.003, 1 steps) |" in flat
    assert "| at | last.pt, epoch 3 | test, n=8 | PGD-1 linf eps=0.1 | 1.5000 | 25.00 | 0.4000 ± 0.0100" in flat
    assert "| at_awp | last.pt, epoch 3 | test, n=8 | PGD-1 linf eps=0.1 | 1.3000 | 25.00 | 0.2000 ± 0.0100" in flat
    assert flat.index("| at | best.pt, epoch 2 |") < flat.index("| at | last.pt, epoch 3 |")
    # the comparison: each run's first file, named (at's best.pt against at_awp's only one, last.pt)
    assert "| average-case flatness (nats), best.pt / last.pt | lower | 0.1000 | 0.2000 |" in md
    assert (out / "fig_landscape.png").read_bytes()[:8] == PNG
    summary = json.loads((out / "summary.json").read_text())
    assert [r["flatness"]["checkpoint"] for r in summary["runs"]] == ["best.pt, epoch 2", "last.pt, epoch 3"]
    assert summary["runs"][0]["flatness"]["average"] == pytest.approx(0.1)


def test_report_reads_the_landscape_and_flatness_files_of_runs_analysed_before(tmp_path):
    """Runs analysed before one file per checkpoint have one landscape.json and flatness.json (landscape_ema.json
    for the EMA weights): still shown, each with its checkpoint when recorded, else the file's name (an old file
    given a run directory recorded the folder); beside a newer file, after it."""
    run = _fake_run(tmp_path / "r", "r", [0.2, 0.3], [0.25, 0.4])
    _analysis(run, "landscape.json", run, 2, 1.2, 0.1)  # `flatrobust landscape r`: the folder recorded
    _analysis(run, "landscape_ema.json", run / "best.pt", 2, 1.1, 0.05, weights="ema")
    _analysis(run, "flatness.json", run / "best.pt", 2, 1.2, 0.1)
    out = tmp_path / "rep"
    assert main(["report", str(run), "--out", str(out)]) == 0
    md = (out / "report.md").read_text()
    assert "| r | `landscape.json`, epoch 2 | test, n=8 | PGD-1 linf eps=0.1 | 1 | 1.2000 |" in md
    assert "| r | best.pt, epoch 2, EMA weights | test, n=8 | PGD-1 linf eps=0.1 | 1 | 1.1000 |" in md
    assert "| r | best.pt, epoch 2 | test, n=8 | PGD-1 linf eps=0.1 | 1.2000 | 25.00 | 0.1000 ± 0.0100" in md
    assert json.loads((out / "summary.json").read_text())["runs"][0]["seconds"]["landscape"] == 1.5

    _analysis(run, "flatness_last.json", run / "last.pt", 4, 1.6, 0.3)  # analysed again since: both kept, the new first
    assert main(["report", str(run), "--out", str(out)]) == 0
    md = (out / "report.md").read_text()
    assert md.index("| r | last.pt, epoch 4 | test, n=8 | PGD-1 linf eps=0.1 | 1.6000 |") < md.index("| r | best.pt, epoch 2 | test, n=8 | PGD-1 linf eps=0.1 | 1.2000 |")


def test_report_without_optional_files(tmp_path):
    run = _fake_run(tmp_path / "only", "only", [0.2, 0.3], [0.25, 0.4])
    out = tmp_path / "rep"
    assert main(["report", str(run), "--out", str(out)]) == 0
    md = (out / "report.md").read_text()
    assert "## Weight loss landscape" not in md and "## Flatness" not in md
    for image in _referenced_images(md):
        assert (out / image).is_file()


def test_run_name_falls_back_to_folder_and_duplicates_are_told_apart(tmp_path):
    a = _fake_run(tmp_path / "a", "same", [0.2], [0.3])
    b = _fake_run(tmp_path / "b", "same", [0.2], [0.3])
    (b / "config.yaml").write_text(yaml.safe_dump({"model": "smallcnn"}))
    assert load_run(b).name == "b"
    c = _fake_run(tmp_path / "c", "same", [0.2], [0.3])
    out = tmp_path / "rep"
    assert main(["report", str(a), str(c), "--out", str(out)]) == 0
    md = (out / "report.md").read_text()
    assert f"same ({a})" in md and f"same ({c})" in md


def test_half_written_last_line_is_ignored(tmp_path):
    run = _fake_run(tmp_path / "r", "r", [0.2, 0.3], [0.25, 0.4])
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"epoch": 3, "test_rob')
    assert [m["epoch"] for m in load_run(run).metrics] == [1, 2]


@pytest.mark.parametrize("breakage, message", [
    ("missing", "does not exist"),
    ("no_metrics", "no metrics.jsonl"),
    ("empty_metrics", "no epoch"),
    ("bad_metrics", "not valid JSON"),
    ("bad_config", "not valid YAML"),
])
def test_bad_run_dir_exits_2_with_one_line(tmp_path, capsys, breakage, message):
    good = _fake_run(tmp_path / "good", "good", [0.2], [0.3])
    bad = tmp_path / "bad"
    if breakage != "missing":
        bad.mkdir()
        (bad / "config.yaml").write_text("name: bad\n")
    if breakage == "empty_metrics":
        (bad / "metrics.jsonl").write_text("\n")
    if breakage == "bad_metrics":
        (bad / "metrics.jsonl").write_text('{"epoch": 1\n{"epoch": 2}\n')
    if breakage == "bad_config":
        (bad / "metrics.jsonl").write_text('{"epoch": 1}\n')
        (bad / "config.yaml").write_text("name: [unclosed\n")
    assert main(["report", str(good), str(bad), "--out", str(tmp_path / "rep")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("flatrobust: error:") and message in err and err.count("\n") == 1


def test_report_checks_awp_against_its_baseline(tmp_path):
    """The AWP-vs-baseline table states, from the runs' own figures, which of the paper's expectations held
    beyond noise: 2 binomial standard errors on the monitoring subsets' n (here 1000 images)."""
    at = _fake_run(tmp_path / "at", "at", [0.30, 0.42, 0.38, 0.33], [0.35, 0.50, 0.60, 0.70], eval_n=1000)
    awp = _fake_run(tmp_path / "at_awp", "at_awp", [0.31, 0.44, 0.45, 0.44], [0.33, 0.47, 0.50, 0.52], eval_n=1000)
    other = _fake_run(tmp_path / "other_awp", "other_awp", [0.2, 0.1], [0.3, 0.4])
    cfg = yaml.safe_load((other / "config.yaml").read_text())
    cfg["attack"]["eps"] = 0.3  # another setting: no baseline to compare with
    (other / "config.yaml").write_text(yaml.safe_dump(cfg))
    out = tmp_path / "rep"
    assert main(["report", str(at), str(awp), str(other), "--out", str(out)]) == 0
    md = (out / "report.md").read_text()
    section = md.split("## AWP against its baseline")[1].split("\n## ")[0]
    assert "**at_awp** (AWP gamma 0.01) against **at**" in section and "other_awp" not in section
    # last: 44 vs 33 on 1000 images each, SE = sqrt(.33 * .67 / 1000 + .44 * .56 / 1000) = 2.16 points
    assert "| test robust accuracy @last (%) | higher | 33.00 | 44.00 | 11.00 | 2 SE = 4.32 | yes |" in section
    assert "| robust generalization gap @last (pts) | lower | 37.00 | 8.00 | -29.00 | 2 SE = 6.09 | yes |" in section
    assert "| test robust accuracy @best (%) | higher | 42.00 | 45.00 | 3.00 | 2 SE = 4.43 | within noise |" in section
    assert "Of 4: 3 held, 0 went the other way, 1 within noise, 0 not judged." in section

    # the other way round: the same figures with the roles swapped go the other way, beyond noise
    for run, g in ((at, 0.01), (awp, 0.0)):
        cfg = yaml.safe_load((run / "config.yaml").read_text())
        cfg["awp"]["gamma"] = g
        (run / "config.yaml").write_text(yaml.safe_dump(cfg))
        (run / "metrics.jsonl").write_text((run / "metrics.jsonl").read_text().replace('"awp_active": false', '"awp_active": true')
                                           if g else (run / "metrics.jsonl").read_text())
    assert main(["report", str(at), str(awp), "--out", str(out)]) == 0
    section = (out / "report.md").read_text().split("## AWP against its baseline")[1]
    assert "Of 4: 0 held, 3 went the other way, 1 within noise, 0 not judged." in section
    summary = json.loads((out / "summary.json").read_text())
    assert summary["comparisons"][0]["counts"] == {"held": 0, "opposite": 3, "within_noise": 1, "not_judged": 0, "total": 4}


def test_a_tiny_difference_is_within_noise_and_unknown_n_is_not_judged(tmp_path):
    """Half a point on 359 images is no evidence either way (the issue's "-0.5 points counted as held")."""
    at = _fake_run(tmp_path / "at", "at", [0.700, 0.710], [0.700, 0.705], eval_n=359)
    awp = _fake_run(tmp_path / "at_awp", "at_awp", [0.700, 0.705], [0.700, 0.695], eval_n=359)
    out = tmp_path / "rep"
    assert main(["report", str(at), str(awp), "--out", str(out)]) == 0
    section = (out / "report.md").read_text().split("## AWP against its baseline")[1]
    assert "| robust generalization gap @last (pts) | lower | -0.50 | -1.00 | -0.50 |" in section
    assert "Of 4: 0 held, 0 went the other way, 4 within noise, 0 not judged." in section
    for run in (at, awp):  # runs that record no sample size: nothing can be judged
        rows = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
        (run / "metrics.jsonl").write_text("".join(json.dumps({k: v for k, v in r.items() if k != "eval_n"}) + "\n" for r in rows))
    assert main(["report", str(at), str(awp), "--out", str(out)]) == 0
    assert "Of 4: 0 held, 0 went the other way, 0 within noise, 4 not judged." in (out / "report.md").read_text()


def test_report_says_when_awp_was_never_or_partly_active(tmp_path):
    at = _fake_run(tmp_path / "at", "at", [0.3, 0.4, 0.4], [0.3, 0.5, 0.6])
    never = _fake_run(tmp_path / "never_awp", "never_awp", [0.3, 0.4, 0.4], [0.3, 0.5, 0.6], warmup=5)
    partly = _fake_run(tmp_path / "partly_awp", "partly_awp", [0.3, 0.4, 0.4], [0.3, 0.5, 0.6], warmup=1)
    out = tmp_path / "rep"
    assert main(["report", str(at), str(never), str(partly), "--out", str(out)]) == 0
    md = (out / "report.md").read_text()
    assert "| gamma 0.01, warm-up 5 epochs: never active |" in md
    assert "| gamma 0.01, warm-up 1 epoch: active 2 of 3 epochs |" in md
    assert "**AWP was never active in never_awp**" in md
    section = md.split("## AWP against its baseline")[1]
    assert "**never_awp** (AWP gamma 0.01, warm-up 5 epochs: never active) against **at**" in section
    assert "both runs trained the plain method, so this table says nothing about AWP" in section
    summary = json.loads((out / "summary.json").read_text())
    assert [r["awp"]["active_epochs"] for r in summary["runs"]] == [0, 0, 2]


def test_report_shows_eps_as_the_recipe_writes_it_and_sample_sizes(tmp_path):
    from flatrobust.attacks import format_eps

    assert [format_eps(e) for e in (0.2, 51 / 255, 8 / 255, 128 / 255, 0.0314, 0.5, 0.0, 0.123456, float("nan"))] == \
        ["0.2", "0.2", "8/255", "128/255", "0.0314", "0.5", "0", "0.1235", "?"]
    run = _fake_run(tmp_path / "r", "r", [0.3, 0.4], [0.3, 0.5], eval_n=None)  # written before eval_n was logged
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    cfg["attack"]["eps"], cfg["data"]["eval_subset"] = 0.2, 359
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    c10 = _fake_run(tmp_path / "c10", "c10", [0.3, 0.4], [0.3, 0.5], eval_n=1000)
    cfg = yaml.safe_load((c10 / "config.yaml").read_text())
    cfg["attack"]["eps"] = 8 / 255
    (c10 / "config.yaml").write_text(yaml.safe_dump(cfg))
    out = tmp_path / "rep"
    assert main(["report", str(run), str(c10), "--out", str(out)]) == 0
    md = (out / "report.md").read_text()
    assert "| PGD-2 linf eps=0.2 | PGD-20 linf eps=0.2 | <= 359 | 2 |" in md and "51/255" not in md
    assert "| PGD-2 linf eps=8/255 | PGD-20 linf eps=8/255 | 1000 | 2 |" in md
    summary = json.loads((out / "summary.json").read_text())
    assert [(r["monitor_n"], r["monitor_n_exact"]) for r in summary["runs"]] == [(359, False), (1000, True)]
    assert summary["runs"][1]["best"] == pytest.approx(40.0) and summary["runs"][1]["seconds"]["train"] == 3.0


def test_a_training_warning_in_metrics_is_shown(tmp_path):
    run = tmp_path / "digits_at_awp"
    _fake_run(run, "digits_at_awp", [0.1, 0.1, 0.1], [0.1, 0.1, 0.1])
    rows = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    rows[-1]["warning"] = "epochs 1-3 with AWP active: the model gives one class to 100.0% of the test images"
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    md = (tmp_path / "out" / "report.md")
    assert main(["report", str(run), "--out", str(tmp_path / "out")]) == 0
    assert "**Warning, digits_at_awp** (epoch 3): epochs 1-3 with AWP active" in md.read_text()
    _fake_run(tmp_path / "plain", "plain", [0.1, 0.2], [0.1, 0.2])
    assert main(["report", str(tmp_path / "plain"), "--out", str(tmp_path / "out2")]) == 0
    assert "**Warning," not in (tmp_path / "out2" / "report.md").read_text()


def test_catastrophic_overfitting_and_the_validation_choice_are_shown(tmp_path):
    run = tmp_path / "fgsm"
    _fake_run(run, "fgsm", [0.3, 0.35, 0.01], [0.3, 0.4, 0.8])
    rows = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    for r, val in zip(rows, [0.4, 0.3, 0.02]):
        r.update(val_robust_acc=val, best_on="val")
    rows[-1]["catastrophic"] = "catastrophic overfitting at epoch 3: test PGD accuracy fell; guard.catastrophic=warn: training goes on"
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(["report", str(run), "--out", str(tmp_path / "out")]) == 0
    md = (tmp_path / "out" / "report.md").read_text()
    assert "**Catastrophic overfitting, fgsm** (epoch 3): catastrophic overfitting at epoch 3" in md
    assert "**fgsm**: best.pt was chosen on the validation split (data.val_subset), not on the test images: epoch 1" in md
