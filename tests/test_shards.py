"""Memory that does not grow with the data: streaming preprocess, resume after a kill, shards read
one image at a time (palm.data.shards, palm.data.preprocess, palm.data.dataset)."""

import json
import os
import pickle
import signal
import subprocess
import sys
import time
import tracemalloc

import cv2
import numpy as np
import pandas as pd
import pytest

from palm.core.errors import DataError
from palm.data import preprocess as pp
from palm.data.dataset import FundusDataset, load_split, make_loader
from palm.data.image import resize_square
from palm.data.shards import MANIFEST, open_split


def photo_folder(root, n, size=96, valid=3):
    """``n`` training and ``valid`` validation PNGs with a labels.csv in the labels stage's layout."""
    rows = []
    rng = np.random.default_rng(0)
    for split, count in (("train", n), ("valid", valid)):
        (root / "raw" / split).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            img = rng.integers(0, 255, (size, size, 3), dtype=np.uint8)
            cv2.imwrite(str(root / "raw" / split / f"{split}{i:04d}.png"), img)
            rows.append({"image": f"{split}/{split}{i:04d}.png", "label": i % 2, "split": split, "group": "PN"[i % 2]})
    pd.DataFrame(rows).to_csv(root / "labels.csv", index=False)
    return root / "labels.csv", root / "raw"


def shard_bytes(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_preprocess_holds_one_shard_not_the_split(tmp_path):
    """120 images of 128 px are 5.9 MB; a shard of 4 is 0.2 MB: the peak of Python-tracked memory
    (NumPy's arrays included; 0.8 MB when measured) stays far below the split."""
    labels, raw = photo_folder(tmp_path, 120, size=128)
    tracemalloc.start()
    try:
        pp.preprocess(labels, raw, tmp_path / "shards", image_size=128, shard_size=4, workers=1)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    split_bytes = 120 * 128 * 128 * 3
    assert peak < split_bytes / 3, (peak, split_bytes)
    assert len(json.loads((tmp_path / "shards" / MANIFEST).read_text())["splits"]["train"]["shards"]) == 30


def test_reading_a_split_holds_one_image_at_a_time(tmp_path):
    labels, raw = photo_folder(tmp_path, 60, size=128)
    pp.preprocess(labels, raw, tmp_path / "shards", image_size=128, shard_size=8, workers=1)
    tracemalloc.start()
    try:
        ds = FundusDataset(load_split(tmp_path / "shards", "train", size=64))
        total = sum(float(ds[i][0].mean()) for i in range(len(ds)))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert np.isfinite(total)
    assert peak < 60 * 128 * 128 * 3 / 5, peak


def test_shard_images_match_the_shard_files_subset_and_resized(tmp_path):
    labels, raw = photo_folder(tmp_path, 10, size=40)
    pp.preprocess(labels, raw, tmp_path / "shards", image_size=32, shard_size=3, workers=2)
    whole = np.concatenate([np.load(tmp_path / "shards" / f"train-{k:03d}.npy") for k in range(4)])
    split = load_split(tmp_path / "shards", "train")
    assert split.pixels.shape == (10, 32, 32, 3) and len(split) == 10
    np.testing.assert_array_equal(np.asarray(split.pixels), whole)
    part = split.subset([7, 2, 9]).resized(20)
    assert part.pixels.shape == (3, 20, 20, 3) and part.images == ["train0007.png", "train0002.png", "train0009.png"]
    for got, row in zip(part.pixels, [7, 2, 9]):
        np.testing.assert_array_equal(got, resize_square(whole[row], 20))
    np.testing.assert_array_equal(part.pixels[-1], part.pixels[2])
    with pytest.raises(IndexError):
        part.pixels[3]
    clone = pickle.loads(pickle.dumps(part.pixels))  # as loader worker processes receive it
    np.testing.assert_array_equal(clone[0], part.pixels[0])


def test_loader_workers_read_the_same_batches(tmp_path):
    labels, raw = photo_folder(tmp_path, 12, size=40)
    pp.preprocess(labels, raw, tmp_path / "shards", image_size=32, shard_size=5, workers=1)
    ds = FundusDataset(load_split(tmp_path / "shards", "train"))
    one = [x.numpy() for x, _ in make_loader(ds, 4, shuffle=True, seed=3)]
    two = [x.numpy() for x, _ in make_loader(ds, 4, shuffle=True, seed=3, workers=2)]
    assert len(one) == 3
    for a, b in zip(one, two):
        np.testing.assert_array_equal(a, b)


def test_a_shard_that_disagrees_with_the_manifest_is_a_clear_error(tmp_path):
    labels, raw = photo_folder(tmp_path, 6, size=40)
    pp.preprocess(labels, raw, tmp_path / "shards", image_size=32, shard_size=3, workers=1)
    np.save(tmp_path / "shards" / "train-001.npy", np.zeros((2, 32, 32, 3), np.uint8))
    with pytest.raises(DataError, match=r"train-001.npy: holds 2 images .* manifest lists 3"):
        open_split(tmp_path / "shards", "train")
    (tmp_path / "shards" / "train-001.npy").unlink()
    with pytest.raises(DataError, match="train-001.npy: shard not found"):
        load_split(tmp_path / "shards", "train")


def test_an_interrupted_preprocess_resumes_without_redoing_finished_shards(tmp_path, monkeypatch):
    labels, raw = photo_folder(tmp_path, 10, size=40)
    pp.preprocess(labels, raw, tmp_path / "fresh", image_size=32, shard_size=3, workers=1)
    decoded = []
    real = pp._decode

    def interrupted(path, image_size):
        if len(decoded) == 7:  # in the third training shard
            raise KeyboardInterrupt
        decoded.append(os.path.basename(path))
        return real(path, image_size)

    monkeypatch.setattr(pp, "_decode", interrupted)
    with pytest.raises(KeyboardInterrupt):
        pp.preprocess(labels, raw, tmp_path / "shards", image_size=32, shard_size=3, workers=1)
    assert not (tmp_path / "shards").exists()
    resume = tmp_path / ".shards.partial"
    assert sorted(json.loads((resume / "progress.json").read_text())["shards"]) == ["train-000.npy", "train-001.npy"]

    decoded.clear()
    monkeypatch.setattr(
        pp, "_decode", lambda path, image_size: (decoded.append(os.path.basename(path)), real(path, image_size))[1]
    )
    # a photograph of a finished shard replaced meanwhile: that shard is decoded again
    cv2.imwrite(str(raw / "train" / "train0004.png"), np.full((40, 40, 3), 7, np.uint8))
    pp.preprocess(labels, raw, tmp_path / "shards", image_size=32, shard_size=3, workers=1)
    assert decoded == [
        "train0003.png",
        "train0004.png",
        "train0005.png",
        "train0006.png",
        "train0007.png",
        "train0008.png",
        "train0009.png",
        "valid0000.png",
        "valid0001.png",
        "valid0002.png",
    ]
    assert not resume.exists()
    # all other shards are byte-identical to an uninterrupted run; the replaced image is the new one
    fresh, resumed = shard_bytes(tmp_path / "fresh"), shard_bytes(tmp_path / "shards")
    assert [k for k in fresh if fresh[k] != resumed[k]] == ["train-001.npy"]
    assert np.load(tmp_path / "shards" / "train-001.npy")[1].max() == 7


def test_finished_shards_of_other_code_or_libraries_are_decoded_again(tmp_path, monkeypatch):
    """The resume folder's stamps name what decoded them: after an edit of the code the stage
    runs (or another OpenCV, Pillow or numpy) an interrupted run's shards are not kept."""
    labels, raw = photo_folder(tmp_path, 6, size=40)
    real = pp._decode

    def interrupted(path, image_size):
        if os.path.basename(path) == "train0004.png":
            raise KeyboardInterrupt
        return real(path, image_size)

    monkeypatch.setattr(pp, "_decode", interrupted)
    with pytest.raises(KeyboardInterrupt):
        pp.preprocess(labels, raw, tmp_path / "shards", image_size=32, shard_size=2, workers=1)
    assert len(json.loads((tmp_path / ".shards.partial" / "progress.json").read_text())["shards"]) == 2

    decoded = []
    monkeypatch.setattr(pp, "_decode", lambda path, image_size: (decoded.append(path), real(path, image_size))[1])
    base = pp.decoder_identity()
    monkeypatch.setattr(pp, "decoder_identity", lambda: base + " edited")
    pp.preprocess(labels, raw, tmp_path / "shards", image_size=32, shard_size=2, workers=1)
    assert len(decoded) == 6 + 3  # every image: none of the interrupted run's shards kept

    monkeypatch.undo()
    assert pp.decoder_identity() == base  # the same code and libraries: the same
    monkeypatch.setattr(cv2, "__version__", "0.0.0")
    assert pp.decoder_identity() != base


def test_a_killed_preprocess_stage_resumes(tmp_path):
    """SIGKILL part-way (no clean-up runs): the next run keeps the shards the kill left complete,
    and the result is byte-identical to a run never killed."""
    labels, raw = photo_folder(tmp_path, 24, size=40)
    pp.preprocess(labels, raw, tmp_path / "fresh", image_size=32, shard_size=2, workers=1)
    slow = (
        "import time, sys; from palm.data import preprocess as pp; real = pp._decode\n"
        "pp._decode = lambda p, image_size: (time.sleep(0.1), real(p, image_size))[1]\n"
        "pp.preprocess(*sys.argv[1:4], image_size=32, shard_size=2, workers=1)\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", slow, str(labels), str(raw), str(tmp_path / "shards")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    progress = tmp_path / ".shards.partial" / "progress.json"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None:
        if progress.is_file() and len(json.loads(progress.read_text() or "{}").get("shards", {})) >= 3:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "shards").exists()
    kept = json.loads(progress.read_text())["shards"]
    assert 3 <= len(kept) < 12

    decoded = []
    real = pp._decode
    pp_decode = lambda path, image_size: (decoded.append(path), real(path, image_size))[1]  # noqa: E731
    orig, pp._decode = pp._decode, pp_decode
    try:
        pp.preprocess(labels, raw, tmp_path / "shards", image_size=32, shard_size=2, workers=1)
    finally:
        pp._decode = orig
    assert len(decoded) == 24 + 3 - 2 * len(kept)
    assert shard_bytes(tmp_path / "shards") == shard_bytes(tmp_path / "fresh")


def test_bad_input_leaves_no_resume_folder(tmp_path):
    labels, raw = photo_folder(tmp_path, 6, size=40)
    (raw / "train" / "train0004.png").write_bytes(b"not a png")
    (raw / "valid" / "valid0001.png").unlink()
    with pytest.raises(DataError, match=r"2 image\(s\) cannot be decoded: .*train0004.png.*valid0001.png"):
        pp.preprocess(labels, raw, tmp_path / "shards", image_size=32, shard_size=2, workers=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["labels.csv", "raw"]
