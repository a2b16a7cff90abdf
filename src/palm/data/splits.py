"""Dividing labelled images: the ``train`` / ``valid`` split of a folder source, the internal
holdout of a training run and the folds of cross-validation. All are stratified and seeded, so
the same seed divides the same images alike.

- :func:`train_valid_split` serves a folder source (``data.source: folder``) whose labels.csv has
  no ``split`` column; its ``group`` (a patient id) keeps a patient's images on one side.
- :func:`stratified_holdout` and :func:`fold_of` divide the training images. In PALM the shards'
  ``group`` is the class subtype (H / N / P), and they stratify by it; from a folder source it is
  a patient id, and they keep each patient's images on one side, stratified by label.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
from sklearn.model_selection import StratifiedGroupKFold, train_test_split

from palm.core.errors import DataError

#: the ``group`` values of PALM's training images: the class subtype, not a patient
PALM_SUBTYPES = frozenset({"H", "N", "P", ""})


def _patients(groups: Sequence[str]) -> bool:
    """Whether ``groups`` are patient ids (a folder source) rather than PALM's subtypes."""
    return any(str(g) not in PALM_SUBTYPES for g in groups)


def strata(labels: np.ndarray, groups: Sequence[str]) -> np.ndarray:
    """Each image's stratum: its group (H/N/P), else its label."""
    return np.array([g or str(label) for g, label in zip(groups, labels)])


def stratified_holdout(
    labels: np.ndarray, groups: Sequence[str], fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Indices (train, holdout): ``fraction`` of each stratum held out (at least one image of
    each stratum of two or more when ``fraction`` > 0, never a whole stratum). With patient
    groups, a patient's images are all on one side (:func:`train_valid_split`)."""
    if _patients(groups) and fraction > 0:
        hold = train_valid_split(labels, fraction, seed, groups, key="train.holdout")
        return np.flatnonzero(~hold), np.flatnonzero(hold)
    rng = np.random.default_rng([seed, 7919])
    keys = strata(labels, groups)
    train_idx: list[int] = []
    hold_idx: list[int] = []
    for key in sorted(set(keys)):
        idx = np.flatnonzero(keys == key)
        rng.shuffle(idx)
        n_hold = int(round(fraction * len(idx)))
        if fraction > 0 and len(idx) > 1:
            n_hold = min(max(n_hold, 1), len(idx) - 1)
        hold_idx.extend(idx[:n_hold])
        train_idx.extend(idx[n_hold:])
    return np.sort(np.array(train_idx, dtype=np.int64)), np.sort(np.array(hold_idx, dtype=np.int64))


def fold_of(labels: np.ndarray, groups: Sequence[str], k: int, seed: int = 0) -> np.ndarray:
    """Fold number (0..k-1) of each image, stratified; the folds' sizes differ by one at most
    (with patient groups: a patient's images share a fold, ``StratifiedGroupKFold``)."""
    if k < 2:
        raise DataError(f"cross-validation needs at least 2 folds, got {k}")
    if len(labels) < k:
        raise DataError(f"{len(labels)} training images cannot make {k} folds")
    if _patients(groups):
        keys = _group_keys(groups, len(labels))
        if len(set(keys)) < k:
            raise DataError(f"{len(set(keys))} patient group(s) cannot make {k} folds")
        return _group_folds(labels, keys, k, seed)
    keys = strata(labels, groups)
    rng = np.random.default_rng([seed, 4099])
    folds = np.zeros(len(labels), dtype=np.int64)
    offset = 0
    for key in sorted(set(keys)):
        idx = np.flatnonzero(keys == key)
        rng.shuffle(idx)
        folds[idx] = (np.arange(len(idx)) + offset) % k
        offset += len(idx)
    return folds


def train_valid_split(labels, fraction: float, seed: int, groups=None, key: str = "data.val_fraction") -> np.ndarray:
    """A boolean mask, True for the validation images: stratified by label, seeded.

    Without ``groups``, ``fraction`` of the images (rounded, at least one of each class
    where a class has two or more) go to validation (scikit-learn's ``train_test_split``).
    With ``groups`` (e.g. a patient id per image; empty = an image of its own), all images of
    a group go to the same side, so one eye or patient never appears in both splits; the
    groups are dealt into ``round(1 / fraction)`` label-stratified folds
    (``StratifiedGroupKFold``) and the first is validation, so the fraction is approximate
    (0.2: one fifth of the groups; 0.3: one third). ``key`` names the parameter in errors.

    The result depends only on the inputs (their order included) and ``seed``.
    """
    y = np.asarray(labels).astype(int)
    n = len(y)
    if not 0 < fraction < 1:
        raise DataError(f"{key} must be between 0 and 1, got {fraction}")
    if n < 2:
        raise DataError(f"{n} image(s) cannot be split into train and valid")
    if groups is None:
        if min(int(y.sum()), int(n - y.sum())) < 2:
            raise DataError(
                f"cannot split {n} images ({int(y.sum())} PM) with {key} {fraction:g}: "
                "each class needs at least 2 images, one for each side"
            )
        try:
            _, test_idx = train_test_split(np.arange(n), test_size=fraction, stratify=y, random_state=seed)
        except ValueError as exc:
            raise DataError(f"cannot split {n} images ({int(y.sum())} PM) with {key} {fraction:g}: {exc}") from None
        valid = np.zeros(n, dtype=bool)
        valid[test_idx] = True
        return valid
    keys = _group_keys(groups, n)
    n_groups = len(set(keys))
    k = max(2, int(round(1 / fraction)))
    if n_groups < k:
        raise DataError(f"{n_groups} group(s) cannot be split {k} ways ({key} {fraction:g}): add groups or raise {key}")
    return _group_folds(y, keys, k, seed) == 0


def _group_keys(groups, n: int) -> np.ndarray:
    """Each image's group as a string; an image without one (empty) is a group of its own."""
    keys = np.array(["" if g is None else str(g) for g in groups], dtype=object)
    if len(keys) != n:
        raise ValueError("labels and groups differ in length")
    alone = keys == ""
    keys[alone] = [f"\0image-{i}" for i in np.flatnonzero(alone)]
    return keys


def _group_folds(labels, keys: np.ndarray, k: int, seed: int) -> np.ndarray:
    """Fold number (0..k-1) of each image: whole groups dealt into ``k`` label-stratified folds,
    seeded (scikit-learn's ``StratifiedGroupKFold``)."""
    folds = np.zeros(len(keys), dtype=np.int64)
    cv = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
    with warnings.catch_warnings():  # "least populated class ... less than n_splits": checked by the callers
        warnings.simplefilter("ignore", UserWarning)
        for fold, (_, idx) in enumerate(cv.split(np.zeros(len(keys)), np.asarray(labels).astype(int), keys)):
            folds[idx] = fold
    return folds
