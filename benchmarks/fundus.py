"""Cost of the fundus enhancement (``train.fundus``, palm.data.fundus) per image, in one run.

For each step alone and all three on: milliseconds per image of ``enhance`` at ``--size`` px
(the shards' side), against the plain resize to ``--input`` px that every image gets anyway
(the ratio printed); then the training loader's read of a shard image (ShardImages) plain,
enhanced on first read, and from the in-memory cache of the enhanced images. Images: synthetic
fundus photographs, or with ``--real`` the training photographs of ../shared/palm-mini (read
from its zip, never copied); with them, how many photographs the crop changes at all.

    python benchmarks/fundus.py [--images 100] [--size 224] [--input 96] [--repeat 3] [--real]
"""

from __future__ import annotations

import argparse
import io
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import cv2
import numpy as np

from palm.data.fundus import Fundus, enhance
from palm.data.image import load_image, resize_square
from palm.data.shards import SplitWriter, new_manifest, open_split, write_manifest

REPO = Path(__file__).resolve().parents[1]
PALM_MINI = REPO.parent / "shared" / "palm-mini" / "training.zip"

SPECS = {
    "crop": Fundus(crop=True),
    "local_norm=1/30": Fundus(local_norm=1 / 30),
    "clahe=luminance": Fundus(clahe="luminance"),
    "clahe=green": Fundus(clahe="green"),
    "all three": Fundus(crop=True, local_norm=1 / 30, clahe="luminance"),
}


def synthetic(n: int, size: int) -> np.ndarray:
    from palm.data.synthetic import draw_fundus

    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        bgr, _ = draw_fundus(rng, "PNH"[i % 3], (1444, 1444) if i % 2 else (2124, 2056), "LR"[i % 2])
        out.append(load_image(cv2.imencode(".jpg", bgr)[1].tobytes(), size))
    return np.stack(out)


def real(n: int, size: int) -> np.ndarray:
    with zipfile.ZipFile(PALM_MINI) as outer:
        inner = zipfile.ZipFile(io.BytesIO(outer.read("PALM-Training400/PALM-Training400.zip")))
        names = sorted(x for x in inner.namelist() if x.lower().endswith(".jpg"))[:n]
        return np.stack([load_image(inner.read(x), size) for x in names])


def per_image_ms(fn, images: np.ndarray, repeat: int) -> float:
    """The fastest of ``repeat`` passes over ``images``, in ms per image."""
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        for img in images:
            fn(img)
        best = min(best, time.perf_counter() - t)
    return 1e3 * best / len(images)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=100)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--input", type=int, default=96)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--real", action="store_true", help="../shared/palm-mini's training photographs")
    args = ap.parse_args(argv)
    cv2.setNumThreads(1)  # one image per core, as the loader and palm predict's workers run
    if args.real and not PALM_MINI.is_file():
        sys.exit(f"{PALM_MINI}: not here")
    images = (real if args.real else synthetic)(args.images, args.size)
    print(
        f"{len(images)} {'real' if args.real else 'synthetic'} images at {args.size} px, one thread, "
        f"best of {args.repeat}"
    )
    base = per_image_ms(lambda im: resize_square(im, args.input), images, args.repeat)
    print(f"  resize {args.size} -> {args.input} px (every image, always): {base:.3f} ms/image")
    for name, spec in SPECS.items():
        ms = per_image_ms(lambda im, s=spec: enhance(im, s), images, args.repeat)
        print(f"  {name:<16} {ms:7.3f} ms/image  ({ms / base:5.1f}x the resize)")
    if args.real:
        changed = sum(not np.array_equal(enhance(im, SPECS["crop"]), im) for im in images)
        print(f"  crop changes {changed} of {len(images)} photographs")
    with tempfile.TemporaryDirectory() as tmp:
        manifest = new_manifest(args.size, {})
        writer = SplitWriter(Path(tmp), manifest, "train", len(images))
        writer.write(images, [f"{i}.jpg" for i in range(len(images))], [0] * len(images), [""] * len(images))
        writer.close()
        write_manifest(Path(tmp), manifest)
        pixels, *_ = open_split(tmp, "train")
        plain = pixels.resized(args.input)
        idx = range(len(images))
        t_plain = per_image_ms(lambda i: plain[i], idx, args.repeat)
        view = pixels.resized(args.input, SPECS["all three"])
        t_first = per_image_ms(lambda i: view[i], idx, 1)
        t_cached = per_image_ms(lambda i: view[i], idx, args.repeat)
        print(
            f"  loader, plain read + resize: {t_plain:.3f} ms/image; all three, first read {t_first:.3f} "
            f"ms/image ({t_first / t_plain:.1f}x), cached {t_cached:.4f} ms/image ({t_cached / t_plain:.2f}x)"
        )


if __name__ == "__main__":
    main()
