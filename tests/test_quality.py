"""palm.serve.quality and palm predict's quality column: pictures that are not gradable fundus
photographs are recognised, real and synthetic fundus photographs are not flagged."""

from __future__ import annotations

import csv
import io
import json
import zipfile

import cv2
import numpy as np
import paddle
import pytest

from conftest import PALM_MINI, requires_palm_mini
from palm.cli import main as palm_main
from palm.data.synthetic import draw_fundus
from palm.serve.quality import OK, REASONS, assess, check_file


def fundus(seed=0, kind="P", size=(600, 600)):
    """A synthetic fundus photograph, RGB."""
    bgr, _ = draw_fundus(np.random.default_rng(seed), kind, size, "L")
    return np.ascontiguousarray(bgr[..., ::-1])


def text_page(size=(800, 600)):
    page = np.full((size[0], size[1], 3), 250, np.uint8)
    for i, y in enumerate(range(40, size[0] - 20, 28)):
        cv2.putText(
            page,
            f"Line {i}: the quick brown fox jumps over the lazy dog",
            (20, y),
            cv2.FONT_HERSHEY_SIMPLEX,
            0.6,
            (20, 20, 20),
            1,
            cv2.LINE_AA,
        )
    return page


NON_FUNDUS = {
    "black": (np.zeros((500, 500, 3), np.uint8), "too dark"),
    "white": (np.full((500, 500, 3), 255, np.uint8), "overexposed"),
    "noise": (np.random.default_rng(0).integers(0, 256, (500, 500, 3), dtype=np.uint8), "no circular fundus"),
    "text": (text_page(), "overexposed"),
    "tiny": (cv2.resize(fundus(), (40, 40), interpolation=cv2.INTER_AREA), "too small"),
    "blurred": (cv2.GaussianBlur(fundus(), (0, 0), 8), "blurred"),
    "dim": ((fundus().astype(np.float32) * 0.12).astype(np.uint8), "too dark"),
    "square photo": (
        cv2.resize(
            cv2.GaussianBlur(np.random.default_rng(1).integers(60, 200, (50, 50, 3), dtype=np.uint8), (0, 0), 2),
            (500, 500),
        ),
        "no circular fundus",
    ),
}


@pytest.mark.parametrize("name", list(NON_FUNDUS))
def test_pictures_that_are_not_gradable_fundus_photographs_are_flagged(name, tmp_path):
    rgb, reason = NON_FUNDUS[name]
    assert reason in REASONS
    assert assess(rgb) == reason
    path = tmp_path / f"{name}.png"  # and from a file, as palm predict reads it
    cv2.imwrite(str(path), rgb[..., ::-1])
    assert check_file(path) == reason


@pytest.mark.parametrize("kind", ["P", "N", "H"])
@pytest.mark.parametrize("size", [(1444, 1444), (2124, 2056), (224, 224)])
def test_synthetic_fundus_photographs_are_ok(kind, size, tmp_path):
    for seed in range(3):
        rgb = fundus(seed, kind, size)
        assert assess(rgb) == OK, (kind, size, seed)
    path = tmp_path / "f.jpg"
    cv2.imwrite(str(path), rgb[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, 90])
    assert check_file(path) == OK


@requires_palm_mini
@pytest.mark.realdata
def test_no_real_palm_mini_photograph_is_flagged():
    flagged, n = {}, 0
    with zipfile.ZipFile(PALM_MINI / "training.zip") as outer:
        inner = zipfile.ZipFile(io.BytesIO(outer.read("PALM-Training400/PALM-Training400.zip")))
    with zipfile.ZipFile(PALM_MINI / "validation.zip") as val:
        sources = [(inner, name) for name in inner.namelist() if name.lower().endswith(".jpg")]
        sources += [(val, name) for name in val.namelist() if name.lower().endswith(".jpg")]
        for zf, name in sources:
            q = check_file(zf.read(name))
            n += 1
            if q != OK:
                flagged[name] = q
    assert n == 400
    assert flagged == {}


def save_model(folder, size=48):
    from palm.nn.models import build_model
    from palm.nn.weights import MODEL_WEIGHTS, save_state

    folder.mkdir(parents=True)
    paddle.seed(1)
    save_state(build_model("lenet", image_size=size).state_dict(), folder / MODEL_WEIGHTS)
    (folder / "model.json").write_text(json.dumps({"model": "lenet", "image_size": size, "threshold": 0.5}))
    return folder


def test_predict_lists_ungradable_images_without_a_diagnosis_unless_asked(tmp_path, capsys):
    models = save_model(tmp_path / "models")
    img = tmp_path / "img"
    img.mkdir()
    cv2.imwrite(str(img / "a_fundus.jpg"), fundus(0)[..., ::-1])
    for name in ("black", "noise", "tiny"):
        cv2.imwrite(str(img / f"{name}.png"), NON_FUNDUS[name][0][..., ::-1])
    out = tmp_path / "preds.csv"
    assert palm_main(["predict", str(img), "--model", str(models), "--out", str(out), "--quiet"]) == 0
    rows = {r["image"].split("/")[-1]: r for r in csv.DictReader(out.open())}
    assert list(rows) == ["a_fundus.jpg", "black.png", "noise.png", "tiny.png"]
    assert rows["a_fundus.jpg"]["quality"] == "ok" and rows["a_fundus.jpg"]["diagnosis"] in ("PM", "non-PM")
    assert 0 <= float(rows["a_fundus.jpg"]["probability"]) <= 1
    for name, reason in (("black.png", "too dark"), ("noise.png", "no circular fundus"), ("tiny.png", "too small")):
        assert rows[name]["quality"] == reason
        assert rows[name]["probability"] == rows[name]["diagnosis"] == rows[name]["predicted"] == ""
    assert "3 not gradable" in capsys.readouterr().err
    # --grade-all diagnoses them anyway, still saying what is wrong with them
    assert palm_main(["predict", str(img), "--model", str(models), "--out", str(out), "--quiet", "--grade-all"]) == 0
    rows = {r["image"].split("/")[-1]: r for r in csv.DictReader(out.open())}
    assert rows["noise.png"]["quality"] == "no circular fundus" and rows["noise.png"]["diagnosis"] in ("PM", "non-PM")
    assert all(r["probability"] != "" for r in rows.values())
