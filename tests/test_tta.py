"""Test-time augmentation (train.tta, model.json's tta, palm.serve.tta): one views+mean helper,
the same probabilities through evaluate, `palm predict` and `palm serve`, and a finished training
run that is not trained again when only tta changes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from conftest import ENV, REPO, make_shards, train_section
from palm.core.errors import ConfigError
from palm.core.params import training_config
from palm.nn import modelinfo
from palm.serve import tta

W = np.random.default_rng(0).normal(size=(3, 6, 6)).astype(np.float32)  # a non-symmetric "network"


def tiny_net(x: np.ndarray) -> np.ndarray:
    """A deterministic network: sigmoid of a fixed weighting of the pixels (N,3,6,6) -> (N,)."""
    return (1 / (1 + np.exp(-(x * W).sum(axis=(1, 2, 3))))).astype(np.float32)


def test_views_are_the_flips_and_the_probability_their_mean():
    x = np.random.default_rng(1).normal(size=(5, 3, 6, 6)).astype(np.float32)
    h, v, hv = x[..., ::-1], x[..., ::-1, :], x[..., ::-1, ::-1]
    assert np.array_equal(tta.views(x, 4), np.concatenate([x, h, v, hv]))
    np.testing.assert_array_equal(tta.predict(tiny_net, x, "off"), tiny_net(x))  # off: the network itself
    np.testing.assert_allclose(tta.predict(tiny_net, x, "hflip"), (tiny_net(x) + tiny_net(h)) / 2, atol=1e-7)
    flips = (tiny_net(x) + tiny_net(h) + tiny_net(v) + tiny_net(hv)) / 4
    np.testing.assert_allclose(tta.predict(tiny_net, x, "flips"), flips, atol=1e-7)
    assert np.abs(flips - tiny_net(x)).max() > 1e-3  # the views do differ
    # a mirror-symmetric image is its own left-right view: hflip changes nothing
    sym = (x + h) / 2
    np.testing.assert_allclose(tta.predict(tiny_net, sym, "hflip"), tiny_net(sym), atol=1e-6)
    # the views go to the network together, in calls of at most max_batch images
    calls = []

    def counted(batch):
        calls.append(len(batch))
        return tiny_net(batch)

    np.testing.assert_allclose(tta.predict(counted, x, "flips", max_batch=64), flips, atol=1e-7)
    assert calls == [20]
    calls.clear()
    np.testing.assert_allclose(tta.predict(counted, x, "flips", max_batch=8), flips, atol=1e-7)
    assert calls == [8, 8, 4]
    # flips+rot: also the image turned by +10 and -10 degrees
    turned = [tta.rotate(x, 10), tta.rotate(x, -10)]
    np.testing.assert_allclose(
        tta.predict(tiny_net, x, "flips+rot"), (4 * flips + tiny_net(turned[0]) + tiny_net(turned[1])) / 6, atol=1e-6
    )
    # every mode from one pass over the views, as cross-validation scores them
    per_view = tta.view_probabilities(tiny_net, x, 6)
    for mode in ("off", "hflip", "flips", "flips+rot"):
        np.testing.assert_allclose(tta.combine(per_view, mode), tta.predict(tiny_net, x, mode), atol=1e-7)
    # the images' own probabilities already known (explain's Grad-CAM pass): only the other views run
    calls.clear()
    np.testing.assert_array_equal(
        tta.predict(counted, x, "flips", first=tiny_net(x)), tta.predict(tiny_net, x, "flips")
    )
    assert calls == [15]
    assert tta.predict(tiny_net, x[:0], "flips").shape == (0,)
    with pytest.raises(ValueError, match="tta must be one of off, hflip, flips, flips.rot"):
        tta.predict(tiny_net, x, "rot90")


def test_rotation_turns_about_the_centre_and_blackens_the_corners():
    flat = np.full((2, 3, 40, 40), 0.5, np.float32)
    turned = tta.rotate(flat, 10)
    assert turned.shape == flat.shape and turned.dtype == np.float32
    np.testing.assert_allclose(turned[..., 10:30, 10:30], 0.5, atol=1e-6)  # the middle stays
    assert (turned[..., 0, 0] == -1).all() and (turned[..., -1, -1] == -1).all()  # the corners come in black
    np.testing.assert_allclose(tta.rotate(flat, 0), flat)
    # counter-clockwise: a bar along the top edge's middle moves to the left when turned +10 degrees
    bar = np.full((1, 3, 40, 40), -1, np.float32)
    bar[..., 2:6, 16:24] = 1

    def centre_column(img):
        weight = (img[0, 0] + 1).sum(axis=0)
        return float((weight * np.arange(40)).sum() / weight.sum())

    assert centre_column(bar) == pytest.approx(19.5)
    assert centre_column(tta.rotate(bar, 10)) < 18.5 and centre_column(tta.rotate(bar, -10)) > 20.5
    assert tta.views(flat, 6).shape == (12, 3, 40, 40)


def test_tta_is_a_training_key_overridable_per_model_and_checked():
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    assert params["train"]["tta"] == "off" and training_config(params).tta == "off"  # the baseline does not move
    params["models"]["senet18"] = {"tta": "flips"}
    assert training_config(params).tta == "flips"
    assert training_config({**params, "model": "lenet"}).tta == "off"
    assert training_config({**params, "models": {"senet18": {"tta": False}}}).tta == "off"  # YAML 1.1's bare off
    params["models"]["senet18"] = {"tta": "sideways"}
    with pytest.raises(ConfigError) as exc:
        training_config(params)
    assert str(exc.value) == (
        "params.yaml: models.senet18.tta = 'sideways': input should be 'off', 'hflip', 'flips' or 'flips+rot'"
    )


def test_a_bad_tta_stops_the_stage_with_one_line_and_exit_2(tmp_path):
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["train"]["tta"] = "hvflip"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    proc = subprocess.run(
        [sys.executable, str(REPO / "stages" / "train.py")], cwd=tmp_path, env=ENV, capture_output=True, text=True
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "error: params.yaml: train.tta = 'hvflip': input should be 'off', 'hflip', 'flips' or 'flips+rot'"
    ]


def test_model_json_without_tta_is_off_and_a_bad_one_is_refused(tmp_path):
    (tmp_path / "model.json").write_text(json.dumps({"model": "senet18", "image_size": 32}))
    assert modelinfo.tta(modelinfo.read_info(tmp_path)) == "off"
    (tmp_path / "model.json").write_text(json.dumps({"model": "senet18", "image_size": 32, "tta": "flips"}))
    assert modelinfo.tta(modelinfo.read_info(tmp_path)) == "flips"
    (tmp_path / "model.json").write_text(json.dumps({"model": "senet18", "image_size": 32, "tta": "mirror"}))
    with pytest.raises(ConfigError, match="model.json: tta = 'mirror': input should be"):
        modelinfo.read_info(tmp_path)


# -- a trained model ------------------------------------------------------------------------------------
TRAIN = ["P0001.jpg", "P0002.jpg", "P0003.jpg", "N0001.jpg", "N0002.jpg", "H0001.jpg"]
VALID = (("V0001.jpg", 1), ("V0002.jpg", 0), ("V0003.jpg", 1), ("V0004.jpg", 0), ("V0005.jpg", 1))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Tiny shards, and a LeNet trained 2 epochs on them with tta off: (shards, params, run folder, stdout)."""
    import contextlib
    import io

    from palm.training.train import Trainer

    tmp = tmp_path_factory.mktemp("tta")
    shards = make_shards(tmp, TRAIN, VALID, image_size=32)
    params = {
        "model": "lenet",
        "image_size": 32,
        "train": train_section(epochs=2, batch_size=4, holdout=0, select="last", ema=0.0, device="cpu"),
    }
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        Trainer(params, shards).run(tmp / "models", tmp / "checkpoints", tmp / "live")
    return shards, params, tmp, out.getvalue()


def flips_model(trained_dir: Path, tmp_path: Path) -> Path:
    """A copy of the trained model whose model.json says tta: flips."""
    import shutil

    model_dir = tmp_path / "models"
    shutil.copytree(trained_dir / "models", model_dir)
    info = json.loads((model_dir / "model.json").read_text())
    (model_dir / "model.json").write_text(json.dumps({**info, "tta": "flips"}))
    return model_dir


def test_changing_tta_resumes_the_finished_run_and_only_rewrites_model_json(trained):
    import contextlib
    import io

    from palm.training.train import Trainer

    shards, params, tmp, first = trained
    assert "epochs 1..2" in first
    info = json.loads((tmp / "models" / "model.json").read_text())
    assert info["tta"] == "off"
    weights = (tmp / "models" / "model.safetensors").read_bytes()
    flips = {**params, "train": {**params["train"], "tta": "flips"}}
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        Trainer(flips, shards).run(tmp / "models2", tmp / "checkpoints", tmp / "live2")
    second = out.getvalue()
    assert "resuming from the checkpoint of epoch 2 of 2" in second and "epochs 3..2" in second
    assert "epoch 1/2" not in second and "train_loss" not in second  # no epoch trained again
    info2 = json.loads((tmp / "models2" / "model.json").read_text())
    assert info2["tta"] == "flips" and info2["config"]["tta"] == "flips"
    assert (tmp / "models2" / "model.safetensors").read_bytes() == weights
    assert {k: v for k, v in info2.items() if k not in ("tta", "config")} == {
        k: v for k, v in info.items() if k not in ("tta", "config")
    }


def test_evaluate_predict_and_serve_give_the_same_tta_probabilities(trained, tmp_path):
    """model.json says tta: flips; evaluate, `palm predict` (Paddle Inference and ONNX-free paths) and the
    service agree to 1e-5, and differ from tta off (LeNet is not mirror-symmetric)."""

    from fastapi.testclient import TestClient

    from palm.evaluation.evaluate import predict_valid, predict_valid_modes
    from palm.serve.predict import Predictor
    from palm.serve.service import Model, create_app

    shards, _, tmp, _ = trained
    model_dir = flips_model(tmp, tmp_path)

    valid, probs, _ = predict_valid(shards, model_dir)
    _, by_mode, _ = predict_valid_modes(shards, model_dir)
    np.testing.assert_array_equal(probs, by_mode["flips"])
    assert np.abs(by_mode["flips"] - by_mode["off"]).max() > 1e-4
    assert np.abs(by_mode["hflip"] - by_mode["off"]).max() > 1e-4
    expected = dict(zip(valid.images, probs))

    files = sorted((tmp / "raw").rglob("V000*.jpg"))
    assert len(files) == len(VALID)
    predictor = Predictor.load(model_dir, device="cpu")
    assert predictor.engine.startswith("paddle-inference") and predictor.engine.endswith("tta flips (4 views)")
    rows = list(predictor.predict(files, batch_size=2, progress=False, grade_all=True))
    cli = {Path(r["image"]).name: r["probability"] for r in rows}
    assert set(cli) == set(expected)
    for name, p in expected.items():
        assert cli[name] == pytest.approx(p, abs=1e-5)

    # the export carries tta into models_export/model.json; onnxruntime averages the same views
    from palm.serve.export import export

    export(model_dir, tmp_path / "export", device="cpu")
    assert json.loads((tmp_path / "export" / "model.json").read_text())["tta"] == "flips"
    for engine in ("paddle-inference", "onnxruntime"):
        rows = Predictor.load(tmp_path / "export", device="cpu", engine=engine).predict(
            files, progress=False, grade_all=True
        )
        for r in rows:
            assert r["probability"] == pytest.approx(expected[Path(r["image"]).name], abs=1e-5), engine

    with TestClient(create_app(Model(model_dir, device="cpu")), base_url="http://127.0.0.1") as client:
        body = client.post(
            "/v1/predict", params={"grade_all": "true"}, files=[("files", (f.name, f.read_bytes())) for f in files]
        ).json()
        card = client.get("/v1/model").json()
    served = {r["image"]: r["probability"] for r in body["results"]}
    for name, p in expected.items():
        assert served[name] == pytest.approx(p, abs=1e-5)
    assert card["tta"] == "flips" and "tta flips" in card["engine"]


def test_explain_captions_the_tta_probability(trained, tmp_path, monkeypatch):
    """explain's figures name the probability the model gives (the mean over its views), not the
    un-flipped image's alone."""

    import pandas as pd

    from palm.evaluation.evaluate import predict_valid_modes
    from palm.evaluation.explain import explain

    shards, _, tmp, _ = trained
    model_dir = flips_model(tmp, tmp_path)
    valid, by_mode, _ = predict_valid_modes(shards, model_dir)
    preds = pd.DataFrame(
        {
            "image": valid.images,
            "label": valid.labels,
            "probability": by_mode["flips"],
            "predicted": (by_mode["flips"] >= 0.5).astype(int),
        }
    )
    preds.to_csv(tmp_path / "predictions.csv", index=False)
    modes, ran = [], []

    def spy(run, x, mode, *args, **kwargs):  # the caption's probability: the views helper, model.json's mode
        modes.append((len(x), mode))
        return real(lambda v: ran.append(len(v)) or run(v), x, mode, *args, **kwargs)

    real = tta.predict
    monkeypatch.setattr(tta, "predict", spy)
    written = explain(len(VALID), shards, model_dir, tmp_path / "predictions.csv", tmp_path / "explain", "cpu")
    assert len(written) >= 3 and modes == [(1, "flips")] * len(written)
    assert ran == [3] * len(written)  # the image's own view: from Grad-CAM's forward pass, not run again
    expected = {Path(image).stem: f"{p:.2f}" for image, p in zip(valid.images, by_mode["flips"])}
    for f in written:
        assert f.name.rsplit("_p", 1)[1] == expected[f.name.split("_")[0]] + ".png"
