"""study/study_report.py (docs/RESULTS.md) reads run directories and judges the paper's claims from them alone."""
import json
from pathlib import Path

import pytest
import yaml
from bench_scripts import load

REPO = Path(__file__).resolve().parents[1]


study = load("study")
report = load("study_report")

CFG = {"model": "smallcnn", "model_args": {}, "epochs": 4, "batch_size": 32, "attack": {"eps": "8/255"},
       "data": {"train_subset": 100, "eval_subset": 50, "augment": "none"}}


def _run(out: Path, name: str, test: list[float], train: list[float], evals: dict | None = None, aa: dict | None = None) -> None:
    d = out / name
    d.mkdir(parents=True)
    (d / "config.yaml").write_text(yaml.safe_dump(CFG))
    rows = [{"epoch": i + 1, "train_robust_acc": tr, "test_robust_acc": te, "train_clean_acc": tr + 0.1,
             "gap": tr - te, "epoch_time_s": 60.0, "eval_time_s": 30.0} for i, (te, tr) in enumerate(zip(test, train))]
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    for ck, acc in (evals or {}).items():
        (d / f"eval_{ck}.json").write_text(json.dumps({"attacks": {"pgd20": {"accuracy": acc}, "clean": {"accuracy": acc + 0.1}}}))
    for ck, (pgd, auto) in (aa or {}).items():  # PGD-20 and AutoAttack on the same images
        (d / f"aa_{ck}.json").write_text(json.dumps({"n": 1000, "attacks": {"pgd20": {"accuracy": pgd}, "autoattack": {"accuracy": auto}},
                                                           "seconds": 600.0}))


def _rows(autoattack: bool = True, trades: bool = False) -> list:
    methods = [("at", "AT"), ("at_awp", "AT-AWP")] + ([("trades", "TRADES"), ("trades_awp", "TRADES-AWP")] if trades else [])
    return [study.Row(m, label, f"toy_{m}", (0, 1), setting="vt", method=m, autoattack=autoattack) for m, label in methods]


def _write(tmp_path, runs: dict, autoattack: bool = True, trades: bool = False) -> str:
    recipes, results, docs = tmp_path / "recipes", tmp_path / "results", tmp_path / "docs"
    recipes.mkdir(parents=True)
    (recipes / "toy_at.yaml").write_text(yaml.safe_dump(CFG))
    settings = [study.Setting("vt", "toy", "a test")]
    for name, args in runs.items():
        _run(results / "c10jpeg", name, *args)
    report.write(results, docs, _rows(autoattack, trades), [("0", "at"), ("0.01", "at_awp")], settings, "vt", recipes)
    return (docs / "RESULTS.md").read_text()


def test_overfitting_and_awp_claims_follow_the_runs(tmp_path):
    # AT: test falls 10 points from its best (epoch 2) while train keeps rising; AT-AWP keeps its best to the end.
    at = ([0.20, 0.40, 0.35, 0.30], [0.3, 0.5, 0.7, 0.9])
    awp = ([0.20, 0.38, 0.38, 0.39], [0.3, 0.45, 0.5, 0.55])
    text = _write(tmp_path, {"toy_at_s0": (*at, {"best": 0.40, "last": 0.30}), "toy_at_s1": (*at, {"best": 0.41, "last": 0.31}),
                             "toy_at_awp_s0": (*awp, {"best": 0.38, "last": 0.38}), "toy_at_awp_s1": (*awp, {"best": 0.39, "last": 0.39})})
    assert "- **Robust overfitting exists here" in text
    line = next(ln for ln in text.splitlines() if ln.startswith("- **Robust overfitting"))
    assert ": held." in line and "full-test PGD-20 of best.pt minus last.pt: 10.0, 10.0 points" in line and "+40.0, +40.0" in line
    gap = next(ln for ln in text.splitlines() if "AWP narrows the robust generalization gap" in ln)
    assert ": held" in gap and "AT 60, AT-AWP 16" in gap  # last-epoch gaps: 90-30 and 55-39 points
    last = next(ln for ln in text.splitlines() if "AWP raises last-epoch robustness" in ln)
    assert ": held" in last and "within seed noise" not in last  # 30.5 vs 38.5, SE 0.7
    best = next(ln for ln in text.splitlines() if "AWP raises best-epoch robustness" in ln)
    assert "did not hold (the difference, against AWP, is within seed noise)" in best  # 40.5 vs 38.5, Welch p = 0.1
    assert "Welch t-test p = 0.0077" in last and "Welch t-test p = 0.11" in best  # t = 11.3 and 2.8, 2 df
    aa = next(ln for ln in text.splitlines() if "AutoAttack agrees with PGD-20" in ln)
    assert "**: not measured yet." in aa
    assert "100 training images seen 4 times in batches of 32 (16 SGD steps, 8 after the first decay), no augmentation" in text
    assert (tmp_path / "docs" / "results" / "curves_vt_at.png").is_file()
    # the gamma curve (seed 0 of each gamma) reads the full-test PGD-20 of both checkpoints, then the monitored values
    assert "| 0 | toy_at_s0 | 40.0 | 30.0 | 40.0 | 30.0 | 60.0 | — | — |  |" in text
    assert "| 0.01 | toy_at_awp_s0 | 38.0 | 38.0 | 39.0 | 39.0 | 16.0 | — | — |  |" in text
    assert "Collapsed" not in text and "collapsed checkpoint" not in text
    assert (tmp_path / "docs" / "results" / "gamma.png").is_file()


def _flatness(results: Path, name: str, values: dict) -> None:
    for ck, (avg, worst) in values.items():
        d = results / "c10jpeg" / name / f"flatness_{ck}"
        d.mkdir(parents=True)
        (d / "flatness.json").write_text(json.dumps({"average": {"average_flatness": avg}, "worst": {"worst_flatness": worst}}))


def test_trades_vs_trades_awp_is_judged_like_at_and_reaches_the_readme_block(tmp_path):
    at = ([0.20, 0.40, 0.35, 0.30], [0.3, 0.5, 0.7, 0.9])
    awp = ([0.20, 0.38, 0.38, 0.39], [0.3, 0.45, 0.5, 0.55])
    runs = {}
    for m, curve, best, last in (("at", at, 0.40, 0.30), ("at_awp", awp, 0.38, 0.38),
                                 ("trades", at, 0.42, 0.33), ("trades_awp", awp, 0.41, 0.40)):
        for seed in (0, 1):
            runs[f"toy_{m}_s{seed}"] = (*curve, {"best": best + seed / 100, "last": last + seed / 100})
    text = _write(tmp_path, runs, trades=True)
    assert "### Setting vt, the main one: TRADES vs TRADES-AWP" in text
    section = text.split("TRADES vs TRADES-AWP\n", 1)[1].split("\n#", 1)[0]
    assert "Robust overfitting" not in section  # a claim about plain AT
    last = next(ln for ln in section.splitlines() if "AWP raises last-epoch robustness" in ln)
    assert ": held" in last and "TRADES 33.5, TRADES-AWP 40.5 points" in last
    gap = next(ln for ln in section.splitlines() if "AWP narrows the robust generalization gap" in ln)
    assert "TRADES 60, TRADES-AWP 16 points" in gap
    aa = next(ln for ln in section.splitlines() if "AutoAttack agrees" in ln)
    assert "ranks TRADES and TRADES-AWP as PGD-20 does" in aa and "not measured yet" in aa
    keys = report.row_keys(_rows(trades=True))
    block = report.readme_block(report.load(tmp_path / "results", _rows(trades=True)), keys, [study.Setting("vt", "toy", "")], "vt", {"vt": CFG})
    rows = [ln for ln in block if ln.startswith("| vt")]
    assert [r.split(" | ")[2] for r in rows] == ["AT → AT-AWP", "TRADES → TRADES-AWP"]
    # robustness needs AutoAttack too in the main setting: PGD-20 alone does not make it held
    assert "| 33.5 → 40.5: not held |" in rows[1] and "| 60.0 → 16.0: **held** |" in rows[1]


def test_readme_block_adds_a_settings_row_once_both_sides_have_finished_there(tmp_path):
    at = ([0.20, 0.40, 0.35, 0.30], [0.3, 0.5, 0.7, 0.9])
    flat = ([0.60, 0.65, 0.66, 0.66], [0.6, 0.66, 0.68, 0.70])
    settings = [study.Setting("vt", "toy", ""), study.Setting("ft", "ftoy", "", dataset="fmnist", autoattack=True)]
    rows = _rows() + [study.Row(f"{m}_ft", m, f"ftoy_{m}", (0, 1), setting="ft", method=m, dataset="fmnist") for m in ("at", "at_awp")]
    results = tmp_path / "results"
    for name, curve in (("toy_at_s0", at), ("toy_at_awp_s0", at), ("ftoy_at_s0", flat)):
        _run(results / ("c10jpeg" if name.startswith("toy") else "fmnist"), name, *curve, {"best": curve[0][2], "last": curve[0][-1]})
    keys, cfgs = report.row_keys(rows), {s.key: CFG for s in settings}

    def table() -> list[str]:
        return [ln for ln in report.readme_block(report.load(results, rows), keys, settings, "vt", cfgs) if ln.startswith("| ")][1:]

    assert [r.split(" | ")[0] for r in table()] == ["| vt (main)"]  # ft's AT-AWP has not finished
    _run(results / "fmnist", "ftoy_at_awp_s0", *flat, {"best": 0.66, "last": 0.66})
    ft = table()[1]
    assert ft.startswith("| ft | Fashion-MNIST, 100 images x 4 epochs, no augmentation | AT → AT-AWP | 1 + 1 |")
    assert "66.0 → 66.0: one seed, not judged" in ft


def test_the_scatter_table_places_each_row_and_checkpoint(tmp_path):
    at = ([0.20, 0.40, 0.35, 0.30], [0.3, 0.5, 0.7, 0.9])
    awp = ([0.20, 0.38, 0.38, 0.39], [0.3, 0.45, 0.5, 0.55])
    for seed, (name, curve) in enumerate((("toy_at_s0", at), ("toy_at_s1", at), ("toy_at_awp_s0", awp))):
        _run(tmp_path / "results" / "c10jpeg", name, *curve)
    _flatness(tmp_path / "results", "toy_at_s0", {"best": (0.05, 0.04), "last": (0.40, 0.30)})
    _flatness(tmp_path / "results", "toy_at_s1", {"best": (0.07, 0.06), "last": (0.50, 0.50)})
    _flatness(tmp_path / "results", "toy_at_awp_s0", {"best": (0.08, 0.03), "last": (0.09, 0.05)})
    text = _write(tmp_path, {})
    assert "| AT | best.pt | 2 | 10.0 ± 0.0 | 0.060 ± 0.014 | 0.050 ± 0.014 |" in text  # gap at epoch 2: 50-40
    assert "| AT | last.pt | 2 | 60.0 ± 0.0 | 0.450 ± 0.071 | 0.400 ± 0.141 |" in text
    assert "| AT-AWP | last.pt | 1 | 16.0 (n=1) | 0.090 (n=1) | 0.050 (n=1) |" in text
    assert ("average-case flatness vs gap, one point per run and checkpoint (two checkpoints of one run are not independent, "
            "so each checkpoint is correlated on its own): best.pt, 3 runs: too few runs; last.pt, 3 runs: too few runs.") in text


def test_flatness_and_gap_are_correlated_per_checkpoint_one_point_per_run(tmp_path):
    """Two checkpoints of a run are not independent: each checkpoint gets its own rank correlation over the runs."""
    results = tmp_path / "results"
    curves = {"toy_at_s0": ([0.20, 0.40, 0.35, 0.30], [0.3, 0.5, 0.7, 0.9]), "toy_at_s1": ([0.20, 0.40, 0.35, 0.32], [0.3, 0.5, 0.7, 0.8]),
              "toy_at_awp_s0": ([0.20, 0.38, 0.38, 0.39], [0.3, 0.45, 0.5, 0.55]), "toy_at_awp_s1": ([0.2, 0.38, 0.38, 0.37], [0.3, 0.45, 0.5, 0.6])}
    flat = {"toy_at_s0": (0.05, 0.60), "toy_at_s1": (0.06, 0.50), "toy_at_awp_s0": (0.07, 0.10), "toy_at_awp_s1": (0.08, 0.20)}
    for name, curve in curves.items():
        _run(results / "c10jpeg", name, *curve)
        _flatness(results, name, {"best": (flat[name][0], 0.1), "last": (flat[name][1], 0.1)})
    text = _write(tmp_path, {})
    # last: gaps 60, 48, 16, 23 against flatness 0.6, 0.5, 0.1, 0.2: the same order, rho = +1
    line = next(ln for ln in text.splitlines() if ln.startswith("average-case flatness vs gap"))
    assert "best.pt, 4 runs: Spearman" in line and "last.pt, 4 runs: Spearman +1.00" in line


def _aa_line(tmp_path, at_aa: dict, awp_aa: dict) -> str:
    at = ([0.20, 0.40, 0.35, 0.30], [0.3, 0.5, 0.7, 0.9])
    awp = ([0.20, 0.38, 0.38, 0.39], [0.3, 0.45, 0.5, 0.55])
    text = _write(tmp_path, {"toy_at_s0": (*at, None, at_aa), "toy_at_awp_s0": (*awp, None, awp_aa)})
    return next(ln for ln in text.splitlines() if "AutoAttack agrees with PGD-20" in ln)


def test_autoattack_claim_holds_when_it_is_stronger_and_ranks_alike(tmp_path):
    line = _aa_line(tmp_path, {"best": (0.40, 0.38), "last": (0.30, 0.27)}, {"best": (0.38, 0.37), "last": (0.38, 0.36)})
    assert "**: held." in line and "over 4 checkpoints: 1.0 to 3.0 points" in line
    assert "last.pt: AT-AWP minus AT +8.0 points under PGD-20, +9.0 under AutoAttack (1 and 1 seed; AutoAttack takes 3.0 points "
    "from AT, 2.0 from AT-AWP)" in line


def test_autoattack_claim_fails_on_a_flipped_ranking_or_a_weaker_autoattack(tmp_path):
    flipped = _aa_line(tmp_path / "a", {"best": (0.40, 0.30), "last": (0.30, 0.27)}, {"best": (0.38, 0.37), "last": (0.38, 0.36)})
    assert "**: did not hold." in flipped and "best.pt: AT-AWP minus AT -2.0 points under PGD-20, +7.0 under AutoAttack" in flipped
    weaker = _aa_line(tmp_path / "b", {"best": (0.40, 0.41), "last": (0.30, 0.27)}, {"best": (0.38, 0.37), "last": (0.38, 0.36)})
    assert "**: did not hold." in weaker and "AutoAttack found more robustness than PGD-20" in weaker
    partial = _aa_line(tmp_path / "c", {"best": (0.40, 0.38)}, {"best": (0.38, 0.37)})
    assert "**: not measured yet." in partial and "best.pt: AT-AWP minus AT -2.0" in partial
    tied = _aa_line(tmp_path / "e", {"best": (0.660, 0.650), "last": (0.30, 0.27)}, {"best": (0.652, 0.651), "last": (0.38, 0.36)})
    assert "**: held." in tied and "best.pt: AT-AWP minus AT -0.8 points under PGD-20, +0.1 under AutoAttack (1 and 1 seed; " \
        "both within 2 standard errors of the evaluation: a tie under both;" in tied
    single = _aa_line(tmp_path / "d", {"best": (0.40, 0.38)}, {})
    assert "over 1 checkpoint: 2.0 points." in single and "**: not measured yet." in single


def test_no_overfitting_and_unfinished_runs(tmp_path):
    flat = ([0.20, 0.30, 0.31, 0.30], [0.3, 0.35, 0.36, 0.36])
    text = _write(tmp_path, {"toy_at_s0": flat, "toy_at_awp_s0": ([0.2, 0.3], [0.3, 0.4])})  # AT-AWP stopped at epoch 2
    line = next(ln for ln in text.splitlines() if ln.startswith("- **Robust overfitting"))
    assert ": did not hold." in line and "(full-test evaluation pending; biased upwards): 1.0 points" in line
    assert "| AT-AWP | vt | 0, 1 | 0 (+1 in progress)" in text
    assert "| 0.10 / 0.00 |" in text  # 4 epochs of 60 s training + 30 s monitoring; no evaluation yet
    assert text.count("Needs finished AT and AT-AWP runs.") == len(report.AWP_CLAIMS) + 1
    for claim in [c for c, *_ in report.AWP_CLAIMS] + [report.AA_CLAIM]:  # the same names as when judged
        assert f"- **{claim}**: not measured yet. Needs finished AT and AT-AWP runs." in text


def test_readme_results_block_is_generated_from_the_committed_runs():
    """README's results block is what `python study/study.py report` writes from results/ (so its
    numbers cannot be typed by hand), and every claim line in it is also in docs/RESULTS.md."""
    runs = report.load(study.RESULTS, study.ROWS)
    cfgs = report.setting_cfgs(study.SETTINGS, study.RECIPES)
    block = report.readme_block(runs, report.row_keys(study.ROWS), study.SETTINGS, study.MAIN, cfgs,
                                {(p.setting, p.base, p.other): p for p in study.PLANS})
    readme = (REPO / "README.md").read_text()
    assert report.replace_block(readme, block) == readme, "run `python study/study.py report`"


def test_study_run_refuses_an_unknown_row_or_stage(capsys):
    for argv in (["run", "--rows", "at,nope", "--dry-run"], ["run", "--stages", "train,eval", "--dry-run"], ["run", "--jobs", "0"]):
        with pytest.raises(SystemExit) as e:
            study.main(argv)
        assert e.value.code == 2
    err = capsys.readouterr().err
    assert "unknown row 'nope'" in err and "unknown stage 'eval': choose from aa,flatness,landscape,pgd,pseudo,train" in err
    assert "--jobs 0: give the number of tasks to run at a time, 1 or more" in err


def test_study_trains_the_main_setting_seed_by_seed_and_evaluates_each_run_after_it():
    order = study.tasks(study.ROWS)
    trains = [t.run for t in order if t.stage == "train"]
    assert trains[:4] == ["c10jpeg3_at_s0", "c10jpeg3_at_awp_s0", "c10jpeg3_trades_s0", "c10jpeg3_trades_awp_s0"]
    i = trains.index
    assert i("c10jpeg3_trades_awp_s1") < i("c10jpeg3_at_s2") < i("c10jpeg3_at_awp_g0.0025_s0") < i("fmnist3_at_awp_s0") < i("c10jpeg3_at_s3")
    assert i("c10jpeg3_at_awp_s3") < i("fmnist3_at_s1") < i("c10jpeg3_at_s4") < i("c10jpeg3_at_awp_s4") < i("c10jpeg3_trades_s2")
    assert "fmnist3_at_s2" not in trains  # the second dataset is a 2-seed study (study/study.py says why)
    assert trains[-2:] == ["c10jpeg3_trades_s2", "c10jpeg3_trades_awp_s2"]  # the third TRADES seed: where the budget allows
    late = [study.Row("x", "X", "c10jpeg3_at", (0, 1), late_seeds=(0,)), study.Row("y", "Y", "fmnist3_at", (5,), setting="f3")]
    assert [t.run for t in study.tasks(late) if t.stage == "train"] == ["c10jpeg3_at_s1", "fmnist3_at_s5", "c10jpeg3_at_s0"]
    for i, t in enumerate(order):  # a stage follows what it needs: its run's training, or (RST) the labeler's pseudo-labels
        assert (t.stage == "train" and not t.run.startswith("c10jpeg3_rst")) == (t.needs is None)
        if t.needs:
            assert any((u.run, u.stage) == t.needs for u in order[:i])
            assert t.needs[0] == t.run or (t.stage, t.needs[1]) == ("train", "pseudo")


def test_rst_trains_on_the_labelers_pseudo_labels_of_the_images_its_seed_leaves_out():
    import torch
    from flatrobust.data import TensorData

    rst = [t for t in study.tasks(study.ROWS) if t.run == "c10jpeg3_rst_s1" and t.stage == "train"][0]
    assert rst.needs == ("c10jpeg3_std_s1", "pseudo") and "data.extra=data/c10jpeg3_extra_s1.npz" in rst.argv
    pseudo = [t for t in study.tasks(study.ROWS) if t.needs == ("c10jpeg3_std_s1", "train") and t.stage == "pseudo"][0]
    assert pseudo.output == study.extra_npz(1) and [t.stage for t in study.tasks(study.ROWS) if t.run == "c10jpeg3_std_s1"] == ["train", "pseudo"]
    # the unlabeled images are exactly those the seed's subset leaves out (TensorData.subset draws the subset)
    x = torch.arange(50).float().view(50, 1, 1, 1)
    data = TensorData(x, torch.zeros(50, dtype=torch.long), None)
    for seed in (0, 1, 2):
        labeled = data.subset(10, seed=seed).x.flatten().long().tolist()
        rest = study.unlabeled_indices(50, 10, seed).tolist()
        assert sorted(labeled + rest) == list(range(50)) and len(rest) == 40


def test_study_dry_run_prints_whole_lines_from_parallel_workers(capsys, tmp_path, monkeypatch):
    monkeypatch.setattr(study, "RESULTS", tmp_path)  # no run done: every task is printed
    assert study.main(["run", "--rows", "trades,trades_awp", "--stages", "train,pgd", "--jobs", "2", "--dry-run"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 * len(study.TRADES_SEEDS) * 3  # 2 rows x their seeds x (train, pgd best, pgd last)
    assert all(ln.startswith("[") and (" train: " in ln or " pgd_" in ln) for ln in lines)
    assert sum(" train: flatrobust train " in ln for ln in lines) == 2 * len(study.TRADES_SEEDS)


def test_a_setting_without_autoattack_says_so_instead_of_waiting_for_it(tmp_path):
    at = ([0.20, 0.40, 0.35, 0.30], [0.3, 0.5, 0.7, 0.9])
    text = _write(tmp_path, {"toy_at_s0": (*at, {"best": 0.40, "last": 0.30}), "toy_at_awp_s0": (*at, {"best": 0.41, "last": 0.31}),
                             "toy_at_s1": (*at, None, {"best": (0.40, 0.38), "last": (0.30, 0.28)})},
                  autoattack=False)  # AutoAttack from before it was left out
    aa = next(ln for ln in text.splitlines() if "AutoAttack agrees with PGD-20" in ln)
    assert "**: not planned in this setting. AutoAttack (10 minutes a checkpoint here, the `seconds`" in aa
    assert "| AT | vt | 0, 1 | 2 | 1 | 1 |" in text and "| AT-AWP | vt | 0, 1 | 1 | 1 | not planned |" in text
    planned = study.tasks([study.Row("x", "X", "c10jpeg3_at", (0,))])
    unplanned = study.tasks([study.Row("x", "X", "c10jpeg3_at", (0,), autoattack=False)])
    assert [t.stage for t in planned if t.stage not in [u.stage for u in unplanned]] == ["aa_best", "aa_last"]


def test_an_evaluation_runner_takes_runs_another_runner_trained_after_it_started(tmp_path, monkeypatch, capsys):
    """`study.py run --stages aa` beside a training runner: a run whose training ends after this runner started is
    evaluated (it was skipped for good before: its training's state was read once, at the start)."""
    monkeypatch.setattr(study, "RESULTS", tmp_path)
    trained = set()
    monkeypatch.setattr(study, "_train_done", lambda d: d.name in trained)
    row = study.Row("x", "X", "c10jpeg3_at", (0,))
    every = study.tasks([row])  # what the runner sees at its start: nothing trained
    assert not any(t.done for t in every)
    trained.add(row.run_name(0))  # the other runner finishes the training
    monkeypatch.setattr(study, "tasks", lambda rows: every)
    assert study.run([row], {"aa"}, 1, dry=True) == 0
    out = capsys.readouterr().out
    assert " aa_best: flatrobust eval " in out and " aa_last: flatrobust eval " in out


def test_a_dry_run_names_runs_another_process_holds_instead_of_waiting_for_them(tmp_path, monkeypatch, capsys):
    """A dry run beside a real runner returned only when that runner let go of its runs (it waited on them)."""
    import subprocess
    import sys
    import threading

    monkeypatch.setattr(study, "RESULTS", tmp_path)
    row = study.Row("x", "X", "c10jpeg3_at", (0,))
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])  # the other runner
    try:
        logs = study._logs(row.run_dir(0))
        logs.mkdir(parents=True)
        (logs / "lock.train").write_text(f"{holder.pid} train\n")
        assert study._busy(row.run_dir(0))
        result = []
        th = threading.Thread(target=lambda: result.append(study.run([row], {"train", "pgd"}, 2, dry=True)), daemon=True)
        th.start()
        th.join(30)
        assert not th.is_alive(), "the dry run waited for the run another process holds"
        assert result == [0]
    finally:
        holder.kill()
        holder.wait()
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 3 and all("(held by another process now: a real run waits for it)" in ln for ln in out)


def _warn(results: Path, name: str, epochs: set[int]) -> None:
    """Give the epochs the training loop's collapse warning (flatrobust.collapse), as train.py stores it."""
    path = results / "c10jpeg" / name / "metrics.jsonl"
    recs = [json.loads(ln) for ln in path.read_text().splitlines()]
    for r in recs:
        if r["epoch"] in epochs:
            r["warning"] = "epochs 1-3 with AWP active: the model gives one class to 100.0% of the test images"
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))


def test_a_collapsed_run_is_named_marked_on_the_gamma_curve_and_kept_out_of_the_correlation(tmp_path):
    """A model AWP drove to one class is flat and has no gap: on the gamma curve and in the flatness-gap scatter it
    would read as the best of all (gamma 0.02 from the first step did this to the main setting)."""
    results = tmp_path / "results"
    at = ([0.20, 0.40, 0.35, 0.30], [0.3, 0.5, 0.7, 0.9])
    dead = ([0.07, 0.10, 0.07, 0.07], [0.10, 0.10, 0.10, 0.10])  # one class throughout (best epoch 2)
    lively = ([0.07, 0.10, 0.30, 0.35], [0.10, 0.10, 0.40, 0.50])  # one class at epochs 1-2, then it learned
    at1 = ([0.20, 0.40, 0.35, 0.32], [0.3, 0.5, 0.7, 0.85])
    for name, curve in (("toy_at_s0", at), ("toy_at_s1", at1), ("toy_at_awp_s0", dead), ("toy_at_awp_s1", lively)):
        _run(results / "c10jpeg", name, *curve)
    _warn(results, "toy_at_awp_s0", {3, 4})  # a warning at epoch e is about epochs e-2 to e (3 epochs of patience)
    _warn(results, "toy_at_awp_s1", {2})
    _flatness(results, "toy_at_s0", {"best": (0.05, 0.04), "last": (0.40, 0.30)})
    _flatness(results, "toy_at_s1", {"best": (0.07, 0.06), "last": (0.50, 0.50)})
    _flatness(results, "toy_at_awp_s0", {"best": (0.001, 0.0), "last": (0.001, 0.0)})
    _flatness(results, "toy_at_awp_s1", {"best": (0.08, 0.03), "last": (0.09, 0.05)})
    text = _write(tmp_path, {})
    assert ("toy_at_awp_s0 at epochs 1-4 (to the end); toy_at_awp_s1 at epochs 1-2 (recovered). A collapsed checkpoint's"
            in text)
    assert "| 0.01 | toy_at_awp_s0 | — | — | 10.0 | 7.0 | 3.0 | 0.001 | 0.000 | collapsed at epochs 1-4 |" in text
    assert "Collapsed (dotted in the figure): gamma 0.01 with AWP from the first step" in text
    # 8 checkpoints, the dead run's two left out; the recovered run's last.pt stays (its best, epoch 4, is not collapsed)
    assert "so each checkpoint is correlated on its own; 2 collapsed checkpoints (x) left out): best.pt, 3 runs" in text
    assert "Means over seeds (± std) of each row at each checkpoint (collapsed checkpoints left out):" in text
    assert "| AT-AWP | last.pt | 1 | 15.0 (n=1) | 0.090 (n=1) | 0.050 (n=1) |" in text


@pytest.mark.parametrize("awp_best, verdict", [((0.44, 0.45), "PGD-20: held, narrowly (0.01 <= p < 0.05"),  # Welch p = 0.030
                                               ((0.43, 0.44), "PGD-20: did not hold (the difference, in AWP's favour"),  # p = 0.051
                                               ((0.48, 0.49), "PGD-20: held, AT")])  # p = 0.0077
def test_a_claim_just_under_the_threshold_holds_narrowly(tmp_path, awp_best, verdict):
    curve = ([0.20, 0.40, 0.35, 0.30], [0.3, 0.5, 0.7, 0.9])
    runs = {"toy_at_s0": (*curve, {"best": 0.40, "last": 0.30}), "toy_at_s1": (*curve, {"best": 0.41, "last": 0.31})}
    for seed, acc in enumerate(awp_best):
        runs[f"toy_at_awp_s{seed}"] = (*curve, {"best": acc, "last": 0.30})
    text = _write(tmp_path, runs)
    best = next(ln for ln in text.splitlines() if "AWP raises best-epoch robustness" in ln)
    assert verdict in best
    assert ("narrowly" in best) == ("narrowly" in verdict)


class _Retraining:
    """Stands in for the `flatrobust train` process a restore starts: writes its run directory at once (the
    epochs given, a newline after each, a last one half written), then runs until terminated or `finish`."""
    calls: list = []

    def __init__(self, argv, epochs: list[dict], run: Path, **kwargs):
        _Retraining.calls.append(argv)
        self.rc, self.terminated = None, False
        run.mkdir(parents=True, exist_ok=True)
        (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in epochs) + '{"epoch": ')
        (run / "env.json").write_text(json.dumps({"torch": "2.x", "cpu_capability": "AVX2"}))
        for ck in ("best.pt", "last.pt"):
            (run / ck).write_text(ck)
        _Retraining.last = self

    def poll(self):
        return self.rc

    def terminate(self):
        self.terminated, self.rc = True, -15

    def wait(self):
        return self.rc


def _restore_fixture(tmp_path, monkeypatch, cut_short: bool, epochs: list[dict], finishes: bool):
    import subprocess

    monkeypatch.setattr(study, "RESULTS", tmp_path)
    monkeypatch.setattr(study, "RESTORE_POLL_S", 0.01)
    row = study.Row("x", "X", "c10jpeg3_at", (0,))
    train, pgd = [t for t in study.tasks([row]) if t.stage in ("train", "pgd_best")]
    d, partial = train.dir, train.dir.parent / ".restore" / train.dir.name
    d.mkdir(parents=True)
    (d / "metrics.jsonl").write_text("".join(json.dumps({"epoch": e, "test_robust_acc": 0.3, "epoch_time_s": 5.0}) + "\n" for e in (1, 2)))
    if cut_short:
        partial.mkdir(parents=True)
        (partial / "last.pt").write_text("epoch 1")
    _Retraining.calls = []

    def popen(argv, **kwargs):
        proc = _Retraining(argv, epochs, partial)
        if finishes:
            proc.rc = 0
        return proc

    monkeypatch.setattr(subprocess, "Popen", popen)
    monkeypatch.setattr(subprocess, "call", lambda argv, **kwargs: _Retraining.calls.append(argv) or 0)  # the evaluation
    return train, pgd, d, partial


@pytest.mark.parametrize("cut_short", [False, True])
def test_a_restore_cut_short_by_the_session_is_continued_not_begun_again(tmp_path, monkeypatch, cut_short):
    """A fresh clone has no checkpoints: the study trains the run again in results/DATASET/.restore to restore them
    (hours), and a retraining the session's end cut short is resumed there, not begun again from epoch 0."""
    same = [{"epoch": e, "test_robust_acc": 0.3, "epoch_time_s": 7.0} for e in (1, 2)]  # other timings only
    train, pgd, d, partial = _restore_fixture(tmp_path, monkeypatch, cut_short, same, finishes=True)
    assert study._command(pgd, False, train.argv) == 0
    calls = _Retraining.calls
    assert len(calls) == 2 and calls[1] == pgd.argv
    if cut_short:
        assert calls[0][3:] == ["train", "--resume", str(partial)]
    else:
        assert calls[0][3:5] == ["train", train.argv[4]] and f"out_dir={partial.parent}" in calls[0] and "--overwrite" in calls[0]
    assert (d / "best.pt").read_text() == "best.pt" and (d / "last.pt").read_text() == "last.pt" and not partial.exists()


@pytest.mark.parametrize("epochs, finishes, where", [
    ([{"epoch": 1, "test_robust_acc": 0.31}], False, "epoch 1, test_robust_acc 0.31 here against 0.3"),  # parts at once
    ([{"epoch": 1, "test_robust_acc": 0.3}], True, "1 epochs here against 2"),  # ended with fewer epochs
])
def test_a_retraining_that_parts_from_the_committed_run_is_stopped_and_says_why(tmp_path, monkeypatch, capsys, epochs, finishes, where):
    """On another processor the retraining rounds differently and parts from the committed run in its first epoch:
    the restore stops it there (not after hours of training) and says what to do instead; nothing is moved in."""
    train, pgd, d, partial = _restore_fixture(tmp_path, monkeypatch, False, epochs, finishes)
    assert study._command(pgd, False, train.argv) == 1
    assert len(_Retraining.calls) == 1  # the evaluation did not run
    assert _Retraining.last.terminated == (not finishes)  # a retraining still running is stopped
    err = capsys.readouterr().err
    assert err == (f"c10jpeg3_at_s0: cannot restore its checkpoints here: the retraining parts from the committed metrics.jsonl at "
                   f"{where} (committed run: torch ?, CPU capability not recorded; here: torch 2.x, CPU capability AVX2). To "
                   f"evaluate it on this machine, train and evaluate it again as a whole: move {d} aside and run "
                   "`python study/study.py run`\n")
    assert not (d / "best.pt").exists()


def test_a_free_worker_takes_a_trained_runs_short_evaluations_before_an_earlier_runs_autoattack(tmp_path, monkeypatch, capsys):
    """Two trained runs: the second run's PGD-20, flatness and landscapes go before the first run's AutoAttacks (they
    queued behind them when tasks were taken in the study's order alone), and each kind keeps the study's order."""
    monkeypatch.setattr(study, "RESULTS", tmp_path)
    monkeypatch.setattr(study, "_train_done", lambda d: True)
    rows = [study.Row("x", "X", "c10jpeg3_at", (0, 1))]
    assert study.run(rows, {"pgd", "flatness", "landscape", "aa"}, 1, dry=True) == 0
    done = [ln.split("] ", 1)[1].split(":")[0] for ln in capsys.readouterr().out.splitlines()]
    short = [f"c10jpeg3_at_s{s} {st}" for s in (0, 1) for st in study.STAGES if st.split("_")[0] in ("pgd", "flatness", "landscape")]
    assert done == short + ["c10jpeg3_at_s0 aa_best", "c10jpeg3_at_s0 aa_last", "c10jpeg3_at_s1 aa_best", "c10jpeg3_at_s1 aa_last"]


def _awp_runs(tmp_path, awp_last: list[float], aa_last: dict[str, list[float]] | None = None, seeds=(0, 1, 2)) -> dict:
    """AT at full-test PGD-20 30/31/32 (best 40) against AT-AWP at `awp_last`, with AutoAttack of last.pt if given."""
    curve = ([0.20, 0.40, 0.35, 0.30], [0.3, 0.5, 0.7, 0.9])
    runs = {}
    for i, seed in enumerate(seeds):
        at_aa = {"last": (0.30 + i / 100, aa_last["at"][i])} if aa_last else None
        awp_aa = {"last": (awp_last[i], aa_last["awp"][i])} if aa_last else None
        runs[f"toy_at_s{seed}"] = (*curve, {"best": 0.40, "last": 0.30 + i / 100}, at_aa)
        runs[f"toy_at_awp_s{seed}"] = (*curve, {"best": 0.40, "last": awp_last[i]}, awp_aa)
    return runs


def _write_planned(tmp_path, runs: dict, plan) -> str:
    recipes, results, docs = tmp_path / "recipes", tmp_path / "results", tmp_path / "docs"
    recipes.mkdir(parents=True)
    (recipes / "toy_at.yaml").write_text(yaml.safe_dump(CFG))
    for name, args in runs.items():
        _run(results / "c10jpeg", name, *args)
    rows = [study.Row(m, label, f"toy_{m}", (0, 1, 2, 3), setting="vt", method=m) for m, label in (("at", "AT"), ("at_awp", "AT-AWP"))]
    report.write(results, docs, rows, [("0", "at")], [study.Setting("vt", "toy", "a test")], "vt", recipes, plans=[plan] if plan else [])
    return (docs / "RESULTS.md").read_text()


def test_claims_are_judged_on_the_planned_seeds_and_added_seeds_are_shown_beside_not_instead(tmp_path):
    """Seeds added after looking are optional stopping: the verdict uses the planned seeds only."""
    # planned seeds 0-1: AT-AWP last.pt 0.33/0.30 against AT 0.30/0.31 (no difference); seeds 2-3 added: AT-AWP far ahead
    runs = _awp_runs(tmp_path, [0.33, 0.30, 0.45, 0.46], seeds=(0, 1, 2, 3))
    plan = study.Plan("vt", "at", "at_awp", (0, 1), (2, 3), "added after looking, for the test")
    text = _write_planned(tmp_path, runs, plan)
    line = next(ln for ln in text.splitlines() if "AWP raises last-epoch robustness" in ln)
    assert "did not hold" in line and "AT 30.5, AT-AWP 31.5 points" in line and "2 and 2 seeds" in line
    assert "With the seeds added after looking (2, 3), PGD-20: AT 31.5, AT-AWP 38.5 points" in line
    assert "Judged on the planned seeds 0, 1 (seeds 2, 3 were added after looking" in text
    assert "| AT vs AT-AWP | vt | 0, 1 | 2, 3 | added after looking, for the test |" in text
    unplanned = _write_planned(tmp_path / "b", runs, None)  # without a plan every finished seed counts
    assert "4 and 4 seeds" in next(ln for ln in unplanned.splitlines() if "AWP raises last-epoch robustness" in ln)


def test_no_verdict_before_the_planned_seeds_have_finished(tmp_path):
    """An interim look (2 of 3 planned seeds) shows the numbers but judges nothing: claims are judged at the planned
    number, however clear the first seeds look (AT-AWP 10 points ahead on both here)."""
    runs = _awp_runs(tmp_path, [0.40, 0.41], {"at": [0.28, 0.29], "awp": [0.38, 0.39]}, seeds=(0, 1))
    text = _write_planned(tmp_path, runs, study.Plan("vt", "at", "at_awp", (0, 1, 2)))
    line = next(ln for ln in text.splitlines() if "AWP raises last-epoch robustness" in ln)
    assert "**: not judged yet (interim: 2 and 2 of the 3 planned seeds have finished" in line, line
    assert "held" not in line.split("**: ")[1].split(".")[0]
    done = _write_planned(tmp_path / "b", _awp_runs(tmp_path, [0.40, 0.41, 0.42], {"at": [0.28, 0.29, 0.30], "awp": [0.38, 0.39, 0.40]}),
                          study.Plan("vt", "at", "at_awp", (0, 1, 2)))
    assert "**: held under both attacks." in next(ln for ln in done.splitlines() if "AWP raises last-epoch robustness" in ln)


def test_a_robustness_claim_holds_only_when_autoattack_confirms_it(tmp_path):
    aa = {"at": [0.28, 0.29, 0.30], "awp": [0.28, 0.30, 0.29]}  # PGD-20 says +8 points, AutoAttack says nothing
    text = _write_planned(tmp_path, _awp_runs(tmp_path, [0.38, 0.39, 0.40], aa), study.Plan("vt", "at", "at_awp", (0, 1, 2)))
    line = next(ln for ln in text.splitlines() if "AWP raises last-epoch robustness" in ln)
    assert "**: did not hold (held under PGD-20 only: AutoAttack does not confirm it)." in line
    assert "PGD-20: held, AT 31, AT-AWP 39 points" in line and "AutoAttack (1,000 test images): did not hold" in line
    both = _write_planned(tmp_path / "b", _awp_runs(tmp_path, [0.38, 0.39, 0.40], {"at": [0.28, 0.29, 0.30], "awp": [0.37, 0.38, 0.38]}),
                          study.Plan("vt", "at", "at_awp", (0, 1, 2)))
    assert "**: held under both attacks." in next(ln for ln in both.splitlines() if "AWP raises last-epoch robustness" in ln)
    pending = _write_planned(tmp_path / "c", _awp_runs(tmp_path, [0.38, 0.39, 0.40]), study.Plan("vt", "at", "at_awp", (0, 1, 2)))
    assert "not judged yet (AutoAttack pending" in next(ln for ln in pending.splitlines() if "AWP raises last-epoch robustness" in ln)


def test_autoattack_agreement_compares_what_it_takes_from_each_row_not_only_signs(tmp_path):
    # the same sign under both attacks, but AutoAttack takes 1 point from AT and 6 from AT-AWP on every seed
    aa = {"at": [0.29, 0.30, 0.31], "awp": [0.32, 0.33, 0.34]}
    text = _write_planned(tmp_path, _awp_runs(tmp_path, [0.38, 0.39, 0.40], aa), study.Plan("vt", "at", "at_awp", (0, 1, 2)))
    line = next(ln for ln in text.splitlines() if "AutoAttack agrees with PGD-20" in ln)
    assert "**: not measured yet." in line  # best.pt has no AutoAttack here
    runs = _awp_runs(tmp_path, [0.38, 0.39, 0.40], aa)
    for i in range(3):  # add best.pt AutoAttack that agrees
        runs[f"toy_at_s{i}"][3]["best"] = (0.40, 0.39)
        runs[f"toy_at_awp_s{i}"][3]["best"] = (0.40, 0.39)
    text = _write_planned(tmp_path / "b", runs, study.Plan("vt", "at", "at_awp", (0, 1, 2)))
    line = next(ln for ln in text.splitlines() if "AutoAttack agrees with PGD-20" in ln)
    assert "**: did not hold." in line and "AutoAttack takes 1.0 points from AT, 6.0 from AT-AWP" in line
    assert "AutoAttack discounts one row more than the other" in line


def test_replaced_runs_are_named_with_why_and_their_earlier_numbers(tmp_path):
    curve = ([0.20, 0.40, 0.35, 0.30], [0.3, 0.5, 0.7, 0.9])
    old = ([0.20, 0.38, 0.30, 0.25], [0.3, 0.5, 0.7, 0.95])
    _run(tmp_path / "results" / "replaced", "toy_at_s0", *old, {"best": 0.37, "last": 0.24})
    (tmp_path / "results" / "replaced" / "toy_at_s0" / "replaced.json").write_text(
        json.dumps({"run": "c10jpeg/toy_at_s0", "replaced_in": "abcdef0123", "why": "trained again elsewhere"}))
    text = _write(tmp_path, {"toy_at_s0": (*curve, {"best": 0.40, "last": 0.30})})
    assert "## Runs retrained and replaced" in text
    assert ("| `c10jpeg/toy_at_s0` | `abcdef0` | trained again elsewhere | best epoch 2, full-test PGD-20 best.pt 37.0 / last.pt 24.0, "
            "gap last 70.0, average flatness last — | best epoch 2, full-test PGD-20 best.pt 40.0 / last.pt 30.0, gap last 60.0") in text


def test_the_study_replaced_command_copies_the_files_before_the_replacing_commit(tmp_path, monkeypatch):
    monkeypatch.setattr(study, "REPLACED_DIR", tmp_path)
    assert study.replaced() == 0
    old = (tmp_path / "c10jpeg3_trades_s2" / "metrics.jsonl").read_text()
    assert old != (study.RESULTS / "c10jpeg" / "c10jpeg3_trades_s2" / "metrics.jsonl").read_text()
    assert old == (study.RESULTS / "replaced" / "c10jpeg3_trades_s2" / "metrics.jsonl").read_text()  # committed as written


def test_figure_1_remedies_are_judged_by_flatness_and_gap(tmp_path):
    results = tmp_path / "results"
    at = ([0.20, 0.40, 0.35, 0.30], [0.3, 0.5, 0.7, 0.9])
    for seed in (0, 1, 2):
        _run(results / "c10jpeg", f"toy_at_s{seed}", *at)
        _flatness(results, f"toy_at_s{seed}", {"best": (0.05 + seed / 100, 0.04 + seed / 100), "last": (0.40 + seed / 50, 0.30 + seed / 30)})
    recipes, docs = tmp_path / "recipes", tmp_path / "docs"
    recipes.mkdir()
    (recipes / "toy_at.yaml").write_text(yaml.safe_dump(CFG))
    rows = [study.Row("at", "AT", "toy_at", (0, 1, 2), setting="vt", method="at"),
            study.Row("rst", "RST", "toy_rst", (0, 1, 2), setting="vt", method="rst")]
    plans = [study.Plan("vt", "at", "rst", (0, 1, 2))]
    report.write(results, docs, rows, [("0", "at")], [study.Setting("vt", "toy", "a test")], "vt", recipes, plans=plans)
    text = (docs / "RESULTS.md").read_text()
    es = text[text.index("### Early stopping"):text.index("### Extra unlabeled data")]
    assert "- **Early stopping lowers the average-case flatness**: held." in es and "paired t-test p = " in es and "3 runs" in es
    assert "- **Early stopping lowers the robust generalization gap**: held." in es  # gap 10 at best vs 60 at last
    assert "Verdict for early stopping: flatter and a narrower gap on every measure." in es
    rst = text[text.index("### Extra unlabeled data"):]
    assert "not measured yet: needs finished AT and RST (AT + pseudo-labeled extra data) runs (planned seeds 0-2)." in rst


def test_the_steps_ratio_of_a_setting_is_computed_from_the_recipes(tmp_path):
    cfgs = report.setting_cfgs(study.SETTINGS, study.RECIPES)
    i = [s.key for s in study.SETTINGS].index("v3")
    why = report._why(study.SETTINGS, cfgs, i)
    assert "6.67 times those of setting v2" in why and "STEPS_RATIO" not in why  # 6,400 / 960 steps
    assert report.sgd_steps(cfgs["v3"]) == 6400 and report.sgd_steps(cfgs["v2"]) == 960


def test_the_readme_block_is_one_row_per_comparison_judged_on_its_planned_seeds():
    runs = report.load(study.RESULTS, study.ROWS)
    cfgs = report.setting_cfgs(study.SETTINGS, study.RECIPES)
    plans = {(p.setting, p.base, p.other): p for p in study.PLANS}
    block = report.readme_block(runs, report.row_keys(study.ROWS), study.SETTINGS, study.MAIN, cfgs, plans)
    rows = [ln for ln in block if ln.startswith("| v") or ln.startswith("| f")]
    assert [r.split(" | ")[0] + " " + r.split(" | ")[2] for r in rows] == [
        "| v3 (main) AT → AT-AWP", "| v3 (main) TRADES → TRADES-AWP", "| v2 AT → AT-AWP", "| v3n AT → AT-AWP", "| f3 AT → AT-AWP"]
    assert "3 + 3 (2 + 2 more added after looking)" in rows[0] and "one seed, not judged" in rows[3]
    assert "[docs/RESULTS.md](docs/RESULTS.md)" in block[0]


def test_a_task_another_runner_finished_since_it_was_listed_is_not_run_again(tmp_path, monkeypatch):
    """Two runners (one training the labeler and RST chain, one evaluating): a task the other finished after this one
    listed its tasks is skipped when its turn comes, not run twice."""
    monkeypatch.setattr(study, "RESULTS", tmp_path)
    monkeypatch.setattr(study, "_train_done", lambda d: True)
    rows = [study.Row("x", "X", "c10jpeg3_at", (0,))]
    listed = study.tasks(rows)
    for t in listed:
        t.done = False  # as listed before the other runner finished them
    monkeypatch.setattr(study, "tasks", lambda rows: listed)
    best = next(t for t in listed if t.stage == "pgd_best")
    best.output.parent.mkdir(parents=True, exist_ok=True)
    best.output.write_text("{}")
    ran = []
    monkeypatch.setattr(study, "_command", lambda t, dry, argv: ran.append(t.stage) or 0)
    study.run(rows, {"train", "pgd"}, 1, dry=False)
    assert ran == ["pgd_last"]
