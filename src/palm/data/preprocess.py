"""The ``preprocess`` stage: decode every image once into compact uint8 ``.npy`` shards.

Output ``data/shards/`` (the format: :mod:`palm.data.shards`)::

    manifest.json            shard list per split, labels, shape, dtype, parameters used
    train-000.npy ...        uint8, (n, image_size, image_size, 3), RGB
    valid-000.npy ...

Streaming: one shard's worth of images is decoded, written and dropped before the next, so
memory does not grow with the number of images. Finished shards wait in a resume folder
(``checkpoints/preprocess`` for the stage) with a stamp of their source files (name, size,
modification time), the parameters, and what decodes them (the source of the code the stage
runs and the versions of OpenCV, Pillow and numpy: :func:`palm.core.provenance.producer`); a run
killed part-way and started again keeps the shards whose stamp still matches and decodes
only the rest. The output folder appears whole,
with its manifest, at the end (or not at all). The same input gives byte-identical shards.

The loader (:mod:`palm.data.dataset`) normalises to float32 CHW in [-1, 1].
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

from palm.core.errors import DataError
from palm.core.fsutil import atomic_dir, atomic_file, move
from palm.core.provenance import producer
from palm.core.runtime import check_memory, machine_share
from palm.data.image import load_image
from palm.data.shards import FORMAT_VERSION, SplitWriter, new_manifest, write_manifest

#: the resume folder's record of its finished shards: {"shards": {file name: stamp}}
PROGRESS = "progress.json"
RESUME_DIR = Path("checkpoints/preprocess")
STAGE_ENTRY = Path("stages/preprocess.py")


def _decode(path: str, image_size: int):
    try:
        return load_image(path, image_size), None
    except DataError as exc:
        return None, str(exc)


def _decode_into(out: np.ndarray, paths, image_size: int, pool, bar=None) -> list[str]:
    """Decode ``paths`` into ``out`` (order kept, in ``pool``'s threads if given); the errors."""
    fn = partial(_decode, image_size=image_size)
    errors = []
    for i, (arr, err) in enumerate(pool.map(fn, paths) if pool is not None else map(fn, paths)):
        if err is not None:
            errors.append(err)
        else:
            out[i] = arr
        if bar is not None:
            bar.update()
    return errors


def _raise_errors(errors: list[str]) -> None:
    if errors:
        raise DataError(
            f"{len(errors)} image(s) cannot be decoded: "
            + "; ".join(errors[:10])
            + (f"; ... ({len(errors) - 10} more)" if len(errors) > 10 else "")
        )


def decoder_identity() -> str:
    """What decodes the images, by its hash: the source of the code the stage runs
    (``stages/preprocess.py`` and its imports, or this module's without the stage) and the
    versions of the libraries that decode and resize."""
    made_by = producer(STAGE_ENTRY, __file__, ("cv2", "PIL", "numpy"))
    return hashlib.sha256(json.dumps(made_by, sort_keys=True).encode()).hexdigest()


def source_stamp(paths, image_size: int, decoder: str = "") -> str:
    """What a shard is made from: the format, the image size, the ``decoder``
    (:func:`decoder_identity`) and each file's name, size and modification time (a changed or
    replaced photograph changes the stamp)."""
    h = hashlib.sha256(json.dumps([FORMAT_VERSION, image_size, decoder]).encode())
    for p in paths:
        try:
            st = os.stat(p)
            h.update(json.dumps([str(p), st.st_size, st.st_mtime_ns]).encode())
        except OSError:
            h.update(json.dumps([str(p), None]).encode())  # missing: decoding it will say so
    return h.hexdigest()


class _Progress:
    """The resume folder: finished shards and their stamps (``progress.json``, written after each)."""

    def __init__(self, folder: Path):
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        try:
            self.stamps = json.loads((folder / PROGRESS).read_text())["shards"]
        except (FileNotFoundError, ValueError, KeyError, TypeError):
            self.stamps = {}
        for p in folder.iterdir():  # partial writes of a killed run, shards no record vouches for
            if p.name != PROGRESS and p.name not in self.stamps:
                p.unlink() if p.is_file() else shutil.rmtree(p, ignore_errors=True)

    def done(self, fname: str, stamp: str, n: int, image_size: int) -> bool:
        if self.stamps.get(fname) != stamp:
            return False
        nbytes = n * image_size * image_size * 3
        try:  # the stamp is written after its shard: the file is complete, unless changed since
            return (self.folder / fname).stat().st_size >= nbytes and tuple(
                np.load(self.folder / fname, mmap_mode="r").shape
            ) == (n, image_size, image_size, 3)
        except (OSError, ValueError):
            return False

    def record(self, fname: str, stamp: str) -> None:
        self.stamps[fname] = stamp
        with atomic_file(self.folder / PROGRESS) as f:
            json.dump({"shards": self.stamps}, f)

    def forget(self, fname: str) -> None:
        if self.stamps.pop(fname, None) is not None:
            with atomic_file(self.folder / PROGRESS) as f:
                json.dump({"shards": self.stamps}, f)


def preprocess(
    labels_csv: str | Path,
    raw_dir: str | Path,
    out_dir: str | Path,
    *,
    image_size: int = 224,
    shard_size: int = 256,
    workers: int = 0,
    resume_dir: str | Path | None = None,
) -> dict:
    """Decode the images of ``labels_csv`` (below ``raw_dir``) into shards in ``out_dir``.

    ``resume_dir`` (default: ``.<out_dir>.partial`` beside it) keeps finished shards across a
    killed run; it is removed when the run succeeds, or fails on bad input.
    """
    if image_size < 16:
        raise DataError(f"image_size must be at least 16, got {image_size}")
    if shard_size < 1:
        raise DataError(f"preprocess.shard_size must be at least 1, got {shard_size}")
    workers = workers or len(machine_share().cpus)
    labels = pd.read_csv(labels_csv, keep_default_na=False)
    raw_dir, out_dir = Path(raw_dir), Path(out_dir)
    resume_dir = Path(resume_dir) if resume_dir is not None else out_dir.with_name(f".{out_dir.name}.partial")
    check_memory(
        shard_size * image_size * image_size * 3,
        f"preprocess at image_size {image_size} (a shard of {shard_size} images)",
        "lower preprocess.shard_size or image_size",
    )
    progress = _Progress(resume_dir)
    decoder = decoder_identity()
    manifest = new_manifest(image_size, {"image_size": image_size, "shard_size": shard_size})
    errors, reused = [], 0
    buf = np.empty((shard_size, image_size, image_size, 3), dtype=np.uint8)
    try:
        with contextlib.ExitStack() as stack:
            pool = stack.enter_context(ThreadPoolExecutor(max_workers=workers)) if workers > 1 else None
            for split, part in labels.groupby("split", sort=False):
                writer = SplitWriter(resume_dir, manifest, split, shard_size)
                with tqdm(total=len(part), desc=f"preprocess {split}", unit="img", dynamic_ncols=True) as bar:
                    for start in range(0, len(part), shard_size):
                        chunk = part.iloc[start : start + shard_size]
                        paths = [str(raw_dir / p) for p in chunk["image"]]
                        meta = ([Path(p).name for p in chunk["image"]], chunk["label"], chunk["group"])
                        fname, stamp = writer.entry(*meta)["file"], source_stamp(paths, image_size, decoder)
                        if progress.done(fname, stamp, len(paths), image_size):
                            writer.skip(*meta)
                            reused += 1
                            bar.update(len(paths))
                            continue
                        progress.forget(fname)
                        pixels = buf[: len(paths)]
                        bad = _decode_into(pixels, paths, image_size, pool, bar)
                        if bad:  # go on: the error names every bad file, not just the first
                            errors += bad
                            writer.skip(*meta)
                            continue
                        writer.write(pixels, *meta)
                        progress.record(fname, stamp)
                writer.close()
        _raise_errors(errors)
    except DataError:
        shutil.rmtree(resume_dir, ignore_errors=True)  # bad input: nothing is left behind
        raise
    if reused:
        print(f"resumed: {reused} finished shard(s) kept from an interrupted run")
    files = {s["file"] for info in manifest["splits"].values() for s in info["shards"]}
    with atomic_dir(out_dir) as tmp:
        for fname in sorted(files):
            move(resume_dir / fname, tmp / fname)  # checkpoints/ may be on another filesystem
        write_manifest(tmp, manifest)
    shutil.rmtree(resume_dir, ignore_errors=True)
    return manifest


def main(params: dict) -> None:
    cfg = params["preprocess"]  # validated by palm.core.params
    manifest = preprocess(
        "data/labels/labels.csv",
        "data/raw",
        "data/shards",
        image_size=params["image_size"],
        shard_size=cfg["shard_size"],
        workers=cfg["workers"],
        resume_dir=RESUME_DIR,
    )
    for split, info in manifest["splits"].items():
        print(f"{split}: {info['count']} images in {len(info['shards'])} shard(s)")
