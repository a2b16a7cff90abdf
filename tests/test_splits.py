"""palm.data.splits: the internal holdout and the cross-validation folds, for PALM's subtypes and for
a folder source's patient groups."""

import numpy as np
import pytest

from palm.core.errors import DataError
from palm.data.splits import fold_of, stratified_holdout

LABELS = np.array([1] * 30 + [0] * 30)
SUBTYPES = ["P"] * 30 + ["N"] * 24 + ["H"] * 6
PATIENTS = [f"patient{i // 2}" for i in range(60)]  # two eyes each


def test_palm_holdout_takes_the_fraction_of_each_subtype_and_is_seeded():
    train, hold = stratified_holdout(LABELS, SUBTYPES, 0.2, seed=0)
    assert sorted(np.concatenate([train, hold])) == list(range(60))
    assert [SUBTYPES[i] for i in hold].count("H") == 1 and [SUBTYPES[i] for i in hold].count("P") == 6
    assert np.array_equal(stratified_holdout(LABELS, SUBTYPES, 0.2, seed=0)[1], hold)
    assert not np.array_equal(stratified_holdout(LABELS, SUBTYPES, 0.2, seed=1)[1], hold)
    assert len(stratified_holdout(LABELS, SUBTYPES, 0, seed=0)[1]) == 0


def test_patient_groups_stay_on_one_side_of_the_holdout_and_of_the_folds():
    train, hold = stratified_holdout(LABELS, PATIENTS, 0.2, seed=0)
    assert not {PATIENTS[i] for i in train} & {PATIENTS[i] for i in hold}
    assert 8 <= len(hold) <= 16 and 0 < LABELS[hold].sum() < len(hold)  # both classes held out
    folds = fold_of(LABELS, PATIENTS, 3, seed=0)
    assert set(folds) == {0, 1, 2}
    assert all(len(set(folds[[i for i, p in enumerate(PATIENTS) if p == q]])) == 1 for q in set(PATIENTS))
    assert np.array_equal(fold_of(LABELS, PATIENTS, 3, seed=0), folds)


def test_too_few_patients_for_the_holdout_is_one_line_naming_the_parameter():
    with pytest.raises(DataError, match="train.holdout"):
        stratified_holdout(LABELS[:4], ["a", "a", "b", "b"], 0.2, seed=0)


def test_images_without_a_patient_group_are_each_their_own_group_in_the_folds():
    labels = np.array([1, 0] * 10)
    groups = ["a", "a", "b", "b"] + [""] * 16  # 16 images with no patient id
    folds = fold_of(labels, groups, 3, seed=0)
    assert folds[0] == folds[1] and folds[2] == folds[3]
    assert set(folds[4:]) == {0, 1, 2}  # not all dealt into one fold as one "" group
    with pytest.raises(DataError, match="2 patient group"):
        fold_of(labels[:4], groups[:4], 3, seed=0)
