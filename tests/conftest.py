"""Shared test helpers: tiny PALM-layout zips built by hand, and the repo paths; how the suite is
spread over pytest-xdist's workers, and which tests the quick loop (``pytest -m "not e2e"``) leaves out."""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest

REPO = Path(__file__).resolve().parents[1]
PALM_MINI = REPO.parent / "shared" / "palm-mini"

# Set before anything starts Paddle or dvc, here and in every process the tests start (they inherit it):
# - no usage-analytics process after each dvc command;
# - under pytest-xdist, each worker's share of the cores as Paddle's thread count (palm.core.runtime
#   reads OMP_NUM_THREADS as the user's), so that N workers do not run N x cores busy threads.
os.environ.setdefault("DVC_NO_ANALYTICS", "1")
if os.environ.get("PYTEST_XDIST_WORKER_COUNT", "").isdigit() and "OMP_NUM_THREADS" not in os.environ:
    os.environ["OMP_NUM_THREADS"] = str(
        max(1, len(os.sched_getaffinity(0)) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))
    )


# every file that decides an answer, as a model card lists them (palm-model-card/2)
CARD_FILES = {
    "models/model.json",
    "models/model.safetensors",
    "models_export/model.json",
    "models_export/inference.json",
    "models_export/inference.pdiparams",
    "models_export/model.onnx",
}


def train_section(**overrides) -> dict:
    """params.yaml's ``train:`` (the one source of defaults) with ``overrides`` (whole values:
    an ``augment`` given replaces params.yaml's)."""
    import yaml

    with open(REPO / "params.yaml", encoding="utf-8") as f:
        return {**yaml.safe_load(f)["train"], **overrides}


requires_palm_mini = pytest.mark.skipif(
    not (PALM_MINI / "training.zip").is_file(), reason="../shared/palm-mini (real images) is not here"
)


def jpeg_bytes(seed: int = 0, size: tuple[int, int] = (40, 32)) -> bytes:
    rng = np.random.default_rng(seed)
    img = rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    ok, buf = cv2.imencode(".jpg", img)
    assert ok
    return buf.tobytes()


def xlsx_bytes(df: pd.DataFrame) -> bytes:
    buf = io.BytesIO()
    df.to_excel(buf, index=False)
    return buf.getvalue()


def write_zip(path: Path, entries: dict[str, bytes]) -> None:
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in entries.items():
            zf.writestr(name, data)


def make_palm_zips(
    folder: Path,
    train=("P0001.jpg", "P0002.jpg", "N0001.jpg", "H0001.jpg"),
    valid=(("V0001.jpg", 1), ("V0002.jpg", 0)),
    gt: pd.DataFrame | None = None,
    valid_images=None,
) -> Path:
    """The three original zips, with tiny random JPEGs; ``gt`` replaces the default xlsx."""
    folder.mkdir(parents=True, exist_ok=True)
    inner = io.BytesIO()
    with zipfile.ZipFile(inner, "w") as zf:
        for i, name in enumerate(train):
            zf.writestr(f"PALM-Training400/{name}", jpeg_bytes(i))
    write_zip(folder / "training.zip", {"PALM-Training400/PALM-Training400.zip": inner.getvalue()})
    names = valid_images if valid_images is not None else [n for n, _ in valid]
    write_zip(folder / "validation.zip", {f"PALM-Validation400/{n}": jpeg_bytes(100 + i) for i, n in enumerate(names)})
    if gt is None:
        gt = pd.DataFrame(
            {
                "ID": range(1, len(valid) + 1),
                "imgName": [n for n, _ in valid],
                "Label": [label for _, label in valid],
                "Fovea_X": 1.0,
                "Fovea_Y": 2.0,
            }
        )
    write_zip(folder / "valid_gt.zip", {"PALM-Validation-GT/PM_Label_and_Fovea_Location.xlsx": xlsx_bytes(gt)})
    return folder


def make_shards(tmp: Path, train, valid=(("V0001.jpg", 1), ("V0002.jpg", 0)), image_size: int = 32) -> Path:
    """``tmp/shards``: tiny PALM zips (``make_palm_zips``) through unzip, labels and preprocess."""
    from palm.data.labels import build_labels
    from palm.data.preprocess import preprocess
    from palm.data.unzip import unzip_all

    unzip_all(make_palm_zips(tmp / "zips", train=train, valid=valid), tmp / "raw")
    build_labels(tmp / "raw").to_csv(tmp / "labels.csv", index=False)
    preprocess(tmp / "labels.csv", tmp / "raw", tmp / "shards", image_size=image_size, workers=1)
    return tmp / "shards"


# dvc, and the `python` of the stages' commands, from the environment running the tests
BIN_DIR = str(Path(sys.executable).parent)
ENV = {**os.environ, "PATH": BIN_DIR + os.pathsep + os.environ.get("PATH", "")}


def run(cmd: list[str], cwd: Path, check: bool = True, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run a command, showing its output when it fails."""
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env={**ENV, **(env or {})})
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
        )
    return proc


def make_project(dest: Path) -> Path:
    """A copy of this repository's pipeline in a fresh git + DVC repo at ``dest``."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in ("dvc.yaml", "params.yaml", ".dvcignore", ".gitignore"):
        shutil.copy2(REPO / name, dest / name)
    for name in ("stages", "src", "scripts"):
        shutil.copytree(REPO / name, dest / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    (dest / "data" / "original").mkdir(parents=True)
    (dest / "data" / "original" / "README.md").write_text("real zips go here\n")
    run(["git", "init", "-q"], dest)
    run(["git", "config", "user.email", "test@example.com"], dest)
    run(["git", "config", "user.name", "test"], dest)
    run(["dvc", "init", "-q"], dest)
    # what `dvc config core.autostage true` and `dvc config core.analytics false` write, without two dvc processes
    with open(dest / ".dvc" / "config", "a", encoding="utf-8") as f:
        f.write("[core]\n    autostage = true\n    analytics = false\n")
    run(["git", "add", "-A"], dest)
    run(["git", "commit", "-qm", "pipeline"], dest)
    return dest


# -- how the suite runs: the quick loop, and pytest-xdist's workers -----------------------------------
# The quick loop, `pytest -m "not e2e"` (CONTRIBUTING.md), leaves out the modules that mark
# themselves e2e and the tests below: each takes more than a few seconds (a stage, server or
# training process, a training run, every network at full size). None: the whole module.
# (Measured with `pytest --durations=0`: results/test-durations-*.txt.)
SLOW: dict[str, set[str] | None] = {
    "test_real_data.py": None,
    "test_serve.py": None,  # one server process for the module, the page in chromium
    "test_train.py": None,  # training runs, most of them several
    "test_faults.py": {
        "test_a_stage_killed_at_any_instant_reruns_to_the_same_outputs_and_leaves_nothing",
        "test_hostile_data_is_one_error_line_with_exit_1_and_nothing_half_written",
        "test_a_bad_parameter_stops_every_stage_before_any_work_with_exit_2",
        "test_broken_params_yaml_is_exit_2",
        "test_a_stage_that_runs_out_of_disk_is_one_line_naming_the_file_and_leaves_nothing",
        "test_a_signal_ends_palm_predict_at_once_with_no_crash_dump_temporary_file_or_worker",
    },
    "test_parallel.py": {"test_two_processes_train_as_one_and_resume_after_a_kill"},
    "test_recipe.py": {
        "test_cross_validate_compares_recipes_with_set",
        "test_data_parallel_ranks_mix_their_own_part_of_the_batch",
        "test_each_lever_trains_reproducibly_and_is_recorded_in_model_json",
        "test_a_mixed_run_resumed_after_a_crash_is_the_uninterrupted_run",
    },
    "test_crossval.py": {
        "test_every_training_image_is_predicted_once_by_a_network_that_did_not_learn_it",
        "test_a_bad_setting_is_one_clear_line",
    },
    "test_onnx.py": {
        "test_export_writes_an_onnx_model_that_matches_eager_paddle_on_synthetic_photographs",
        "test_onnx_model_matches_eager_paddle_on_real_photographs",
        "test_predict_with_onnxruntime_needs_no_paddle",
    },
    "test_palm_compare.py": {"test_two_tiny_experiments_are_compared_from_dvc_exp_show"},
    "test_repo.py": {"test_pip_resolves_one_paddle_build_for_the_cpu_extras"},
    "test_shards.py": {"test_a_killed_preprocess_stage_resumes"},
    "test_runtime.py": {
        "test_two_processes_under_palm_jobs_2_take_two_slots_and_split_the_cores",
        "test_stages_start_quietly",
    },
    "test_tta.py": {
        "test_a_bad_tta_stops_the_stage_with_one_line_and_exit_2",
        "test_evaluate_predict_and_serve_give_the_same_tta_probabilities",
        "test_explain_captions_the_tta_probability",
    },
    "test_fundus.py": {"test_a_model_trained_with_enhancement_records_it_and_predict_applies_it"},
    "test_folder.py": {"test_a_stage_stops_with_one_error_line_naming_the_problem_and_exit_1"},
    # in-process, but above ~5 s each on a loaded 2-core machine (results/test-durations-after.txt)
    "test_models.py": {
        "test_loss_falls_when_overfitting_a_few_images",
        "test_output_is_one_logit_per_image[224-vgg16]",
        "test_output_is_one_logit_per_image[224-resnet152]",
        "test_output_is_one_logit_per_image[224-resnet101]",
    },
    "test_use_model.py": {
        "test_exported_model_matches_the_training_time_model",
        "test_gradcam_heatmap[vgg16]",
        "test_predict_cli_reports_unreadable_files_and_predicts_the_rest",
        "test_predict_applies_the_threshold_stored_in_model_json",
    },
    "test_inference.py": {
        "test_paddle_inference_matches_eager_on_synthetic_photographs",
        "test_paddle_inference_matches_eager_on_real_photographs",
        "test_predict_runs_exports_and_weights_through_paddle_inference",
        "test_predict_cli_engine_choice_and_workers",
    },
    "test_synthetic.py": {"test_class_signal_is_shape_and_texture_not_mean_colour"},
    "test_ensemble_oof.py": {"test_the_ensemble_is_the_mean_probability_scored_as_cross_validate_scores"},
}

# The costliest modules first: their groups are handed out first, each followed by two cheap tests
# (a worker takes its next unit when two of its tests are left: a cheap one, rather than a second
# costly group while the other worker idles), then the rest in their order.
FIRST: list[str] = [
    "test_dvc_workflow.py",
    "test_pipeline_e2e.py",
    "test_faults.py",
    "test_never_stale.py",
    "test_palm_compare.py",
    "test_real_data.py",
    "test_parallel.py",
    "test_serve.py",
    "test_train.py",
    "test_onnx.py",
    "test_inference.py",
    "test_folder_e2e.py",
    "test_crossval.py",
    "test_tta.py",
    "test_recipe.py",
]
# Tests that share a module-level cache rather than a fixture: grouped by that parameter (one
# export per network); the tests without the parameter use the default given.
PARAM_GROUPS: dict[str, tuple[str, str]] = {"test_onnx.py": ("name", "senet18")}


def _module_fixtures(item) -> list[str]:
    """The module-scoped fixtures of the test's own module that the test uses."""
    info = getattr(item, "_fixtureinfo", None)
    module = getattr(item, "module", None)
    if info is None or module is None:
        return []
    names = []
    for name, defs in info.name2fixturedefs.items():
        fixturedef = defs[-1]
        if fixturedef.scope == "module" and getattr(fixturedef.func, "__module__", None) == module.__name__:
            names.append(name)
    return sorted(names)


def _group(item) -> str | None:
    if item.path.name in PARAM_GROUPS:
        param, default = PARAM_GROUPS[item.path.name]
        callspec = getattr(item, "callspec", None)
        return f"{item.path.stem}:{callspec.params.get(param, default) if callspec else default}"
    shared = _module_fixtures(item)
    return f"{item.path.stem}:{'+'.join(shared)}" if shared else None


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    """Mark the slow tests e2e; keep the tests that share a module-scoped fixture on one xdist worker
    (``--dist loadgroup``: the fixture is built once); the costliest modules first."""
    groups = {}
    for item in items:
        slow = SLOW.get(item.path.name, set())
        if slow is None or getattr(item, "originalname", item.name) in slow or item.name in slow:
            item.add_marker(pytest.mark.e2e)
        groups[item] = _group(item)
        if groups[item]:
            item.add_marker(pytest.mark.xdist_group(groups[item]))
    grouped_modules = {item.path.name for item in items if groups[item]}
    fillers = [item for item in items if item.path.name not in FIRST and item.path.name not in grouped_modules]
    rank = {name: i for i, name in enumerate(FIRST)}
    first = sorted((item for item in items if item.path.name in rank), key=lambda item: rank[item.path.name])
    last = {groups[item]: i for i, item in enumerate(first)}
    order, used = [], set()
    for i, item in enumerate(first):
        order.append(item)
        if groups[item] and last[groups[item]] == i and first[-1].path.name != item.path.name:  # a group ends
            for filler in fillers[len(used) : len(used) + 2]:
                order.append(filler)
                used.add(filler)
    order += [item for item in items if item.path.name not in rank and item not in used]
    assert len(order) == len(items)
    items[:] = order
