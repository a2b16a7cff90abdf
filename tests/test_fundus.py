"""Fundus enhancement (``train.fundus``, palm.data.fundus): each step on a synthetic fundus, one
code path from the shards and from a photograph, the parameter, model.json, and a trained model
that records its enhancement and is fed with it by ``palm predict``."""

import json
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest

import conftest
from conftest import make_shards, train_section
from palm.core.config import load_params
from palm.core.errors import ConfigError
from palm.data.fundus import Fundus, enhance, find_disc

SIDE = 224
ALL_ON = Fundus(crop=True, local_norm=1 / 30, clahe="luminance")


def synthetic_fundus(side=SIDE, centre=(90, 120), radius=70, gradient=0.0, seed=0) -> np.ndarray:
    """An orange disc with dark vessels and texture on a black canvas (RGB uint8); ``gradient``:
    brightness rising by this fraction from left to right across the disc."""
    rng = np.random.default_rng(seed)
    img = np.zeros((side, side, 3), np.float32)
    disc = np.zeros((side, side), np.uint8)
    cv2.circle(disc, centre, radius, 1, -1)
    base = np.array([160, 80, 40], np.float32)
    ramp = 1 + gradient * (np.arange(side, dtype=np.float32) - centre[0]) / radius
    img[disc == 1] = base
    img *= ramp[None, :, None]
    img += disc[..., None] * rng.normal(0, 6, (side, side, 1)).astype(np.float32)
    for _k in range(6):  # vessels
        a = rng.uniform(0, np.pi)
        p0 = (int(centre[0] - radius * np.cos(a)), int(centre[1] - radius * np.sin(a)))
        p1 = (int(centre[0] + radius * np.cos(a)), int(centre[1] + radius * np.sin(a)))
        vessel = np.zeros_like(disc)
        cv2.line(vessel, p0, p1, 1, 2)
        img[(vessel == 1) & (disc == 1)] *= 0.9  # faint: 4x their contrast stays within uint8
    return np.clip(img, 0, 255).astype(np.uint8)


# -- the disc and the crop -----------------------------------------------------------------


def test_the_disc_is_found_off_centre():
    disc = find_disc(synthetic_fundus())
    assert disc is not None
    assert abs(disc.cx - 90) <= 2 and abs(disc.cy - 120) <= 2
    assert abs(disc.radius - 70) <= 2


def test_crop_removes_the_border_and_centres_the_disc():
    img = synthetic_fundus()
    out = enhance(img, Fundus(crop=True))
    assert out.shape == img.shape and out.dtype == np.uint8
    disc = find_disc(out)
    # the disc now fills the square: centred, its diameter the side (within a few pixels)
    assert abs(disc.cx - SIDE / 2) <= 3 and abs(disc.cy - SIDE / 2) <= 3
    assert abs(2 * disc.radius - SIDE) <= 4
    # corners: outside the disc, black; the middle of each edge: inside the disc
    assert all(out[y, x].max() <= 10 for y, x in [(2, 2), (2, SIDE - 3), (SIDE - 3, 2), (SIDE - 3, SIDE - 3)])
    assert all(out[y, x].max() > 100 for y, x in [(SIDE // 2, 4), (SIDE // 2, SIDE - 5), (4, SIDE // 2)])


def test_a_disc_that_leaves_the_frame_is_padded_with_black():
    img = synthetic_fundus(centre=(60, 112), radius=80)  # cut off on the left
    out = enhance(img, Fundus(crop=True))
    assert out.shape == img.shape
    assert out[SIDE // 2, :8].max() <= 10  # the part outside the frame: black padding
    assert out[SIDE // 2, SIDE - 12 :].max() > 100  # the disc's right edge reaches the square's


@pytest.mark.parametrize(
    "img",
    [
        np.zeros((SIDE, SIDE, 3), np.uint8),
        np.full((SIDE, SIDE, 3), 140, np.uint8),
        np.random.default_rng(0).integers(60, 255, (SIDE, SIDE, 3), dtype=np.uint8),
    ],
    ids=["all-black", "flat", "no-border"],
)
def test_an_image_without_border_or_without_disc_comes_through_the_crop_unchanged(img):
    assert find_disc(img) is None
    np.testing.assert_array_equal(enhance(img, Fundus(crop=True)), img)
    for spec in (Fundus(local_norm=0.05), ALL_ON, Fundus(clahe="green")):
        out = enhance(img, spec)
        assert out.shape == img.shape and out.dtype == np.uint8


# -- local normalisation and CLAHE ---------------------------------------------------------------


def test_local_normalisation_centres_the_disc_on_128_and_removes_a_brightness_gradient():
    img = synthetic_fundus(gradient=0.4)
    inner = np.zeros((SIDE, SIDE), np.uint8)
    cv2.circle(inner, (90, 120), 50, 1, -1)
    left, right = inner.copy(), inner.copy()
    left[:, 90:], right[:, :90] = 0, 0
    before = img[right == 1].mean() - img[left == 1].mean()
    out = enhance(img, Fundus(local_norm=1 / 30))
    after = out[right == 1].astype(float).mean() - out[left == 1].astype(float).mean()
    assert before > 20 and abs(after) < 1
    assert abs(out[inner == 1].astype(float).mean() - 128) < 2
    assert (out[:10, :10] == 128).all() and (out[-10:, -10:] == 128).all()  # outside the disc: grey


@pytest.mark.parametrize("mode", ["luminance", "green"])
def test_clahe_raises_local_contrast_and_keeps_shape_and_type(mode):
    rng = np.random.default_rng(1)
    img = np.full((SIDE, SIDE, 3), (150, 100, 60), np.uint8)
    img = np.clip(img + rng.normal(0, 3, (SIDE, SIDE, 1)), 0, 255).astype(np.uint8)  # low contrast
    out = enhance(img, Fundus(clahe=mode))
    assert out.shape == img.shape and out.dtype == np.uint8
    channels = [1] if mode == "green" else [0, 1, 2]
    patch = (slice(80, 140), slice(80, 140))

    def spread(x):  # the mean over the channels of each channel's standard deviation in the patch
        return x[patch][..., channels].astype(float).std(axis=(0, 1)).mean()

    assert spread(out) > 1.5 * spread(img)
    if mode == "green":  # red and blue kept
        np.testing.assert_array_equal(out[..., [0, 2]], img[..., [0, 2]])


def test_all_off_is_the_image_itself_and_the_steps_are_deterministic():
    img = synthetic_fundus()
    assert enhance(img, None) is img and enhance(img, {}) is img and enhance(img, Fundus()) is img
    np.testing.assert_array_equal(enhance(img, ALL_ON), enhance(img.copy(), ALL_ON))
    assert not np.array_equal(enhance(img, ALL_ON), img)


# -- one code path: shards and photographs ------------------------------------------------------


@pytest.fixture(scope="module")
def fundus_photos():
    """conftest's tiny PALM zips, with synthetic fundus photographs instead of random pixels."""
    from palm.data.synthetic import draw_fundus

    def photo(seed=0, size=(40, 32)):
        bgr, _ = draw_fundus(np.random.default_rng(seed), "PNH"[seed % 3], (300 + 8 * (seed % 5), 260), "LR"[seed % 2])
        ok, buf = cv2.imencode(".jpg", bgr)
        return buf.tobytes()

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(conftest, "jpeg_bytes", photo)
        yield


@pytest.fixture(scope="module")
def big_shards(tmp_path_factory, fundus_photos):
    return make_shards(tmp_path_factory.mktemp("fundus224"), ["P0001.jpg", "N0001.jpg", "H0001.jpg"], image_size=224)


def test_shards_and_a_photograph_give_byte_identical_network_inputs(big_shards):
    """preprocess, then the loader of training and evaluate (enhance, then resize) = palm predict's
    decoding of the same file, every step on; the enhancement does change the image."""
    from palm.data.dataset import load_split
    from palm.serve.decode import decode_stream

    split = load_split(big_shards, "train", size=96, fundus=ALL_ON)
    plain = load_split(big_shards, "train", size=96)
    files = [big_shards.parent / "raw" / "PALM-Training400" / name for name in split.images]
    decoded = list(decode_stream(files, 224, 96, workers=0, check_quality=True, fundus=ALL_ON))
    for i, d in enumerate(decoded):
        assert d.error is None
        assert d.image.shape == (96, 96, 3)
        np.testing.assert_array_equal(d.image, split.pixels[i])
        assert not np.array_equal(d.image, plain.pixels[i])
    # the cache gives the same bytes the second time, and a caller cannot change it
    again = split.pixels[0]
    np.testing.assert_array_equal(again, decoded[0].image)
    assert not again.flags.writeable


# -- the parameter and model.json ---------------------------------------------------------------


def test_the_parameter_merges_per_model_and_a_bad_value_is_one_line():
    from palm.core.params import training_config
    from palm.training.crossval import apply_overrides

    p = load_params()
    cfg = training_config(p)
    assert (cfg.fundus.crop, cfg.fundus.local_norm, cfg.fundus.clahe) == (False, 0.0, "off")  # committed: off
    assert "fundus" not in cfg.record()
    p = apply_overrides(
        p, [f"models.{p['model']}.fundus.crop=true", "train.fundus.clahe=green", "train.fundus.local_norm=0.033"]
    )
    cfg = training_config(p)
    assert cfg.record()["fundus"] == {"crop": True, "local_norm": 0.033, "clahe": "green"}
    p = apply_overrides(p, [f"models.{p['model']}.fundus.clahe=off"])  # YAML 1.1: a bare off is false
    assert training_config(p).fundus.clahe == "off"
    bad = apply_overrides(p, ["train.fundus.clahe=blue"])
    with pytest.raises(ConfigError) as exc:
        training_config(bad)
    assert exc.value.exit_code == 2
    assert str(exc.value) == "params.yaml: train.fundus.clahe = 'blue': input should be 'off', 'luminance' or 'green'"
    with pytest.raises(ConfigError, match=r"^params.yaml: models.senet18.fundus.sharpen = True: is not a known key$"):
        training_config(apply_overrides(p, ["models.senet18.fundus.sharpen=true"]))


def test_the_schema_and_the_enhancement_agree_on_the_bound_and_on_what_is_on():
    """One bound of local_norm (params.yaml, model.json and a Fundus built in code), and one rule
    of "enhancement on" for the run identity (FundusParams) and enhance (Fundus)."""
    import itertools

    from palm.core.params import MAX_LOCAL_NORM, FundusParams

    assert Fundus(local_norm=MAX_LOCAL_NORM) and FundusParams(local_norm=MAX_LOCAL_NORM)
    with pytest.raises(ValueError, match=r"fundus.local_norm must be in \[0, 0.5\], got 0.6"):
        Fundus(local_norm=0.6)
    with pytest.raises(ValueError, match="less than or equal to 0.5"):
        FundusParams(local_norm=0.6)
    for crop, norm, mode in itertools.product((False, True), (0.0, 0.05), ("off", "luminance", "green")):
        assert (
            bool(FundusParams(crop=crop, local_norm=norm, clahe=mode))
            == bool(Fundus(crop, norm, mode))
            == (crop or norm > 0 or mode != "off")
        )
    assert not FundusParams()  # nothing given: all off


def test_model_json_round_trips_the_enhancement_and_an_old_one_means_none(tmp_path):
    from palm.nn import modelinfo

    info = {"model": "senet18", "image_size": 224, "input_size": 96, "fundus": ALL_ON.record()}
    modelinfo.write_info(tmp_path, info)
    assert modelinfo.fundus(modelinfo.read_info(tmp_path)) == ALL_ON
    modelinfo.write_info(tmp_path, {"model": "senet18", "image_size": 224})
    assert modelinfo.fundus(modelinfo.read_info(tmp_path)) == Fundus() and not Fundus()
    modelinfo.write_info(tmp_path, {**info, "fundus": {"clahe": "red"}})
    with pytest.raises(ConfigError, match="fundus.clahe = 'red'"):
        modelinfo.read_info(tmp_path)


# -- a trained model ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_shards(tmp_path_factory, fundus_photos):
    train = [f"P{i:04d}.jpg" for i in range(4)] + [f"N{i:04d}.jpg" for i in range(3)] + ["H0001.jpg"]
    return make_shards(
        tmp_path_factory.mktemp("fundus64"),
        train,
        valid=(("V0001.jpg", 1), ("V0002.jpg", 0), ("V0003.jpg", 0)),
        image_size=64,
    )


def test_a_model_trained_with_enhancement_records_it_and_predict_applies_it(tmp_path, small_shards):
    from palm.evaluation.evaluate import predict_valid
    from palm.evaluation.explain import explain
    from palm.evaluation.model_card import enhancement
    from palm.serve.export import export
    from palm.serve.predict import Predictor
    from palm.training.train import Trainer

    spec = {"crop": True, "local_norm": 0.05, "clahe": "green"}
    p = {
        "model": "senet18",
        "image_size": 64,
        "train": train_section(epochs=1, batch_size=4, warmup_epochs=0, ema=0.0, to_static=False, input_size=48),
        "models": {"senet18": {"fundus": spec}},
    }
    info = Trainer(p, small_shards).run(tmp_path / "models", tmp_path / "ckpt", tmp_path / "live")
    saved = json.loads((tmp_path / "models" / "model.json").read_text())
    assert saved["fundus"] == info["fundus"] == {**spec, "local_norm": 0.05}
    assert saved["config"]["fundus"] == saved["fundus"]
    valid, expected, _ = predict_valid(small_shards, tmp_path / "models")
    predictor = Predictor.load(tmp_path / "models")
    assert predictor.fundus == Fundus(**spec)
    files = [small_shards.parent / "raw" / "PALM-Validation400" / name for name in valid.images]
    got = [r["probability"] for r in predictor.predict(files, progress=False, grade_all=True)]
    np.testing.assert_allclose(got, expected, atol=1e-5)
    # without the enhancement the network would see other images: predict does apply it
    plain = Predictor(**{**predictor.__dict__, "fundus": Fundus()})
    other = [r["probability"] for r in plain.predict(files, progress=False, grade_all=True)]
    assert np.abs(np.subtract(other, expected)).max() > 0.02  # (here 0.15-0.23 apart)
    assert "cropped to the fundus disc" in enhancement(Fundus(**spec)) and enhancement(Fundus()) == ""
    # the exported model carries it (models_export/model.json) and scores as the trained one
    export(tmp_path / "models", tmp_path / "export", device="cpu")
    assert json.loads((tmp_path / "export" / "model.json").read_text())["fundus"] == saved["fundus"]
    exported = [
        r["probability"] for r in Predictor.load(tmp_path / "export").predict(files, progress=False, grade_all=True)
    ]
    np.testing.assert_allclose(exported, expected, atol=1e-4)
    # explain feeds the network the enhanced image: its Grad-CAM probability is evaluate's
    pd.DataFrame(
        {
            "image": valid.images,
            "label": valid.labels,
            "probability": expected,
            "predicted": (expected >= 0.5).astype(int),
        }
    ).to_csv(tmp_path / "predictions.csv", index=False)
    pngs = explain(3, small_shards, tmp_path / "models", tmp_path / "predictions.csv", tmp_path / "explain", "cpu")
    shown = {p.name.split("_label-")[0]: float(p.stem.rsplit("_p", 1)[1]) for p in pngs}
    assert len(shown) == 3
    for name, prob in zip(valid.images, expected):
        assert abs(shown[Path(name).stem] - prob) <= 0.006  # the file name rounds to 2 decimals
