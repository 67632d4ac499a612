"""Threshold calibration: good images' leave-one-out scores -> a threshold, and the false-alarm rate it
promises.

Two rules, both from good images only:
- **target FPR** (`target_fpr`, the default): the threshold that a new good image exceeds with probability
  `target_fpr`. Above the 80th percentile of the good scores the tail is modelled as exponential and
  extrapolated to the target; the promise is that model's false-positive rate at the threshold, with a
  confidence interval. An image score is a maximum over patches, and maxima of light-tailed variables
  have exponential upper tails (the Gumbel domain of extreme-value theory), so the model has a reason
  beyond fitting; docs/calibration.md has the measurements that chose it over Gaussian, log-normal,
  Gumbel, generalised Pareto and plain empirical quantiles.
- **sigma** (`target_fpr: null`): mean + k std, the rule before target FPR. Banks fitted with it keep it.

Every function here is pure numpy/scipy: sample in, numbers out.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

CONFIDENCE = 0.95
"""Two-sided confidence of every interval stated for a promised FPR."""
TAIL_FRACTION = 0.2
"""Share of the good scores the exponential tail is fitted to (the top 20 %: the model's validity range)."""


@dataclass(frozen=True)
class Promise:
    """A threshold and the FPR it promises on new good images.

    `fpr` is the predicted exceedance probability at `threshold`; `low`, `high` its `CONFIDENCE` interval
    (given the model of `method`); `n` the good scores it was fitted to.
    """

    threshold: float
    fpr: float
    low: float
    high: float
    method: str
    n: int

    def record(self) -> dict[str, float | int | str]:
        """The fields a bank's calibration record stores (see `engine.calibrate`)."""
        return {
            "predicted_fpr": self.fpr,
            "predicted_fpr_low": self.low,
            "predicted_fpr_high": self.high,
            "confidence": CONFIDENCE,
            "method": self.method,
        }


def _checked(scores: np.ndarray) -> np.ndarray:
    values = np.sort(np.asarray(scores, dtype=np.float64).ravel())
    if values.size < 2 or not np.isfinite(values).all():
        raise ValueError(f"need at least 2 finite good scores, got {values.size} values")
    return values


def _check_target(target_fpr: float) -> None:
    if not 0.0 < target_fpr < 1.0:
        raise ValueError(f"target_fpr must be strictly between 0 and 1, got {target_fpr}")


def _tail(values: np.ndarray, tail_fraction: float) -> tuple[float, np.ndarray, int]:
    """Sorted scores -> (u, excesses over u, m): u is the order statistic x_(n-m), the m scores above it
    form the tail (m = `tail_fraction` of n, at least 1 and at most n - 1)."""
    n = values.size
    m = int(min(n - 1, max(1, round(tail_fraction * n))))
    u = float(values[n - m - 1])
    return u, values[n - m :] - u, m


def _exceedance_bounds(n: int, m: int, confidence: float) -> tuple[float, float, float]:
    """P(score > x_(n-m)) for a new good score: exactly Beta(m + 1, n - m) for any continuous distribution
    (order statistics). -> (mean, low, high) at `confidence`."""
    from scipy.stats import beta

    law = beta(m + 1, n - m)
    tail = (1.0 - confidence) / 2
    return float(law.mean()), float(law.ppf(tail)), float(law.ppf(1.0 - tail))


def _scale_bounds(mean_excess: float, m: int, confidence: float) -> tuple[float, float]:
    """Exponential excesses: 2 m mean / scale ~ chi2(2 m), so the scale's `confidence` interval."""
    from scipy.stats import chi2

    tail = (1.0 - confidence) / 2
    total = 2.0 * m * mean_excess
    return total / float(chi2.ppf(1.0 - tail, 2 * m)), total / float(chi2.ppf(tail, 2 * m))


def tail_fpr(
    scores: np.ndarray, threshold: float, tail_fraction: float = TAIL_FRACTION
) -> tuple[float, float, float]:
    """The exponential-tail model's FPR at `threshold`, fitted to N good scores -> (fpr, low, high).

    Model: above u = x_(n-m) the scores are u + Exponential(scale). The exceedance probability of u has
    the distribution-free law Beta(m + 1, n - m); given u, the m excesses are i.i.d. exponential, so
    2 m mean excess / scale ~ chi2(2 m), independently.
    - `fpr` is the predictive probability that a new good score reaches `threshold`, averaged over what
      the m excesses leave unknown about the scale. A new excess divided by the mean excess has a law
      free of the scale, with survival (1 + x / m)^-m, so fpr = P(> u) (1 + d / (m mean excess))^-m for
      d = threshold - u. A threshold set where `fpr` equals a target therefore has an expected FPR of
      exactly that target when the tail is exponential; the plain plug-in P(> u) exp(-d / mean excess)
      would be too low on average.
    - (`low`, `high`) is an interval for the true FPR at `threshold`: each factor gets a sqrt(CONFIDENCE)
      interval, and since P(> u) exp(-d / scale) rises with both, the pair holds with CONFIDENCE.
    Below u the model does not apply: the FPR there is the empirical one (see `empirical_fpr`).
    """
    values = _checked(scores)
    u, excesses, m = _tail(values, tail_fraction)
    if threshold <= u:
        return empirical_fpr(values, threshold)
    part = math.sqrt(CONFIDENCE)
    above_u, above_low, above_high = _exceedance_bounds(values.size, m, part)
    mean_excess = float(excesses.mean())
    if mean_excess <= 0.0:  # the whole tail is tied at u: nothing above it was ever seen
        return 0.0, 0.0, above_high
    scale_low, scale_high = _scale_bounds(mean_excess, m, part)
    distance = threshold - u
    return (
        above_u * (1.0 + distance / (m * mean_excess)) ** -m,
        above_low * math.exp(-distance / scale_low),
        above_high * math.exp(-distance / scale_high),
    )


def empirical_fpr(scores: np.ndarray, threshold: float) -> tuple[float, float, float]:
    """Distribution-free FPR at `threshold` from N good scores -> (fpr, low, high).

    With j of the n scores >= `threshold`, the threshold sits at order statistic n - j + 1, whose
    exceedance by a new score is Beta(j, n + 1 - j): its mean (j / (n + 1)) and CONFIDENCE interval. With
    no score at or above it, j = 0: the estimate is 0 and only the upper bound (1 - Beta(1, n)'s quantile)
    says something.
    """
    from scipy.stats import beta

    values = _checked(scores)
    n = values.size
    j = int(n - np.searchsorted(values, threshold, side="left"))
    tail = (1.0 - CONFIDENCE) / 2
    if j == 0:
        return 0.0, 0.0, float(beta(1, n).ppf(1.0 - tail))
    law = beta(j, n + 1 - j)
    return float(law.mean()), float(law.ppf(tail)), float(law.ppf(1.0 - tail))


def target_fpr_threshold(
    scores: np.ndarray, target_fpr: float, tail_fraction: float = TAIL_FRACTION
) -> Promise:
    """The threshold whose predicted FPR on new good images is `target_fpr`, from N good scores.

    When the target lies inside the modelled tail (below the share of scores above u), the exponential
    tail is solved for it: t = u + mean excess * m ((P(> u) / target)^(1/m) - 1), where `tail_fpr`'s
    predictive FPR equals the target, so that the FPR averaged over the draw of good images is the
    target. A larger target is read from the scores themselves: the order statistic x_(k),
    k = ceil((n + 1)(1 - target)), whose exceedance is distribution-free (conformal) with mean at most
    the target.
    """
    _check_target(target_fpr)
    values = _checked(scores)
    n = values.size
    u, excesses, m = _tail(values, tail_fraction)
    above_u = _exceedance_bounds(n, m, CONFIDENCE)[0]
    if target_fpr < above_u:
        # The predictive FPR of `tail_fpr` solved for the target.
        threshold = u + float(excesses.mean()) * m * ((above_u / target_fpr) ** (1.0 / m) - 1.0)
        if threshold <= u:  # a tied tail: flag only what lies above every good score seen
            threshold = float(np.nextafter(values[-1], math.inf))
        fpr, low, high = tail_fpr(values, threshold, tail_fraction)
        method = f"exponential tail over the top {round(100 * tail_fraction)} % of good scores"
    else:
        k = min(n, math.ceil((n + 1) * (1.0 - target_fpr)))
        threshold = float(values[k - 1])
        fpr, low, high = empirical_fpr(values, threshold)
        method = "empirical quantile of good scores"
    return Promise(float(threshold), fpr, low, high, method, n)


def sigma_threshold(scores: np.ndarray, k: float) -> Promise:
    """mean + k std (ddof 1) of N good scores, with the FPR the exponential tail model predicts there."""
    values = _checked(scores)
    threshold = float(values.mean() + k * values.std(ddof=1))
    fpr, low, high = tail_fpr(values, threshold)
    return Promise(
        threshold, fpr, low, high, f"mean + {k:g} std; FPR from the exponential tail model", n=values.size
    )


def stored_promise(record: Mapping[str, Any]) -> dict[str, Any] | None:
    """The promise in a bank's calibration record, as plain data; None when the bank has none (fitted
    before promises were stored) or what it holds is not a valid one (a bank file is untrusted input).

    -> {"target_fpr": float or None, "predicted_fpr", "low", "high", "confidence", "method", "n_images"}.
    """
    rates = [record.get(key) for key in ("predicted_fpr", "predicted_fpr_low", "predicted_fpr_high")]
    target, confidence = record.get("target_fpr"), record.get("confidence")
    if not all(_is_rate(value) for value in (*rates, confidence)) or not (target is None or _is_rate(target)):
        return None
    if not rates[1] <= rates[0] <= rates[2]:
        return None
    method, n = record.get("method"), record.get("n_images")
    return {
        "target_fpr": None if target is None else float(target),
        "predicted_fpr": float(rates[0]),
        "low": float(rates[1]),
        "high": float(rates[2]),
        "confidence": float(confidence),
        "method": method if isinstance(method, str) else "",
        "n_images": n if isinstance(n, int) and not isinstance(n, bool) else None,
    }


def _is_rate(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and 0.0 <= value <= 1.0
