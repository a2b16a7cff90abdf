"""Fundus-specific enhancement of a decoded photograph (``train.fundus``, recorded in ``model.json``).

:func:`enhance` takes an RGB uint8 image at ``image_size`` (a shard's pixels, or what
:func:`palm.data.image.load_image` decodes a photograph to) and returns one of the same shape,
before the resize to the network's ``input_size`` (:func:`palm.data.image.to_input`, the one
place that does "enhance, then resize" for training, evaluate, explain, export, predict and serve).
The steps, each optional, in this order:

1. ``crop``: the fundus disc (:func:`find_disc`) in a square centred on it, side the disc's larger
   extent, black where the square leaves the frame, resized back to the input's side;
2. ``local_norm`` (a fraction of the side, 0 = off): Ben Graham's local colour normalisation
   (Kaggle diabetic retinopathy, 2015): ``4 * img - 4 * GaussianBlur(img, sigma) + 128``, saturated
   to uint8, with everything outside the disc shrunk by 5% of its radius set to 128 (grey: the
   network's 0, as in his code; the disc's own region, not a circle: a photograph squeezed to a
   square has an elliptical disc, and many are cut off at the top and bottom);
3. ``clahe``: OpenCV's CLAHE (clip limit 2, 8x8 tiles) on ``luminance`` (L of CIELAB) or on the
   ``green`` channel (kept in place: red and blue are unchanged).

A photograph with no dark border (the disc fills the frame) or without any disc (all black)
has nothing to crop or mask: it comes through ``crop`` unchanged, and ``local_norm`` is applied
to the whole frame.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import NamedTuple

import cv2
import numpy as np

from palm.core.params import CLAHE_MODES, MAX_LOCAL_NORM, fundus_on  # the schema of Fundus's steps

#: a pixel belongs to the disc if its brightest channel is above this fraction of the image's maximum...
DISC_FRACTION = 0.08
#: ... and above this value (the black border of a JPEG is rarely exactly 0)
DISC_FLOOR = 10
#: the smallest disc taken as one (fraction of the frame's area): below, no disc is found
MIN_DISC_AREA = 0.05
#: a bright region covering this fraction of the frame is no disc on a border (a disc that just fits
#: its square covers pi/4 = 0.785 of it): the photograph has no border to remove
NO_BORDER_AREA = 0.95
#: local_norm's mask: the disc's region shrunk by (1 - this) of its radius
MASK_RADIUS = 0.95
CLAHE_CLIP, CLAHE_TILES = 2.0, (8, 8)


@dataclass(frozen=True)
class Fundus:
    """The steps of :func:`enhance` (all off by default). Hashable: a cache key."""

    crop: bool = False
    local_norm: float = 0.0
    clahe: str = "off"

    def __post_init__(self):
        if self.clahe not in CLAHE_MODES:
            raise ValueError(f"fundus.clahe must be one of {', '.join(CLAHE_MODES)}, got {self.clahe!r}")
        if not 0 <= self.local_norm <= MAX_LOCAL_NORM:
            raise ValueError(f"fundus.local_norm must be in [0, {MAX_LOCAL_NORM}], got {self.local_norm!r}")

    def __bool__(self) -> bool:
        """Whether any step is on."""
        return fundus_on(self.crop, self.local_norm, self.clahe)

    @classmethod
    def of(cls, value) -> Fundus:
        """A spec from None (all off), a mapping (``model.json``'s ``fundus``, params), a pydantic
        model of one (``palm.core.params.FundusParams``) or a spec; keys not given (or None) are off."""
        if isinstance(value, cls):
            return value
        if value is None:
            return cls()
        if hasattr(value, "model_dump"):
            value = value.model_dump()
        given = {k: v for k, v in dict(value).items() if v is not None}
        if given.get("clahe") is False:  # YAML 1.1 reads a bare `off` as false
            given["clahe"] = "off"
        return cls(
            crop=bool(given.get("crop", False)),
            local_norm=float(given.get("local_norm", 0.0)),
            clahe=str(given.get("clahe", "off")),
        )

    def record(self) -> dict:
        return asdict(self)


class Disc(NamedTuple):
    """The fundus disc's bounding box: centre (x, y) and extents (width, height), in pixels; and its
    region (uint8, 1 inside, holes filled)."""

    cx: float
    cy: float
    width: int
    height: int
    region: np.ndarray

    @property
    def radius(self) -> float:
        return max(self.width, self.height) / 2


def find_disc(rgb: np.ndarray) -> Disc | None:
    """The bounding box of the largest bright connected region (the fundus disc against its black
    border; extended beyond one edge of the frame that cuts it, as a round disc), or None when there is no disc (an all-dark image, a region below
    :data:`MIN_DISC_AREA` of the frame) or no border (the region covers :data:`NO_BORDER_AREA`
    of the frame)."""
    r, g, b = cv2.split(rgb)
    bright = cv2.max(cv2.max(r, g), b)  # each pixel's brightest channel (24x faster than numpy's max here)
    top = int(bright.max())
    if top <= DISC_FLOOR:
        return None
    mask = (bright > max(DISC_FLOOR, DISC_FRACTION * top)).astype(np.uint8)
    n, labels, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
    if n < 2:
        return None
    k = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
    x, y, w, h, area = (int(v) for v in stats[k, :5])
    height, width = mask.shape
    if not MIN_DISC_AREA * height * width <= area < NO_BORDER_AREA * height * width:
        return None
    # a disc cut off by one edge of the frame (an off-centre photograph): it is taken round, as wide
    # as it is high (or the reverse), and extends beyond that edge; cut off by both, it is centred
    if h > w and (x == 0) != (x + w >= width):
        x, w = (x + w - h if x == 0 else x), h
    elif w > h and (y == 0) != (y + h >= height):
        y, h = (y + h - w if y == 0 else y), w
    region = np.zeros_like(mask)
    contours, _ = cv2.findContours((labels == k).astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    cv2.drawContours(region, contours, -1, 1, thickness=cv2.FILLED)  # dark spots inside are the disc's
    return Disc(x + w / 2, y + h / 2, w, h, region)


def crop_to_disc(rgb: np.ndarray, disc: Disc | None = None) -> np.ndarray:
    """The square around the disc (side: its larger extent), black outside the frame, at the input's side."""
    # palm.data.image imports this module (its to_input enhances, then resizes): imported here, not above
    from palm.data.image import resize_square

    disc = find_disc(rgb) if disc is None else disc
    if disc is None:
        return rgb
    h, w = rgb.shape[:2]
    side = max(disc.width, disc.height)
    x0, y0 = int(round(disc.cx - side / 2)), int(round(disc.cy - side / 2))
    square = np.zeros((side, side, 3), np.uint8)
    sx0, sy0, sx1, sy1 = max(x0, 0), max(y0, 0), min(x0 + side, w), min(y0 + side, h)
    square[sy0 - y0 : sy1 - y0, sx0 - x0 : sx1 - x0] = rgb[sy0:sy1, sx0:sx1]
    return resize_square(square, h)


def local_normalise(rgb: np.ndarray, fraction: float, disc: Disc | None = None) -> np.ndarray:
    """``4 * rgb - 4 * blur(rgb, sigma = fraction * side) + 128`` (saturated), grey (128) outside
    ``disc``'s region shrunk by (1 - :data:`MASK_RADIUS`) of its radius (not at the frame's edges,
    where a disc is cut off; no disc: nothing masked)."""
    sigma = fraction * max(rgb.shape[:2])
    blurred = cv2.GaussianBlur(rgb, (0, 0), sigma)
    out = cv2.addWeighted(rgb, 4.0, blurred, -4.0, 128.0)
    if disc is not None:
        r = max(1, int(round((1 - MASK_RADIUS) * disc.radius)))
        kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1, 2 * r + 1))
        inside = cv2.erode(disc.region, kernel)  # the frame's edge is no border: not eroded from there
        out[inside == 0] = 128
    return out


def clahe(rgb: np.ndarray, mode: str) -> np.ndarray:
    """CLAHE (clip limit 2, 8x8 tiles) on L of CIELAB (``luminance``) or on the green channel."""
    if mode == "off":
        return rgb
    tool = cv2.createCLAHE(clipLimit=CLAHE_CLIP, tileGridSize=CLAHE_TILES)  # per call: thread-safe (palm serve)
    if mode == "green":
        out = rgb.copy()
        out[..., 1] = tool.apply(np.ascontiguousarray(rgb[..., 1]))
        return out
    lab = cv2.cvtColor(rgb, cv2.COLOR_RGB2LAB)
    lab[..., 0] = tool.apply(np.ascontiguousarray(lab[..., 0]))
    return cv2.cvtColor(lab, cv2.COLOR_LAB2RGB)


def enhance(rgb: np.ndarray, spec) -> np.ndarray:
    """``rgb`` (uint8 HxWx3) through the steps of ``spec`` (a :class:`Fundus` or what
    :meth:`Fundus.of` takes), same shape and dtype; all off: ``rgb`` itself."""
    spec = Fundus.of(spec)
    if not spec:
        return rgb
    out = np.ascontiguousarray(rgb, dtype=np.uint8)
    if spec.crop:
        out = crop_to_disc(out)
    if spec.local_norm:
        out = local_normalise(out, spec.local_norm, find_disc(out))
    if spec.clahe != "off":
        out = clahe(out, spec.clahe)
    return np.ascontiguousarray(out)
