"""Dividing the training images: the internal holdout of a training run and the folds of
cross-validation. Both are stratified by each image's group (H / N / P in PALM), else its
label, and seeded, so the same seed divides the same images alike.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from palm.errors import DataError


def strata(labels: np.ndarray, groups: Sequence[str]) -> np.ndarray:
    """Each image's stratum: its group (H/N/P), else its label."""
    return np.array([g or str(l) for g, l in zip(groups, labels)])


def stratified_holdout(labels: np.ndarray, groups: Sequence[str], fraction: float,
                       seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (train, holdout): ``fraction`` of each stratum held out (at least one image of
    each stratum of two or more when ``fraction`` > 0, never a whole stratum)."""
    rng = np.random.default_rng([seed, 7919])
    keys = strata(labels, groups)
    train_idx, hold_idx = [], []
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
    """Fold number (0..k-1) of each image, stratified; the folds' sizes differ by one at most."""
    if k < 2:
        raise DataError(f"cross-validation needs at least 2 folds, got {k}")
    if len(labels) < k:
        raise DataError(f"{len(labels)} training images cannot make {k} folds")
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
