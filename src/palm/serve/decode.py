"""Decoding photographs in worker processes while the network runs (``palm predict``).

:func:`decode_stream` yields, in the order of the files given, each file's image decoded by
:func:`palm.data.image.load_image` (the preprocessing of training) or the reason it could not be
read. Worker processes decode ahead of the consumer, at most ``ahead`` images at a time, so
memory stays bounded however many files there are, and the consumer (the network) runs
while the next images are decoded.
"""

from __future__ import annotations

import collections
import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Iterable, Iterator, NamedTuple

import numpy as np

from palm.core.errors import DataError
from palm.data.image import decode, fit, load_image
from palm.serve.quality import SIDE, assess, check_file
from palm.core.runtime import machine_share


class Decoded(NamedTuple):
    file: Path
    image: np.ndarray | None     # RGB uint8 (input_size, input_size, 3), or None when unreadable
    error: str | None            # why the file could not be read
    quality: str | None = None   # with check_quality: palm.serve.quality's verdict (ok, or why not gradable)


def decode_one(file: Path | bytes, image_size: int, input_size: int | None, check_quality: bool = False,
               fundus=None) -> Decoded:
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


def _init_worker() -> None:
    import signal

    import cv2

    cv2.setNumThreads(1)      # one process per core already
    # Ctrl-C reaches the whole process group: the main process stops the workers (no traceback
    # from each); SIGTERM ends a worker at once, as by default
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def default_workers() -> int:
    """One decoding process per core of this run's share of the machine (``palm.core.runtime``)."""
    return len(machine_share().cpus)


def decode_stream(files: Iterable[str | Path], image_size: int, input_size: int | None = None,
                  workers: int | None = None, ahead: int = 64, check_quality: bool = False,
                  fundus=None) -> Iterator[Decoded]:
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
