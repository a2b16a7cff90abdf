"""Never stale (issue 27): a result always matches the code, data and parameters that made it.

Real `dvc` in a temporary git repo on tiny data, running the project's own copy of the library
(``PYTHONPATH=<project>/src``), so that editing it edits the code the stages run."""

import hashlib
import json

import pytest
import yaml

from conftest import make_project, run
from test_pipeline_e2e import PARAMS, TINY, set_params

pytestmark = pytest.mark.e2e


def weights(project) -> str:
    return hashlib.sha256((project / "models" / "model.safetensors").read_bytes()).hexdigest()


def edit(path, old: str, new: str) -> None:
    text = path.read_text()
    assert text.count(old) == 1, old
    path.write_text(text.replace(old, new))


def append(path, text: str) -> None:
    path.write_text(path.read_text() + text)


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    proj = make_project(tmp_path_factory.mktemp("stale") / "palm")
    set_params(
        proj,
        **{f"synthetic.{k}": v for k, v in TINY.items()},
        image_size=32,
        model="lenet",
        **{"train.epochs": 2, "train.batch_size": 4, "train.warmup_epochs": 0, "explain.n_images": 2},
        **{f"models.{m}.epochs": 2 for m, over in PARAMS["models"].items() if "epochs" in over},
    )
    run(["git", "commit", "-qam", "tiny"], proj)
    return proj


def repro(project, *args) -> str:
    return run(["dvc", "repro", *args], project, env={"PYTHONPATH": str(project / "src")}).stdout


def test_an_edit_of_the_code_training_runs_trains_from_scratch_and_nothing_else_reruns(project):
    out = repro(project)
    assert "Running stage 'train'" in out and "epochs 1..2" in out
    first = weights(project)
    lock = yaml.safe_load((project / "dvc.lock").read_text())["stages"]["train"]["params"]["params.yaml"]
    assert set(lock) == {"model", "image_size", "train", "models.lenet"}  # exact: this network's overrides

    # the same code: the finished run's checkpoint is this run's, nothing to train
    assert "Running stage" not in repro(project)

    # the override of a network that is not selected: nothing reruns
    set_params(project, **{"models.alexnet.lr": 0.0002})
    assert "Running stage" not in repro(project)
    # a module no stage imports, then one that training does not import: train does not rerun
    append(project / "src" / "palm" / "cli.py", "\n# edited\n")
    assert "Running stage" not in repro(project)
    append(project / "src" / "palm" / "evaluation" / "report" / "__init__.py", "\n# edited\n")
    out = repro(project)
    assert "Running stage 'report'" in out and "Running stage 'train'" not in out

    # the selected network's override: train reruns (and, another configuration, from scratch)
    set_params(project, **{"models.lenet.lr": 0.0002})
    out = repro(project, "train")
    assert "checkpoint is from other parameters: training from scratch" in out and "epochs 1..2" in out
    set_params(project, **{"models.lenet.lr": PARAMS["models"]["lenet"]["lr"]})
    # (without DVC's run cache, which would restore the first run's models/ without running)
    out = repro(project, "train", "--no-run-cache")
    assert "checkpoint is from other parameters: training from scratch" in out
    assert weights(project) == first  # from scratch again: the same seed, the same weights

    # an edit of the code training runs that leaves the arithmetic alone: from scratch, same weights
    train_py = project / "src" / "palm" / "training" / "train.py"
    edit(train_py, '"""The ``train`` stage', '"""Edited. The ``train`` stage')
    out = repro(project, "train")
    assert "checkpoint is from other code (src/palm/training/train.py): training from scratch" in out
    assert "resuming" not in out and "epochs 1..2" in out
    assert weights(project) == first

    # the edit: the cosine schedule's rate times 30: trained from epoch 1, other weights
    edit(train_py, "CosineAnnealingDecay(cfg.lr, ", "CosineAnnealingDecay(cfg.lr * 30, ")
    status = run(["dvc", "status", "train"], project).stdout
    assert "modified:" in status and "src/palm/training" in status  # the family folder is one dep
    out = repro(project, "train")
    assert "checkpoint is from other code (src/palm/training/train.py): training from scratch" in out
    assert "resuming" not in out and "epochs 1..2" in out
    assert weights(project) != first
    manifest = json.loads((project / "checkpoints" / "checkpoint.json").read_text())
    assert (
        manifest["identity"]["code"]["src/palm/training/train.py"] == hashlib.sha256(train_py.read_bytes()).hexdigest()
    )
