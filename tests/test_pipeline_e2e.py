"""End to end: the real pipeline (dvc repro, dvc exp run -S ...) in a temporary git repo,
on a tiny synthetic PALM set."""

import json
import math
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest
import yaml

from conftest import CARD_FILES, ENV, REPO, make_project, run

pytestmark = pytest.mark.e2e

TINY = {"n_train_p": 10, "n_train_n": 8, "n_train_h": 2, "n_val_pm": 6, "n_val_non_pm": 6, "scale": 0.05}
PARAMS = yaml.safe_load((REPO / "params.yaml").read_text())
EVAL_FIELDS = ("accuracy", "auc", "precision", "sensitivity", "specificity", "f1", "loss", "n", "threshold")


def set_params(project, **changes):
    path = project / "params.yaml"
    params = yaml.safe_load(path.read_text())
    for dotted, value in changes.items():
        node = params
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    path.write_text(yaml.safe_dump(params, sort_keys=False))


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    proj = make_project(tmp_path_factory.mktemp("e2e") / "palm")
    # SE-ResNet18 (the default network, trained in static-graph mode as ResNet50 is): a third of ResNet50's
    # time per stage; two Grad-CAM images (explain's default of 12 took minutes)
    set_params(
        proj,
        **{f"synthetic.{k}": v for k, v in TINY.items()},
        image_size=64,
        model="senet18",
        **{"train.epochs": 1, "train.batch_size": 4, "train.warmup_epochs": 0, "explain.n_images": 2},
        # per-model defaults (models.<name>.epochs) would override train.epochs
        **{f"models.{m}.epochs": 1 for m, over in PARAMS["models"].items() if "epochs" in over},
    )
    run(["git", "commit", "-qam", "tiny"], proj)
    out = run(["dvc", "repro"], proj)
    assert "Running stage 'train'" in out.stdout
    return proj


def test_repro_writes_shards_with_the_right_shapes_counts_and_labels(project):
    labels = pd.read_csv(project / "data" / "labels" / "labels.csv")
    train, valid = labels[labels.split == "train"], labels[labels.split == "valid"]
    assert len(train) == 20 and train.label.sum() == 10
    assert len(valid) == 12 and valid.label.sum() == 6
    manifest = json.loads((project / "data" / "shards" / "manifest.json").read_text())
    for split, part in (("train", train), ("valid", valid)):  # shards follow labels.csv
        shards = manifest["splits"][split]["shards"]
        arrays = [np.load(project / "data" / "shards" / s["file"]) for s in shards]
        assert all(a.dtype == np.uint8 and a.shape[1:] == (64, 64, 3) for a in arrays)
        assert sum(len(a) for a in arrays) == len(part)
        assert [v for s in shards for v in s["labels"]] == part.label.tolist()
        assert [v for s in shards for v in s["images"]] == [p.split("/")[-1] for p in part.image]
    assert not any(p.name.startswith(".") for p in (project / "data").iterdir() if p.name != ".gitignore")


def test_metrics_have_every_field_finite_and_in_range(project):
    m = json.loads((project / "metrics" / "eval.json").read_text())
    for field in EVAL_FIELDS:
        assert m[field] is not None and math.isfinite(m[field]), field
    for field in ("accuracy", "auc", "precision", "sensitivity", "specificity", "f1"):
        assert 0.0 <= m[field] <= 1.0, field
    assert m["n"] == 12 and m["loss"] > 0 and m["threshold"] == 0.5
    preds = pd.read_csv(project / "metrics" / "predictions.csv")
    assert len(preds) == 12 and preds.probability.between(0, 1).all()
    assert m["accuracy"] == pytest.approx((preds.predicted == preds.label).mean())
    show = run(["dvc", "metrics", "show", "--json"], project).stdout
    assert "accuracy" in show
    plots = run(["dvc", "plots", "show", "--json"], project).stdout
    for name in (
        "roc.json",
        "confusion_matrix.json",
        "precision_recall.json",
        "calibration.json",
        "PM probability per class",
        "train_loss.tsv",
        "metrics/explain/",
    ):
        assert name in plots, name
    for key in ("accuracy", "sensitivity", "specificity", "auc"):  # intervals, shown by dvc metrics show
        assert m[f"{key}_ci_low"] <= m[key] <= m[f"{key}_ci_high"], key
        assert f"{key}_ci_low" in show


def test_export_explain_and_predict_from_the_pipeline(project, tmp_path):
    pngs = sorted((project / "metrics" / "explain").glob("*.png"))
    assert 1 <= len(pngs) <= 12 and all("_label-" in p.name and "_pred-" in p.name for p in pngs)
    out = tmp_path / "preds.csv"
    # --grade-all: the tiny synthetic set's photographs (scale 0.05, ~100 px) are "too small" to grade
    run(
        [
            "palm",
            "predict",
            "data/raw/PALM-Validation400",
            "--model",
            "models_export",
            "--out",
            str(out),
            "--quiet",
            "--grade-all",
        ],
        project,
    )
    exported = pd.read_csv(out).sort_values("image").reset_index(drop=True)
    saved = pd.read_csv(project / "metrics" / "predictions.csv").sort_values("image").reset_index(drop=True)
    assert [p.split("/")[-1] for p in exported.image] == saved.image.tolist()
    np.testing.assert_allclose(exported.probability, saved.probability, atol=1e-4)


def test_card_describes_the_run_and_dvc_artifacts_get_finds_the_model(project, tmp_path):
    from palm.core.fsutil import sha256_file

    card = json.loads((project / "models_card" / "card.json").read_text())
    assert (project / "models_card" / "card.md").read_text().startswith("# Model card: palm-pm-classifier (senet18)")
    evaluation = json.loads((project / "metrics" / "eval.json").read_text())
    assert card["validation"]["metrics"]["auc"] == {
        "estimate": evaluation["auc"],
        "ci95": [evaluation["auc_ci_low"], evaluation["auc_ci_high"]],
    }
    counts = card["training_data"]["counts"]
    assert counts["valid"] == {"PM": TINY["n_val_pm"], "non_PM": TINY["n_val_non_pm"], "total": 12}
    assert counts["train"]["total"] == TINY["n_train_p"] + TINY["n_train_n"] + TINY["n_train_h"]
    lock = yaml.safe_load((project / "dvc.lock").read_text())["stages"]
    train_outs = {o["path"]: o["md5"] for o in lock["train"]["outs"]}
    assert card["provenance"]["dvc_lock"]["train"]["outs"] == train_outs
    assert card["provenance"]["git_revision"] in run(["git", "log", "--format=%H"], project).stdout.split()
    assert {w["path"] for w in card["files"]} == CARD_FILES
    assert all(sha256_file(project / w["path"]) == w["sha256"] for w in card["files"])
    # the DVC model registry: a version is a git tag name@vX.Y.Z on a commit of the run
    run(["git", "add", "-A"], project)
    run(["git", "commit", "-qm", "run"], project)
    run(["git", "tag", "-a", "pm-classifier@v0.1.0", "-m", "first model"], project)
    run(["git", "tag", "-a", "pm-classifier-export@v0.1.0", "-m", "first model"], project)
    run(["git", "reset", "-q", "--soft", "HEAD~1"], project)  # the later tests commit the baseline themselves
    for name, folder, weights in (
        ("pm-classifier", "models", "model.safetensors"),
        ("pm-classifier-export", "models_export", "model.onnx"),
    ):
        run(["dvc", "artifacts", "get", str(project), name, "-o", str(tmp_path / name)], tmp_path)
        assert sha256_file(tmp_path / name / weights) == sha256_file(project / folder / weights)


def test_noop_repro_and_image_size_change_reruns_preprocess_only(project):
    t0 = time.perf_counter()
    out = run(["dvc", "repro"], project).stdout
    assert "Running stage" not in out
    assert time.perf_counter() - t0 < 30
    set_params(project, image_size=48)
    status = json.loads(run(["dvc", "status", "--json"], project).stdout)
    assert "preprocess" in status
    assert not {"synthesize", "unzip", "labels"} & set(status)
    run(["git", "checkout", "params.yaml"], project)
    assert "Running stage" not in run(["dvc", "repro"], project).stdout


def test_exp_run_another_model_and_metrics_diff(project):
    run(["git", "add", "-A"], project)
    run(["git", "commit", "-qm", "baseline"], project)
    out = run(["dvc", "exp", "run", "-S", "model=alexnet"], project)
    assert "Running stage 'train'" in out.stdout and "Running stage 'preprocess'" not in out.stdout
    assert json.loads((project / "models" / "model.json").read_text())["model"] == "alexnet"
    diff = json.loads(run(["dvc", "metrics", "diff", "--json"], project).stdout)
    assert "metrics/eval.json" in diff and diff["metrics/eval.json"], diff
    exp_show = run(["dvc", "exp", "show", "--json"], project).stdout
    assert "alexnet" in exp_show


def test_compare_script_runs_each_model_and_seed_and_tabulates_the_pipeline_metrics(project):
    out = run(
        [
            sys.executable,
            "scripts/compare_models.py",
            "--models",
            "lenet",
            "--seeds",
            "0",
            "1",
            "--out",
            "metrics/compare.json",
        ],
        project,
    ).stdout
    rows = json.loads((project / "metrics" / "compare.json").read_text())
    assert [(r["model"], r["seed"]) for r in rows] == [("lenet", 0), ("lenet", 1)]
    last = json.loads((project / "metrics" / "eval.json").read_text())  # the workspace holds the last run
    assert rows[1]["accuracy"] == last["accuracy"] and rows[1]["auc"] == last["auc"]
    assert all(r["train_seconds"] > 0 and r["n_valid"] == last["n"] for r in rows)
    assert "| lenet | 2 |" in out and "| lenet | 64 | 1 |" in out


def test_killed_training_resumes_from_its_checkpoint(project):
    set_params(project, **{"train.epochs": 6})
    proc = subprocess.Popen(
        ["dvc", "repro", "train"],
        cwd=project,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
        env=ENV,
    )
    ckpt = project / "checkpoints" / "checkpoint.json"
    deadline = time.time() + 300
    try:
        while time.time() < deadline and proc.poll() is None:
            if ckpt.is_file() and json.loads(ckpt.read_text() or "{}").get("config", {}).get("epochs") == 6:
                break
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    killed_at = json.loads(ckpt.read_text())["epoch"]
    assert 1 <= killed_at < 6
    out = run(["dvc", "repro", "train"], project).stdout
    assert f"resuming from the checkpoint of epoch {killed_at} of 6" in out
    history = json.loads(ckpt.read_text())["history"]
    assert [r["epoch"] for r in history] == [1, 2, 3, 4, 5, 6]
    assert len((project / "metrics" / "train" / "plots" / "metrics" / "train_loss.tsv").read_text().splitlines()) == 7
