"""Using a trained model: predict (CLI), the exported inference model, Grad-CAM."""

import csv
import json

import cv2
import numpy as np
import paddle
import pytest

from palm.cli import main as palm_main
from palm.data.image import load_image, to_chw_float
from palm.nn.models import build_model, gradcam_layer
from palm.nn.weights import load_state, save_state
from palm.serve.export import export
from palm.serve.gradcam import gradcam
from palm.serve.predict import Predictor

SIZE = 48


def save_model(folder, name="senet18"):
    """A (randomly initialised) trained-model folder as the train stage writes it."""
    folder.mkdir(parents=True)
    paddle.seed(1)
    model = build_model(name, image_size=SIZE)
    save_state(model.state_dict(), folder / "model.safetensors")
    (folder / "model.json").write_text(json.dumps({"model": name, "image_size": SIZE, "threshold": 0.5}))
    return folder


def photos(folder, n=3):
    """Synthetic fundus photographs (gradable: palm predict diagnoses them)."""
    from palm.data.synthetic import draw_fundus

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        img, _ = draw_fundus(rng, "PNH"[i % 3], (280, 300 + 40 * i), "L")
        cv2.imwrite(str(folder / f"img{i}.jpg"), img)
    return sorted(folder.glob("*.jpg"))


@pytest.mark.parametrize("name", ["senet18", "googlenet"])
def test_exported_model_matches_the_training_time_model(tmp_path, name):
    models = save_model(tmp_path / "models", name)
    export(models, tmp_path / "export")
    files = photos(tmp_path / "img")
    a = list(Predictor.load(models).predict(files, progress=False))
    b = list(Predictor.load(tmp_path / "export").predict(files, progress=False))
    pa = np.array([r["probability"] for r in a])
    pb = np.array([r["probability"] for r in b])
    np.testing.assert_allclose(pa, pb, atol=1e-4)
    # and the raw logits, on the very same preprocessed input
    x = to_chw_float(np.stack([load_image(f, SIZE) for f in files]))
    model = build_model(name, image_size=SIZE)
    model.set_state_dict(load_state(models / "model.safetensors"))
    model.eval()
    loaded = paddle.jit.load(str(tmp_path / "export" / "inference"))
    np.testing.assert_allclose(model(paddle.to_tensor(x)).numpy(), loaded(paddle.to_tensor(x)).numpy(), atol=1e-4)


def test_predict_cli_reports_unreadable_files_and_predicts_the_rest(tmp_path, capsys):
    models = save_model(tmp_path / "models")
    photos(tmp_path / "img", 3)
    (tmp_path / "img" / "broken.jpg").write_bytes(b"not a jpeg")
    out = tmp_path / "preds.csv"
    code = palm_main(["predict", str(tmp_path / "img"), "--model", str(models), "--out", str(out), "--quiet"])
    assert code == 1
    rows = list(csv.DictReader(out.open()))
    assert [r["image"].split("/")[-1] for r in rows] == ["broken.jpg", "img0.jpg", "img1.jpg", "img2.jpg"]
    assert "broken.jpg" in rows[0]["error"] and rows[0]["probability"] == ""
    for r in rows[1:]:
        assert 0 <= float(r["probability"]) <= 1 and r["predicted"] in ("0", "1") and r["error"] == ""
        assert r["quality"] == "ok"
    assert "broken.jpg" in capsys.readouterr().err
    assert palm_main(["predict", str(tmp_path / "img" / "img0.jpg"), "--model", str(models), "--quiet"]) == 0


def test_predict_without_a_model_is_a_clear_error(tmp_path, capsys):
    photos(tmp_path / "img", 1)
    assert palm_main(["predict", str(tmp_path / "img"), "--model", str(tmp_path / "nothing")]) == 2
    assert "no model.json" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["alexnet", "vgg16", "googlenet", "resnet50", "senet18", "lenet"])
def test_gradcam_heatmap(name):
    paddle.seed(0)
    model = build_model(name, image_size=64)
    model.eval()
    rng = np.random.default_rng(0)
    a = to_chw_float(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8))
    b = to_chw_float(cv2.circle(np.zeros((64, 64, 3), np.uint8), (20, 40), 12, (255, 255, 255), -1))
    cam_a, p = gradcam(model, gradcam_layer(name, model), a)
    cam_b, _ = gradcam(model, gradcam_layer(name, model), b)
    assert cam_a.shape == (64, 64) and 0 <= p <= 1
    assert cam_a.min() >= 0 and cam_a.max() <= 1
    assert cam_a.std() > 0 or cam_b.std() > 0
    assert not np.allclose(cam_a, cam_b)


class _Plant:
    """An object whose unpickling creates a file: what a hostile model.pdparams carries."""

    def __init__(self, target):
        self.target = str(target)

    def __reduce__(self):
        return (open, (self.target, "w"))


def test_a_pickled_model_is_refused_and_never_unpickled(tmp_path, capsys):
    import pickle

    marker = tmp_path / "pwned"
    for folder, name in ((tmp_path / "models", "model.pdparams"), (tmp_path / "export", "inference.pdiparams.info")):
        folder.mkdir()
        (folder / name).write_bytes(pickle.dumps(_Plant(marker)))
        (folder / "model.json").write_text(json.dumps({"model": "senet18", "image_size": SIZE}))
    (tmp_path / "export" / "inference.pdmodel").write_bytes(pickle.dumps(_Plant(marker)))
    photos(tmp_path / "img", 1)
    for folder in ("models", "export"):
        code = palm_main(["predict", str(tmp_path / "img"), "--model", str(tmp_path / folder), "--quiet"])
        err = capsys.readouterr().err
        assert code == 2 and not marker.exists(), err
        assert str(tmp_path / folder) in err and "pickle" in err and "Traceback" not in err
        assert len(err.strip().splitlines()) == 1


def test_saved_weights_round_trip_exactly_and_reject_other_files(tmp_path):
    from palm.core.errors import DataError

    paddle.seed(3)
    model = build_model("senet18", image_size=SIZE)
    state = {"model": model.state_dict(), "epoch": 3, "lr": {"last_lr": 1e-3, "nested": [1, 2.5, None]}}
    save_state(state, tmp_path / "w.safetensors")
    back = load_state(tmp_path / "w.safetensors")
    assert back["epoch"] == 3 and back["lr"] == {"last_lr": 1e-3, "nested": [1, 2.5, None]}
    assert set(back["model"]) == set(state["model"])
    for k, v in state["model"].items():
        assert back["model"][k].dtype == v.numpy().dtype and np.array_equal(back["model"][k], v.numpy()), k
    (tmp_path / "junk.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}......")
    with pytest.raises(DataError, match="junk.safetensors: not a safetensors"):
        load_state(tmp_path / "junk.safetensors")


def test_gradcam_figure_is_readable_and_captioned():
    import pandas as pd

    from palm.evaluation.explain import caption, choose_images, figure

    rgb = cv2.circle(np.zeros((96, 96, 3), np.uint8), (48, 48), 40, (200, 80, 40), -1)
    cam = np.zeros((12, 12), np.float32)
    cam[3:6, 3:6] = 1
    lines = caption("V0012.jpg", 1, 0.31, 0.5)
    assert lines[0] == "V0012: label PM, predicted non-PM (WRONG)" and "0.310" in lines[1] and "0.500" in lines[1]
    fig = figure(rgb, cam, lines)
    assert fig.dtype == np.uint8 and min(fig.shape[:2]) >= 448
    band = fig[:96]
    assert (band < 128).any()  # the caption is written
    left, right = fig[96:, :512], fig[96:, 520:]
    assert left.shape == right.shape == (512, 512, 3)
    assert not np.array_equal(left, right)  # the heatmap is drawn over the right one
    # the most confident errors come first
    preds = pd.DataFrame(
        {
            "image": list("abcdef"),
            "label": [1, 1, 0, 0, 1, 0],
            "probability": [0.45, 0.05, 0.55, 0.99, 0.9, 0.1],
            "predicted": [0, 0, 1, 1, 1, 0],
        }
    )
    assert choose_images(preds, 6).image.tolist()[:2] == ["d", "b"]


@pytest.mark.parametrize("threshold,expected", [(0.01, 1), (0.99, 0)])
def test_predict_applies_the_threshold_stored_in_model_json(tmp_path, threshold, expected):
    models = save_model(tmp_path / "models")
    info = json.loads((models / "model.json").read_text())
    (models / "model.json").write_text(json.dumps({**info, "threshold": threshold, "threshold_rule": "youden"}))
    rows = list(Predictor.load(models).predict(photos(tmp_path / "img", 2), progress=False))
    assert all(0.01 < r["probability"] < 0.99 for r in rows)  # an untrained network is unsure
    assert [r["predicted"] for r in rows] == [expected, expected]
