"""The model card (palm.evaluation.model_card, stage card) and the weights check of palm predict (palm.nn.card)."""

import json
import shutil
import subprocess

import pandas as pd
import pytest
from conftest import REPO
from test_inference import save_model, synthetic_photos

from palm.cli import main as palm_main
from palm.core.errors import DataError
from palm.evaluation.model_card import write_card
from palm.core.fsutil import sha256_file
from palm.nn.card import CARD_DIR, CARD_JSON, CARD_MD, find_card, verify
from palm.serve.predict import Predictor

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
    pd.DataFrame({"split": ["train"] * 5 + ["valid"] * 3, "image": [f"i{i}.jpg" for i in range(8)],
                  "label": [1, 1, 1, 0, 0, 1, 0, 0]}).to_csv(root / "data" / "labels" / "labels.csv", index=False)
    (root / "dvc.lock").write_text("schema: '2.0'\nstages:\n  train:\n    cmd: python stages/train.py\n"
                                   "    outs:\n    - path: models\n      md5: 0123abcd.dir\n")
    for cmd in (["init", "-q"], ["config", "user.email", "t@example.com"], ["config", "user.name", "t"],
                ["add", "dvc.lock"], ["commit", "-qm", "run"]):
        subprocess.run(["git", *cmd], cwd=root, check=True)
    return root


def write(run, monkeypatch):
    monkeypatch.chdir(run)
    return json.loads(write_card(params=PARAMS).read_text())


def test_card_says_use_data_metrics_threshold_input_provenance_and_weights(run, monkeypatch):
    card = write(run, monkeypatch)
    assert (run / CARD_DIR / CARD_MD).is_file() and find_card(run / "models") == run / CARD_DIR / CARD_JSON
    assert "not a medical device" in " ".join(card["not_for"]) and card["intended_use"]
    assert any("SYNTHETIC" in x for x in card["limitations"])          # the default data is not eyes
    assert card["training_data"]["counts"] == {"train": {"PM": 3, "non_PM": 2, "total": 5},
                                               "valid": {"PM": 1, "non_PM": 2, "total": 3}}
    auc = card["validation"]["metrics"]["auc"]
    assert auc == {"estimate": BASELINE_EVAL["auc"],
                   "ci95": [BASELINE_EVAL["auc_ci_low"], BASELINE_EVAL["auc_ci_high"]]}
    assert set(card["validation"]["metrics"]) >= {"accuracy", "sensitivity", "specificity", "ppv_at_prevalence"}
    assert card["decision"]["threshold"] == 0.5 and "probability >= threshold" in card["decision"]["rule"]
    assert card["input"]["tensor"]["shape"] == ["batch", 3, 64, 64] and card["model"]["network"] == "lenet"
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=run, capture_output=True, text=True).stdout.strip()
    prov = card["provenance"]
    assert prov["git_revision"] == head and prov["dvc_lock"]["train"]["outs"] == {"models": "0123abcd.dir"}
    assert prov["dvc_lock"]["sha256"] == sha256_file(run / "dvc.lock")
    listed = {w["path"]: w["sha256"] for w in card["weights"]}
    assert set(listed) == {"models/model.safetensors", "models_export/inference.json",
                           "models_export/inference.pdiparams", "models_export/model.onnx"}
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
    for folder, engine in (("models", "eager"), ("models_export", "paddle-inference"),
                           ("models_export", "onnxruntime")):
        assert verify(run / folder) == run / CARD_DIR / CARD_JSON
        assert palm_main(["predict", *map(str, files), "--model", folder, "--engine", engine, "--quiet"]) == 0
    # altered weights (one byte), in either folder, for any engine: one line, exit 2
    for folder, name, engine in (("models", "model.safetensors", "eager"),
                                 ("models_export", "inference.pdiparams", "paddle-inference"),
                                 ("models_export", "model.onnx", "onnxruntime")):
        victim = tmp_path / folder
        shutil.rmtree(victim, ignore_errors=True)
        shutil.copytree(run / folder, victim)
        data = bytearray((victim / name).read_bytes())
        data[-1] ^= 1
        (victim / name).write_bytes(bytes(data))
        shutil.copy(run / CARD_DIR / CARD_JSON, victim / CARD_JSON)     # a card shipped in the folder
        capsys.readouterr()
        assert palm_main(["predict", *map(str, files), "--model", str(victim), "--engine", engine]) == 2
        err = capsys.readouterr().err.strip()
        assert "does not match the model card" in err and name in err and len(err.splitlines()) == 1, err
    with pytest.raises(DataError, match="does not match the model card"):
        Predictor.load(tmp_path / "models", device="cpu", engine="eager")   # the service's loading path too


def test_a_file_the_card_does_not_list_is_refused_and_no_card_checks_nothing(run, monkeypatch, tmp_path):
    card = write(run, monkeypatch)
    folder = tmp_path / "models_export"
    shutil.copytree(run / "models_export", folder)
    assert verify(folder) is None                       # no card in it or beside it: run unchecked
    (folder / CARD_JSON).write_text(json.dumps({**card, "weights": [w for w in card["weights"]
                                                                    if not w["path"].endswith(".onnx")]}))
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
