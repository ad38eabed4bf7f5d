"""flatrobust.catastrophic: catastrophic overfitting of single-step training, from the monitored numbers."""
from flatrobust.catastrophic import CatastrophicOverfitting


def test_fires_when_pgd_collapses_while_training_attack_accuracy_rises():
    co = CatastrophicOverfitting(n=200)
    # (epoch, test PGD, train accuracy under FGSM): learns, then PGD falls to ~0 while FGSM accuracy jumps (Wong et al.)
    seq = [(1, 0.20, 0.25), (2, 0.28, 0.32), (3, 0.31, 0.36), (4, 0.30, 0.37), (5, 0.02, 0.71)]
    out = [co.check(*s) for s in seq]
    assert out[:4] == [None] * 4 and out[4].startswith("catastrophic overfitting at epoch 5: test PGD accuracy fell to 2.0% from 31.0% at epoch 3")
    assert co.fired == [5] and "\n" not in out[4]


def test_noise_a_slow_decline_or_a_diverging_run_do_not_fire():
    co = CatastrophicOverfitting(n=20)  # 20 images: 0.30 -> 0.10 is within 3 standard errors
    assert [co.check(e, a, t) for e, a, t in [(1, 0.30, 0.3), (2, 0.10, 0.5)]] == [None, None]
    robust_overfit = CatastrophicOverfitting(n=1000)  # PGD falls by a third, not by half: robust overfitting
    assert [robust_overfit.check(e, a, t) for e, a, t in [(1, 0.27, 0.3), (2, 0.18, 0.6)]] == [None, None]
    diverged = CatastrophicOverfitting(n=1000)  # both fall: a failing run, not a beaten attack
    assert [diverged.check(e, a, t) for e, a, t in [(1, 0.30, 0.4), (2, 0.01, 0.1)]] == [None, None]


def test_state_round_trips_so_a_resumed_run_judges_as_an_uninterrupted_one():
    a, b = CatastrophicOverfitting(n=200), CatastrophicOverfitting(n=200)
    for s in [(1, 0.20, 0.25), (2, 0.30, 0.35)]:
        a.check(*s)
    b.load_state_dict(a.state_dict())
    assert a.check(3, 0.01, 0.8) == b.check(3, 0.01, 0.8) is not None
