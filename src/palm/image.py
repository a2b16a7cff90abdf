"""The one image preprocessing function shared by ``preprocess`` (training data) and ``predict``.

``load_image`` decodes a photograph to an ``image_size`` x ``image_size`` RGB uint8 array
(and on to a model's ``input_size``, via ``resize_square``);
``to_chw_float`` turns such arrays into the network's input (float32, CHW, in [-1, 1]).
"""

from __future__ import annotations

import io
from pathlib import Path

import cv2
import numpy as np
from PIL import Image, UnidentifiedImageError

from palm.errors import DataError


def load_image(source: str | Path | bytes, image_size: int, input_size: int | None = None) -> np.ndarray:
    """Decode ``source`` (a path or the file's bytes) to RGB uint8 of shape (image_size, image_size, 3).

    This is what ``preprocess`` stores. With ``input_size`` (a model trained at a lower
    resolution than the shards, ``train.input_size``), that image is then resized again to
    ``input_size``, exactly as the training loader resizes the shards.

    Large JPEGs are decoded at reduced resolution (libjpeg's DCT scaling, 1/2 to 1/8, never
    below ``image_size``): a 2124x2056 photograph is decoded about 8x faster than at full size.
    The image is then resized to a square with area interpolation (aspect ratio is not kept,
    as in the PALM course notebooks; the fundus images are nearly square).
    """
    rgb, _ = decode(source, image_size)
    rgb = resize_square(rgb, image_size)
    return rgb if input_size is None else resize_square(rgb, input_size)


def decode(source: str | Path | bytes, min_side: int) -> tuple[np.ndarray, tuple[int, int]]:
    """RGB uint8 of ``source`` (JPEGs decoded at reduced resolution, never below ``min_side``),
    and the original ``(width, height)``."""
    name = str(source) if not isinstance(source, bytes) else "<bytes>"
    try:
        with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as im:
            size = im.size
            im.draft("RGB", (min_side, min_side))
            rgb = np.asarray(im.convert("RGB"))
    except FileNotFoundError:
        raise DataError(f"{name}: file not found") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise DataError(f"{name}: cannot decode image ({exc})") from None
    return rgb, size


def resize_square(rgb: np.ndarray, size: int) -> np.ndarray:
    """``rgb`` as a ``size`` x ``size`` image (area interpolation when shrinking)."""
    if rgb.shape[:2] != (size, size):
        shrinking = rgb.shape[0] >= size and rgb.shape[1] >= size
        rgb = cv2.resize(rgb, (size, size), interpolation=cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR)
    return np.ascontiguousarray(rgb)


def to_chw_float(images: np.ndarray) -> np.ndarray:
    """uint8 HWC (or NHWC) RGB -> float32 CHW (or NCHW) in [-1, 1]."""
    x = np.asarray(images, dtype=np.float32) * (2.0 / 255.0) - 1.0
    return np.ascontiguousarray(np.moveaxis(x, -1, -3))
