"""Decoding photographs in worker processes while the network runs (``palm predict``).

:func:`decode_stream` yields, in the order of the files given, each file's image decoded by
:func:`palm.data.image.load_image` (the preprocessing of training) or the reason it could not be
read. Worker processes decode ahead of the consumer, at most ``ahead`` images at a time, so
memory stays bounded however many files there are, and the consumer (the network) runs
while the next images are decoded.

:func:`decode_cost` tells from a file's header alone (size, mode and bit depth, format, JPEG
scaling and progressive mode) how much memory decoding it will take, so that ``palm serve``
can bound a request's memory before decoding anything.
"""

from __future__ import annotations

import collections
import io
import multiprocessing
import warnings
from collections.abc import Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import IO, NamedTuple

import numpy as np
from PIL import Image

from palm.core.errors import DataError
from palm.core.runtime import machine_share
from palm.data.image import MAX_PIXELS, decode, fit, load_image
from palm.serve.quality import SIDE, assess, check_file


class Decoded(NamedTuple):
    file: Path | bytes  # bytes: palm serve's uploads
    image: np.ndarray | None  # RGB uint8 (input_size, input_size, 3), or None when unreadable
    error: str | None  # why the file could not be read
    quality: str | None = None  # with check_quality: palm.serve.quality's verdict (ok, or why not gradable)


def decode_one(
    file: Path | bytes, image_size: int, input_size: int | None, check_quality: bool = False, fundus=None
) -> Decoded:
    """``file`` (a path, or a file's bytes: ``palm serve``'s uploads) as
    :func:`palm.data.image.load_image` returns it (enhanced by the model's ``fundus``); with ``check_quality`` also its
    :mod:`palm.serve.quality` verdict, from the same decoding when the shards are at least the
    checks' resolution (the default 224 px). Errors name bytes ``<bytes>``."""
    try:
        if not check_quality:
            return Decoded(file, load_image(file, image_size, input_size, fundus), None)
        if image_size >= SIDE:
            rgb, size = decode(file, image_size)
            return Decoded(file, fit(rgb, image_size, input_size, fundus), None, assess(rgb, size))
        return Decoded(file, load_image(file, image_size, input_size, fundus), None, check_file(file))
    except DataError as exc:
        return Decoded(file, None, str(exc))
    except Exception as exc:  # noqa: BLE001 - whatever one file makes a decoder raise is that file's error
        name = "<bytes>" if isinstance(file, bytes) else file
        return Decoded(file, None, f"{name}: {type(exc).__name__}: {exc}")


#: the formats ``palm serve`` accepts (``palm predict``'s file types), read from the header before decoding
ACCEPTED = ("JPEG", "PNG", "BMP", "TIFF")  # a multi-picture JPEG (MPO) opens as JPEG
#: peak bytes per decoded pixel of :func:`palm.data.image.decode` by Pillow mode: measured on 4000 x 4000
#: images of every mode (Pillow 13, numpy 2), plus 4 for the copy an EXIF orientation makes, plus ~10 %.
#: 16-bit greyscale (measured 19.7) and transparent or palette images (36.7: converted through RGBA
#: and float32) cost the most; ``I`` and ``F`` are refused once loaded (4.2).
BYTES_PER_PIXEL = {
    "1": 17,
    "L": 17,
    "P": 44,
    "RGB": 20,
    "RGBX": 20,
    "YCbCr": 20,
    "CMYK": 20,
    "LAB": 20,
    "HSV": 20,
    "I;16": 26,
    "I;16L": 26,
    "I;16B": 26,
    "I;16N": 26,
    "RGBA": 44,
    "RGBa": 44,
    "LA": 44,
    "La": 44,
    "PA": 44,
    "I": 10,
    "F": 10,
}
UNKNOWN_MODE = 44  # any other mode: the most of any
OVERHEAD = 8 << 20  # per image, whatever its size (the decoders' buffers, allocator granularity)


class Cost(NamedTuple):
    bytes: int  # the most memory decoding the file takes (0: it is refused before decoding)
    what: str  # e.g. "8000x8000 I;16 PNG", for messages


def decode_cost(source: bytes | IO[bytes], min_sides: Iterable[int]) -> Cost:
    """What decoding ``source`` (bytes, or a binary file, left at its start) with
    :func:`palm.data.image.decode` at each of ``min_sides`` costs at most, from its header alone.

    JPEGs are decoded at reduced size (libjpeg's scaling), so their cost is that of the reduced
    image, plus, for a progressive JPEG, libjpeg's coefficient buffer at full size (2 bytes per
    coefficient of each component). A file Pillow cannot identify as one of :data:`ACCEPTED`
    raises a :class:`DataError` (never decoded); one above :data:`palm.data.image.MAX_PIXELS` costs 0
    (``decode`` refuses it from its header)."""
    fp = io.BytesIO(source) if isinstance(source, bytes) else source
    worst, what = 0, ""
    for side in set(min_sides):
        fp.seek(0)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                im = Image.open(fp, formats=ACCEPTED)
        except Image.DecompressionBombError:
            return Cost(0, "above the pixel limit")
        except Exception:  # noqa: BLE001 - whatever the header makes Pillow raise: not an image we read
            fp.seek(0)
            raise DataError(
                "<bytes>: cannot decode image (not a JPEG, PNG, BMP or TIFF file: palm serve reads only these)"
            ) from None
        with im:
            w, h = im.size
            what = f"{w}x{h} {im.mode} {im.format}"
            if w * h > MAX_PIXELS:
                return Cost(0, what)
            full = 0
            if im.format in ("JPEG", "MPO"):
                if im.info.get("progressive"):
                    full = 2 * len(im.getbands()) * w * h
                im.draft("RGB", (side, side))
            dw, dh = im.size
            cost = OVERHEAD + full + dw * dh * BYTES_PER_PIXEL.get(im.mode, UNKNOWN_MODE)
        worst = max(worst, cost)
    fp.seek(0)
    return Cost(worst, what)


def _init_worker() -> None:
    import signal

    import cv2

    cv2.setNumThreads(1)  # one process per core already
    # Ctrl-C reaches the whole process group: the main process stops the workers (no traceback
    # from each); SIGTERM ends a worker at once, as by default
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def default_workers() -> int:
    """One decoding process per core of this run's share of the machine (``palm.core.runtime``)."""
    return len(machine_share().cpus)


def decode_stream(
    files: Iterable[str | Path],
    image_size: int,
    input_size: int | None = None,
    workers: int | None = None,
    ahead: int = 64,
    check_quality: bool = False,
    fundus=None,
) -> Iterator[Decoded]:
    """Every file decoded (:func:`decode_one`), in order; ``workers`` processes (None: one per
    core; 0: in this process) keep up to ``ahead`` images decoded or in progress ahead of the
    consumer."""
    workers = default_workers() if workers is None else int(workers)
    if workers < 0 or ahead < 1:
        raise DataError(f"decode workers must be >= 0 and ahead >= 1, got {workers} and {ahead}")
    files = iter(map(Path, files))
    if workers == 0:
        for f in files:
            yield decode_one(f, image_size, input_size, check_quality, fundus)
        return
    # spawn, not fork: the parent has Paddle's OpenMP and oneDNN thread pools running
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker) as pool:
        pending: collections.deque = collections.deque()
        try:
            for f in files:
                pending.append(pool.submit(decode_one, f, image_size, input_size, check_quality, fundus))
                if len(pending) >= ahead:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            for fut in pending:
                fut.cancel()
            # stopped early (an error, Ctrl-C, SIGTERM): the workers end now, without decoding what was queued
            pool.shutdown(wait=True, cancel_futures=True)
