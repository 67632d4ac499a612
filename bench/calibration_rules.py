"""Compare threshold calibration rules offline, on the files `bench/calibration_collect.py` writes.

    PYTHONPATH=. python bench/calibration_rules.py RUNS_DIR [--target 0.01 --target 0.02]

Prints markdown (the tables of docs/calibration.md):
1. per dataset, the chosen rule at three targets beside the old default and the oracle; then every rule
   fitted to the leave-one-out (LOO) scores of ALL training images: the threshold,
   the FPR it promises, the FPR measured on the good test images (k/N with a Clopper-Pearson 95 %
   interval), TPR, balanced accuracy and F1, beside the old default (mean + 3 std of a seeded sample of
   50 images, exactly as fit drew it) and the oracle F1-max threshold;
2. the rules checked against held-out LOO scores: n images drawn as the calibration sample, the FPR
   measured on all the others, over many draws (the mean, and how often it exceeds 2x the target);
3. the bias of LOO scores against good test scores;
4. the same rules for the pixel threshold: map maxima of good test images against LOO map maxima.

With --simulate (RUNS_DIR is then ignored), the chosen rule on samples drawn from known laws instead.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
from scipy import stats

from patchcore_cli import calibration
from patchcore_cli.config import FitConfig
from patchcore_cli.metrics import binomial_interval, f1_max_threshold, thresholded_metrics

OLD_SAMPLE = 50  # the calibration_images default before target FPR
SEED = 42  # fit's default seed, which drew that sample
DRAWS = 400


def _gauss(x: np.ndarray, a: float) -> float:
    return float(x.mean() + stats.norm.isf(a) * x.std(ddof=1))


def _lognormal(x: np.ndarray, a: float) -> float:
    logs = np.log(x)
    return float(np.exp(logs.mean() + stats.norm.isf(a) * logs.std(ddof=1)))


def _gumbel(x: np.ndarray, a: float) -> float:
    scale = x.std(ddof=1) * math.sqrt(6) / math.pi  # method of moments
    location = x.mean() - np.euler_gamma * scale
    return float(location - scale * math.log(-math.log1p(-a)))


def _empirical(x: np.ndarray, a: float) -> float:
    """Conformal order statistic; above the largest score when n is too small to reach the target."""
    k = math.ceil((len(x) + 1) * (1 - a))
    return float(np.sort(x)[k - 1]) if k <= len(x) else float(np.nextafter(x.max(), math.inf))


def _gpd(x: np.ndarray, a: float, fraction: float = 0.2) -> float:
    values = np.sort(x)
    m = max(3, round(fraction * len(values)))
    u = values[-m - 1]
    shape, _, scale = stats.genpareto.fit(values[-m:] - u, floc=0)
    above = (m + 1) / (len(values) + 1)
    return float(u + stats.genpareto.isf(a / above, shape, 0, scale)) if a < above else _empirical(x, a)


def _exp_tail(fraction: float) -> Callable[[np.ndarray, float], float]:
    return lambda x, a: calibration.target_fpr_threshold(x, a, fraction).threshold


RULES: dict[str, Callable[[np.ndarray, float], float]] = {
    "mean + 3 std": lambda x, a: float(x.mean() + 3 * x.std(ddof=1)),
    "Gaussian quantile": _gauss,
    "log-normal quantile": _lognormal,
    "Gumbel (moments)": _gumbel,
    "empirical (conformal)": _empirical,
    "GPD tail, top 20 %": _gpd,
    "exponential tail, top 10 %": _exp_tail(0.1),
    "exponential tail, top 20 % (chosen)": _exp_tail(0.2),
    "exponential tail, top 30 %": _exp_tail(0.3),
}


def load(folder: Path) -> list[dict]:
    order = {"bottle": 0, "capsule": 1, "magnetic_tile": 2}
    runs = [json.loads(path.read_text()) for path in sorted(folder.glob("*.json"))]
    return sorted(runs, key=lambda r: (order.get(r["dataset"], 3), r["dataset"]))


def seeded_sample(loo: np.ndarray, size: int) -> np.ndarray:
    """The LOO scores fit uses with `calibration_images` = size: its seeded sample (engine.leave_one_out).

    A left-out image's score does not depend on which others are left out, so this is exactly what fit
    computes.
    """
    chosen = np.sort(np.random.default_rng(SEED).permutation(len(loo))[:size])
    return loo[chosen]


def interval(k: int, n: int) -> str:
    low, high = binomial_interval(k, n)
    return f"{k}/{n} = {k / n:.3f} [{low:.3f}, {high:.3f}]"


def summary_table(runs: list[dict], targets: tuple[float, ...]) -> list[str]:
    """Per dataset: the old default, the new default exactly as fit computes it (seeded sample of at most
    `calibration_images` images), the chosen rule on every LOO score at each target, and the oracle.

    The promised FPR of a target-FPR row is what the bank stores; for the old rule, the tail model's FPR
    at its threshold, fitted to every LOO score.
    """
    default = FitConfig()
    lines = [
        "| dataset | threshold rule | LOO images | promised FPR [95 % CI] | "
        "measured FPR, good test images [95 % CI] | TPR | BA | F1 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for run in runs:
        loo = np.array(run["loo_scores"])
        labels = np.array([t["label"] for t in run["test"]])
        scores = np.array([t["score"] for t in run["test"]])
        n_good = int((labels == 0).sum())
        old = seeded_sample(loo, OLD_SAMPLE)
        old_threshold = float(old.mean() + 3 * old.std(ddof=1))
        rows = [("mean + 3 std (old default)", len(old), old_threshold, _promised(loo, old_threshold))]
        shipped = seeded_sample(loo, default.calibration_images)
        promise = calibration.target_fpr_threshold(shipped, default.target_fpr)
        rows.append(
            (
                f"target FPR {default.target_fpr:g} (new default)",
                len(shipped),
                promise.threshold,
                _text(promise),
            )
        )
        for target in targets:
            promise = calibration.target_fpr_threshold(loo, target)
            rows.append((f"target FPR {target:g}", len(loo), promise.threshold, _text(promise)))
        rows.append(("oracle F1-max (test labels)", 0, f1_max_threshold(labels, scores)[0], ""))
        for name, count, threshold, promised in rows:
            m = thresholded_metrics(labels, scores, threshold)
            lines.append(
                f"| {run['dataset']} | {name} | {count or ''} | {promised} | {interval(m['fp'], n_good)} | "
                f"{m['tpr']:.3f} | {m['balanced_accuracy']:.3f} | {m['f1']:.3f} |"
            )
    return [*lines, ""]


def _text(promise: calibration.Promise) -> str:
    return f"{promise.fpr:.4f} [{promise.low:.4f}, {promise.high:.4f}]"


def verdict_table(run: dict, target: float) -> list[str]:
    loo = np.array(run["loo_scores"])
    labels = np.array([t["label"] for t in run["test"]])
    scores = np.array([t["score"] for t in run["test"]])
    n_good = int((labels == 0).sum())
    lines = [
        f"#### {run['dataset']}: {len(loo)} LOO scores, {n_good} good and {int(labels.sum())} defective "
        f"test images, target FPR {target:g}",
        "",
        "| rule | threshold | promised FPR [95 % CI] | measured FPR, good test images [95 % CI] "
        "| TPR | BA | F1 |",
        "|---|---|---|---|---|---|---|",
    ]
    rows: list[tuple[str, float, str]] = []
    sample = seeded_sample(loo, OLD_SAMPLE)
    old = float(sample.mean() + 3 * sample.std(ddof=1))
    rows.append(("old default: mean + 3 std, 50 images", old, _promised(loo, old)))
    for name, rule in RULES.items():
        threshold = rule(loo, target)
        rows.append((name, threshold, _promised(loo, threshold)))
    oracle, _ = f1_max_threshold(labels, scores)
    rows.append(("oracle F1-max (test labels)", oracle, ""))
    for name, threshold, promised in rows:
        m = thresholded_metrics(labels, scores, threshold)
        lines.append(
            f"| {name} | {threshold:.4f} | {promised} | {interval(m['fp'], n_good)} | {m['tpr']:.3f} | "
            f"{m['balanced_accuracy']:.3f} | {m['f1']:.3f} |"
        )
    return [*lines, ""]


def _promised(loo: np.ndarray, threshold: float) -> str:
    """The exponential tail model's FPR at a threshold, fitted to all LOO scores."""
    fpr, low, high = calibration.tail_fpr(loo, threshold)
    return f"{fpr:.4f} [{low:.4f}, {high:.4f}]"


def held_out_table(runs: list[dict], target: float, sizes: tuple[int, ...]) -> list[str]:
    """Each rule on n drawn LOO scores, the FPR measured on all the dataset's other LOO scores."""
    rng = np.random.default_rng(0)
    sizes = tuple(dict.fromkeys(sizes))
    header = " | ".join(f"n = {n}" for n in sizes)
    lines = [
        f"Mean measured FPR on held-out LOO scores (target {target:g}); in brackets, the share of "
        f"{DRAWS} draws whose measured FPR exceeds {2 * target:g}.",
        "",
        f"| dataset | rule | {header} |",
        "|---|---|" + "---|" * len(sizes),
    ]
    for run in runs:
        loo = np.array(run["loo_scores"])
        usable = [n for n in sizes if len(loo) - n >= 100]
        if not usable:
            continue
        for name, rule in RULES.items():
            cells = []
            for n in sizes:
                if n not in usable:
                    cells.append("")
                    continue
                measured = []
                for _ in range(DRAWS):
                    order = rng.permutation(len(loo))
                    threshold = rule(loo[order[:n]], target)
                    measured.append(float((loo[order[n:]] >= threshold).mean()))
                measured = np.array(measured)
                cells.append(f"{measured.mean():.4f} ({(measured > 2 * target).mean():.2f})")
            lines.append(f"| {run['dataset']} | {name} | " + " | ".join(cells) + " |")
    return [*lines, ""]


def bias_table(runs: list[dict]) -> list[str]:
    lines = [
        "| dataset | LOO mean ± std | good test mean ± std | shift (LOO std) | KS p | "
        "good test above LOO 90 % / 95 % / 99 % quantile |",
        "|---|---|---|---|---|---|",
    ]
    for run in runs:
        loo = np.array(run["loo_scores"])
        good = np.array([t["score"] for t in run["test"] if t["label"] == 0])
        shift = (good.mean() - loo.mean()) / loo.std(ddof=1)
        above = []
        for q in (0.90, 0.95, 0.99):
            k = int((good >= np.quantile(loo, q)).sum())
            above.append(f"{k / len(good):.3f} (expect {1 - q:.2f})")
        lines.append(
            f"| {run['dataset']} | {loo.mean():.3f} ± {loo.std(ddof=1):.3f} | "
            f"{good.mean():.3f} ± {good.std(ddof=1):.3f} | {shift:+.2f} | "
            f"{stats.ks_2samp(loo, good).pvalue:.3f} | {' / '.join(above)} |"
        )
    return [*lines, ""]


def pixel_table(runs: list[dict], target: float) -> list[str]:
    lines = [
        "| dataset | pixel threshold rule | good test images with any pixel flagged [95 % CI] |",
        "|---|---|---|",
    ]
    for run in runs:
        loo = np.array(run["loo_map_maxima"])
        good = np.array([t["map_max"] for t in run["test"] if t["label"] == 0])
        for name, threshold in (
            ("mean + 3 std", float(loo.mean() + 3 * loo.std(ddof=1))),
            (f"target FPR {target:g}", calibration.target_fpr_threshold(loo, target).threshold),
        ):
            lines.append(
                f"| {run['dataset']} | {name} | {interval(int((good >= threshold).sum()), len(good))} |"
            )
    return [*lines, ""]


SIMULATED = {
    "Gumbel": stats.gumbel_r(),
    "exponential": stats.expon(),
    "Gaussian": stats.norm(),
    "log-normal, sigma 0.5": stats.lognorm(0.5),
    "log-normal, sigma 1": stats.lognorm(1.0),
    "Student t, 5 d.o.f.": stats.t(5),
}


def simulation_table(
    target: float, sizes: tuple[int, ...] = (50, 75, 200, 500), draws: int = 400
) -> list[str]:
    """The chosen rule on samples from known laws: the true FPR of its threshold (mean over draws, and
    the share above twice the target) and how often the stated interval covers the true FPR."""
    rng = np.random.default_rng(1)
    lines = [
        f"True FPR of the threshold for target {target:g}, {draws} draws per cell: mean (share above "
        f"{2 * target:g}; interval coverage).",
        "",
        "| law | " + " | ".join(f"n = {n}" for n in sizes) + " |",
        "|---|" + "---|" * len(sizes),
    ]
    for name, law in SIMULATED.items():
        cells = []
        for n in sizes:
            fprs, covered = [], 0
            for _ in range(draws):
                promise = calibration.target_fpr_threshold(law.rvs(n, random_state=rng), target)
                fpr = float(law.sf(promise.threshold))
                fprs.append(fpr)
                covered += promise.low <= fpr <= promise.high
            fprs = np.array(fprs)
            cells.append(f"{fprs.mean():.4f} ({(fprs > 2 * target).mean():.2f}; {covered / draws:.2f})")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return [*lines, ""]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", type=Path)
    parser.add_argument(
        "--target", type=float, action="append", help="repeat for several (default 0.01, 0.02)"
    )
    parser.add_argument("--simulate", action="store_true", help="only the table on simulated scores")
    args = parser.parse_args()
    targets = args.target or [0.01, 0.02]
    if args.simulate:
        for target in targets:
            print("\n".join(simulation_table(target)))
        return
    runs = load(args.runs)
    lines = ["### The new default and the chosen rule at three targets, the old default, the oracle", ""]
    lines += summary_table(runs, (0.01, 0.02, 0.05))
    for target in targets:
        lines += [f"### Every rule at target {target:g}", ""]
        for run in runs:
            lines += verdict_table(run, target)
        lines += [f"### Rules against held-out LOO scores, target {target:g}", ""]
        lines += held_out_table(runs, target, (50, FitConfig().calibration_images, 200))
    lines += ["### LOO scores against good test scores", ""]
    lines += bias_table(runs)
    lines += ["### Pixel threshold", ""]
    lines += pixel_table(runs, FitConfig().target_fpr)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
