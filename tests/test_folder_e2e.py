"""End to end: `dvc repro` on a folder of your own photographs (data.source: folder), in a
temporary git repo, on 24 tiny JPEGs and a one-epoch LeNet."""

import json

import cv2
import numpy as np
import pandas as pd
import pytest

from conftest import make_project, run
from test_pipeline_e2e import set_params

pytestmark = pytest.mark.e2e


def test_repro_on_a_folder_source_evaluates_its_validation_split(tmp_path):
    proj = make_project(tmp_path / "palm")
    clinic = proj / "data" / "clinic"
    rng = np.random.default_rng(0)
    rows = []
    for patient in range(12):  # two eyes each, PM in half the patients; the split keeps a patient whole
        for eye in ("left", "right"):
            img = rng.integers(0, 255, (48, 56, 3), dtype=np.uint8)
            (clinic / f"p{patient:02d}").mkdir(parents=True, exist_ok=True)
            assert cv2.imwrite(str(clinic / f"p{patient:02d}" / f"{eye}.jpg"), img)
            rows.append((f"p{patient:02d}/{eye}.jpg", "PM" if patient % 2 else "non-PM", f"p{patient:02d}"))
    pd.DataFrame(rows, columns=["image", "label", "group"]).to_csv(clinic / "labels.csv", index=False)
    set_params(
        proj,
        **{"data.source": "folder", "data.input": "data/clinic", "data.val_fraction": 0.25},
        image_size=32,
        model="lenet",
        **{
            "train.epochs": 1,
            "train.batch_size": 8,
            "train.warmup_epochs": 0,
            "preprocess.workers": 1,
            "evaluate.bootstrap": 20,
            "explain.n_images": 2,
        },
    )
    run(["git", "commit", "-qam", "own photographs"], proj)

    run(["dvc", "repro"], proj)

    assert (proj / "data" / "synthetic" / "SKIPPED.txt").is_file()
    labels = pd.read_csv(proj / "data" / "labels" / "labels.csv", keep_default_na=False)
    assert list(labels.columns) == ["split", "image", "label", "group"] and len(labels) == 24
    assert labels.groupby("group").split.nunique().max() == 1
    n_valid = int((labels.split == "valid").sum())
    assert n_valid == 6  # 3 of the 12 patients
    assert json.loads((proj / "metrics" / "eval.json").read_text())["n"] == n_valid
    assert "data/clinic" in (proj / "metrics" / "report.html").read_text()
