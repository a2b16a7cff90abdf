"""Is a picture a gradable colour fundus photograph? (``palm predict``'s ``quality`` column)

A network scores any picture; only a fundus photograph's score means something. Checks, in
this order, on the image seen at ``SIDE`` x ``SIDE`` pixels (the first that fails is the reason):

- ``too small``: the original's shorter side is below ``MIN_SIDE`` pixels;
- ``too dark``: less than ``MIN_LIT`` of the picture is lit (brightest channel above
  ``DARK_LEVEL``), or the lit part's mean grey is below ``MIN_MEAN``;
- ``overexposed``: more than ``MAX_SATURATED`` of the lit part is near-white (grey > 235);
- ``no circular fundus``: a fundus photograph is a bright disc on a black surround: the
  corners must be dark, the lit part a single round blob (its area at least ``MIN_FILL`` of
  its enclosing circle) covering ``MIN_LIT_DISC``-``MAX_LIT`` of the picture;
- ``blurred``: the variance of the Laplacian inside the disc (away from its rim) is below
  ``MIN_SHARPNESS``.

Thresholds were set with margins from palm-mini's 400 real photographs (224 px; none is
flagged, ``tests/test_quality.py``): lit fraction 0.55-0.81, fill 0.66-0.99, mean grey of the
disc 28.9-97.0, near-white share <= 0.006, Laplacian variance 9.7-682 (blurring one with a
Gaussian of sigma 2 px brings it to ~2.9).
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from palm.data.image import decode

OK = "ok"
REASONS = ("too small", "too dark", "overexposed", "no circular fundus", "blurred")

SIDE = 224  # the checks' working resolution
MIN_SIDE = 128  # px, the original's shorter side
DARK_LEVEL = 20  # a pixel is lit when its brightest channel is above this
MIN_LIT = 0.2  # below this lit share: too dark
MIN_MEAN = 18.0  # mean grey of the lit part below this: too dark
MAX_SATURATED = 0.3  # share of the lit part above grey 235: overexposed
MIN_LIT_DISC = 0.3  # the fundus disc covers 30-95% of the picture
MAX_LIT = 0.95
MIN_FILL = 0.5  # the disc's area / its enclosing circle's
CORNER = 0.08  # corner patches (share of the side) that must be dark ...
MIN_DARK_CORNERS = 0.8  # ... for at least this share of their pixels
MIN_SHARPNESS = 5.0  # variance of the Laplacian (grey levels^2) inside the disc


def assess(rgb: np.ndarray, original_size: tuple[int, int] | None = None) -> str:
    """``ok``, or the first reason (``REASONS``) why ``rgb`` (uint8 HxWx3) is not gradable."""
    if original_size is None:
        original_size = (rgb.shape[1], rgb.shape[0])
    if min(original_size) < MIN_SIDE:
        return "too small"
    rgb = cv2.resize(
        rgb, (SIDE, SIDE), interpolation=cv2.INTER_AREA if min(rgb.shape[:2]) >= SIDE else cv2.INTER_LINEAR
    )
    grey = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY).astype(np.float32)
    brightest = rgb.max(axis=2)
    lit = brightest > DARK_LEVEL
    if lit.mean() < MIN_LIT or grey[lit].mean() < MIN_MEAN:
        return "too dark"
    if (grey[lit] > 235).mean() > MAX_SATURATED:
        return "overexposed"
    c = max(1, int(SIDE * CORNER))
    corners = np.concatenate(
        [brightest[:c, :c].ravel(), brightest[:c, -c:].ravel(), brightest[-c:, :c].ravel(), brightest[-c:, -c:].ravel()]
    )
    if (corners <= DARK_LEVEL).mean() < MIN_DARK_CORNERS or not MIN_LIT_DISC <= lit.mean() <= MAX_LIT:
        return "no circular fundus"
    contours, _ = cv2.findContours(lit.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    disc = max(contours, key=cv2.contourArea)
    _, radius = cv2.minEnclosingCircle(disc)
    if cv2.contourArea(disc) < MIN_FILL * np.pi * radius**2:
        return "no circular fundus"
    inner = cv2.erode(lit.astype(np.uint8), np.ones((9, 9), np.uint8)).astype(bool)
    if not inner.any() or cv2.Laplacian(grey, cv2.CV_32F)[inner].var() < MIN_SHARPNESS:
        return "blurred"
    return OK


def check_file(path: str | Path | bytes) -> str:
    """:func:`assess` of an image file (decoded at reduced resolution, not below ``SIDE``)."""
    rgb, size = decode(path, SIDE)
    return assess(rgb, size)
