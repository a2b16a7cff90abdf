"""The shard format, its one owner: writing shards and their manifest, and reading images back.

A shards folder (``data/shards/``)::

    manifest.json            shard list per split, labels, shape, dtype, parameters used
    train-000.npy ...        uint8, (n, image_size, image_size, 3), RGB, NumPy's .npy format
    valid-000.npy ...

``manifest.json``: ``{"format_version", "dtype", "layout", "channels", "image_size", "params",
"splits": {name: {"count": n, "shards": [{"file", "shape", "images", "labels", "groups"}, ...]}}}``.

Memory does not grow with the data: shards are written one at a time (:class:`SplitWriter`), and
:class:`ShardImages` reads one image at a time from its shard (``os.preadv`` at the image's offset
in the ``.npy`` file, no memory map whose pages would stay resident), enhanced and resized to a
network's ``input_size`` as it is read (:func:`palm.data.image.to_input`). Only the manifest's names and labels are held for a whole split.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import NoReturn

import numpy as np

from palm.core.errors import DataError
from palm.core.fsutil import atomic_file, writing
from palm.core.params import MAX_SIDE, MIN_SIDE, short
from palm.data.fundus import Fundus
from palm.data.image import to_input

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
SUFFIX = ".npy"


def new_manifest(image_size: int, params: dict) -> dict:
    """The manifest of a shards folder, before its splits are added (``splits[name] =
    {"count": n, "shards": [{"file", "shape", "images", "labels", "groups"}, ...]}``)."""
    return {
        "format_version": FORMAT_VERSION,
        "dtype": "uint8",
        "layout": "NHWC",
        "channels": "RGB",
        "image_size": image_size,
        "params": params,
        "splits": {},
    }


def shard_name(split: str, k: int) -> str:
    return f"{split}-{k:03d}{SUFFIX}"


def save_shard(path: Path, pixels: np.ndarray) -> None:
    """Write one shard so that ``path`` is complete or absent (:func:`palm.core.fsutil.atomic_file`)."""
    with atomic_file(path, "wb") as f:
        np.save(f, np.ascontiguousarray(pixels, dtype=np.uint8))


def write_manifest(folder: Path, manifest: dict) -> None:
    with writing(Path(folder) / MANIFEST), open(Path(folder) / MANIFEST, "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=1)


class SplitWriter:
    """Writes one split of ``manifest`` into ``folder``, one shard (at most ``shard_size`` images)
    per :meth:`write`; :meth:`skip` records a shard that is already in ``folder`` (a resumed run)
    without rewriting it; :meth:`close` adds the split's entry to the manifest."""

    def __init__(self, folder: Path, manifest: dict, split: str, shard_size: int):
        self.folder, self.manifest, self.split, self.shard_size = Path(folder), manifest, split, shard_size
        self.side = int(manifest["image_size"])
        self.shards: list[dict] = []

    def entry(self, images, labels, groups) -> dict:
        """The manifest entry of the next shard (``images``, ``labels``, ``groups`` of its images)."""
        return {
            "file": shard_name(self.split, len(self.shards)),
            "shape": [len(images), self.side, self.side, 3],
            "images": [str(v) for v in images],
            "labels": [int(v) for v in labels],
            "groups": [str(v) for v in groups],
        }

    def skip(self, images, labels, groups) -> dict:
        entry = self.entry(images, labels, groups)
        self.shards.append(entry)
        return entry

    def write(self, pixels: np.ndarray, images, labels, groups) -> dict:
        """Write one whole shard (``len(images)`` images, at most ``shard_size``)."""
        entry = self.entry(images, labels, groups)
        if len(images) > self.shard_size or pixels.shape != tuple(entry["shape"]):
            raise ValueError(f"shard {entry['file']}: pixels {pixels.shape}, expected {tuple(entry['shape'])}")
        save_shard(self.folder / entry["file"], pixels)
        self.shards.append(entry)
        return entry

    def close(self) -> dict:
        info = {"count": sum(s["shape"][0] for s in self.shards), "shards": self.shards}
        self.manifest["splits"][self.split] = info
        return info


def read_manifest(shards_dir: str | Path) -> dict:
    path = Path(shards_dir) / MANIFEST
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"{path}: not found; run the preprocess stage first (dvc repro preprocess)") from None
    except ValueError as exc:
        raise DataError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format_version") != FORMAT_VERSION:
        version = manifest.get("format_version") if isinstance(manifest, dict) else None
        raise DataError(
            f"{path}: shard format {version!r}, this code reads "
            f"{FORMAT_VERSION}; run the preprocess stage again (dvc repro preprocess)"
        )
    check_manifest(manifest, path)
    return manifest


def check_manifest(manifest: dict, path: Path) -> None:
    """Every value of a shard manifest that the pipeline uses, checked as params.yaml is: a
    :class:`DataError` naming the file and the key (sizes within params.yaml's bounds, labels 0 or
    1, shard files by their own names in the folder, one image name, label and group per image)."""

    def bad(key: str, value, why: str) -> NoReturn:
        raise DataError(
            f"{path}: {key} = {short(value)}: {why}; run the preprocess stage again (dvc repro -f preprocess)"
        )

    side = manifest.get("image_size")
    if type(side) is not int or not MIN_SIDE <= side <= MAX_SIDE:
        bad("image_size", side, f"must be a whole number from {MIN_SIDE} to {MAX_SIDE}")
    splits = manifest.get("splits")
    if not isinstance(splits, dict):
        bad("splits", splits, "must be a mapping of splits")
    for name, split in splits.items():
        shards = split.get("shards") if isinstance(split, dict) else None
        if not isinstance(shards, list):
            bad(f"splits.{name}.shards", shards, "must be a list")
        for k, shard in enumerate(shards):
            key = f"splits.{name}.shards[{k}]"
            if not isinstance(shard, dict):
                bad(key, shard, "must be a mapping")
            file = shard.get("file")
            if (
                not isinstance(file, str)
                or file != Path(file).name
                or not file.endswith(SUFFIX)
                or file.startswith(".")
            ):
                bad(f"{key}.file", file, f"must be the name of a {SUFFIX} file in the shards folder")
            labels = shard.get("labels")
            if not isinstance(labels, list):
                bad(f"{key}.labels", labels, "must be a list")
            for i, v in enumerate(labels):
                if type(v) is not int or v not in (0, 1):
                    bad(f"{key}.labels[{i}]", v, "must be 0 (not PM) or 1 (PM)")
            for field in ("images", "groups"):
                values = shard.get(field, [""] * len(labels) if field == "groups" else None)
                if (
                    not isinstance(values, list)
                    or len(values) != len(labels)
                    or not all(isinstance(v, str) for v in values)
                ):
                    bad(f"{key}.{field}", values, f"must list one name per label ({len(labels)})")


def _npy_layout(path: Path) -> tuple[tuple[int, ...], int]:
    """(shape, offset of the data) of a uint8 C-order ``.npy`` file, from its header alone."""
    try:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            read_header = (
                np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            )
            shape, fortran, dtype = read_header(f)
            offset = f.tell()
    except FileNotFoundError:
        raise DataError(f"{path}: shard not found; run the preprocess stage again") from None
    except ValueError as exc:
        raise DataError(f"{path}: not a shard ({exc})") from None
    if dtype != np.uint8 or fortran or len(shape) != 4 or shape[3] != 3:
        raise DataError(f"{path}: expected uint8 (n, side, side, 3) images, found {dtype} {shape}")
    return tuple(int(v) for v in shape), offset


class ShardImages:
    """The images of a split, read from disk one at a time: ``images[i]`` is uint8 HWC RGB.

    Array-like where the pipeline needs it (``len``, ``shape``, integer indexing, iteration,
    ``np.asarray`` for small splits), never holding more than the image asked for. ``rows``
    selects and orders images (a subset), ``size`` and ``fundus`` enhance and resize each image as
    it is read (:func:`palm.data.image.to_input`, as ``palm predict`` does to a photograph).
    Enhanced images are kept in memory (:attr:`cache`, shared by the views of one spec and size:
    224 px x 400 images is 60 MB), since enhancing costs more than reading (benchmarks/fundus.py);
    never on disk. Picklable (for loader worker processes); each process opens the files itself.
    """

    def __init__(
        self,
        files: list[Path],
        counts: list[int],
        side: int,
        rows: np.ndarray | None = None,
        size: int | None = None,
        offsets: list[int] | None = None,
        fundus=None,
        cache: dict | None = None,
    ):
        self.files, self.counts, self.side = [Path(p) for p in files], list(counts), int(side)
        self.starts = np.concatenate([[0], np.cumsum(self.counts, dtype=np.int64)])
        self.offsets = offsets
        self.rows = np.arange(self.starts[-1], dtype=np.int64) if rows is None else np.asarray(rows, np.int64)
        self.size = self.side if size is None else int(size)
        self.fundus = Fundus.of(fundus)
        #: row -> image as returned, when ``fundus`` is on (one dict per spec and size, shared by views)
        self.cache: dict[int, np.ndarray] = {} if cache is None else cache
        self._fds: dict[int, int] = {}

    # -- views -------------------------------------------------------------------------
    def _view(self, rows, size, fundus) -> ShardImages:
        same = size == self.size and Fundus.of(fundus) == self.fundus
        return ShardImages(
            self.files, self.counts, self.side, rows, size, self.offsets, fundus, self.cache if same else None
        )

    def subset(self, idx) -> ShardImages:
        return self._view(self.rows[np.asarray(idx, dtype=np.int64)], self.size, self.fundus)

    def resized(self, size: int, fundus=None) -> ShardImages:
        """The same images enhanced by ``fundus`` (None: not) and resized to ``size``, as each is read."""
        return self._view(self.rows, size, fundus)

    # -- array-like ----------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.rows)

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (len(self), self.size, self.size, 3)

    dtype = np.dtype(np.uint8)

    def __getitem__(self, i):
        if isinstance(i, slice) or not np.isscalar(i):
            idx = np.arange(len(self))[i] if isinstance(i, slice) else np.asarray(i)
            return (
                np.stack([self[int(j)] for j in idx]) if len(idx) else np.zeros((0, self.size, self.size, 3), np.uint8)
            )
        i = int(i)
        if not -len(self) <= i < len(self):
            raise IndexError(f"image {i} of {len(self)}")
        row = int(self.rows[i])
        if not self.fundus:
            return to_input(self._read(row), self.size if self.size != self.side else None)
        img = self.cache.get(row)
        if img is None:
            img = self.cache[row] = to_input(self._read(row), self.size, self.fundus)
            img.flags.writeable = False  # shared: a caller that changes an image works on a copy
        return img

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    def __array__(self, dtype=None, copy=None):
        arr = self[:]
        return arr if dtype is None else arr.astype(dtype)

    # -- reading ----------------------------------------------------------------------------
    def _read(self, row: int) -> np.ndarray:
        k = int(np.searchsorted(self.starts, row, side="right")) - 1
        if self.offsets is None:
            self.offsets = [_npy_layout(p)[1] for p in self.files]
        nbytes = self.side * self.side * 3
        out = np.empty((self.side, self.side, 3), np.uint8)
        # numpy's stubs give ndarray the buffer protocol (__buffer__) only from Python 3.12 on
        got = os.preadv(self._fd(k), [out], self.offsets[k] + (row - int(self.starts[k])) * nbytes)  # type: ignore[list-item]
        if got != nbytes:
            raise DataError(f"{self.files[k]}: truncated shard (image {row - int(self.starts[k])})")
        return out

    def _fd(self, k: int) -> int:
        fd = self._fds.get(k)
        if fd is None:
            if len(self._fds) >= 64:  # a bounded number of open files, whatever the number of shards
                os.close(self._fds.pop(next(iter(self._fds))))
            fd = self._fds[k] = os.open(self.files[k], os.O_RDONLY)
        return fd

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    def __getstate__(self):
        return {**self.__dict__, "_fds": {}, "cache": {}}  # a worker process fills its own cache


def digest(shards_dir: str | Path, split: str) -> str:
    """sha256 of what a reader of ``split`` reads: the manifest and every byte of the split's
    shards (0.13 s for 400 images of 224 px, 60 MB, as the default set's training split: measured
    on the project's 2-core machine)."""
    shards_dir = Path(shards_dir)
    manifest = read_manifest(shards_dir)  # a missing or unreadable manifest is a one-line error
    h = hashlib.sha256((shards_dir / MANIFEST).read_bytes())
    for s in manifest["splits"].get(split, {}).get("shards", []):
        try:
            with open(shards_dir / s["file"], "rb") as f:
                h.update(s["file"].encode() + b"\0" + hashlib.file_digest(f, "sha256").digest())
        except FileNotFoundError:
            raise DataError(f"{shards_dir / s['file']}: shard not found; run the preprocess stage again") from None
    return h.hexdigest()


def open_split(shards_dir: str | Path, split: str, manifest: dict | None = None):
    """``(images, labels, names, groups)`` of one split: :class:`ShardImages` and the manifest's
    lists, after checking every shard's header against the manifest."""
    shards_dir = Path(shards_dir)
    manifest = read_manifest(shards_dir) if manifest is None else manifest
    if split not in manifest["splits"]:
        raise DataError(f"{shards_dir}: no split {split!r} (have {', '.join(manifest['splits'])})")
    shards = manifest["splits"][split]["shards"]
    side = int(manifest["image_size"])
    files, counts, offsets = [], [], []
    for s in shards:
        path = shards_dir / s["file"]
        shape, offset = _npy_layout(path)
        if shape[1:3] != (side, side) or shape[0] != len(s["labels"]):
            raise DataError(
                f"{path}: holds {shape[0]} images of {shape[1]}x{shape[2]} px, the manifest lists "
                f"{len(s['labels'])} labels of {side} px"
            )
        expected = offset + int(np.prod(shape))
        if path.stat().st_size != expected:
            raise DataError(
                f"{path}: truncated shard ({path.stat().st_size:,} bytes, its header says "
                f"{expected:,}); run the preprocess stage again (dvc repro -f preprocess)"
            )
        files.append(path)
        counts.append(shape[0])
        offsets.append(offset)
    labels = np.array([v for s in shards for v in s["labels"]], dtype=np.int64)
    names = [v for s in shards for v in s["images"]]
    groups = [v for s in shards for v in s.get("groups", [""] * len(s["labels"]))]
    return ShardImages(files, counts, side, offsets=offsets), labels, names, groups
