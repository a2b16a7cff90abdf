"""The model card (palm.evaluation.model_card, stage card) and the weights check of palm predict (palm.nn.card)."""

import json
import shutil
import subprocess

import numpy as np
import pandas as pd
import pytest

from conftest import CARD_FILES, REPO
from palm.cli import main as palm_main
from palm.core.errors import DataError
from palm.core.fsutil import sha256_file
from palm.evaluation.model_card import write_card
from palm.nn.card import CARD_DIR, CARD_JSON, CARD_MD, find_card, verify
from palm.serve.predict import Predictor
from test_inference import save_model, synthetic_photos

BASELINE_EVAL = json.loads((REPO / "metrics" / "eval.json").read_text())
PARAMS = {"data": {"source": "palm", "input": "data/synthetic"}}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A pipeline run's outputs, as the stages before ``card`` leave them, in a git repo."""
    from palm.serve.export import export

    root = tmp_path_factory.mktemp("run")
    save_model(root / "models", "lenet")
    export(root / "models", root / "models_export", device="cpu")
    (root / "metrics").mkdir()
    (root / "metrics" / "eval.json").write_text(json.dumps(BASELINE_EVAL))
    (root / "data" / "labels").mkdir(parents=True)
    pd.DataFrame(
        {
            "split": ["train"] * 5 + ["valid"] * 3,
            "image": [f"i{i}.jpg" for i in range(8)],
            "label": [1, 1, 1, 0, 0, 1, 0, 0],
        }
    ).to_csv(root / "data" / "labels" / "labels.csv", index=False)
    (root / "dvc.lock").write_text(
        "schema: '2.0'\nstages:\n  train:\n    cmd: python stages/train.py\n"
        "    outs:\n    - path: models\n      md5: 0123abcd.dir\n"
    )
    for cmd in (
        ["init", "-q"],
        ["config", "user.email", "t@example.com"],
        ["config", "user.name", "t"],
        ["add", "dvc.lock"],
        ["commit", "-qm", "run"],
    ):
        subprocess.run(["git", *cmd], cwd=root, check=True)
    return root


def write(run, monkeypatch):
    monkeypatch.chdir(run)
    return json.loads(write_card(params=PARAMS).read_text())


def test_card_says_use_data_metrics_threshold_input_provenance_and_weights(run, monkeypatch):
    card = write(run, monkeypatch)
    assert (run / CARD_DIR / CARD_MD).is_file() and find_card(run / "models") == run / CARD_DIR / CARD_JSON
    assert "not a medical device" in " ".join(card["not_for"]) and card["intended_use"]
    assert any("SYNTHETIC" in x for x in card["limitations"])  # the default data is not eyes
    assert card["training_data"]["counts"] == {
        "train": {"PM": 3, "non_PM": 2, "total": 5},
        "valid": {"PM": 1, "non_PM": 2, "total": 3},
    }
    auc = card["validation"]["metrics"]["auc"]
    assert auc == {
        "estimate": BASELINE_EVAL["auc"],
        "ci95": [BASELINE_EVAL["auc_ci_low"], BASELINE_EVAL["auc_ci_high"]],
    }
    assert set(card["validation"]["metrics"]) >= {"accuracy", "sensitivity", "specificity", "ppv_at_prevalence"}
    assert card["decision"]["threshold"] == 0.5 and "probability >= threshold" in card["decision"]["rule"]
    assert card["input"]["tensor"]["shape"] == ["batch", 3, 64, 64] and card["model"]["network"] == "lenet"
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=run, capture_output=True, text=True).stdout.strip()
    prov = card["provenance"]
    assert prov["git_revision"] == head and prov["dvc_lock"]["train"]["outs"] == {"models": "0123abcd.dir"}
    assert prov["dvc_lock"]["sha256"] == sha256_file(run / "dvc.lock")
    listed = {w["path"]: w["sha256"] for w in card["files"]}
    assert set(listed) == CARD_FILES
    assert listed["models/model.json"] == sha256_file(run / "models" / "model.json")
    assert listed["models/model.safetensors"] == sha256_file(run / "models" / "model.safetensors")
    text = (run / CARD_DIR / CARD_MD).read_text()
    assert f"| auc | {BASELINE_EVAL['auc']:.3f} | {BASELINE_EVAL['auc_ci_low']:.3f} - " in text
    assert listed["models_export/model.onnx"] in text


def test_the_card_says_how_a_photograph_is_enhanced_before_the_network(run, monkeypatch, tmp_path):
    """A model trained with ``train.fundus`` (model.json's ``fundus``): the card's input names the
    steps; a model without one (the run above) has no ``fundus`` in its card."""
    assert "fundus" not in write(run, monkeypatch)["input"]
    root = tmp_path / "run"
    shutil.copytree(run, root)
    info = json.loads((root / "models" / "model.json").read_text())
    spec = {"crop": True, "local_norm": 0.033, "clahe": "green"}
    (root / "models" / "model.json").write_text(json.dumps({**info, "fundus": spec}))
    card = write(root, monkeypatch)
    assert card["input"]["fundus"] == spec
    said = card["input"]["preprocessing"]
    assert "cropped to the fundus disc" in said and "sigma 0.033" in said and "CLAHE on the green channel" in said
    assert said in (root / CARD_DIR / CARD_MD).read_text()


def test_the_card_says_which_training_recipe_levers_were_on(run, monkeypatch, tmp_path):
    """``train.label_smoothing`` / ``train.mix`` are in model.json's config only when on: the card's
    provenance names them then, and says nothing of them otherwise."""
    write(run, monkeypatch)
    assert "trained with" not in (run / CARD_DIR / CARD_MD).read_text()
    root = tmp_path / "run"
    shutil.copytree(run, root)
    info = json.loads((root / "models" / "model.json").read_text())
    recipe = {"label_smoothing": 0.1, "mix": "mixup", "mix_alpha": 0.4}
    (root / "models" / "model.json").write_text(json.dumps({**info, "config": {**info.get("config", {}), **recipe}}))
    card = write(root, monkeypatch)
    assert {k: card["model"]["training_config"][k] for k in recipe} == recipe
    assert "; trained with label smoothing 0.1, mixup (alpha 0.4)" in (root / CARD_DIR / CARD_MD).read_text()


def test_predict_runs_the_weights_of_its_card_and_refuses_others(run, monkeypatch, tmp_path, capsys):
    write(run, monkeypatch)
    files = synthetic_photos(tmp_path / "img", 2)
    for folder, engine in (
        ("models", "eager"),
        ("models_export", "paddle-inference"),
        ("models_export", "onnxruntime"),
    ):
        assert verify(run / folder) == run / CARD_DIR / CARD_JSON
        assert palm_main(["predict", *map(str, files), "--model", folder, "--engine", engine, "--quiet"]) == 0
    # altered weights (one byte), in either folder, for any engine: one line, exit 2
    for folder, name, engine in (
        ("models", "model.safetensors", "eager"),
        ("models_export", "inference.pdiparams", "paddle-inference"),
        ("models_export", "model.onnx", "onnxruntime"),
    ):
        victim = tmp_path / folder
        shutil.rmtree(victim, ignore_errors=True)
        shutil.copytree(run / folder, victim)
        data = bytearray((victim / name).read_bytes())
        data[-1] ^= 1
        (victim / name).write_bytes(bytes(data))
        shutil.copy(run / CARD_DIR / CARD_JSON, victim / CARD_JSON)  # a card shipped in the folder
        capsys.readouterr()
        assert palm_main(["predict", *map(str, files), "--model", str(victim), "--engine", engine]) == 2
        err = capsys.readouterr().err.strip()
        assert "does not match the model card" in err and name in err and len(err.splitlines()) == 1, err
    with pytest.raises(DataError, match="does not match the model card"):
        Predictor.load(tmp_path / "models", device="cpu", engine="eager")  # the service's loading path too


def test_a_file_the_card_does_not_list_is_refused_and_no_card_checks_nothing(run, monkeypatch, tmp_path):
    card = write(run, monkeypatch)
    folder = tmp_path / "models_export"
    shutil.copytree(run / "models_export", folder)
    assert verify(folder) is None  # no card in it or beside it: run unchecked
    (folder / CARD_JSON).write_text(
        json.dumps({**card, "files": [w for w in card["files"] if not w["path"].endswith(".onnx")]})
    )
    with pytest.raises(DataError, match="model.onnx: not described by the model card"):
        verify(folder)
    (folder / CARD_JSON).write_text("{not json")
    with pytest.raises(DataError, match="not a valid model card"):
        verify(folder)


def test_card_without_the_evaluation_is_a_one_line_error(run, monkeypatch, tmp_path):
    monkeypatch.chdir(run)
    with pytest.raises(DataError, match="nothing.json: not found; run the earlier stages"):
        write_card(out_dir=tmp_path / "card", eval_json=tmp_path / "nothing.json", params=PARAMS)
    assert not (tmp_path / "card").exists()


# --- issue 40, class 3: what is served is what the card says ---------------------------------------------------


def probabilities(predictor, files):
    return np.array([r["probability"] for r in predictor.predict(files, progress=False, grade_all=True)])


@pytest.fixture(scope="module")
def other(run, tmp_path_factory):
    """Other weights of the same network (every tensor negated), saved and exported like ``run``'s:
    what an attacker, or a ``dvc repro`` during serving, puts in place of the checked files."""
    from palm.nn.weights import load_state, save_state
    from palm.serve.export import export

    root = tmp_path_factory.mktemp("other")
    (root / "models").mkdir()
    state = load_state(run / "models" / "model.safetensors")
    save_state({k: -v for k, v in state.items()}, root / "models" / "model.safetensors")
    shutil.copy(run / "models" / "model.json", root / "models" / "model.json")
    export(root / "models", root / "models_export", device="cpu")
    return root


def carded_copy(run, monkeypatch, dest):
    """A copy of ``run``'s models, export and card (written first)."""
    write(run, monkeypatch)
    for d in ("models", "models_export", CARD_DIR):
        shutil.copytree(run / d, dest / d)
    return dest


@pytest.mark.parametrize(
    "folder, name, engine",
    [
        ("models", "model.safetensors", "eager"),
        ("models", "model.safetensors", "paddle-inference"),
        ("models_export", "inference.pdiparams", "paddle-inference"),
        ("models_export", "inference.pdiparams", "eager"),
        ("models_export", "model.onnx", "onnxruntime"),
    ],
)
def test_the_weights_checked_are_the_weights_that_run_even_if_the_file_is_swapped_after_the_check(
    run, other, monkeypatch, tmp_path, folder, name, engine
):
    """Issue 40: the card was checked, then the weights read again later: other weights swapped in
    that window were served, exit 0. Now each file is read once, hashed, and loaded from those bytes."""
    import palm.nn.card as card_module

    root = carded_copy(run, monkeypatch, tmp_path / "run")
    files = synthetic_photos(tmp_path / "img", 3)
    want = probabilities(Predictor.load(root / folder, device="cpu", engine=engine), files)
    theirs = probabilities(Predictor.load(other / folder, device="cpu", engine=engine), files)
    assert np.abs(theirs - want).max() > 1e-3  # the swap would show

    real = card_module.read_regular

    def read_then_swap(path):
        data = real(path)
        if path.name == name:  # right after the bytes were read (and hashed)
            shutil.copyfile(other / folder / name, path)
        return data

    monkeypatch.setattr(card_module, "read_regular", read_then_swap)
    predictor = Predictor.load(root / folder, device="cpu", engine=engine)
    assert sha256_file(root / folder / name) == sha256_file(other / folder / name)  # swapped on the disk
    assert predictor.sha256[name] == sha256_file(run / folder / name)  # what was checked
    np.testing.assert_allclose(probabilities(predictor, files), want, atol=1e-6)  # and what runs
    monkeypatch.setattr(card_module, "read_regular", real)
    code = palm_main(["predict", *map(str, files), "--model", str(root / folder), "--engine", engine, "--quiet"])
    assert code == 2  # loaded afresh now: the swapped file is refused


@pytest.mark.parametrize("folder", ["models", "models_export"])
@pytest.mark.parametrize("edit", [{"threshold": 1.0}, {"tta": "flips"}, {"input_size": 32}])
def test_an_edited_model_json_is_refused_by_the_card(run, monkeypatch, tmp_path, capsys, folder, edit):
    """Issue 40: the card did not cover model.json: an edited threshold (1.0) or tta silently changed
    every answer. The card lists model.json's SHA-256 too."""
    root = carded_copy(run, monkeypatch, tmp_path / "run")
    files = synthetic_photos(tmp_path / "img", 2)
    info = json.loads((root / folder / "model.json").read_text())
    (root / folder / "model.json").write_text(json.dumps({**info, **edit}))
    for engine in ("eager",) + (("onnxruntime",) if folder == "models_export" else ()):
        capsys.readouterr()
        assert palm_main(["predict", *map(str, files), "--model", str(root / folder), "--engine", engine]) == 2
        err = capsys.readouterr().err.strip()
        assert "model.json: SHA-256" in err and "does not match the model card" in err, err
        assert len(err.splitlines()) == 1, err


@pytest.mark.parametrize(
    "key, value, says",
    [
        ("threshold", True, "threshold = True: must be a number"),
        ("threshold", "0.5", "threshold = '0.5': must be a number"),
        ("image_size", 64.0, "image_size = 64.0: must be a whole number"),
        ("input_size", True, "input_size = True: must be a whole number"),
        ("tta", False, "tta = False"),
        ("fundus", {"crop": 1}, "fundus.crop = 1: must be true or false"),
        ("fundus", {"local_norm": False}, "fundus.local_norm = False: must be a number"),
        ("threshold_rule", 0.5, "threshold_rule = 0.5"),
    ],
)
def test_model_json_types_are_strict(run, tmp_path, capsys, key, value, says):
    """Issue 40: ``"threshold": true`` was read as 1.0 (PM for nothing but a certainty). A bool is
    not a number, a float not a side: one line naming the key, exit 2 (a folder with no card)."""
    folder = tmp_path / "models"
    shutil.copytree(run / "models", folder)
    info = json.loads((folder / "model.json").read_text())
    (folder / "model.json").write_text(json.dumps({**info, key: value}))
    files = synthetic_photos(tmp_path / "img", 1)
    capsys.readouterr()
    assert palm_main(["predict", *map(str, files), "--model", str(folder), "--engine", "eager"]) == 2
    err = capsys.readouterr().err.strip()
    assert says in err and "model.json" in err and len(err.splitlines()) == 1, err


def test_a_model_folder_reached_through_a_symbolic_link_is_checked(run, monkeypatch, tmp_path, capsys):
    """Issue 40: ``--model link`` (a link to a folder beside models_card/) skipped the check."""
    root = carded_copy(run, monkeypatch, tmp_path / "run")
    (tmp_path / "elsewhere").mkdir()
    link = tmp_path / "elsewhere" / "model"
    link.symlink_to(root / "models", target_is_directory=True)
    assert verify(link) == root / CARD_DIR / CARD_JSON and find_card(link) == root / CARD_DIR / CARD_JSON
    info = json.loads((root / "models" / "model.json").read_text())
    (root / "models" / "model.json").write_text(json.dumps({**info, "threshold": 1.0}))
    files = synthetic_photos(tmp_path / "img", 1)
    capsys.readouterr()
    assert palm_main(["predict", *map(str, files), "--model", str(link), "--engine", "eager"]) == 2
    err = capsys.readouterr().err.strip()
    assert "does not match the model card" in err and len(err.splitlines()) == 1, err
    (tmp_path / "loop").symlink_to(tmp_path / "loop")  # a loop of links: one line too
    with pytest.raises(DataError, match="loop: cannot open the model folder"):
        verify(tmp_path / "loop")


def test_files_of_different_folders_of_the_card_or_an_older_card_are_refused(run, monkeypatch, tmp_path):
    root = carded_copy(run, monkeypatch, tmp_path / "run")
    card = json.loads((root / CARD_DIR / CARD_JSON).read_text())
    shutil.copy(root / "models" / "model.json", root / "models_export" / "model.json")  # listed, but for models/
    with pytest.raises(DataError, match="listed by the model card .* but for different model folders"):
        verify(root / "models_export")
    (root / CARD_DIR / CARD_JSON).write_text(
        json.dumps({**card, "schema": "palm-model-card/1", "weights": card["files"]})
    )
    with pytest.raises(DataError, match=r"written by an older palm .*rerun dvc repro card"):
        verify(root / "models")


def test_the_service_answers_from_the_model_and_card_it_loaded_until_it_restarts(run, other, monkeypatch, tmp_path):
    """Issue 40: ``/v1/model`` reread the card while the network in memory stayed the old one (after
    a ``dvc repro`` during serving it described the new weights while the old ones answered). The
    service reports the card its model was checked against when it loaded, and answers with that
    model's weights and threshold, until it is restarted."""
    from fastapi.testclient import TestClient

    from palm.serve.service import Model, create_app

    root = carded_copy(run, monkeypatch, tmp_path / "run")
    files = synthetic_photos(tmp_path / "img", 2)
    upload = [("files", (f.name, f.read_bytes())) for f in files]
    loaded_card = json.loads((root / CARD_DIR / CARD_JSON).read_text())

    def serve_and_ask(model):
        with TestClient(create_app(model), base_url="http://127.0.0.1:8000") as client:
            card = client.get("/v1/model").json()
            answer = client.post("/v1/predict", files=upload, params={"grade_all": True}).json()
        return card, answer

    model = Model(root / "models", device="cpu", engine="eager")
    card, before = serve_and_ask(model)
    assert card == loaded_card and before["threshold"] == 0.5
    # a dvc repro during serving: other weights, a new model.json and the card that vouches for them
    shutil.copy(other / "models" / "model.safetensors", root / "models" / "model.safetensors")
    info = json.loads((root / "models" / "model.json").read_text())
    (root / "models" / "model.json").write_text(json.dumps({**info, "threshold": 0.9}))
    new_card = {
        **loaded_card,
        "validation": {**loaded_card["validation"], "metrics": {"auc": {"estimate": 0.61}}},
        "files": [
            {**f, "sha256": sha256_file(root / f["path"])} if f["path"].startswith("models/") else f
            for f in loaded_card["files"]
        ],
    }
    (root / CARD_DIR / CARD_JSON).write_text(json.dumps(new_card))
    card, after = serve_and_ask(model)
    assert card == loaded_card and after == before  # the model it loaded, and that model's card
    card, restarted = serve_and_ask(Model(root / "models", device="cpu", engine="eager"))
    assert card == new_card and restarted["threshold"] == 0.9
    assert [r["probability"] for r in restarted["results"]] != [r["probability"] for r in before["results"]]
