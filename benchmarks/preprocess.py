"""Images per second of the preprocess stage against the seed-style loop, in one run.

The seed-style loop is what the course notebooks do: ``cv2.imread`` at full size,
``cv2.resize``, one process. Both read the same full-size synthetic PALM images
(1444x1444 and 2124x2056 JPEGs) from disk, and the output arrays are compared.

    python benchmarks/preprocess.py [--images 200] [--size 224] [--repeat 3]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import tempfile
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from palm.data.preprocess import _decode_into, _raise_errors
from palm.data.synthetic import generate


def decode_all(paths: list[str], image_size: int, workers: int, desc: str = "decode") -> np.ndarray:
    """The preprocess stage's decoding of ``paths`` in one array (its shards write the same per
    shard): in parallel (order kept); fail naming every file that cannot be decoded.

    Threads, not processes: JPEG decoding and resizing release the GIL, and no pixels need
    pickling between processes (measured here on 200 full-size images, 2 cores: 432 images/s
    with 2 threads, 363 with 2 processes, 216 with one).
    """
    out = np.empty((len(paths), image_size, image_size, 3), dtype=np.uint8)
    with contextlib.ExitStack() as stack:
        pool = stack.enter_context(ThreadPoolExecutor(max_workers=workers)) if workers > 1 else None
        bar = stack.enter_context(tqdm(total=len(paths), desc=desc, unit="img", dynamic_ncols=True))
        errors = _decode_into(out, paths, image_size, pool, bar)
    _raise_errors(errors)
    return out


def seed_style(paths: list[str], size: int) -> np.ndarray:
    out = np.empty((len(paths), size, size, 3), np.uint8)
    for i, p in enumerate(paths):
        out[i] = cv2.cvtColor(cv2.resize(cv2.imread(p), (size, size)), cv2.COLOR_BGR2RGB)
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=200)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        half = args.images // 2
        generate(
            tmp / "zips",
            seed=1,
            n_train_p=half,
            n_train_n=args.images - half,
            n_train_h=0,
            n_val_pm=1,
            n_val_non_pm=1,
            scale=1.0,
            progress=False,
        )
        with zipfile.ZipFile(tmp / "zips" / "training.zip") as outer:
            with zipfile.ZipFile(outer.open("PALM-Training400/PALM-Training400.zip")) as inner:
                inner.extractall(tmp / "raw")
        paths = sorted(str(p) for p in (tmp / "raw").rglob("*.jpg"))
        shapes = {cv2.imread(p).shape[:2] for p in paths[:10]}
        print(f"{len(paths)} full-size JPEGs (e.g. {sorted(shapes)}), target {args.size}px, {os.cpu_count()} cores")

        def timed(fn):
            times = []
            for _ in range(args.repeat):
                t0 = time.perf_counter()
                result = fn()
                times.append(time.perf_counter() - t0)
            return result, statistics.median(times)

        base, t_base = timed(lambda: seed_style(paths, args.size))
        ours, t_ours = timed(lambda: decode_all(paths, args.size, os.cpu_count() or 1, desc="preprocess"))
        diff = np.abs(base.astype(np.int16) - ours.astype(np.int16)).mean()
    print(f"seed-style loop (imread full size + resize, 1 process): {len(paths) / t_base:8.1f} images/s")
    print(f"preprocess stage (reduced decode, {os.cpu_count()} threads):      {len(paths) / t_ours:8.1f} images/s")
    print(f"speed-up: {t_base / t_ours:.2f}x   (mean abs pixel difference {diff:.2f} of 255)")


if __name__ == "__main__":
    sys.exit(main())
