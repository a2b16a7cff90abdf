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
    os.environ["OMP_NUM_THREADS"] = str(max(1, len(os.sched_getaffinity(0)) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))



def train_section(**overrides) -> dict:
    """params.yaml's ``train:`` (the one source of defaults) with ``overrides`` (whole values:
    an ``augment`` given replaces params.yaml's)."""
    import yaml

    with open(REPO / "params.yaml", encoding="utf-8") as f:
        return {**yaml.safe_load(f)["train"], **overrides}


requires_palm_mini = pytest.mark.skipif(
    not (PALM_MINI / "training.zip").is_file(), reason="../shared/palm-mini (real images) is not here")


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


def make_palm_zips(folder: Path, train=("P0001.jpg", "P0002.jpg", "N0001.jpg", "H0001.jpg"),
                   valid=(("V0001.jpg", 1), ("V0002.jpg", 0)), gt: pd.DataFrame | None = None,
                   valid_images=None) -> Path:
    """The three original zips, with tiny random JPEGs; ``gt`` replaces the default xlsx."""
    folder.mkdir(parents=True, exist_ok=True)
    inner = io.BytesIO()
    with zipfile.ZipFile(inner, "w") as zf:
        for i, name in enumerate(train):
            zf.writestr(f"PALM-Training400/{name}", jpeg_bytes(i))
    write_zip(folder / "training.zip", {"PALM-Training400/PALM-Training400.zip": inner.getvalue()})
    names = valid_images if valid_images is not None else [n for n, _ in valid]
    write_zip(folder / "validation.zip",
              {f"PALM-Validation400/{n}": jpeg_bytes(100 + i) for i, n in enumerate(names)})
    if gt is None:
        gt = pd.DataFrame({"ID": range(1, len(valid) + 1), "imgName": [n for n, _ in valid],
                           "Label": [l for _, l in valid], "Fovea_X": 1.0, "Fovea_Y": 2.0})
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
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
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
    run(["dvc", "config", "core.autostage", "true"], dest)
    run(["dvc", "config", "core.analytics", "false"], dest)
    run(["git", "add", "-A"], dest)
    run(["git", "commit", "-qm", "pipeline"], dest)
    return dest


# -- how the suite runs: the quick loop, and pytest-xdist's workers -----------------------------------
# The quick loop, `pytest -m "not e2e"` (CONTRIBUTING.md), leaves out the modules that mark
# themselves e2e and the tests below: each takes more than a few seconds (a stage, server or
# training process, a training run, every network at full size). None: the whole module.
# (Measured with `pytest --durations=0`: results/test-durations-*.txt.)
SLOW: dict[str, set[str] | None] = {}

# The costliest modules first (their test groups are handed out first, and the cheap tests fill
# the workers' gaps after); the others keep their order, after these.
FIRST: list[str] = []


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


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    """Mark the slow tests e2e; keep the tests that share a module-scoped fixture on one xdist worker
    (``--dist loadgroup``: the fixture is built once); the costliest modules first."""
    rank = {name: i for i, name in enumerate(FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(FIRST)))
    for item in items:
        slow = SLOW.get(item.path.name, set())
        if slow is None or getattr(item, "originalname", item.name) in slow:
            item.add_marker(pytest.mark.e2e)
        shared = _module_fixtures(item)
        if shared:
            item.add_marker(pytest.mark.xdist_group(f"{item.path.stem}:{'+'.join(shared)}"))
