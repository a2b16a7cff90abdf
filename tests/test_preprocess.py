import json

import cv2
import numpy as np
import pytest

from conftest import make_palm_zips
from palm.core.errors import DataError
from palm.data.dataset import Augment, FundusDataset, load_split
from palm.data.image import load_image, to_chw_float
from palm.data.labels import build_labels
from palm.data.preprocess import preprocess
from palm.data.splits import stratified_holdout
from palm.data.unzip import unzip_all


def prepared(tmp_path, **kwargs):
    raw = tmp_path / "raw"
    unzip_all(make_palm_zips(tmp_path / "zips", **kwargs), raw)
    build_labels(raw).to_csv(tmp_path / "labels.csv", index=False)
    return raw


@pytest.mark.parametrize("workers", [1, 2])
def test_shards_and_manifest(tmp_path, workers):
    raw = prepared(tmp_path)
    manifest = preprocess(
        tmp_path / "labels.csv", raw, tmp_path / "shards", image_size=24, shard_size=3, workers=workers
    )
    on_disk = json.loads((tmp_path / "shards" / "manifest.json").read_text())
    assert on_disk == manifest
    assert manifest["params"] == {"image_size": 24, "shard_size": 3}
    train = manifest["splits"]["train"]
    assert [s["shape"] for s in train["shards"]] == [[3, 24, 24, 3], [1, 24, 24, 3]]
    assert [v for s in train["shards"] for v in s["labels"]] == [0, 0, 1, 1]  # H0001, N0001, P0001, P0002
    arr = np.load(tmp_path / "shards" / "train-000.npy")
    assert arr.dtype == np.uint8 and arr.shape == (3, 24, 24, 3)
    expected = load_image(raw / "PALM-Training400" / "H0001.jpg", 24)
    np.testing.assert_array_equal(arr[0], expected)
    split = load_split(tmp_path / "shards", "valid")
    assert split.images == ["V0001.jpg", "V0002.jpg"] and split.labels.tolist() == [1, 0]


def test_corrupt_jpeg_is_named_and_nothing_is_left(tmp_path):
    raw = prepared(tmp_path)
    (raw / "PALM-Training400" / "N0001.jpg").write_bytes(b"\xff\xd8\xff\xe0 broken")
    with pytest.raises(DataError, match="N0001.jpg"):
        preprocess(tmp_path / "labels.csv", raw, tmp_path / "shards", image_size=24, workers=2)
    assert not (tmp_path / "shards").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".shards")]


def test_truncated_jpeg_is_an_error(tmp_path):
    img = np.random.default_rng(0).integers(0, 255, (300, 300, 3), dtype=np.uint8)
    data = cv2.imencode(".jpg", img)[1].tobytes()
    (tmp_path / "t.jpg").write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match="t.jpg"):
        load_image(tmp_path / "t.jpg", 64)


def test_large_image_reduced_decode_matches_full_decode(tmp_path):
    yy, xx = np.mgrid[0:2056, 0:2124]
    img = np.stack([(xx / 2124 * 255), (yy / 2056 * 255), np.full_like(xx, 128.0)], -1).astype(np.uint8)
    cv2.circle(img, (1000, 1000), 400, (255, 255, 255), -1)
    cv2.imwrite(str(tmp_path / "big.jpg"), img)
    fast = load_image(tmp_path / "big.jpg", 224)
    full = cv2.resize(
        cv2.cvtColor(cv2.imread(str(tmp_path / "big.jpg")), cv2.COLOR_BGR2RGB), (224, 224), interpolation=cv2.INTER_AREA
    )
    assert fast.shape == (224, 224, 3) and fast.dtype == np.uint8
    assert np.abs(fast.astype(int) - full.astype(int)).mean() < 3


def test_grey_and_small_images_become_rgb_squares(tmp_path):
    cv2.imwrite(str(tmp_path / "g.jpg"), np.full((50, 80), 200, np.uint8))
    out = load_image(tmp_path / "g.jpg", 64)
    assert out.shape == (64, 64, 3)


def test_loader_normalises_to_chw_in_minus_one_one(tmp_path):
    x = to_chw_float(np.array([[[0, 255, 128]]], dtype=np.uint8))
    assert x.shape == (3, 1, 1) and x.dtype == np.float32
    np.testing.assert_allclose(x.ravel(), [-1.0, 1.0, 128 / 127.5 - 1], atol=1e-6)
    raw = prepared(tmp_path)
    preprocess(tmp_path / "labels.csv", raw, tmp_path / "shards", image_size=24, workers=1)
    ds = FundusDataset(load_split(tmp_path / "shards", "train"))
    img, label = ds[3]
    assert img.shape == (3, 24, 24) and img.dtype == np.float32
    assert -1.0 <= img.min() and img.max() <= 1.0
    assert label.tolist() == [1.0]


def test_augmentation_is_deterministic_per_seed_epoch_and_item(tmp_path):
    raw = prepared(tmp_path)
    preprocess(tmp_path / "labels.csv", raw, tmp_path / "shards", image_size=24, workers=1)
    split = load_split(tmp_path / "shards", "train")
    aug = Augment(hflip=True, rotate_deg=15, brightness=0.2, contrast=0.2, scale=0.1)
    a, b = FundusDataset(split, aug, seed=1), FundusDataset(split, aug, seed=1)
    np.testing.assert_array_equal(a[0][0], b[0][0])
    a.set_epoch(1)
    assert not np.array_equal(a[0][0], b[0][0])
    assert not np.array_equal(FundusDataset(split)[0][0], b[0][0])


def test_holdout_is_stratified_and_disjoint(tmp_path):
    raw = prepared(
        tmp_path,
        train=[f"P{i:04d}.jpg" for i in range(10)]
        + [f"N{i:04d}.jpg" for i in range(10)]
        + [f"H{i:04d}.jpg" for i in range(4)],
    )
    preprocess(tmp_path / "labels.csv", raw, tmp_path / "shards", image_size=16, workers=1)
    split = load_split(tmp_path / "shards", "train")
    tr, ho = stratified_holdout(split.labels, split.groups, 0.2, seed=0)
    assert set(tr).isdisjoint(ho) and len(tr) + len(ho) == 24
    assert sorted(split.groups[i] for i in ho) == ["H", "N", "N", "P", "P"]
    assert np.array_equal(stratified_holdout(split.labels, split.groups, 0.2, seed=0)[1], ho)
