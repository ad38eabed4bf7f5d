"""The evaluation protocol: what its numbers promise (clean >= FGSM >= PGD >= AutoAttack, reproducible with
a seed, model in eval mode) and the `flatrobust eval` command (eval.json, table, one-line errors)."""
import copy
import json

import pytest
import torch

from conftest import write_digits_checkpoint
from flatrobust.checkpoint import save_checkpoint
from flatrobust.cli import main
from flatrobust.cli.evaluate import parse_pixels
from flatrobust.errors import UserError
from flatrobust.evaluate import ATTACKS, PROTOCOL, default_alpha, evaluate, format_table, resolve_attacks

EPS = 0.1  # L-inf, pixel units: PGD-20 takes the natural digits CNN from ~98% to ~50%


@pytest.fixture
def checkpoint(tmp_path, trained_cnn):
    """A checkpoint as `flatrobust train` writes it, holding the conftest CNN, in a run directory."""
    return write_digits_checkpoint(tmp_path / "run" / "best.pt", trained_cnn, EPS)


def _without_time(result):
    """The result with wall-clock seconds removed (everything else must repeat exactly)."""
    result = copy.deepcopy(result)
    result.pop("seconds")
    for r in result["attacks"].values():
        r.pop("seconds")
    return result


def test_registry_holds_the_papers_protocol():
    assert tuple(ATTACKS) == PROTOCOL == ("clean", "fgsm", "pgd20", "pgd100", "cw20", "autoattack")
    assert ATTACKS["pgd100"].params(_ctx())["steps"] == 100
    assert ATTACKS["cw20"].params(_ctx())["loss"] == "cw"


def _ctx():
    from flatrobust.evaluate import AttackContext

    return AttackContext("linf", 8 / 255, 2 / 255, 0, torch.Generator(), torch.device("cpu"))


def test_default_step_sizes_are_the_papers():
    assert default_alpha("linf", 8 / 255) == pytest.approx(2 / 255)
    assert default_alpha("l2", 128 / 255) == pytest.approx(15 / 255)


def test_accuracy_ordering_and_worst_case(trained_cnn, digits):
    _, _, x, y = digits
    res = evaluate(trained_cnn, x[:128], y[:128], attacks="clean,fgsm,pgd20,cw20", norm="linf", eps=EPS,
                   batch_size=50, progress=False, checks=False)
    acc = {k: r["accuracy"] for k, r in res["attacks"].items()}
    assert acc["clean"] > 0.9
    assert acc["clean"] >= acc["fgsm"] >= acc["pgd20"]
    assert acc["pgd20"] < acc["clean"] - 0.2  # PGD at this eps must hurt a naturally trained model
    assert res["worst_case"]["accuracy"] <= min(acc.values())
    assert res["worst_case"]["over"] == ["clean", "fgsm", "pgd20", "cw20"]
    assert res["n"] == 128 and res["alpha"] == pytest.approx(EPS / 4) and res["checks"] is None
    for r in res["attacks"].values():
        assert r["max_perturbation"] <= EPS + 1e-6 and r["outside_threat_model"] == 0
        assert r["correct"] == round(r["accuracy"] * 128)
    table = format_table(res)
    assert "pgd20" in table and "worst case" in table


def test_same_seed_same_numbers_and_model_mode_restored(trained_cnn, digits):
    _, _, x, y = digits
    model = copy.deepcopy(trained_cnn).train()  # left in train mode by its owner
    bn = model.net.bn1.running_mean.clone()
    kw = dict(attacks=["pgd20", "cw20"], norm="l2", eps=0.5, batch_size=32, seed=3, progress=False, checks=False)
    a = evaluate(model, x[:64], y[:64], **kw)
    b = evaluate(model, x[:64], y[:64], **kw)
    assert _without_time(a) == _without_time(b)
    assert model.training and all(m.training for m in model.modules())
    assert torch.equal(model.net.bn1.running_mean, bn)  # every forward ran in eval mode


def test_each_attack_has_its_own_randomness(trained_cnn, digits):
    """pgd20's number does not depend on which attacks ran before it."""
    _, _, x, y = digits
    kw = dict(norm="linf", eps=EPS, progress=False, checks=False)
    alone = evaluate(trained_cnn, x[:64], y[:64], attacks="pgd20", **kw)
    after = evaluate(trained_cnn, x[:64], y[:64], attacks="cw20,pgd20", **kw)
    assert alone["attacks"]["pgd20"]["correct"] == after["attacks"]["pgd20"]["correct"]


def test_evaluate_runs_the_trust_checks_on_a_subset(trained_cnn, digits):
    _, _, x, y = digits
    res = evaluate(trained_cnn, x[:40], y[:40], attacks="clean,fgsm,pgd20", norm="linf", eps=EPS,
                   progress=False, checks_n=16)
    assert res["checks_n"] == 16
    assert {c["name"] for c in res["checks"]} >= {"huge_eps", "pgd_le_fgsm", "deterministic_forward"}
    assert all(c["passed"] for c in res["checks"]), [c for c in res["checks"] if not c["passed"]]


def test_unknown_attack_suggests_the_closest_name():
    with pytest.raises(UserError, match=r"unknown attack 'pgd2': did you mean 'pgd20'\?"):
        resolve_attacks("clean,pgd2")
    assert resolve_attacks(" PGD20, clean,pgd20 ") == ["pgd20", "clean"]


@pytest.mark.parametrize("text, value", [("8/255", 8 / 255), ("0.5", 0.5), ("1e-2", 0.01), (" 128 / 255 ", 128 / 255), ("0", 0.0)])
def test_eps_syntax(text, value):
    assert parse_pixels(text, "--eps") == pytest.approx(value)


@pytest.mark.parametrize("text", ["-1", "8/0", "abc", "8//255", "nan", ""])
def test_bad_eps_is_refused(text):
    with pytest.raises(UserError):
        parse_pixels(text, "--eps")


def test_cli_writes_eval_json_and_prints_the_table(checkpoint, capsys):
    rc = main(["eval", str(checkpoint), "--attacks", "clean,fgsm,pgd20", "--n", "48", "--eps", "26/255",
               "--checks-n", "16", "--device", "cpu"])
    out = capsys.readouterr().out
    assert rc == 0
    report = json.loads((checkpoint.parent / "eval_best.json").read_text())
    assert {"format", "version", "created", "command", "checkpoint", "epoch", "config", "train_config",
            "environment", "n", "attacks", "worst_case", "checks", "seconds"} <= set(report)
    assert report["format"] == "flatrobust-eval" and report["epoch"] == 7 and report["n"] == 48
    cfg = report["config"]
    assert cfg["eps"] == pytest.approx(26 / 255) and cfg["norm"] == "linf"
    assert cfg["alpha"] == pytest.approx(26 / 255 / 4)  # --eps overrides training's eps, so not its alpha
    assert cfg["data"] == {"name": "digits", "root": None, "image_size": 0, "channels": 0, "classes": [], "split": "test", "n": 48,
                           "subset_seed": 0}
    assert list(report["attacks"]) == ["clean", "fgsm", "pgd20"]
    assert report["environment"]["torch"] == torch.__version__
    assert report["environment"]["cpu_capability"] == torch.backends.cpu.get_cpu_capability() and report["environment"]["cpu"]
    assert "--eps" in report["command"] and "--n 48" in report["command"]
    assert len(report["checks"]) == 9 and report["config"]["checks_n"] == 16
    for name in ("clean", "fgsm", "pgd20", "worst case", "trust checks on 16 examples", "huge_eps", "eval_best.json"):
        assert name in out


def test_one_result_file_per_checkpoint(checkpoint, capsys):
    """Evaluating last.pt after best.pt keeps best.pt's numbers (issue 29, item 2); --out still chooses the file."""
    import shutil

    shutil.copy(checkpoint, checkpoint.parent / "last.pt")
    common = ["--attacks", "clean", "--n", "8", "--no-checks"]
    assert main(["eval", str(checkpoint.parent), *common]) == 0  # the folder: best.pt
    assert main(["eval", str(checkpoint.parent / "last.pt"), *common]) == 0
    assert main(["eval", str(checkpoint), *common, "--out", str(checkpoint.parent / "mine.json")]) == 0
    best, last = (json.loads((checkpoint.parent / f"eval_{s}.json").read_text()) for s in ("best", "last"))
    assert best["checkpoint"].endswith("best.pt") and last["checkpoint"].endswith("last.pt")
    assert (checkpoint.parent / "mine.json").is_file() and not (checkpoint.parent / "eval.json").exists()
    assert "wrote " + str(checkpoint.parent / "eval_last.json") in capsys.readouterr().out


def test_eval_json_command_and_config_agree_on_the_checks(checkpoint, tmp_path):
    """--checks-n larger than --n: the checks run on all n examples, and both the command and the config say n."""
    import shlex

    assert main(["eval", str(checkpoint), "--attacks", "clean,pgd20", "--n", "12", "--checks-n", "200"]) == 0
    first = json.loads((checkpoint.parent / "eval_best.json").read_text())
    assert first["config"]["checks_n"] == 12 and "--checks-n 12" in first["command"]
    again = tmp_path / "again.json"
    assert main(shlex.split(first["command"])[1:] + ["--out", str(again)]) == 0  # the recorded command repeats it
    second = json.loads(again.read_text())
    assert second["config"] == first["config"] and second["command"] == first["command"]
    assert [(c["name"], c["passed"], c["detail"]) for c in second["checks"]] == \
        [(c["name"], c["passed"], c["detail"]) for c in first["checks"]]


def test_cli_threat_model_from_the_checkpoint_and_out_file(checkpoint, tmp_path, capsys):
    out = tmp_path / "elsewhere" / "e.json"
    assert main(["eval", str(checkpoint.parent), "--attacks", "clean,pgd20", "--n", "8", "--no-checks",
                 "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["config"]["eps"] == EPS and report["config"]["alpha"] == EPS / 4
    assert report["checks"] is None and "trust checks" not in capsys.readouterr().out
    assert report["checkpoint"].endswith("best.pt")


@pytest.mark.parametrize("args, message", [
    (["--attacks", "clean,pgd2"], "unknown attack 'pgd2': did you mean 'pgd20'?"),
    (["--n", "0"], "--n must be >= 1"),
    (["--eps", "-1"], "--eps must be >= 0"),
    (["--eps", "8/zz"], "--eps must be a number or a fraction"),
])
def test_cli_bad_input_is_one_line(checkpoint, capsys, args, message):
    assert main(["eval", str(checkpoint), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("flatrobust: error: ") and "\n" not in err
    assert message in err


def test_cli_missing_or_corrupt_checkpoint(tmp_path, capsys):
    assert main(["eval", str(tmp_path / "nope.pt"), "--attacks", "clean"]) == 2
    assert "does not exist" in capsys.readouterr().err
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint at all")
    assert main(["eval", str(bad), "--attacks", "clean"]) == 2
    err = capsys.readouterr().err.strip()
    assert f"{bad} is not a checkpoint: it is a text file" in err and "\n" not in err
    bad.write_bytes(b"PK\x03\x04" + b"\x00" * 40)  # torch.save's zip format, cut short
    assert main(["eval", str(bad), "--attacks", "clean"]) == 2
    err = capsys.readouterr().err.strip()
    assert "truncated or corrupted" in err and "\n" not in err


def test_cli_checkpoint_without_a_threat_model(tmp_path, trained_cnn, capsys):
    path = tmp_path / "x.pt"
    save_checkpoint({"config": {"model": "smallcnn", "data": {"name": "digits"}}, "model": trained_cnn.state_dict()}, path)
    assert main(["eval", str(path), "--attacks", "clean"]) == 2
    assert "pass --norm linf or --norm l2" in capsys.readouterr().err


def test_cli_autoattack_without_pyautoattack(checkpoint, capsys, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "pyautoattack", None)  # makes `import pyautoattack` fail
    assert main(["eval", str(checkpoint), "--attacks", "clean,autoattack"]) == 2
    assert "pip install pyautoattack" in capsys.readouterr().err


def test_autoattack_is_at_least_as_strong_as_pgd(trained_cnn, digits):
    """AutoAttack standard through pyautoattack on 20 examples. At eps=0.15 APGD-CE already breaks what
    PGD-20 leaves, so the cascade stops early (about a second); the full cascade is the slow test below."""
    pytest.importorskip("pyautoattack")
    _, _, x, y = digits
    rng = torch.get_rng_state()
    res = evaluate(trained_cnn, x[:20], y[:20], attacks="pgd20,autoattack", norm="linf", eps=0.15,
                   progress=False, checks=False)
    assert torch.equal(torch.get_rng_state(), rng)  # pyautoattack reseeds the global RNG; the caller's is given back
    aa, pgd20 = res["attacks"]["autoattack"], res["attacks"]["pgd20"]
    assert aa["correct"] <= pgd20["correct"] + 1
    assert list(aa["stages"]) == ["apgd-ce", "apgd-t", "fab-t", "square"]
    assert aa["stages"]["square"]["correct"] == aa["correct"]
    assert aa["max_perturbation"] <= 0.15 + 1e-6 and aa["outside_threat_model"] == 0


@pytest.mark.slow
def test_full_autoattack_cascade_and_square_check(trained_cnn, digits):
    """The whole standard cascade (APGD-CE, APGD-T, FAB-T, Square 5000 queries) on points PGD cannot break."""
    pytest.importorskip("pyautoattack")
    _, _, x, y = digits
    res = evaluate(trained_cnn, x[:10], y[:10], attacks="clean,pgd20,autoattack", norm="linf", eps=EPS,
                   progress=False, checks_n=10)
    aa = res["attacks"]["autoattack"]
    assert aa["correct"] <= res["attacks"]["pgd20"]["correct"] + 1
    assert aa["stages"]["fab-t"]["correct"] > 0  # Square really ran on survivors
    names = {c["name"]: c for c in res["checks"]}
    assert "autoattack_flags" in names
    assert "AutoAttack: Square broke" in names["square_not_better"]["detail"]
    assert all(c["passed"] for c in res["checks"]), [c for c in res["checks"] if not c["passed"]]
