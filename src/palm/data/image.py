"""The one image preprocessing function shared by ``preprocess`` (training data) and ``predict``.

``load_image`` decodes a photograph to an ``image_size`` x ``image_size`` RGB uint8 array
(and on to a model's ``input_size`` via :func:`to_input`: a model's fundus enhancement,
:mod:`palm.data.fundus`, then ``resize_square``; the shards' readers do the same);
``to_chw_float`` turns such arrays into the network's input (float32, CHW, in [-1, 1]).
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from palm.core.errors import DataError
from palm.core.runtime import fixed_opencv
from palm.data.fundus import enhance

cv2 = fixed_opencv()   # OpenCV's baseline code on every CPU: the same pixels everywhere

#: the most pixels a photograph may have (8000 x 8000); the PALM photographs have up to 2124 x 2056.
#: Larger images are refused before decoding (a "decompression bomb" could need gigabytes).
MAX_PIXELS = 64_000_000

#: modes decoded as they are, or through Pillow's own conversion to RGB
_DIRECT = {"RGB", "L", "1", "RGBX", "CMYK", "YCbCr"}
_ALPHA = {"RGBA", "RGBa", "LA", "La", "PA", "P"}
_SIXTEEN_BIT = {"I;16", "I;16L", "I;16B", "I;16N"}


def load_image(source: str | Path | bytes, image_size: int, input_size: int | None = None,
               fundus=None) -> np.ndarray:
    """Decode ``source`` (a path or the file's bytes) to RGB uint8 of shape (image_size, image_size, 3).

    This is what ``preprocess`` stores. With ``input_size`` (a model trained at a lower
    resolution than the shards, ``train.input_size``), that image is then resized again to
    ``input_size``, exactly as the training loader resizes the shards; with ``fundus`` (a
    model's ``train.fundus``, :class:`palm.data.fundus.Fundus`) it is first enhanced, as the
    training loader enhances the shards (:func:`to_input`).

    Large JPEGs are decoded at reduced resolution (libjpeg's DCT scaling, 1/2 to 1/8, never
    below ``image_size``): a 2124x2056 photograph is decoded about 8x faster than at full size.
    The image is then resized to a square with area interpolation (aspect ratio is not kept,
    as in the PALM course notebooks; the fundus images are nearly square).

    An EXIF orientation tag (1 to 8) is applied first: the image is what a viewer shows, upright.
    Unusual formats are converted explicitly, never clipped: grayscale (8 or 16 bit) is
    repeated over the three channels, 16-bit values are scaled to 8 bits (65535 -> 255),
    palette and CMYK images go through Pillow's conversion, and transparent pixels are put on
    black (the fundus photographs' background). 32-bit integer and floating-point pixels, other
    modes, and images of more than :data:`MAX_PIXELS` pixels are refused with the reason.
    Any failure is a :class:`DataError` naming the file.
    """
    rgb, _ = decode(source, image_size)
    return fit(rgb, image_size, input_size, fundus)


def fit(rgb: np.ndarray, image_size: int, input_size: int | None = None, fundus=None) -> np.ndarray:
    """A decoded image (:func:`decode` with ``min_side=image_size``) as :func:`load_image` returns it."""
    rgb = resize_square(rgb, image_size)
    return to_input(rgb, input_size, fundus)


def to_input(rgb: np.ndarray, size: int | None, fundus=None) -> np.ndarray:
    """An image at ``image_size`` (a shard's, or :func:`load_image`'s) as a network sees it: enhanced
    by ``fundus`` (:func:`palm.data.fundus.enhance`; None or all off: unchanged), then resized to
    ``size`` (None: kept). The one place that does both, for training, evaluate, explain and predict."""
    rgb = enhance(rgb, fundus)
    return rgb if size is None else resize_square(rgb, size)


def decode(source: str | Path | bytes, min_side: int) -> tuple[np.ndarray, tuple[int, int]]:
    """RGB uint8 of ``source`` (JPEGs decoded at reduced resolution, never below ``min_side``),
    and the original ``(width, height)``."""
    name = str(source) if not isinstance(source, bytes) else "<bytes>"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # the limit is ours, below
            im = Image.open(io.BytesIO(source) if isinstance(source, bytes) else source)
        with im:
            size = w, h = im.size
            if w * h > MAX_PIXELS:
                raise DataError(f"{name}: {w}x{h} pixels is above the limit of {MAX_PIXELS:,} "
                                "(palm.data.image.MAX_PIXELS); refusing to decode it")
            im.draft("RGB", (min_side, min_side))
            drafted = im.size
            # as the eye saw it: a photograph saved sideways with an EXIF orientation tag (phones,
            # many fundus cameras) is turned upright before anything else; no tag, no change
            ImageOps.exif_transpose(im, in_place=True)
            if im.size != drafted:  # turned a quarter: the original size as displayed
                size = h, w
            rgb = _to_rgb(im, name)
    except DataError:
        raise
    except FileNotFoundError:
        raise DataError(f"{name}: file not found") from None
    except Image.DecompressionBombError as exc:
        raise DataError(f"{name}: refusing to decode it ({exc})") from None
    except (UnidentifiedImageError, SyntaxError) as exc:
        raise DataError(f"{name}: cannot decode image ({exc})") from None
    except Exception as exc:  # noqa: BLE001 - whatever a broken file makes a decoder raise, it is this file's error
        raise DataError(f"{name}: cannot decode image ({type(exc).__name__}: {exc})") from None
    if rgb.ndim != 3 or rgb.shape[2] != 3 or min(rgb.shape[:2]) < 1:
        raise DataError(f"{name}: decoded to an unexpected shape {rgb.shape}")
    return rgb, size


def _to_rgb(im: Image.Image, name: str) -> np.ndarray:
    """``im`` as RGB uint8, converted as :func:`load_image` says."""
    mode = im.mode
    if mode in _DIRECT:
        return np.asarray(im.convert("RGB"))
    if mode in _SIXTEEN_BIT:
        gray = np.asarray(im).astype(np.float64) / 257.0
        return np.repeat(np.rint(gray).astype(np.uint8)[..., None], 3, axis=2)
    if mode in _ALPHA:
        rgba = np.asarray(im.convert("RGBA"))
        alpha = rgba[..., 3:4].astype(np.float32) / 255.0
        return np.rint(rgba[..., :3].astype(np.float32) * alpha).astype(np.uint8)  # on black
    if mode in ("I", "F"):
        raise DataError(f"{name}: {'32-bit integer' if mode == 'I' else 'floating-point'} pixels (mode {mode}) "
                        "are not supported; save the image with 8 or 16 bits per channel")
    raise DataError(f"{name}: image mode {mode} is not supported (RGB, grayscale, palette, CMYK, 16-bit gray)")


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
