"""The real-image path on ../shared/palm-mini (skipped where that folder is absent)."""

import json

import numpy as np
import pytest

from conftest import PALM_MINI, requires_palm_mini
from palm.labels import build_labels
from palm.preprocess import preprocess
from palm.unzip import unzip_all

pytestmark = [requires_palm_mini, pytest.mark.realdata]


@pytest.fixture(scope="module")
def real_shards(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("palm-mini")
    unzip_all(PALM_MINI, tmp / "raw")
    labels = build_labels(tmp / "raw")
    labels.to_csv(tmp / "labels.csv", index=False)
    preprocess(tmp / "labels.csv", tmp / "raw", tmp / "shards", image_size=REAL_SIZE)
    return tmp


REAL_SIZE = 128


def test_palm_mini_goes_through_unzip_labels_preprocess(real_shards):
    manifest = json.loads((real_shards / "shards" / "manifest.json").read_text())
    train, valid = manifest["splits"]["train"], manifest["splits"]["valid"]
    assert train["count"] == 301 and valid["count"] == 99
    train_labels = [v for s in train["shards"] for v in s["labels"]]
    valid_labels = [v for s in valid["shards"] for v in s["labels"]]
    assert sum(train_labels) == 160 and sum(valid_labels) == 53
    groups = [g for s in train["shards"] for g in s["groups"]]
    assert (groups.count("H"), groups.count("N"), groups.count("P")) == (20, 121, 160)
    first = np.load(real_shards / "shards" / train["shards"][0]["file"])
    assert first.dtype == np.uint8 and first.shape[1:] == (REAL_SIZE, REAL_SIZE, 3)
    assert first.std() > 10  # real photographs, not blank arrays
