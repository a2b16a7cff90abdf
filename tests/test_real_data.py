"""The real-image path on ../shared/palm-mini (skipped where that folder is absent)."""

import contextlib
import json

import numpy as np
import pytest

from conftest import PALM_MINI, requires_palm_mini, train_section
from palm.data.dataset import FundusDataset, load_split, make_loader
from palm.data.labels import build_labels
from palm.data.preprocess import preprocess
from palm.data.unzip import unzip_all
from palm.evaluation.metrics import score
from palm.nn.artifact import load as load_trained
from palm.nn.artifact import predict_probs
from palm.training.train import Trainer

pytestmark = [requires_palm_mini, pytest.mark.realdata]
REAL_SIZE = 128
REAL_EPOCHS = 5


@pytest.fixture(scope="module")
def real_shards(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("palm-mini")
    unzip_all(PALM_MINI, tmp / "raw")
    labels = build_labels(tmp / "raw")
    labels.to_csv(tmp / "labels.csv", index=False)
    preprocess(tmp / "labels.csv", tmp / "raw", tmp / "shards", image_size=REAL_SIZE)
    return tmp


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


def test_a_short_training_on_real_eyes_beats_the_majority_class_clearly(real_shards):
    """SE-ResNet18, 128 px, a few epochs on palm-mini's 301 training images; scored on its
    99 validation images (majority class: 53.5%)."""
    params = {
        "model": "senet18",
        "image_size": REAL_SIZE,
        "train": train_section(
            epochs=REAL_EPOCHS,
            batch_size=16,
            lr=0.001,
            warmup_epochs=0.5,
            holdout=0.15,
            select="best",
            select_by="accuracy",
            ema=0.0,
            to_static=False,
            augment={"hflip": True, "rotate_deg": 10, "scale": 0.05, "brightness": 0.15, "contrast": 0.15},
        ),
    }
    out = real_shards / "run"
    info = Trainer(params, real_shards / "shards").run(out / "models", out / "checkpoints", out / "live")
    model, _ = load_trained(out / "models")
    valid = load_split(real_shards / "shards", "valid")
    probs = predict_probs(model, make_loader(FundusDataset(valid), 32, shuffle=False), contextlib.nullcontext)
    m = score(valid.labels, probs, 0.5)
    print(f"palm-mini senet18 {REAL_SIZE}px {REAL_EPOCHS} epochs: {m} ({info['train_seconds']} s)")
    assert m["accuracy"] >= 0.80 and m["auc"] >= 0.85, m
