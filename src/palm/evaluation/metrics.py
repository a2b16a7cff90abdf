"""Every statistic the project reports about a set of predictions: the one scoring function.

:func:`score` turns labels and PM probabilities into the flat dictionary of
``metrics/eval.json`` (and of the training holdout, and of cross-validation):

- at the threshold: accuracy, sensitivity, specificity, precision (PPV), NPV, F1, the
  confusion matrix;
- threshold-free: ROC AUC, log loss, Brier score, expected calibration error (ECE);
- operating characteristics: sensitivity at specificity 0.90 / 0.95, specificity at
  sensitivity 0.90 / 0.95 (read off the empirical ROC curve);
- PPV and NPV at a given prevalence (Bayes' rule from sensitivity and specificity), next to
  the raw ones, whose prevalence is the data set's;
- 95% confidence intervals (``<key>_ci_low`` / ``<key>_ci_high``): for the proportions
  (accuracy, sensitivity, specificity, precision, NPV) the *Wilson score* interval
  (``scipy.stats.binomtest``), which stays honest at 0 or 100% (46 of 46: [0.923, 1], where
  a percentile bootstrap collapses to [1, 1]); for the PPV/NPV at a prevalence, Bayes' rule
  at the ends of the Wilson intervals of sensitivity and specificity (both rise with each,
  so the ends bound them; conservative); for F1, ROC AUC and Brier the *stratified
  bootstrap*: ``n_boot`` resamples (default 2000, fixed seed) that draw, with replacement,
  as many PM and as many non-PM images as the data has, so every resample keeps its class
  mix; percentile intervals. Vectorised (resample counts times per-image indicators), so
  2000 resamples of 400 predictions take well under a second.

:func:`choose_threshold` turns a rule (``youden``, ``sensitivity>=0.95``,
``specificity>=0.90``) or a number into the operating threshold.
"""

from __future__ import annotations

import math

import numpy as np

from palm.core.errors import DataError
from palm.core.params import DEFAULT_THRESHOLD, parse_threshold  # noqa: F401  (the threshold grammar: palm.core.params)

N_BOOT = 2000
BOOT_SEED = 0
ECE_BINS = 10
# PM prevalence of a screening population: population studies put it at 0.9-3.1%
# (Wong et al., Am J Ophthalmol 2014;157:9-25, a systematic review); 2% is in that range.
DEFAULT_PREVALENCE = 0.02

INTERVAL_KEYS = (
    "accuracy",
    "sensitivity",
    "specificity",
    "precision",
    "npv",
    "f1",
    "auc",
    "brier",
    "ppv_at_prevalence",
    "npv_at_prevalence",
)
WILSON_KEYS = ("accuracy", "sensitivity", "specificity", "precision", "npv")
BOOTSTRAP_KEYS = ("f1", "auc", "brier")


def wilson_interval(successes: int, n: int, level: float = 0.95) -> tuple[float | None, float | None]:
    """The Wilson score interval of a proportion ``successes / n`` (``(None, None)`` when n is 0)."""
    from scipy.stats import binomtest

    if n <= 0:
        return None, None
    ci = binomtest(int(successes), int(n)).proportion_ci(confidence_level=level, method="wilson")
    return float(ci.low), float(ci.high)


def _div(a, b):
    """a / b elementwise, 0 where b is 0 (scikit-learn's ``zero_division=0``: the precision of
    no PM prediction is 0)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return np.where(b > 0, a / np.where(b > 0, b, 1), 0.0)


def _counts_metrics(tp, fp, tn, fn, prevalence: float) -> dict:
    """Threshold metrics from confusion counts (scalars or arrays of resamples)."""
    sens, spec = _div(tp, tp + fn), _div(tn, tn + fp)
    prec = _div(tp, tp + fp)
    pv_pos = _div(sens * prevalence, sens * prevalence + (1 - spec) * (1 - prevalence))
    pv_neg = _div(spec * (1 - prevalence), spec * (1 - prevalence) + (1 - sens) * prevalence)
    return {
        "accuracy": _div(tp + tn, tp + tn + fp + fn),
        "sensitivity": sens,
        "specificity": spec,
        "precision": prec,
        "npv": _div(tn, tn + fn),
        "f1": _div(2 * tp, 2 * tp + fp + fn),
        "ppv_at_prevalence": pv_pos,
        "npv_at_prevalence": pv_neg,
    }


def calibration_bins(probs, n_bins: int = ECE_BINS) -> np.ndarray:
    """The bin (0 .. n_bins-1) of each probability among ``n_bins`` equal-width bins of [0, 1]:
    scikit-learn's ``calibration_curve`` binning (``strategy="uniform"``), which draws dvclive's
    calibration plot (``dvc plots``): a probability on an edge goes to the lower bin
    (``[0, 0.1], (0.1, 0.2], ..., (0.9, 1]``), so ECE, the report and ``dvc plots`` agree."""
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    return np.searchsorted(edges[1:-1], np.asarray(probs, dtype=np.float64))


def reliability_table(labels, probs, n_bins: int = ECE_BINS) -> list[dict]:
    """Per non-empty bin (:func:`calibration_bins`): its range, mean predicted probability,
    observed fraction of PM, count."""
    labels = np.asarray(labels, dtype=np.float64)
    probs = np.asarray(probs, dtype=np.float64)
    bins = calibration_bins(probs, n_bins)
    rows = []
    for b in range(n_bins):
        inside = bins == b
        if inside.any():
            rows.append(
                {
                    "bin_low": b / n_bins,
                    "bin_high": (b + 1) / n_bins,
                    "mean_probability": float(probs[inside].mean()),
                    "fraction_pm": float(labels[inside].mean()),
                    "count": int(inside.sum()),
                }
            )
    return rows


def expected_calibration_error(labels, probs, n_bins: int = ECE_BINS) -> float:
    """ECE: sum over the non-empty bins of :func:`reliability_table` of (bin share) x |mean
    probability - fraction of PM| (Guo et al. 2017)."""
    n = len(np.asarray(probs))
    return float(
        sum(
            r["count"] / n * abs(r["mean_probability"] - r["fraction_pm"])
            for r in reliability_table(labels, probs, n_bins)
        )
    )


def sensitivity_at_specificity(labels, probs, target: float) -> float:
    """The highest sensitivity of any threshold whose specificity is at least ``target``."""
    from sklearn.metrics import roc_curve

    fpr, tpr, _ = roc_curve(labels, probs)
    ok = (1 - fpr) >= target - 1e-12
    return float(tpr[ok].max()) if ok.any() else 0.0


def specificity_at_sensitivity(labels, probs, target: float) -> float:
    """The highest specificity of any threshold whose sensitivity is at least ``target``."""
    from sklearn.metrics import roc_curve

    fpr, tpr, _ = roc_curve(labels, probs)
    ok = tpr >= target - 1e-12
    return float((1 - fpr[ok]).max()) if ok.any() else 0.0


def choose_threshold(labels, probs, rule) -> float:
    """The threshold (``probability >= threshold`` is PM) that ``rule`` picks on these predictions.

    - a number: itself;
    - ``youden``: the threshold maximising sensitivity + specificity - 1 (Youden's J);
    - ``sensitivity>=X``: the highest threshold whose sensitivity is at least X (so the most
      specific one that reaches it);
    - ``specificity>=X``: the lowest threshold whose specificity is at least X.

    Thresholds are the predicted probabilities themselves (those of ``roc_curve``). Never
    call this on the validation set: the numbers reported on it would be optimistic.
    """
    from sklearn.metrics import roc_curve

    rule = parse_threshold(rule)
    if isinstance(rule, float):
        return rule
    labels = np.asarray(labels).astype(int)
    if len(set(labels.tolist())) != 2:
        raise DataError(f"threshold rule {rule!r} needs PM and non-PM images to choose on")
    fpr, tpr, thr = roc_curve(labels, np.asarray(probs, dtype=np.float64), drop_intermediate=False)
    thr = np.minimum(thr, 1.0)  # the first, "predict nothing", threshold is inf
    if rule == "youden":
        i = int(np.argmax(tpr - fpr))  # first maximum: the highest threshold of the ties
    else:
        what, target = rule.split(">=")
        target = float(target)
        ok = (
            np.flatnonzero(tpr >= target - 1e-12)
            if what == "sensitivity"
            else np.flatnonzero(1 - fpr >= target - 1e-12)
        )
        if not len(ok):
            raise DataError(f"no threshold reaches {rule} on these predictions")
        i = int(ok[0]) if what == "sensitivity" else int(ok[-1])
    return float(thr[i])


def _bootstrap(
    labels: np.ndarray, probs: np.ndarray, pred: np.ndarray, prevalence: float, n_boot: int, seed: int
) -> dict[str, np.ndarray]:
    """Each metric of ``INTERVAL_KEYS`` on ``n_boot`` stratified resamples."""
    rng = np.random.default_rng(seed)
    pos, neg = np.flatnonzero(labels == 1), np.flatnonzero(labels == 0)
    # how many times each PM (non-PM) image is drawn in each resample: (n_boot, n_pos) and (n_boot, n_neg)
    cpos = rng.multinomial(len(pos), np.full(len(pos), 1 / len(pos)), size=n_boot).astype(np.float64)
    cneg = rng.multinomial(len(neg), np.full(len(neg), 1 / len(neg)), size=n_boot).astype(np.float64)
    tp = cpos @ pred[pos]
    fp = cneg @ pred[neg]
    out = _counts_metrics(tp, fp, len(neg) - fp, len(pos) - tp, prevalence)
    # AUC of a resample: weighted share of (PM, non-PM) pairs ranked right, ties count one half
    pp, pn = probs[pos], probs[neg]
    kernel = (pp[:, None] > pn[None, :]) + 0.5 * (pp[:, None] == pn[None, :])
    out["auc"] = np.einsum("bi,ij,bj->b", cpos, kernel, cneg) / (len(pos) * len(neg))
    sq = (probs - labels) ** 2
    out["brier"] = (cpos @ sq[pos] + cneg @ sq[neg]) / len(labels)
    return out


def score(
    labels,
    probs,
    threshold: float = DEFAULT_THRESHOLD,
    prevalence: float = DEFAULT_PREVALENCE,
    n_boot: int = N_BOOT,
    seed: int = BOOT_SEED,
) -> dict:
    """All reported metrics of PM probabilities ``probs`` against 0/1 ``labels``, as a flat dict.

    ``n_boot=0`` skips the confidence intervals (the training holdout, every epoch). AUC,
    specificity and the operating characteristics need both classes (else ``None``); a ratio
    whose denominator is 0 (precision with no PM prediction) is 0, as scikit-learn's.
    """
    from sklearn.metrics import brier_score_loss, log_loss, roc_auc_score

    labels = np.asarray(labels).astype(int)
    probs = np.asarray(probs, dtype=np.float64)
    if labels.shape != probs.shape or labels.ndim != 1 or not len(labels):
        raise DataError(f"score: need as many labels as probabilities, got {labels.shape} and {probs.shape}")
    if not 0 < prevalence < 1:
        raise DataError(f"prevalence must be in (0, 1), got {prevalence}")
    pred = (probs >= threshold).astype(np.float64)
    tp = int(((pred == 1) & (labels == 1)).sum())
    fp = int(((pred == 1) & (labels == 0)).sum())
    tn = int(((pred == 0) & (labels == 0)).sum())
    fn = int(((pred == 0) & (labels == 1)).sum())
    both = len(set(labels.tolist())) == 2

    def num(x):
        x = float(x)
        return None if math.isnan(x) else x

    out = {k: num(v) for k, v in _counts_metrics(tp, fp, tn, fn, prevalence).items()}
    if tn + fp == 0:
        out["specificity"] = None
    out.update(
        {
            "auc": float(roc_auc_score(labels, probs)) if both else None,
            "loss": float(log_loss(labels, np.clip(probs, 1e-7, 1 - 1e-7), labels=[0, 1])),
            "brier": float(brier_score_loss(labels, probs, pos_label=1)),
            "ece": expected_calibration_error(labels, probs),
        }
    )
    for pct in (90, 95):  # keys without a dot, which dvc would read as nesting
        out[f"sensitivity_at_specificity_{pct}"] = (
            sensitivity_at_specificity(labels, probs, pct / 100) if both else None
        )
        out[f"specificity_at_sensitivity_{pct}"] = (
            specificity_at_sensitivity(labels, probs, pct / 100) if both else None
        )
    if n_boot and both:
        ci = {}
        boot = _bootstrap(labels, probs, pred, prevalence, int(n_boot), int(seed))
        for key in BOOTSTRAP_KEYS:
            values = boot[key][~np.isnan(boot[key])]
            ci[key] = tuple(num(v) for v in np.percentile(values, [2.5, 97.5])) if len(values) else (None, None)
        for key, (k, n) in {
            "accuracy": (tp + tn, tp + tn + fp + fn),
            "sensitivity": (tp, tp + fn),
            "specificity": (tn, tn + fp),
            "precision": (tp, tp + fp),
            "npv": (tn, tn + fn),
        }.items():
            ci[key] = wilson_interval(k, n)
        ends = []
        for sens, spec in zip(ci["sensitivity"], ci["specificity"]):  # PPV, NPV rise with both
            ends.append(
                {
                    "ppv": num(_div(sens * prevalence, sens * prevalence + (1 - spec) * (1 - prevalence))),
                    "npv": num(_div(spec * (1 - prevalence), spec * (1 - prevalence) + (1 - sens) * prevalence)),
                }
            )
        ci["ppv_at_prevalence"] = (ends[0]["ppv"], ends[1]["ppv"])
        ci["npv_at_prevalence"] = (ends[0]["npv"], ends[1]["npv"])
        for key in INTERVAL_KEYS:
            out[f"{key}_ci_low"], out[f"{key}_ci_high"] = ci[key]
    out.update(
        {
            "n": int(len(labels)),
            "n_pm": int(labels.sum()),
            "threshold": float(threshold),
            "prevalence": float(prevalence),
            "prevalence_observed": float(labels.mean()),
            "ci_method": f"95%: Wilson score for {', '.join(WILSON_KEYS)}; Bayes at the Wilson ends of sensitivity "
            f"and specificity for ppv/npv_at_prevalence; stratified bootstrap ({int(n_boot)} resamples, "
            f"seed {int(seed)}, percentile) for {', '.join(BOOTSTRAP_KEYS)}"
            if n_boot and both
            else "none",
            "tp": tp,
            "fp": fp,
            "tn": tn,
            "fn": fn,
        }
    )
    return out
