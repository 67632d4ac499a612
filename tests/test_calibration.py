"""Threshold calibration: the target-FPR rule on samples from known distributions, the promise it stores,
and the binomial interval of a measured FPR."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from patchcore_cli import calibration
from patchcore_cli.engine import threshold_from_scores
from patchcore_cli.metrics import binomial_interval

TARGET = 0.01


def _true_fprs(law: stats.rv_continuous, n: int, draws: int, seed: int) -> tuple[np.ndarray, float]:
    """Fit the rule to `draws` samples of n scores -> (true exceedance of each threshold, CI coverage)."""
    rng = np.random.default_rng(seed)
    fprs, covered = [], 0
    for _ in range(draws):
        promise = calibration.target_fpr_threshold(law.rvs(n, random_state=rng), TARGET)
        fpr = float(law.sf(promise.threshold))
        fprs.append(fpr)
        covered += promise.low <= fpr <= promise.high
    return np.array(fprs), covered / draws


@pytest.mark.parametrize("law", [stats.gumbel_r(loc=15, scale=1), stats.expon(loc=10, scale=2)])
def test_exponential_tails_get_the_target_on_average_and_the_interval_covers(law):
    # A maximum over patches has a Gumbel-like law, whose upper tail is exponential: the model's case.
    fprs, coverage = _true_fprs(law, n=200, draws=300, seed=1)
    assert abs(fprs.mean() - TARGET) < 0.15 * TARGET
    assert coverage >= 0.93  # the interval is built for 95 %
    assert np.mean(fprs > 2 * TARGET) < 0.12


def test_a_light_tail_is_served_conservatively():
    # Gaussian scores fall off faster than the exponential model assumes: fewer false alarms than promised.
    fprs, _ = _true_fprs(stats.norm(loc=15, scale=1), n=200, draws=200, seed=2)
    assert fprs.mean() < TARGET


def test_more_images_tighten_the_promise():
    rng = np.random.default_rng(3)
    widths = []
    for n in (50, 500):
        promise = calibration.target_fpr_threshold(stats.gumbel_r.rvs(size=n, random_state=rng), TARGET)
        assert promise.n == n and promise.fpr == pytest.approx(TARGET)
        widths.append(promise.high / promise.low)
    assert widths[1] < widths[0] / 3


def test_the_promise_is_the_tail_model_at_the_threshold():
    scores = stats.gumbel_r.rvs(size=120, random_state=np.random.default_rng(4))
    promise = calibration.target_fpr_threshold(scores, 0.02)
    assert calibration.tail_fpr(scores, promise.threshold) == pytest.approx(
        (promise.fpr, promise.low, promise.high)
    )
    assert promise.fpr == pytest.approx(0.02) and promise.low < promise.fpr < promise.high
    assert "exponential tail" in promise.method


def test_a_target_beyond_the_tail_is_an_empirical_quantile():
    rng = np.random.default_rng(5)
    law = stats.uniform()
    fprs = []
    for _ in range(200):
        promise = calibration.target_fpr_threshold(law.rvs(40, random_state=rng), 0.4)
        assert promise.method == "empirical quantile of good scores"
        fprs.append(law.sf(promise.threshold))
    # The conformal order statistic: its exceedance is at most the target on average, and close to it.
    assert 0.36 < np.mean(fprs) <= 0.41


def test_tied_scores_still_give_a_finite_threshold_above_them():
    promise = calibration.target_fpr_threshold(np.full(30, 7.5), TARGET)
    assert math.isfinite(promise.threshold) and promise.threshold > 7.5


@pytest.mark.parametrize("target", [0.0, 1.0, -0.1, 1.5, float("nan")])
def test_target_outside_the_open_unit_interval_is_refused(target):
    with pytest.raises(ValueError, match="target_fpr"):
        calibration.target_fpr_threshold(np.arange(10.0), target)


def test_sigma_rule_keeps_mean_plus_k_std_and_states_its_fpr():
    scores = np.array([1.0, 2.0, 3.0, 4.0, 5.0, 7.0])
    record = threshold_from_scores(scores, scores * 2, target_fpr=None, k=3.0)
    assert record["image_threshold"] == pytest.approx(scores.mean() + 3 * scores.std(ddof=1))
    assert record["pixel_threshold"] == pytest.approx(2 * scores.mean() + 6 * scores.std(ddof=1))
    assert record["target_fpr"] is None and record["threshold_sigma"] == 3.0
    assert record["rule"].startswith("mean + 3 * std")
    assert 0.0 <= record["predicted_fpr_low"] <= record["predicted_fpr"] <= record["predicted_fpr_high"]


def test_record_holds_the_promise_for_image_and_pixel_thresholds():
    rng = np.random.default_rng(6)
    scores, maxima = (
        stats.gumbel_r.rvs(size=300, random_state=rng),
        stats.gumbel_r.rvs(size=300, random_state=rng),
    )
    record = threshold_from_scores(scores, 3 * maxima, target_fpr=0.05)
    assert record["target_fpr"] == 0.05 and record["n_images"] == 300 and record["confidence"] == 0.95
    assert record["predicted_fpr"] == pytest.approx(0.05)
    assert record["image_threshold"] == calibration.target_fpr_threshold(scores, 0.05).threshold
    assert record["pixel_threshold"] == calibration.target_fpr_threshold(3 * maxima, 0.05).threshold
    assert record["calibration_fpr"] == pytest.approx(np.mean(scores >= record["image_threshold"]))
    promise = calibration.stored_promise(record)
    assert promise is not None and promise["predicted_fpr"] == record["predicted_fpr"]


@pytest.mark.parametrize(
    "change",
    [
        {"predicted_fpr": None},
        {"predicted_fpr": "0.01"},
        {"predicted_fpr": float("nan")},
        {"predicted_fpr_high": 2.0},
        {"predicted_fpr_low": 0.5},  # above the point estimate
        {"target_fpr": True},
    ],
)
def test_a_damaged_promise_is_ignored_not_trusted(change):
    record = threshold_from_scores(np.arange(20.0), np.arange(20.0), target_fpr=TARGET)
    assert calibration.stored_promise(record) is not None
    assert calibration.stored_promise({**record, **change}) is None


def test_banks_without_a_promise_have_none():
    old = {"image_threshold": 19.0, "image_std": 1.1, "pixel_threshold": 2.0, "rule": "mean + 3 * std"}
    assert calibration.stored_promise(old) is None


@pytest.mark.parametrize(("k", "n"), [(0, 20), (1, 20), (5, 476), (19, 20), (20, 20), (0, 1)])
def test_binomial_interval_is_clopper_pearson(k, n):
    exact = stats.binomtest(k, n).proportion_ci(confidence_level=0.95, method="exact")
    assert binomial_interval(k, n) == pytest.approx((exact.low, exact.high))


def test_binomial_interval_edges():
    low, high = binomial_interval(0, 20)
    assert low == 0.0 and high == pytest.approx(1 - 0.025 ** (1 / 20))
    assert all(math.isnan(v) for v in binomial_interval(0, 0))
    with pytest.raises(ValueError):
        binomial_interval(3, 2)


# --- the promise in a bank ----------------------------------------------------------------------------

OLD_RECORD_KEYS = (  # the calibration record banks were written with before target FPR
    "rule",
    "n_images",
    "threshold_sigma",
    "image_threshold",
    "image_mean",
    "image_std",
    "image_max",
    "calibration_fpr",
    "pixel_threshold",
    "pixel_mean",
    "pixel_std",
)


@pytest.fixture(scope="module")
def fitted(washer):
    from patchcore_cli import config as config_mod
    from patchcore_cli.data import list_images
    from patchcore_cli.engine import fit
    from tests.conftest import TINY_CONFIG

    return fit(list_images([washer / "train" / "good"]), config_mod.build(**TINY_CONFIG))


def test_fit_stores_the_promise_and_scoring_reads_it_back(fitted, tmp_path):
    from patchcore_cli import bank as bank_io
    from patchcore_cli.config import FitConfig
    from patchcore_cli.engine import Scorer

    record, default = fitted.bank.calibration, FitConfig().target_fpr
    assert fitted.bank.config["target_fpr"] == default == record["target_fpr"]
    assert record["n_images"] == 8 == len(fitted.calibration_scores)  # every training image left out
    assert record["predicted_fpr"] == pytest.approx(default)
    assert record["predicted_fpr_low"] < default < record["predicted_fpr_high"]
    path = tmp_path / "bank.st"
    bank_io.save(fitted.bank, path)
    scorer = Scorer(bank_io.load(path))
    assert scorer.promise == calibration.stored_promise(record)
    assert scorer.promise["target_fpr"] == default and scorer.promise["n_images"] == 8


def test_an_old_bank_keeps_its_threshold_and_scores_without_a_promise(fitted, washer, tmp_path):
    from patchcore_cli import bank as bank_io
    from patchcore_cli import config as config_mod
    from patchcore_cli.data import list_images
    from patchcore_cli.engine import Scorer

    old_config = {k: v for k, v in fitted.bank.config.items() if k != "target_fpr"}
    scores = fitted.calibration_scores
    old_threshold = float(scores.mean() + 3 * scores.std(ddof=1))
    old_record = {key: fitted.bank.calibration[key] for key in OLD_RECORD_KEYS if key != "image_threshold"}
    old_record.update(image_threshold=old_threshold, threshold_sigma=3.0, rule="mean + 3 * std")
    old = bank_io.Bank(
        memory_bank=np.array(fitted.bank.memory_bank),
        config=old_config,
        calibration=old_record,
        weights_sha256=fitted.bank.weights_sha256,
        n_train_images=fitted.bank.n_train_images,
    )
    path = tmp_path / "old.st"
    bank_io.save(old, path)
    loaded = bank_io.load(path)
    assert config_mod.from_bank(loaded.config).target_fpr is None  # fitted with the mean + k std rule
    scorer = Scorer(loaded)
    assert scorer.threshold == old_threshold and scorer.promise is None
    paths = list_images([washer / "test"])
    now = Scorer(fitted.bank).score_paths(paths)
    before = scorer.score_paths(paths)
    assert [r.score for r in before] == pytest.approx([r.score for r in now])
    assert [r.anomalous for r in before] == [r.score >= old_threshold for r in before]
