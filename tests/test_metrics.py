"""palm.evaluation.metrics: every statistic against a value computed by hand or by scikit-learn."""

from __future__ import annotations

import time

import numpy as np
import pytest
from sklearn.metrics import (
    accuracy_score,
    brier_score_loss,
    f1_score,
    log_loss,
    precision_score,
    recall_score,
    roc_auc_score,
)

from palm.core.errors import ConfigError, DataError
from palm.evaluation.metrics import (
    choose_threshold,
    expected_calibration_error,
    parse_threshold,
    reliability_table,
    score,
    sensitivity_at_specificity,
    specificity_at_sensitivity,
    wilson_interval,
)

# a known confusion matrix at 0.5: tp 3, fn 1, fp 2, tn 4
LABELS = np.array([1, 1, 1, 1, 0, 0, 0, 0, 0, 0])
PROBS = np.array([0.9, 0.8, 0.6, 0.3, 0.7, 0.55, 0.4, 0.2, 0.1, 0.05])


def test_score_on_a_known_confusion_matrix():
    m = score(LABELS, PROBS, 0.5, prevalence=0.1, n_boot=0)
    assert (m["tp"], m["fn"], m["fp"], m["tn"]) == (3, 1, 2, 4)
    assert m["accuracy"] == pytest.approx(7 / 10)
    assert m["sensitivity"] == pytest.approx(3 / 4)
    assert m["specificity"] == pytest.approx(4 / 6)
    assert m["precision"] == pytest.approx(3 / 5)
    assert m["npv"] == pytest.approx(4 / 5)
    assert m["f1"] == pytest.approx(2 * 3 / (2 * 3 + 2 + 1))
    # Bayes at 10% prevalence: PPV = .75*.1 / (.75*.1 + (1/3)*.9) = 0.2, NPV = (2/3*.9) / (2/3*.9 + .25*.1)
    assert m["ppv_at_prevalence"] == pytest.approx(0.075 / (0.075 + 0.3))
    assert m["npv_at_prevalence"] == pytest.approx(0.6 / (0.6 + 0.025))
    assert m["prevalence_observed"] == pytest.approx(0.4) and m["n_pm"] == 4
    # and the same as scikit-learn
    pred = (PROBS >= 0.5).astype(int)
    assert m["accuracy"] == pytest.approx(accuracy_score(LABELS, pred))
    assert m["precision"] == pytest.approx(precision_score(LABELS, pred))
    assert m["sensitivity"] == pytest.approx(recall_score(LABELS, pred))
    assert m["f1"] == pytest.approx(f1_score(LABELS, pred))
    assert m["auc"] == pytest.approx(roc_auc_score(LABELS, PROBS))
    # by hand: of the 4 x 6 (PM, non-PM) pairs, the PM image scores higher in 6 + 6 + 5 + 3
    assert m["auc"] == pytest.approx(20 / 24)
    assert m["loss"] == pytest.approx(log_loss(LABELS, PROBS))
    assert m["brier"] == pytest.approx(brier_score_loss(LABELS, PROBS))
    assert m["brier"] == pytest.approx(np.mean((PROBS - LABELS) ** 2))
    assert "accuracy_ci_low" not in m and m["ci_method"] == "none"


def test_ece_by_hand():
    # bins (0.1,0.2]: 0.12, 0.15 (labels 0, 1) -> |0.135 - 0.5| ; (0.9,1.0]: 0.95, 1.0 (1, 1) -> |0.975 - 1|
    labels, probs = [0, 1, 1, 1], [0.12, 0.15, 0.95, 1.0]
    assert expected_calibration_error(labels, probs) == pytest.approx(0.5 * 0.365 + 0.5 * 0.025)
    rows = reliability_table(labels, probs)
    assert [(r["count"], r["fraction_pm"]) for r in rows] == [(2, 0.5), (2, 1.0)]
    assert expected_calibration_error([0, 1], [0.0, 1.0]) == 0.0  # perfectly calibrated


def test_a_probability_on_a_bin_edge_goes_to_the_lower_bin_as_in_dvc_plots():
    """One binning: ECE and the report's reliability diagram bin as scikit-learn's calibration_curve,
    which draws dvclive's calibration plot (dvc plots)."""
    from sklearn.calibration import calibration_curve

    from palm.evaluation.metrics import calibration_bins

    assert calibration_bins([0.0, 0.1, 0.1000001, 0.5, 0.9, 1.0]).tolist() == [0, 0, 1, 4, 8, 9]
    rng = np.random.default_rng(0)
    probs = np.r_[rng.random(300), np.linspace(0, 1, 11), np.round(rng.random(100), 1)]
    labels = (rng.random(len(probs)) < probs).astype(int)
    prob_true, prob_pred = calibration_curve(labels, probs, n_bins=10, strategy="uniform")
    rows = reliability_table(labels, probs)
    assert [r["fraction_pm"] for r in rows] == pytest.approx(prob_true.tolist())
    assert [r["mean_probability"] for r in rows] == pytest.approx(prob_pred.tolist())
    counts = np.array([r["count"] for r in rows])
    assert expected_calibration_error(labels, probs) == pytest.approx(
        float(np.sum(counts / len(probs) * np.abs(prob_pred - prob_true)))
    )


def test_operating_characteristics_by_hand():
    # specificity >= 0.90 allows no false positive of the 6 non-PM (5/6 < 0.9): the threshold above
    # 0.7 catches 2 of 4 PM (0.9, 0.8)
    assert sensitivity_at_specificity(LABELS, PROBS, 0.90) == pytest.approx(0.5)
    assert sensitivity_at_specificity(LABELS, PROBS, 0.80) == pytest.approx(0.75)  # one FP allowed (0.7)
    # sensitivity >= 0.90 needs all 4 PM, down to 0.3: non-PM above it are 0.7, 0.55, 0.4 -> 3/6 specific
    assert specificity_at_sensitivity(LABELS, PROBS, 0.90) == pytest.approx(0.5)
    assert specificity_at_sensitivity(LABELS, PROBS, 0.75) == pytest.approx(5 / 6)  # down to 0.6: one FP (0.7)
    m = score(LABELS, PROBS, n_boot=0)  # and as eval.json's keys
    assert (m["sensitivity_at_specificity_90"], m["sensitivity_at_specificity_95"]) == (0.5, 0.5)
    assert (m["specificity_at_sensitivity_90"], m["specificity_at_sensitivity_95"]) == (0.5, 0.5)


def test_choose_threshold_rules():
    # Youden's J: at 0.6 sens .75 spec 5/6 (J .583); at 0.8 sens .5 spec 1 (J .5); at 0.3 sens 1 spec .5 (J .5)
    assert choose_threshold(LABELS, PROBS, "youden") == pytest.approx(0.6)
    assert choose_threshold(LABELS, PROBS, "sensitivity>=0.95") == pytest.approx(0.3)
    assert choose_threshold(LABELS, PROBS, "sensitivity>=0.7") == pytest.approx(0.6)
    assert choose_threshold(LABELS, PROBS, "specificity>=0.8") == pytest.approx(0.6)  # 5/6 specific, lowest
    assert choose_threshold(LABELS, PROBS, "specificity>=0.95") == pytest.approx(0.8)
    assert choose_threshold(LABELS, PROBS, 0.42) == 0.42
    assert choose_threshold(LABELS, PROBS, "0.3") == 0.3


@pytest.mark.parametrize("bad", ["median", "sensitivity>0.9", "sensitivity>=1.5", 0, 1.0, -0.2, True, ""])
def test_bad_threshold_settings_are_refused(bad):
    with pytest.raises(ConfigError, match="threshold"):
        parse_threshold(bad)


def test_bootstrap_intervals_are_reproducible_cover_the_estimate_and_are_fast():
    rng = np.random.default_rng(1)
    labels = np.r_[np.ones(211), np.zeros(189)].astype(int)
    probs = np.clip(labels * 0.6 + rng.normal(0.2, 0.2, len(labels)), 0, 1)
    t0 = time.perf_counter()
    m = score(labels, probs)
    assert time.perf_counter() - t0 < 5
    assert "Wilson score for accuracy" in m["ci_method"] and "stratified bootstrap (2000 resamples" in m["ci_method"]
    assert m["f1_ci_low"] < m["f1_ci_high"] and m["auc_ci_low"] < m["auc_ci_high"]
    for key in (
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
    ):
        assert m[f"{key}_ci_low"] <= m[key] <= m[f"{key}_ci_high"], key
        assert m[f"{key}_ci_low"] < m[f"{key}_ci_high"], key
    assert m == score(labels, probs)  # fixed seed
    # the proportions' intervals are Wilson's: sensitivity tp of the 211 PM images
    assert (m["sensitivity_ci_low"], m["sensitivity_ci_high"]) == pytest.approx(wilson_interval(m["tp"], 211))
    # and the bootstrap's agree with it where both apply (the accuracy, on the same resamples)
    from palm.evaluation.metrics import _bootstrap

    boot = _bootstrap(labels, probs, (probs >= 0.5).astype(float), 0.02, 2000, 0)["accuracy"]
    assert np.percentile(boot, [2.5, 97.5]) == pytest.approx([m["accuracy_ci_low"], m["accuracy_ci_high"]], abs=0.01)


def test_wilson_interval_by_hand():
    # 46 of 46: the lower bound is n / (n + z^2), z = 1.95996
    assert wilson_interval(46, 46) == pytest.approx((46 / (46 + 1.959964**2), 1.0))
    # 7 of 10: (p + z^2/2n -+ z sqrt(p(1-p)/n + z^2/4n^2)) / (1 + z^2/n)
    z, p, n = 1.959964, 0.7, 10
    centre, half = p + z * z / (2 * n), z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    assert wilson_interval(7, 10) == pytest.approx(
        ((centre - half) / (1 + z * z / n), (centre + half) / (1 + z * z / n))
    )
    assert wilson_interval(7, 10) == pytest.approx((0.3968, 0.8922), abs=1e-4)
    assert wilson_interval(0, 0) == (None, None)
    # no error on 46 non-PM: specificity 1.000 with the honest interval, not the bootstrap's [1, 1]
    labels = np.r_[np.ones(53), np.zeros(46)].astype(int)
    probs = np.r_[np.linspace(0.3, 1, 53), np.linspace(0, 0.4, 46)]
    m = score(labels, probs, 0.45)
    assert m["specificity"] == 1.0 and m["specificity_ci_low"] == pytest.approx(0.9229, abs=1e-4)
    # and the PPV at 2% is 1.000 with an interval from Bayes at the Wilson ends, not [1, 1]
    s_lo, c_lo = m["sensitivity_ci_low"], m["specificity_ci_low"]
    assert m["ppv_at_prevalence"] == 1.0
    assert m["ppv_at_prevalence_ci_low"] == pytest.approx(s_lo * 0.02 / (s_lo * 0.02 + (1 - c_lo) * 0.98))
    assert m["ppv_at_prevalence_ci_low"] < 0.3 and m["ppv_at_prevalence_ci_high"] == 1.0
    s_hi, c_hi = m["sensitivity_ci_high"], m["specificity_ci_high"]
    assert m["npv_at_prevalence_ci_high"] == pytest.approx(c_hi * 0.98 / (c_hi * 0.98 + (1 - s_hi) * 0.02))


def test_bootstrap_auc_matches_scikit_learn_on_a_resample():
    """The vectorised AUC of a resample equals roc_auc_score of the same resample drawn explicitly."""
    from palm.evaluation.metrics import _bootstrap

    rng = np.random.default_rng(3)
    labels = np.r_[np.ones(30), np.zeros(25)].astype(int)
    probs = np.round(rng.random(55), 1)  # ties included
    pred = (probs >= 0.5).astype(float)
    boot = _bootstrap(labels, probs, pred, 0.02, 5, seed=7)
    r = np.random.default_rng(7)
    pos, neg = np.flatnonzero(labels == 1), np.flatnonzero(labels == 0)
    cpos = r.multinomial(len(pos), np.full(len(pos), 1 / len(pos)), size=5)
    cneg = r.multinomial(len(neg), np.full(len(neg), 1 / len(neg)), size=5)
    for b in range(5):
        idx = np.r_[np.repeat(pos, cpos[b]), np.repeat(neg, cneg[b])]
        assert boot["auc"][b] == pytest.approx(roc_auc_score(labels[idx], probs[idx]))
        assert boot["accuracy"][b] == pytest.approx(accuracy_score(labels[idx], pred[idx]))
        assert boot["brier"][b] == pytest.approx(brier_score_loss(labels[idx], probs[idx]))


def test_one_class_leaves_undefined_metrics_empty():
    m = score([1, 1, 1], [0.9, 0.2, 0.7])
    assert m["auc"] is None and m["specificity"] is None and m["sensitivity_at_specificity_90"] is None
    assert m["sensitivity"] == pytest.approx(2 / 3) and m["ci_method"] == "none"
    none_said_pm = score([1, 0], [0.2, 0.1], n_boot=0)
    assert none_said_pm["precision"] == precision_score([1, 0], [0, 0], zero_division=0) == 0.0
    with pytest.raises(DataError, match="prevalence"):
        score(LABELS, PROBS, prevalence=0)
    with pytest.raises(DataError, match="as many labels"):
        score([1, 0], [0.5])
