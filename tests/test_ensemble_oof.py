"""scripts/ensemble_oof.py: a seed or network ensemble scored from cross-validation runs' predictions."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from palm.evaluation import compare as cmp
from palm.evaluation.metrics import score

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "ensemble_oof.py"


def _member(path: Path, probs, seed: int, folds=(0, 0, 1, 1, 2, 2)) -> Path:
    oof = pd.DataFrame(
        {
            "image": [f"{g}{i:04d}.jpg" for i, g in enumerate("PPNNHP")],
            "group": list("PPNNHP"),
            "label": [1, 1, 0, 0, 0, 1],
            "fold": list(folds),
            "probability": probs,
        }
    )
    oof.to_csv(path, index=False)
    path.with_suffix(".json").write_text(json.dumps({"model": "senet18", "set": [f"train.seed={seed}"]}))
    return path


def _run(*args, cwd):
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], cwd=cwd, capture_output=True, text=True)


def test_the_ensemble_is_the_mean_probability_scored_as_cross_validate_scores(tmp_path):
    a = _member(tmp_path / "a.csv", [0.9, 0.4, 0.2, 0.6, 0.7, 0.8], 0)
    # the second member lists its images in another order: they are matched by name
    b = _member(tmp_path / "b.csv", [0.7, 0.8, 0.0, 0.2, 0.1, 0.6], 1)
    pd.read_csv(b).iloc[::-1].to_csv(b, index=False)
    proc = _run(a, b, "--out", tmp_path / "ens.json", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    oof = pd.read_csv(tmp_path / "ens.csv").set_index("image")
    mean = (pd.read_csv(a).set_index("image").probability + pd.read_csv(b).set_index("image").probability) / 2
    np.testing.assert_allclose(oof.probability, mean.loc[oof.index], atol=1e-12)
    summary = json.loads((tmp_path / "ens.json").read_text())
    expected = score(oof["label"], oof["probability"], 0.5)
    assert summary["auc"] == expected["auc"] and summary["errors"] == expected["fp"] + expected["fn"]
    # one setting names the members, so palm compare does not take the ensemble for seed 0 of a recipe
    assert summary["set"] == ["ensemble=a+b"] and summary["members"] == [str(a), str(b)]
    # palm compare takes it as a run of no seed (not seed 0), the members as seeds 0 and 1
    assert cmp.read_run(str(tmp_path / "ens.csv")).seed == "-"
    assert cmp.read_run(str(a)).seed == "0" and cmp.read_run(str(b)).seed == "1"


def test_members_of_other_folds_are_refused_with_one_line_and_nothing_written(tmp_path):
    a = _member(tmp_path / "a.csv", [0.9, 0.4, 0.2, 0.6, 0.7, 0.8], 0)
    b = _member(tmp_path / "b.csv", [0.7, 0.8, 0.0, 0.2, 0.1, 0.6], 1, folds=(0, 1, 1, 0, 2, 2))
    proc = _run(a, b, "--out", tmp_path / "ens.json", cwd=tmp_path)
    assert proc.returncode == 1
    assert "differ in their images, labels or folds" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "ens.json").exists() and not (tmp_path / "ens.csv").exists()


def test_one_member_or_a_file_that_is_not_predictions_is_refused(tmp_path):
    a = _member(tmp_path / "a.csv", [0.9, 0.4, 0.2, 0.6, 0.7, 0.8], 0)
    assert _run(a, "--out", tmp_path / "ens.json", cwd=tmp_path).returncode == 2
    proc = _run(a, a.with_suffix(".json"), "--out", tmp_path / "ens.json", cwd=tmp_path)
    assert proc.returncode == 1 and "not a cross-validation prediction file" in proc.stderr
    assert not (tmp_path / "ens.json").exists()


def _one_line(proc) -> str:
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    return lines[0]


def test_out_never_overwrites_a_member_or_writes_json_over_a_csv(tmp_path):
    a = _member(tmp_path / "a.csv", [0.9, 0.4, 0.2, 0.6, 0.7, 0.8], 0)
    b = _member(tmp_path / "b.csv", [0.7, 0.8, 0.0, 0.2, 0.1, 0.6], 1)
    before = {p: p.read_bytes() for p in tmp_path.iterdir()}
    for out, message in (
        (tmp_path / "a.json", "would overwrite"),  # a.csv is a member, a.json its settings
        (tmp_path / "ens.csv", "must end in .json"),
        (tmp_path / "sub" / ".." / "b.json", "would overwrite"),
    ):
        proc = _run(a, b, "--out", out, cwd=tmp_path)
        assert proc.returncode == 2 and message in _one_line(proc), proc.stderr
    assert {p: p.read_bytes() for p in tmp_path.iterdir()} == before  # nothing written, nothing changed


@pytest.mark.parametrize(
    "column,value,message",
    [
        ("probability", "x", "probability holds values that are not numbers: 'x' (P0000.jpg)"),
        ("probability", 1.7, "probability must be a number in [0, 1], got 1.7 (P0000.jpg)"),
        ("probability", float("nan"), "probability must be a number in [0, 1], got nan (P0000.jpg)"),
        ("label", 2, "label must be 0 or 1, got 2 (P0000.jpg)"),
    ],
)
def test_impossible_numbers_in_a_member_are_one_line_and_exit_1(tmp_path, column, value, message):
    a = _member(tmp_path / "a.csv", [0.9, 0.4, 0.2, 0.6, 0.7, 0.8], 0)
    b = _member(tmp_path / "b.csv", [0.7, 0.8, 0.0, 0.2, 0.1, 0.6], 1)
    for m in (a, b):
        df = pd.read_csv(m)
        df[column] = df[column].astype(object)
        df.loc[0, column] = value
        df.to_csv(m, index=False)
    proc = _run(a, b, "--out", tmp_path / "ens.json", cwd=tmp_path)
    assert proc.returncode == 1 and _one_line(proc) == f"error: {a}: {message}"
    assert not (tmp_path / "ens.json").exists() and not (tmp_path / "ens.csv").exists()
