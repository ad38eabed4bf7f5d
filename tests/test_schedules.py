"""flatrobust.schedules: the official script's --lr-schedule names, per iteration, as that script computes them."""
import math

import numpy as np
import pytest

from flatrobust import schedules
from flatrobust.config import RunConfig
from flatrobust.train import lr_at


def _official(name: str, t: float, epochs: int, lr_max: float, lr_one_drop: float, lr_drop_epoch: int) -> float:
    """The official definitions as they are written there (numpy.interp and all), t = epoch + (i + 1) / batches."""
    if name == "superconverge":
        return np.interp([t], [0, epochs * 2 // 5, epochs], [0, lr_max, 0])[0]
    if name == "piecewise":
        return lr_max if t / epochs < 0.5 else lr_max / 10. if t / epochs < 0.75 else lr_max / 100.
    if name == "linear":
        return np.interp([t], [0, epochs // 3, epochs * 2 // 3, epochs], [lr_max, lr_max, lr_max / 10, lr_max / 100])[0]
    if name == "onedrop":
        return lr_max if t < lr_drop_epoch else lr_one_drop
    if name == "multipledecay":
        return lr_max - (t // (epochs // 10)) * (lr_max / 10)
    if name == "cosine":
        return lr_max * 0.5 * (1 + np.cos(t / epochs * np.pi))
    if name == "cyclic":
        return np.interp([t], [0, 0.4 * epochs, epochs], [0, lr_max, 0])[0]
    raise AssertionError(name)


@pytest.mark.parametrize("name", schedules.OFFICIAL)
@pytest.mark.parametrize("epochs, batches", [(200, 7), (13, 5), (30, 1)])
def test_each_official_schedule_matches_the_official_definition_at_every_iteration(name, epochs, batches):
    recipe_name = f"official_{name}" if name in schedules.OWN else name
    s = schedules.Schedule(recipe_name, 0.1, epochs, batches, lr_one_drop=0.005, lr_drop_epoch=epochs // 2)
    for epoch in range(epochs):
        for i in range(batches):
            want = _official(name, epoch + (i + 1) / batches, epochs, 0.1, 0.005, epochs // 2)
            assert math.isclose(s(epoch * batches + i), want, rel_tol=1e-12, abs_tol=1e-15), (epoch, i)


def test_flatrobusts_own_names_keep_their_rule_so_old_runs_resume_bit_for_bit():
    for name in schedules.OWN:
        cfg = RunConfig()
        cfg.optim.schedule, cfg.optim.lr = name, 0.1
        s = schedules.Schedule(name, 0.1, 10, 7)
        assert [s(k) for k in range(70)] == [lr_at(k, 70, cfg) for k in range(70)]
    # the own piecewise decays one iteration after the official one: step 34 of 70 is the official first /10
    own, official = schedules.Schedule("piecewise", 0.1, 10, 7), schedules.Schedule("official_piecewise", 0.1, 10, 7)
    assert (own(34), official(34), own(35)) == (0.1, 0.01, 0.01)


def test_schedule_names_that_cannot_run_are_refused_in_one_line():
    assert schedules.check("piecewise", 200) is None and schedules.check("cyclic", 3) is None
    msg = schedules.check("piecewisezoom", 200)
    assert "defines no schedule for it" in msg and "\n" not in msg
    assert "did you mean 'superconverge'?" in schedules.check("superconverg", 200)
    assert "did you mean" not in schedules.check("xyz", 200) and "choose from piecewise, cosine, constant" in schedules.check("xyz", 200)
    assert "needs epochs >= 10, got 5" in schedules.check("multipledecay", 5)


def test_optim_schedule_takes_every_official_name_and_lr_at_follows_it():
    from flatrobust.config import load_config
    from flatrobust.errors import UserError

    cfg = load_config(None, ["epochs=10", "optim.lr=0.2", "optim.schedule=onedrop", "optim.lr_drop_epoch=4", "optim.lr_one_drop=0.03"])
    s = schedules.Schedule("onedrop", 0.2, 10, 5, lr_one_drop=0.03, lr_drop_epoch=4)
    assert [lr_at(k, 50, cfg) for k in range(50)] == [s(k) for k in range(50)] and lr_at(19, 50, cfg) == 0.03
    for name in schedules.NAMES:
        assert load_config(None, ["epochs=10", f"optim.schedule={name}"]).optim.schedule == name
    for bad, why in [("superconverg", "did you mean 'superconverge'?"), ("piecewisezoom", "defines no schedule for it")]:
        with pytest.raises(UserError, match=why):
            load_config(None, [f"optim.schedule={bad}"])
