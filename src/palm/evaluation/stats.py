"""The paired statistics of two models scored on the same images, free of git and of formatting.

Two networks that scored the **same** images make paired predictions, so their difference is
tested on the pairs, which is far more sensitive than comparing two separate 95% intervals:

- **ROC AUC**: DeLong's test for two correlated AUCs (DeLong, DeLong & Clarke-Pearson 1988),
  computed with the fast midrank algorithm of Sun & Xu (IEEE SPL 2014); normal interval and
  two-sided p-value of the difference (:func:`delong`).
- **accuracy, sensitivity, specificity** (at each run's own threshold: its 0/1 classes):
  McNemar's exact test on the discordant pairs (``scipy.stats.binomtest``, two-sided, p = 0.5),
  with Newcombe's hybrid score interval for a difference of paired proportions (Newcombe 1998,
  method 10: the Wilson intervals of the two proportions and their correlation). Sensitivity
  uses the PM images only, specificity the non-PM ones (:func:`mcnemar`).
- **Brier score, F1**: a paired, stratified bootstrap (``n_boot`` resamples, fixed seed: the
  same resampled images for both networks, as many PM and non-PM images as the data has);
  percentile interval, and the two-sided percentile p-value (twice the smaller share of
  resampled differences on either side of 0, at least 2 / (n_boot + 1)), which is below 0.05
  exactly when the interval leaves 0 out (:func:`paired_bootstrap`, :func:`bootstrap_summary`).
- **Holm's step-down correction** across a family of comparisons (:func:`holm`). A verdict is
  ``better`` / ``worse`` when ``p_adjusted < alpha``, otherwise "no difference detectable with
  n images", with roughly how many images would resolve a difference of this size (80% power
  at ``alpha``: n x ((1.96 + 0.84) x SE / |diff|)^2, SE from the interval's width, the same
  class mix assumed) (:func:`verdict`, :func:`images_needed`).
- **Seeds**: two recipes trained with the same seeds, compared on the seeds' paired differences
  (mean and a t interval over seeds: the training variance) and on the pooled predictions (the
  difference of the metric averaged over the seeds, with a paired bootstrap over images that
  resamples the same images for every seed of both: the sampling variance) (:func:`over_seeds`).

A run's predictions are anything with ``probs`` (PM probabilities) and ``pred`` (0/1 classes),
e.g. :class:`palm.evaluation.compare.runs.Run`; :func:`check_predictions` refuses impossible
numbers (a label 2, a probability 1.7 or NaN) before any test scores them.
"""

from __future__ import annotations

import math

import numpy as np

from palm.core.errors import ConfigError, DataError, listing
from palm.evaluation.metrics import BOOT_SEED, N_BOOT, _bootstrap, wilson_interval

METRICS = ("auc", "accuracy", "sensitivity", "specificity", "brier", "f1")
LOWER_IS_BETTER = {"brier"}
TESTS = {
    "auc": "DeLong",
    "accuracy": "exact McNemar",
    "sensitivity": "exact McNemar",
    "specificity": "exact McNemar",
    "brier": "paired bootstrap",
    "f1": "paired bootstrap",
}
ALPHA = 0.05
Z95 = 1.959963984540054
Z_POWER = 0.8416212335729143  # 80% power


def delong(labels, probs_a, probs_b) -> dict:
    """DeLong's test of AUC(b) - AUC(a) on the same images, by the fast midrank algorithm.

    Returns ``auc_a``, ``auc_b``, ``diff`` (b - a), ``var`` (its variance), the 95% interval
    ``ci_low``/``ci_high`` and the two-sided ``p_value``. Identical rankings give a variance
    of 0: p = 1 and the interval [0, 0].
    """
    from scipy.stats import norm, rankdata

    labels = np.asarray(labels).astype(int)
    scores = np.vstack([np.asarray(probs_a, np.float64), np.asarray(probs_b, np.float64)])
    pos, neg = labels == 1, labels == 0
    m, n = int(pos.sum()), int(neg.sum())
    if m < 2 or n < 2:
        raise DataError(f"DeLong's test needs at least 2 PM and 2 non-PM images, got {m} and {n}")
    x, y = scores[:, pos], scores[:, neg]
    tx, ty = rankdata(x, axis=1), rankdata(y, axis=1)  # midranks within each class
    tz = rankdata(np.hstack([x, y]), axis=1)  # and over all the images
    aucs = (tz[:, :m].sum(axis=1) - m * (m + 1) / 2) / (m * n)
    v10 = (tz[:, :m] - tx) / n  # per PM image: share of non-PM images ranked below it
    v01 = 1 - (tz[:, m:] - ty) / m  # per non-PM image: share of PM images ranked above it
    cov = np.cov(v10) / m + np.cov(v01) / n
    diff = float(aucs[1] - aucs[0])
    var = float(max(cov[0, 0] + cov[1, 1] - 2 * cov[0, 1], 0.0))
    if var <= 1e-15:
        p = 1.0 if abs(diff) < 1e-12 else 0.0
        half = 0.0
    else:
        p = float(2 * norm.sf(abs(diff) / math.sqrt(var)))
        half = Z95 * math.sqrt(var)
    return {
        "auc_a": float(aucs[0]),
        "auc_b": float(aucs[1]),
        "diff": diff,
        "var": var,
        "ci_low": diff - half,
        "ci_high": diff + half,
        "p_value": p,
    }


def newcombe_paired_interval(
    both: int, only_a: int, only_b: int, neither: int, level: float = 0.95
) -> tuple[float, float]:
    """Newcombe's (1998, method 10) interval for p_b - p_a, two proportions on the same subjects.

    ``both``: successes of both; ``only_a``/``only_b``: of one only; ``neither``. Hybrid score:
    the Wilson intervals of p_a and p_b combined with the correlation phi of the pairs.
    """
    n = both + only_a + only_b + neither
    if n == 0:
        return (math.nan, math.nan)
    pa, pb = (both + only_a) / n, (both + only_b) / n
    la, ua = wilson_interval(both + only_a, n, level)
    lb, ub = wilson_interval(both + only_b, n, level)
    assert la is not None and ua is not None and lb is not None and ub is not None  # n > 0: both are set
    den = (both + only_a) * (only_b + neither) * (both + only_b) * (only_a + neither)
    phi = (both * neither - only_a * only_b) / math.sqrt(den) if den > 0 else 0.0
    d = pb - pa
    lower = math.sqrt(max((pb - lb) ** 2 - 2 * phi * (pb - lb) * (ua - pa) + (ua - pa) ** 2, 0.0))
    upper = math.sqrt(max((ub - pb) ** 2 - 2 * phi * (ub - pb) * (pa - la) + (pa - la) ** 2, 0.0))
    return (d - lower, d + upper)


def mcnemar(correct_a, correct_b) -> dict:
    """McNemar's exact test of two classifiers' 0/1 ``correct`` on the same images.

    ``diff`` = share correct of b - of a, with Newcombe's paired interval; the p-value is the
    two-sided exact binomial test of the discordant pairs (b right a wrong vs a right b wrong).
    """
    from scipy.stats import binomtest

    a, b = np.asarray(correct_a, bool), np.asarray(correct_b, bool)
    both, neither = int((a & b).sum()), int((~a & ~b).sum())
    only_a, only_b = int((a & ~b).sum()), int((~a & b).sum())
    n = len(a)
    discordant = only_a + only_b
    p = float(binomtest(only_b, discordant, 0.5).pvalue) if discordant else 1.0
    low, high = newcombe_paired_interval(both, only_a, only_b, neither)
    return {
        "a": (both + only_a) / n,
        "b": (both + only_b) / n,
        "diff": (only_b - only_a) / n,
        "ci_low": low,
        "ci_high": high,
        "p_value": p,
        "only_a": only_a,
        "only_b": only_b,
        "n": n,
    }


def paired_bootstrap(
    labels, probs_a, pred_a, probs_b, pred_b, metric: str, n_boot: int = N_BOOT, seed: int = BOOT_SEED
) -> np.ndarray:
    """``metric`` (``brier``, ``f1``, ``auc``, ``accuracy``...) of b minus a on ``n_boot``
    stratified resamples, the same resampled images for both (the resampling depends on the
    labels and the seed only)."""
    labels = np.asarray(labels).astype(int)
    boot_a = _bootstrap(labels, np.asarray(probs_a, np.float64), np.asarray(pred_a, np.float64), 0.5, n_boot, seed)
    boot_b = _bootstrap(labels, np.asarray(probs_b, np.float64), np.asarray(pred_b, np.float64), 0.5, n_boot, seed)
    return np.asarray(boot_b[metric] - boot_a[metric], np.float64)


def bootstrap_summary(diff: float, boots: np.ndarray, level: float = 0.95) -> dict:
    """Percentile interval and shifted-null two-sided p-value of a bootstrap distribution."""
    boots = boots[~np.isnan(boots)]
    if not len(boots):
        return {"diff": diff, "ci_low": math.nan, "ci_high": math.nan, "p_value": math.nan}
    low, high = np.percentile(boots, [50 * (1 - level), 100 - 50 * (1 - level)])
    # two-sided percentile p-value: twice the smaller share of resamples on either side of 0,
    # so that p < 1 - level exactly when the percentile interval leaves 0 out
    below, above = int((boots <= 0).sum()), int((boots >= 0).sum())
    p = 2 * min(below + 1, above + 1) / (len(boots) + 1)
    return {"diff": diff, "ci_low": float(low), "ci_high": float(high), "p_value": float(min(p, 1.0))}


def holm(p_values) -> list[float]:
    """Holm's step-down adjusted p-values (the same order as given; NaN stays NaN)."""
    p = np.asarray(p_values, np.float64)
    out = np.full(len(p), np.nan)
    ok = np.flatnonzero(~np.isnan(p))
    order = ok[np.argsort(p[ok], kind="stable")]
    m, running = len(order), 0.0
    for i, k in enumerate(order):
        running = max(running, min(1.0, (m - i) * p[k]))
        out[k] = running
    return out.tolist()


def images_needed(diff: float, ci_low: float, ci_high: float, n: int, alpha: float = ALPHA) -> int | None:
    """Roughly how many images a paired test needs to resolve ``diff`` with 80% power (the
    standard error read off the 95% interval, scaled as 1/sqrt(n)); None for a zero difference."""
    from scipy.stats import norm

    if not all(math.isfinite(v) for v in (diff, ci_low, ci_high)) or abs(diff) < 1e-12 or ci_high <= ci_low:
        return None
    se = (ci_high - ci_low) / (2 * Z95)
    need = n * ((norm.isf(alpha / 2) + Z_POWER) * se / abs(diff)) ** 2
    return int(float(f"{need:.2g}")) if need >= 10 else int(math.ceil(need))


UNITS = {"sensitivity": "PM images", "specificity": "non-PM images"}


def verdict(
    metric: str, diff: float, p_adjusted: float, n: int, ci_low: float, ci_high: float, alpha: float = ALPHA
) -> str:
    """``better``, ``worse`` (b against a, after correction) or why no difference is detectable
    (sensitivity counts the PM images, specificity the non-PM ones)."""
    if math.isfinite(p_adjusted) and p_adjusted < alpha and diff != 0:
        good = diff < 0 if metric in LOWER_IS_BETTER else diff > 0
        return "better" if good else "worse"
    need = images_needed(diff, ci_low, ci_high, n, alpha)
    unit = UNITS.get(metric, "images")
    if need is None:
        return f"no difference detectable with {n} {unit}" + (" (identical)" if abs(diff) < 1e-12 else "")
    return f"no difference detectable with {n} {unit} (~{need:,} would resolve this size)"


# ---------------------------------------------------------------- a run's predictions


def check_predictions(labels, probs, pred=None, name: str = "predictions", images=None) -> None:
    """Refuse (:class:`DataError`, one line naming ``name`` and the first rows) labels that are
    not 0 or 1, probabilities that are not finite numbers in [0, 1], and classes (``pred``) that
    are not 0 or 1: impossible numbers that every test would otherwise score."""
    rows = list(images) if images is not None else None

    def where(bad: np.ndarray) -> str:
        idx = np.flatnonzero(bad)
        return listing([rows[i] if rows is not None else f"row {i + 1}" for i in idx], 5)

    def numbers(values, column: str) -> np.ndarray:
        try:
            return np.asarray(values, np.float64)
        except (TypeError, ValueError):
            pass
        values = list(values)
        bad = np.zeros(len(values), bool)
        for i, v in enumerate(values):
            try:
                float(v)
            except (TypeError, ValueError):
                bad[i] = True
        raise DataError(
            f"{name}: {column} holds values that are not numbers: "
            f"{listing(dict.fromkeys(repr(values[i]) for i in np.flatnonzero(bad)), 5)} ({where(bad)})"
        )

    for column, values in (("label", labels), ("predicted", pred)):
        if values is None:
            continue
        v = numbers(values, column)
        bad = ~np.isin(v, (0.0, 1.0))
        if bad.any():
            raise DataError(
                f"{name}: {column} must be 0 or 1, got {listing([f'{x:g}' for x in np.unique(v[bad])], 5)} "
                f"({where(bad)})"
            )
    p = numbers(probs, "probability")
    bad = ~np.isfinite(p) | (p < 0) | (p > 1)
    if bad.any():
        raise DataError(
            f"{name}: probability must be a number in [0, 1], got "
            f"{listing([f'{x:g}' for x in np.unique(p[bad])], 5)} ({where(bad)})"
        )


def metric_value(metric: str, labels, probs, pred) -> float:
    """A metric of one run's predictions (threshold metrics from its ``predicted`` column)."""
    from sklearn.metrics import roc_auc_score

    labels, pred = np.asarray(labels).astype(int), np.asarray(pred).astype(int)
    probs = np.asarray(probs, np.float64)
    if metric == "auc":
        return float(roc_auc_score(labels, probs)) if len(set(labels.tolist())) == 2 else math.nan
    if metric == "brier":
        return float(np.mean((probs - labels) ** 2))
    tp = int(((pred == 1) & (labels == 1)).sum())
    fp = int(((pred == 1) & (labels == 0)).sum())
    tn = int(((pred == 0) & (labels == 0)).sum())
    fn = int(((pred == 0) & (labels == 1)).sum())
    ratio = {
        "accuracy": (tp + tn, len(labels)),
        "sensitivity": (tp, tp + fn),
        "specificity": (tn, tn + fp),
        "f1": (2 * tp, 2 * tp + fp + fn),
    }[metric]
    return ratio[0] / ratio[1] if ratio[1] else math.nan


def compare_pair(metric: str, labels, a, b, n_boot: int = N_BOOT, seed: int = BOOT_SEED) -> dict:
    """One paired test of ``metric``, run b against run a (the same images, in the same order;
    ``a``, ``b``: anything with ``probs`` and ``pred``)."""
    labels = np.asarray(labels).astype(int)
    if metric == "auc":
        r = delong(labels, a.probs, b.probs)
        return {
            "value_a": r["auc_a"],
            "value_b": r["auc_b"],
            "diff": r["diff"],
            "ci_low": r["ci_low"],
            "ci_high": r["ci_high"],
            "p_value": r["p_value"],
            "test": "DeLong",
            "n": len(labels),
        }
    if metric in ("accuracy", "sensitivity", "specificity"):
        keep = {"accuracy": np.ones(len(labels), bool), "sensitivity": labels == 1, "specificity": labels == 0}[metric]
        if not keep.any():
            raise DataError(f"{metric}: no {'PM' if metric == 'sensitivity' else 'non-PM'} image to compare on")
        r = mcnemar((a.pred == labels)[keep], (b.pred == labels)[keep])
        return {
            "value_a": r["a"],
            "value_b": r["b"],
            "diff": r["diff"],
            "ci_low": r["ci_low"],
            "ci_high": r["ci_high"],
            "p_value": r["p_value"],
            "n": int(keep.sum()),
            "test": f"exact McNemar ({r['only_a']} vs {r['only_b']} discordant), Newcombe interval",
        }
    if metric in ("brier", "f1"):
        va, vb = metric_value(metric, labels, a.probs, a.pred), metric_value(metric, labels, b.probs, b.pred)
        boots = paired_bootstrap(labels, a.probs, a.pred, b.probs, b.pred, metric, n_boot, seed)
        r = bootstrap_summary(vb - va, boots)
        return {
            "value_a": va,
            "value_b": vb,
            **r,
            "n": len(labels),
            "test": f"paired bootstrap ({n_boot} resamples, seed {seed})",
        }
    raise ConfigError(f"--metric: unknown metric {metric!r} (one of {', '.join(METRICS)})")


def over_seeds(metric: str, labels, pairs, n_boot: int = N_BOOT, seed: int = BOOT_SEED) -> list[dict]:
    """Recipe b against recipe a trained with the same seeds: ``pairs`` lists each common seed's
    ``(a, b)`` runs (at least two). Two records: over seeds (t interval of the per-seed
    differences: the training variance) and pooled (the seed-averaged difference, paired
    bootstrap over images, the same resampled images for every seed: the sampling variance)."""
    from scipy import stats

    labels = np.asarray(labels).astype(int)
    diffs = np.array(
        [
            metric_value(metric, labels, b.probs, b.pred) - metric_value(metric, labels, a.probs, a.pred)
            for a, b in pairs
        ]
    )
    mean, k = float(diffs.mean()), len(diffs)
    sd = float(diffs.std(ddof=1))
    if sd > 0:
        half = float(stats.t.isf(0.025, k - 1) * sd / math.sqrt(k))
        p = float(stats.ttest_1samp(diffs, 0.0).pvalue)
    else:
        half, p = 0.0, (1.0 if mean == 0 else 0.0)
    n = int({"sensitivity": labels.sum(), "specificity": (1 - labels).sum()}.get(metric, len(labels)))
    seeds = {
        "diff": mean,
        "ci_low": mean - half,
        "ci_high": mean + half,
        "p_value": p,
        "test": f"t over {k} seeds' paired differences (training variance)",
        "n": n,
    }
    boots = np.mean(
        [paired_bootstrap(labels, a.probs, a.pred, b.probs, b.pred, metric, n_boot, seed) for a, b in pairs], axis=0
    )
    pooled = {
        **bootstrap_summary(mean, boots),
        "n": n,
        "test": f"pooled over {k} seeds, paired bootstrap over images ({n_boot} resamples; sampling variance)",
    }
    return [seeds, pooled]
