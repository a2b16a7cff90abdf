"""The synthetic PALM generator: layout, determinism, and a class signal that is not colour."""

import io
import zipfile

import cv2
import numpy as np
import pandas as pd
import pytest

from palm.data import synthetic
from palm.data.synthetic import SIZES, draw_fundus, generate

SCALE = 0.06
SMALL_SIZES = {(round(w * SCALE), round(h * SCALE)) for w, h in SIZES}


def tiny(out, seed=0, **kw):
    args = dict(
        seed=seed,
        n_train_p=4,
        n_train_n=3,
        n_train_h=2,
        n_val_pm=3,
        n_val_non_pm=3,
        scale=SCALE,
        workers=1,
        progress=False,
    )
    generate(out, **{**args, **kw})
    return out


def test_layout_names_labels_and_images(tmp_path):
    out = tiny(tmp_path / "z")
    assert sorted(p.name for p in out.iterdir()) == ["training.zip", "valid_gt.zip", "validation.zip"]
    with zipfile.ZipFile(out / "training.zip") as outer:
        assert outer.namelist() == ["PALM-Training400/PALM-Training400.zip"]
        inner = zipfile.ZipFile(io.BytesIO(outer.read("PALM-Training400/PALM-Training400.zip")))
    names = sorted(inner.namelist())
    assert names == sorted(
        [f"PALM-Training400/{k}{i:04d}.jpg" for k, n in (("P", 4), ("N", 3), ("H", 2)) for i in range(1, n + 1)]
    )
    for name in names:
        img = cv2.imdecode(np.frombuffer(inner.read(name), np.uint8), cv2.IMREAD_COLOR)
        assert img is not None and img.ndim == 3 and (img.shape[1], img.shape[0]) in SMALL_SIZES
    with zipfile.ZipFile(out / "validation.zip") as zf:
        assert zf.namelist() == [f"PALM-Validation400/V{i:04d}.jpg" for i in range(1, 7)]
        valid = {
            n.split("/")[1]: cv2.imdecode(np.frombuffer(zf.read(n), np.uint8), cv2.IMREAD_COLOR) for n in zf.namelist()
        }
    with zipfile.ZipFile(out / "valid_gt.zip") as zf:
        assert zf.namelist() == ["PALM-Validation-GT/PM_Label_and_Fovea_Location.xlsx"]
        gt = pd.read_excel(io.BytesIO(zf.read(zf.namelist()[0])))
    assert list(gt.columns) == ["ID", "imgName", "Label", "Fovea_X", "Fovea_Y"]
    assert gt.ID.tolist() == list(range(1, 7)) and sorted(gt.imgName) == sorted(valid)
    assert gt.Label.sum() == 3 and set(gt.Label) == {0, 1}
    for _, row in gt.iterrows():
        h, w = valid[row.imgName].shape[:2]
        assert 0 < row.Fovea_X < w and 0 < row.Fovea_Y < h


def test_fovea_coordinates_are_where_the_fovea_is_drawn():
    ratios = []
    for seed in range(10):
        img, (fx, fy) = draw_fundus(np.random.default_rng(seed), "N", (600, 580), "R")
        grey = cv2.GaussianBlur(cv2.cvtColor(img, cv2.COLOR_BGR2GRAY).astype(np.float32), (0, 0), 8)
        yy, xx = np.mgrid[0 : grey.shape[0], 0 : grey.shape[1]]
        d = np.hypot(xx - fx, yy - fy)
        ratios.append(grey[int(fy), int(fx)] / np.median(grey[(d > 90) & (d < 110)]))
        # the bright disc is nasal: to the right of the fovea in a right eye
        disc_x = np.unravel_index(np.argmax(grey), grey.shape)[1]
        assert disc_x > fx + 100, seed
    # the macula is darker than the retina in a ring around it (a vessel or the tessellation
    # of some normal eyes can hide it in a single image, not in most)
    assert np.median(ratios) < 0.85, ratios


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path):
    a, b, c = tiny(tmp_path / "a"), tiny(tmp_path / "b", workers=2), tiny(tmp_path / "c", seed=1)
    for name in ("training.zip", "validation.zip", "valid_gt.zip"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    assert (a / "validation.zip").read_bytes() != (c / "validation.zip").read_bytes()


def features(kind_seq, seed):
    """Mean RGB, and the share of pale (yellow-white: green high relative to red) fundus."""
    rgb, pale = [], []
    for i, kind in enumerate(kind_seq):
        rng = np.random.default_rng([seed, i])
        img, _ = draw_fundus(rng, kind, (160, 160), "R" if i % 2 else "L")
        rgb.append(img.reshape(-1, 3).mean(0))
        f = img.astype(np.float32)
        inside = f.sum(-1) > 40
        ratio = f[..., 1] / (f[..., 2] + 1)
        pale.append(float(((ratio > 1.5 * np.median(ratio[inside])) & inside).mean()))
    return np.array(rgb), np.array(pale)


def test_class_signal_is_shape_and_texture_not_mean_colour():
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    kinds = ["P"] * 40 + ["N"] * 34 + ["H"] * 6
    y = np.array([k == "P" for k in kinds], int)
    rgb_tr, pale_tr = features(kinds, 1)
    rgb_va, pale_va = features(kinds, 2)
    scaler = StandardScaler().fit(rgb_tr)
    clf = LogisticRegression().fit(scaler.transform(rgb_tr), y)
    acc_rgb = clf.score(scaler.transform(rgb_va), y)
    assert acc_rgb < 0.75, acc_rgb
    # whereas a crude texture feature (share of pale, unsaturated fundus) separates the classes
    threshold = (pale_tr[y == 1].mean() + pale_tr[y == 0].mean()) / 2
    acc_tex = ((pale_va > threshold).astype(int) == y).mean()
    assert acc_tex > 0.85, acc_tex


@pytest.mark.parametrize(
    "kw", [{"n_train_p": -1}, {"scale": 0}, {"n_val_pm": 0, "n_val_non_pm": 0}, {"jpeg_quality": 0}]
)
def test_bad_arguments(tmp_path, kw):
    with pytest.raises(ValueError):
        tiny(tmp_path, **kw)


def test_failure_leaves_no_partial_zip(tmp_path, monkeypatch):
    calls = []

    def failing_zip(entries):
        calls.append(1)
        if len(calls) == 3:
            raise OSError("disk full")
        return b"PK"

    monkeypatch.setattr(synthetic, "_zip_bytes", failing_zip)
    with pytest.raises(OSError):
        tiny(tmp_path / "z")
    assert not (tmp_path / "z").exists() or not list((tmp_path / "z").iterdir())


def test_failure_while_writing_leaves_nothing(tmp_path, monkeypatch):
    import os

    real_replace = os.replace
    calls = []

    def failing_replace(a, b):
        calls.append(1)
        if len(calls) == 2:
            raise OSError("disk full")
        return real_replace(a, b)

    monkeypatch.setattr(os, "replace", failing_replace)  # the atomic writer's rename
    with pytest.raises(OSError):
        tiny(tmp_path / "z")
    leftovers = sorted(p.name for p in (tmp_path / "z").iterdir())
    assert all(not n.startswith(".") for n in leftovers)
