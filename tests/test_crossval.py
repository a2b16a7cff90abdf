"""Cross-validation on the training images (scripts/cross_validate.py, palm.training.crossval)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from conftest import make_shards, train_section
from palm.core.errors import DataError
from palm.data.dataset import load_split
from palm.data.splits import fold_of
from palm.evaluation.metrics import score
from palm.training.crossval import apply_overrides

ROOT = Path(__file__).resolve().parents[1]
TRAIN = (
    [f"P{i:04d}.jpg" for i in range(7)] + [f"N{i:04d}.jpg" for i in range(5)] + ["H0001.jpg", "H0002.jpg", "H0003.jpg"]
)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return make_shards(tmp_path_factory.mktemp("data"), TRAIN)


def test_folds_are_stratified_by_group_and_cover_every_image_once(shards):
    split = load_split(shards, "train")
    folds = fold_of(split.labels, split.groups, 3, seed=0)
    assert sorted(set(folds.tolist())) == [0, 1, 2]
    assert np.bincount(folds).tolist() == [5, 5, 5]
    groups = np.array(split.groups)
    for g in "HNP":  # each group spread over the folds as evenly as it can be
        counts = np.bincount(folds[groups == g], minlength=3)
        assert counts.max() - counts.min() <= 1
    assert np.array_equal(fold_of(split.labels, split.groups, 3, seed=0), folds)
    assert not np.array_equal(fold_of(split.labels, split.groups, 3, seed=1), folds)
    with pytest.raises(DataError, match="at least 2 folds"):
        fold_of(split.labels, split.groups, 1)
    with pytest.raises(DataError, match="cannot make 20 folds"):
        fold_of(split.labels, split.groups, 20)


def test_overrides_are_set_like_dvc_exp_run():
    p = apply_overrides(
        {"model": "senet18", "train": {"lr": 0.001}}, ["model=lenet", "train.lr=3e-4", "train.augment.hflip=false"]
    )
    assert p == {"model": "lenet", "train": {"lr": 3e-4, "augment": {"hflip": False}}}
    with pytest.raises(DataError, match="KEY=VALUE"):
        apply_overrides({}, ["train.lr"])
    with pytest.raises(DataError, match="not a section"):
        apply_overrides({"model": "x"}, ["model.lr=1"])


def test_every_training_image_is_predicted_once_by_a_network_that_did_not_learn_it(shards, tmp_path):
    params = tmp_path / "params.yaml"
    repo = yaml.safe_load((ROOT / "params.yaml").read_text())
    params.write_text(
        yaml.safe_dump(
            {
                **repo,
                "model": "lenet",
                "image_size": 32,
                "train": train_section(epochs=1, batch_size=4, holdout=0, select="last", ema=0.0),
            }
        )
    )
    out = tmp_path / "cv.json"
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts" / "cross_validate.py"),
            "--shards",
            str(shards),
            "--params",
            str(params),
            "--set",
            "train.lr=0.001",
            "train.tta=hflip",
            "--out",
            str(out),
            "--threshold",
            "youden",
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    oof = pd.read_csv(out.with_suffix(".csv"))
    assert sorted(oof["image"]) == sorted(TRAIN)  # each training image once; no validation image
    assert oof.groupby("fold").size().tolist() == [5, 5, 5]
    summary = json.loads(out.read_text())
    assert summary["model"] == "lenet" and summary["set"] == ["train.lr=0.001", "train.tta=hflip"]
    # every tta mode scored from the same fold networks; probability is the configured mode's (hflip)
    assert list(summary["tta"]) == ["off", "hflip", "flips", "flips+rot"]
    assert [c for c in oof.columns if c.startswith("probability")] == [
        "probability",
        "probability_off",
        "probability_hflip",
        "probability_flips",
        "probability_flips+rot",
    ]
    assert oof["probability"].tolist() == oof["probability_hflip"].tolist()
    assert not np.allclose(oof["probability_off"], oof["probability_hflip"], atol=1e-6)  # lenet is not symmetric
    for mode in ("off", "hflip", "flips", "flips+rot"):
        assert summary["tta"][mode]["n"] == 15
        assert summary["tta"][mode]["auc"] == pytest.approx(score(oof["label"], oof[f"probability_{mode}"], 0.5)["auc"])
    assert summary["auc"] == summary["tta"]["hflip"]["auc"]
    assert summary["accuracy"] == summary["tta"]["hflip"]["accuracy"]
    assert summary["n"] == 15 and len(summary["runs"]) == 3
    wrong = int(((oof["probability"] >= 0.5).astype(int) != oof["label"]).sum())
    assert summary["errors"] == wrong and summary["accuracy"] == pytest.approx(1 - wrong / 15)
    # --threshold: the rule applied to the out-of-fold predictions, and their scores at it
    from palm.evaluation.metrics import choose_threshold

    t = choose_threshold(oof["label"], oof["probability"], "youden")
    assert summary["threshold_rule"] == "youden" and summary["chosen_threshold"] == pytest.approx(t)
    wrong_at_t = int(((oof["probability"] >= t).astype(int) != oof["label"]).sum())
    assert summary["at_threshold_fp"] + summary["at_threshold_fn"] == wrong_at_t


def test_a_bad_setting_is_one_clear_line(shards, tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts" / "cross_validate.py"),
            "--shards",
            str(shards),
            "--set",
            "model.x=1",
            "--params",
            str(ROOT / "params.yaml"),
            "--out",
            str(tmp_path / "cv.json"),
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert proc.returncode == 1 and "error:" in proc.stderr and not (tmp_path / "cv.json").exists()


def test_bad_options_and_an_unwritable_out_are_one_line_exit_2_before_any_training(shards, tmp_path, capsys):
    """--out is checked first: with a --params that does not exist, its error (not the params')
    is the one reported, so no training could have run before it; --fold-seed -1 is bad usage."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("cross_validate", ROOT / "scripts" / "cross_validate.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    (tmp_path / "afile").write_text("x")
    os.mkfifo(tmp_path / "fifo.json")
    for args, message in (
        (["--fold-seed", "-1"], "argument --fold-seed: must be at least 0, got -1"),
        (["--folds", "1"], "argument --folds: must be at least 2, got 1"),
        (["--out", str(tmp_path / "afile" / "cv.json")], f"{tmp_path / 'afile' / 'cv.csv'}: cannot write there"),
        (["--out", str(tmp_path / "fifo.json")], f"{tmp_path / 'fifo.json'}: a FIFO, not a regular file"),
        (["--out", str(tmp_path / "cv.csv")], "must end in .json"),
    ):
        try:
            code = script.main(["--shards", str(shards), "--params", str(tmp_path / "none.yaml"), *args])
        except SystemExit as exc:  # argparse
            code = exc.code
        err = capsys.readouterr().err
        assert code == 2 and "Traceback" not in err and message in err.strip().splitlines()[-1], err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "fifo.json"]
