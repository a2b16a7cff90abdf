"""Test-time augmentation (TTA): a model's probability as the mean over flipped copies of each image.

The one implementation every predictor uses (evaluate and cross-validation, ``palm predict``,
``palm serve``, explain's caption), whatever engine runs the network (Paddle Inference, eager
Paddle, onnxruntime). ``model.json``'s ``tta`` (``train.tta`` of params.yaml when the model was
trained; absent = ``off``) names the mode:

| mode | views (in this order) |
|---|---|
| ``off`` | the image |
| ``hflip`` | the image, its left-right mirror |
| ``flips`` | the image, left-right, top-bottom, both (a 180-degree turn) |
| ``flips+rot`` | ``flips``' four, and the image turned by +10 and -10 degrees (:data:`ROTATE_DEG`) |

The probability is the mean of the views' **probabilities** (sigmoids, not logits). The views of a
batch go to the engine together (one call of up to :data:`MAX_VIEW_BATCH` images), not one call per
view. Each mode's views begin with the smaller modes' views, so one pass over the ``flips`` views
gives the probabilities of every mode (:func:`view_probabilities`, :func:`combine`): the
cross-validation scores all modes from the same networks. Numpy only (no Paddle): the ONNX-only
install runs it.
"""

from __future__ import annotations

from collections.abc import Callable

import cv2
import numpy as np

from palm.core.params import TTA_MODES
from palm.serve.engine import Engine

#: how many views each mode averages (the first ``n`` of :func:`views`' order)
N_VIEWS = {"off": 1, "hflip": 2, "flips": 4, "flips+rot": 6}
#: the turns of ``flips+rot``'s last two views, degrees (counter-clockwise first); the corners
#: uncovered are black, as after the training augmentation's turns (palm.data.dataset.Augment)
ROTATE_DEG = 10.0
BLACK = -1.0  # a black pixel as the network sees it (palm.data.image.to_chw_float)
#: the most images one engine call gets (views of a batch included); TensorRT's largest batch (inference.TRT_MAX_BATCH)
MAX_VIEW_BATCH = 64
assert tuple(N_VIEWS) == TTA_MODES


def check_mode(mode: str) -> str:
    if mode not in N_VIEWS:
        raise ValueError(f"tta must be one of {', '.join(TTA_MODES)}, got {mode!r}")
    return mode


def rotate(x: np.ndarray, degrees: float) -> np.ndarray:
    """The NCHW batch ``x`` turned by ``degrees`` about each image's centre (bilinear, black corners)."""
    h, w = x.shape[-2:]
    m = cv2.getRotationMatrix2D((w / 2, h / 2), degrees, 1.0)
    out = np.empty_like(x, dtype=np.float32)
    for i, img in enumerate(x):
        hwc = np.ascontiguousarray(img.transpose(1, 2, 0), dtype=np.float32)
        turned = cv2.warpAffine(
            hwc, m, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=(BLACK,) * 4
        )
        out[i] = turned.reshape(h, w, -1).transpose(2, 0, 1)
    return out


def views(x: np.ndarray, n: int) -> np.ndarray:
    """The first ``n`` views of the NCHW batch ``x``, stacked view-major: ``(n * N, C, H, W)``."""
    flips = [x, x[..., ::-1], x[..., ::-1, :], x[..., ::-1, ::-1]][:n]
    turns = [rotate(x, d) for d in (ROTATE_DEG, -ROTATE_DEG)[: max(0, n - 4)]]
    return np.ascontiguousarray(np.concatenate(flips + turns), dtype=np.float32)


def view_probabilities(
    run: Callable[[np.ndarray], np.ndarray], x: np.ndarray, n: int, max_batch: int = MAX_VIEW_BATCH, first=None
) -> np.ndarray:
    """``(n, N)``: the probability ``run`` gives each of the first ``n`` views of each image of ``x``,
    the views run together in calls of at most ``max_batch`` images (at least one image's views).
    ``first``: the images' own probabilities (the first view), when a pass already gave them
    (explain's Grad-CAM): only the other views are run."""
    if len(x) == 0:
        return np.zeros((n, 0), np.float32)
    v = views(x, n)
    known = [] if first is None else [np.asarray(first, np.float32).reshape(-1)]
    v = v[len(x) :] if known else v
    step = max(int(max_batch), n)
    probs = np.concatenate(
        known + [np.asarray(run(v[i : i + step]), np.float32).reshape(-1) for i in range(0, len(v), step)]
    )
    return probs.reshape(n, len(x))


def combine(per_view: np.ndarray, mode: str) -> np.ndarray:
    """The probability of ``mode`` from :func:`view_probabilities`' rows (it needs at least its views)."""
    return per_view[: N_VIEWS[check_mode(mode)]].mean(axis=0, dtype=np.float64).astype(np.float32)


def predict(
    run: Callable[[np.ndarray], np.ndarray], x: np.ndarray, mode: str, max_batch: int = MAX_VIEW_BATCH, first=None
) -> np.ndarray:
    """The probabilities (N,) of the batch ``x`` under ``mode``; ``off`` is ``run(x)`` itself (or
    ``first``, the images' own probabilities when already known: :func:`view_probabilities`)."""
    if check_mode(mode) == "off":
        return run(x) if first is None else np.asarray(first, np.float32).reshape(-1)
    return combine(view_probabilities(run, x, N_VIEWS[mode], max_batch, first), mode)


def wrap(engine, mode: str, max_batch: int = MAX_VIEW_BATCH):
    """``engine`` (:class:`palm.serve.engine.Engine`) scoring with ``mode``: itself for ``off``."""
    if check_mode(mode) == "off":
        return engine
    return Engine(lambda x: predict(engine, x, mode, max_batch), f"{engine.name}, tta {mode} ({N_VIEWS[mode]} views)")
