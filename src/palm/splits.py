"""Dividing a labelled photograph set into the ``train`` and ``valid`` splits.

:func:`train_valid_split` serves a folder source (``data.source: folder``) whose labels.csv
has no ``split`` column.
"""

from __future__ import annotations

import warnings

import numpy as np
from sklearn.model_selection import StratifiedGroupKFold, train_test_split

from palm.errors import DataError


def train_valid_split(labels, fraction: float, seed: int, groups=None) -> np.ndarray:
    """A boolean mask, True for the validation images: stratified by label, seeded.

    Without ``groups``, ``fraction`` of the images (rounded, at least one of each class
    where a class has two or more) go to validation (scikit-learn's ``train_test_split``).
    With ``groups`` (e.g. a patient id per image; empty = an image of its own), all images of
    a group go to the same side, so one eye or patient never appears in both splits; the
    groups are dealt into ``round(1 / fraction)`` label-stratified folds
    (``StratifiedGroupKFold``) and the first is validation, so the fraction is approximate
    (0.2: one fifth of the groups; 0.3: one third).

    The result depends only on the inputs (their order included) and ``seed``.
    """
    y = np.asarray(labels).astype(int)
    n = len(y)
    if not 0 < fraction < 1:
        raise DataError(f"data.val_fraction must be between 0 and 1, got {fraction}")
    if n < 2:
        raise DataError(f"{n} image(s) cannot be split into train and valid")
    valid = np.zeros(n, dtype=bool)
    if groups is None:
        if min(int(y.sum()), int(n - y.sum())) < 2:
            raise DataError(f"cannot split {n} images ({int(y.sum())} PM) with data.val_fraction {fraction:g}: "
                            "each class needs at least 2 images, one for each side")
        try:
            _, test_idx = train_test_split(np.arange(n), test_size=fraction, stratify=y, random_state=seed)
        except ValueError as exc:
            raise DataError(f"cannot split {n} images ({int(y.sum())} PM) with data.val_fraction "
                            f"{fraction:g}: {exc}") from None
        valid[test_idx] = True
        return valid
    keys = np.array(["" if g is None else str(g) for g in groups], dtype=object)
    if len(keys) != n:
        raise ValueError("labels and groups differ in length")
    alone = keys == ""
    keys[alone] = [f"\0image-{i}" for i in np.flatnonzero(alone)]  # no group: its own
    n_groups = len(set(keys))
    k = max(2, int(round(1 / fraction)))
    if n_groups < k:
        raise DataError(f"{n_groups} group(s) cannot be split {k} ways (data.val_fraction {fraction:g}): "
                        "add groups or raise val_fraction")
    cv = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
    with warnings.catch_warnings():  # "least populated class ... less than n_splits": checked by the caller
        warnings.simplefilter("ignore", UserWarning)
        _, test_idx = next(cv.split(np.zeros(n), y, keys))
    valid[test_idx] = True
    return valid
