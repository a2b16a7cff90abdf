"""A synthetic PALM (iChallenge-PM) data set, written in the original download's layout.

``generate`` writes ``training.zip`` (with the nested ``PALM-Training400/PALM-Training400.zip``
of ``{H,N,P}NNNN.jpg``), ``validation.zip`` (``PALM-Validation400/VNNNN.jpg``) and
``valid_gt.zip`` (``PALM-Validation-GT/PM_Label_and_Fovea_Location.xlsx`` with columns
``ID, imgName, Label, Fovea_X, Fovea_Y``; the fovea is where it was drawn).

``draw_fundus`` paints one colour fundus photograph: a round field of view on black, an
orange-red background with vignetting, an optic disc with a vessel tree, a darker fovea,
for a left or a right eye. The classes differ by shape and texture, like the real signs:

- ``P`` (pathologic myopia): large peripapillary atrophy (a pale crescent or ring around the
  disc), patches of chorioretinal atrophy with pigmented edges, strong tessellation;
- ``H`` (high myopia, not PM): tessellation and a small temporal crescent, no patches;
- ``N`` (normal): clean.

Each image's mean colour is rescaled to a random target drawn the same way for every class,
so that global colour carries no class information (tested: a logistic regression on mean
RGB stays near chance).

The same arguments give the same bytes on every x86-64 CPU (docs/reproducibility.md): OpenCV
runs its baseline code (:func:`palm.core.runtime.fixed_opencv`), ``exp``, ``cos`` and ``sin``
are computed from additions and multiplications only (:func:`palm.core.runtime.exact_exp`, ``exact_cos_sin``;
numpy's and the C library's versions are chosen by the CPU and round differently), and the
zips store their entries (deflate's bytes depend on the zlib build).
"""

from __future__ import annotations

import contextlib
import io
import zipfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from palm.core.fsutil import atomic_file
from palm.core.runtime import exact_cos_sin as _cos_sin
from palm.core.runtime import exact_exp as _exp
from palm.core.runtime import fixed_opencv, machine_share
from palm.data.layout import (
    GT_FILE,
    GT_ZIP,
    NESTED_TRAIN_ZIP,
    TRAIN_DIR,
    TRAIN_ZIP,
    VALID_DIR,
    VALID_ZIP,
)

SIZES = ((1444, 1444), (2124, 2056))  # (width, height) of the real photographs
WORK_SIDE = 768  # drawn at most this large, then resized (fundus images are smooth)
H_SHARE_OF_NON_PM = 26 / 187  # as in the real training set
ZIP_DATE = (1980, 1, 1, 0, 0, 0)

cv2 = fixed_opencv()


# -- drawing ------------------------------------------------------------------------------


def _blend(img: np.ndarray, mask: np.ndarray, color, alpha: float = 1.0) -> None:
    """In place: img <- img * (1 - a) + color * a, with a = alpha * mask (mask in [0, 1])."""
    a = (alpha * mask)[..., None]
    img *= 1.0 - a
    img += a * np.asarray(color, np.float32)


def _soft(mask: np.ndarray, sigma: float) -> np.ndarray:
    return cv2.GaussianBlur(mask.astype(np.float32), (0, 0), max(sigma, 0.5))


def _low_freq(rng, shape, cells: int, sigma: float = 1.0) -> np.ndarray:
    """Smooth random field in [-1, 1] of ``shape`` (h, w)."""
    small = rng.uniform(-1, 1, (cells, cells)).astype(np.float32)
    small = cv2.GaussianBlur(small, (0, 0), sigma)
    small /= max(np.abs(small).max(), 1e-6)
    return cv2.resize(small, (shape[1], shape[0]), interpolation=cv2.INTER_CUBIC)


def _blob_polygon(rng, center, radius: float, irregularity: float = 0.35, n: int = 24) -> np.ndarray:
    """An irregular closed outline around ``center``."""
    theta = np.linspace(0, 2 * np.pi, n, endpoint=False)
    k = rng.normal(0, 1, 5)
    wobble = sum(k[j] * _cos_sin((j + 2) * theta + rng.uniform(0, 2 * np.pi))[0] for j in range(5)) / 5
    r = radius * (1 + irregularity * wobble) * rng.uniform(0.8, 1.2, 2)[:, None].repeat(n, 1)[0]
    r = np.clip(r, radius * 0.3, None)
    aspect = rng.uniform(0.6, 1.0)
    rot = rng.uniform(0, np.pi)
    cos_t, sin_t = _cos_sin(theta)
    cos_r, sin_r = _cos_sin(rot)
    x, y = r * cos_t, r * sin_t * aspect
    xr = x * cos_r - y * sin_r
    yr = x * sin_r + y * cos_r
    return np.stack([center[0] + xr, center[1] + yr], 1).astype(np.int32)


def _vessel(rng, mask, p, angle, length, width, depth, bend, scale):
    """A vessel from ``p`` heading ``angle``, turning by ``bend`` rad over its length, branching."""
    steps = max(4, int(length / (6 * scale)))
    seg = length / steps
    pts = [p]
    x, y = p
    for i in range(steps):
        angle += bend / steps + rng.normal(0, 0.04)
        cos_a, sin_a = _cos_sin(angle)
        x, y = float(x + seg * cos_a), float(y + seg * sin_a)
        pts.append((x, y))
        if depth > 0 and i > 1 and rng.random() < 0.09:
            side = rng.choice([-1, 1])
            _vessel(
                rng,
                mask,
                (x, y),
                angle + side * rng.uniform(0.35, 0.8),
                length * rng.uniform(0.3, 0.5),
                width * 0.65,
                depth - 1,
                rng.normal(0, 0.6),
                scale,
            )
    t = max(1, int(round(width)))
    cv2.polylines(mask, [np.array(pts, np.int32)], False, 1.0, thickness=t, lineType=cv2.LINE_AA)


@dataclass
class _Frame:
    """The geometry of one drawing (working resolution ``w`` x ``h``, drawing unit ``s``)."""

    w: int
    h: int
    s: float
    xx: np.ndarray
    yy: np.ndarray
    cx: float
    cy: float
    R: float  # radius of the field of view
    dist: np.ndarray  # distance from its centre, in radii
    nasal: int = 1  # +1: disc on the right (right eye)
    disc_r: float = 0.0
    dx: float = 0.0  # disc centre
    dy: float = 0.0
    fov_x: float = 0.0  # fovea
    fov_y: float = 0.0


def _frame(rng, w: int, h: int) -> _Frame:
    s = min(w, h) / 700.0  # drawing unit
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    cx, cy = w / 2 + rng.normal(0, 0.01) * w, h / 2 + rng.normal(0, 0.01) * h
    R = min(w, h) * rng.uniform(0.46, 0.5)
    dist = np.sqrt((xx - cx) ** 2 + (yy - cy) ** 2) / R
    return _Frame(w, h, s, xx, yy, cx, cy, R, dist)


def _background(rng, g: _Frame) -> np.ndarray:
    """Orange-red fundus with low-frequency mottling."""
    base = np.array([rng.uniform(0.62, 0.85), rng.uniform(0.25, 0.40), rng.uniform(0.06, 0.16)], np.float32)
    img = np.empty((g.h, g.w, 3), np.float32)
    img[:] = base
    img *= (1 + 0.10 * _low_freq(rng, (g.h, g.w), 6))[..., None]
    img *= (1 + 0.04 * _low_freq(rng, (g.h, g.w), 24, 0.8))[..., None]
    return img


def _landmarks(rng, g: _Frame, eye: str) -> None:
    """Place the optic disc (nasal) and the fovea, about 2.5 disc diameters temporal to it."""
    g.nasal = 1 if eye == "R" else -1
    g.disc_r = g.R * rng.uniform(0.135, 0.16)
    g.dx, g.dy = g.cx + g.nasal * g.R * rng.uniform(0.36, 0.46), g.cy + g.R * rng.normal(0, 0.04)
    g.fov_x = g.dx - g.nasal * 5.0 * g.disc_r * rng.uniform(0.9, 1.05)
    g.fov_y = g.dy + g.disc_r * rng.uniform(0.1, 0.5)


def _tessellation(rng, img: np.ndarray, g: _Frame, kind: str) -> None:
    """Large choroidal vessels showing through a thin retina."""
    tess = {
        "N": rng.uniform(0.05, 0.2) * (rng.random() < 0.3),
        "H": rng.uniform(0.18, 0.38),
        "P": rng.uniform(0.2, 0.5),
    }[kind]
    if not tess:
        return
    vm = np.zeros((g.h, g.w), np.float32)
    for _ in range(int(rng.integers(40, 60))):
        a = rng.uniform(0, 2 * np.pi)
        p0 = (g.cx + rng.uniform(-1, 1) * g.R, g.cy + rng.uniform(-1, 1) * g.R)
        _vessel(
            rng, vm, p0, a, g.R * rng.uniform(0.3, 0.7), 7 * g.s * rng.uniform(0.8, 1.6), 1, rng.normal(0, 0.7), g.s
        )
    vm = np.clip(_soft(vm, 2 * g.s), 0, 1)
    img *= (1 - tess * (1 - vm) * np.clip(1.2 - g.dist, 0, 1))[..., None]  # darker pigmented interstices


def _peripapillary_atrophy(rng, img: np.ndarray, g: _Frame, kind: str, sev: float) -> None:
    """A pale crescent (temporal) or ring around the disc; larger with severity."""
    crescent = {"N": rng.random() < 0.2, "H": rng.random() < 0.9, "P": True}[kind]
    if not crescent:
        return
    m = np.zeros((g.h, g.w), np.float32)
    if kind == "P":
        scale_r = 1.15 + sev * rng.uniform(0.5, 1.3)
        shift = (0.1 + 0.4 * sev) * rng.uniform(0.8, 1.2) * g.disc_r
    else:
        scale_r = rng.uniform(1.1, 1.45) if kind == "H" else rng.uniform(1.05, 1.2)
        shift = rng.uniform(0.1, 0.25) * g.disc_r
    ax = (int(g.disc_r * scale_r), int(g.disc_r * scale_r * rng.uniform(0.85, 1.05)))
    centre = (int(g.dx - g.nasal * shift), int(g.dy))
    cv2.ellipse(m, centre, ax, rng.uniform(-20, 20), 0, 360, 1.0, -1, cv2.LINE_AA)
    pale = np.array([0.95, 0.80, 0.50], np.float32) * rng.uniform(0.9, 1.05)
    _blend(img, _soft(m, 2 * g.s), pale, rng.uniform(0.6, 0.9))
    if kind == "P" and rng.random() < sev:  # pigment at the atrophy's rim
        rim = np.zeros((g.h, g.w), np.float32)
        cv2.ellipse(rim, centre, ax, 0, 0, 360, 1.0, max(1, int(3 * g.s)), cv2.LINE_AA)
        _blend(img, _soft(rim, g.s), (0.25, 0.12, 0.05), 0.5)


def _patchy_atrophy(rng, img: np.ndarray, g: _Frame, sev: float) -> None:
    """Pale irregular patches with pigmented edges around the macula (PM only; more and
    larger with severity, so mild PM may have none)."""
    for _ in range(int(rng.poisson(3.5 * sev))):
        ang = rng.uniform(0, 2 * np.pi)
        rr = rng.uniform(0.3, 1.1)
        cos_a, sin_a = _cos_sin(ang)
        px = float((g.fov_x + g.dx) / 2 + cos_a * rr * 3 * g.disc_r)
        py = float((g.fov_y + g.dy) / 2 + sin_a * rr * 2.2 * g.disc_r)
        if np.hypot(px - g.cx, py - g.cy) > 0.85 * g.R:
            continue
        poly = _blob_polygon(rng, (px, py), g.disc_r * rng.uniform(0.25, 0.35 + 0.65 * sev))
        pm = np.zeros((g.h, g.w), np.float32)
        cv2.fillPoly(pm, [poly], 1.0, cv2.LINE_AA)
        _blend(
            img,
            _soft(pm, 1.5 * g.s),
            np.array([0.97, 0.85, 0.55], np.float32) * rng.uniform(0.9, 1.05),
            rng.uniform(0.45, 0.65) + 0.25 * sev,
        )
        em = np.zeros((g.h, g.w), np.float32)
        cv2.polylines(em, [poly], True, 1.0, max(1, int(rng.uniform(2, 5) * g.s)), cv2.LINE_AA)
        for _ in range(int(rng.integers(1, 5))):  # pigment clumps
            q = poly[rng.integers(len(poly))]
            cv2.circle(em, (int(q[0]), int(q[1])), max(1, int(rng.uniform(3, 8) * g.s)), 1.0, -1, cv2.LINE_AA)
        _blend(img, _soft(em, g.s), (0.18, 0.09, 0.04), rng.uniform(0.5, 0.8))


def _macula_and_disc(rng, img: np.ndarray, g: _Frame) -> None:
    """A darker macula with a small bright foveal reflex; a bright yellow-white disc, brighter cup."""
    d_f = np.sqrt((g.xx - g.fov_x) ** 2 + (g.yy - g.fov_y) ** 2)
    img *= (1 - rng.uniform(0.25, 0.4) * _exp(-((d_f / (1.3 * g.disc_r)) ** 2))).astype(np.float32)[..., None]
    _blend(img, _exp(-((d_f / (0.08 * g.disc_r)) ** 2)).astype(np.float32), (0.9, 0.75, 0.55), 0.5)
    m = np.zeros((g.h, g.w), np.float32)
    cv2.ellipse(
        m,
        (int(g.dx), int(g.dy)),
        (int(g.disc_r * rng.uniform(0.85, 0.95)), int(g.disc_r)),
        0,
        0,
        360,
        1.0,
        -1,
        cv2.LINE_AA,
    )
    _blend(img, _soft(m, 2 * g.s), np.array([0.98, 0.85, 0.55], np.float32) * rng.uniform(0.95, 1.05), 0.92)
    d_d = np.sqrt((g.xx - g.dx) ** 2 + (g.yy - g.dy) ** 2)
    _blend(img, _exp(-((d_d / (0.45 * g.disc_r)) ** 2)).astype(np.float32), (1.0, 0.97, 0.88), rng.uniform(0.5, 0.8))


def _vessel_tree(rng, img: np.ndarray, g: _Frame) -> None:
    """Four arcades leaving the disc, branching, thinner as they go."""
    vm = np.zeros((g.h, g.w), np.float32)
    temporal = np.pi if g.nasal == 1 else 0.0
    for up in (-1, 1):  # superior (-1, y grows downwards) and inferior arcades
        a0 = temporal - up * g.nasal * rng.uniform(0.9, 1.2)
        _vessel(
            rng,
            vm,
            (g.dx, g.dy),
            a0,
            g.R * rng.uniform(1.0, 1.3),
            9 * g.s,
            3,
            up * g.nasal * rng.uniform(1.2, 1.7),
            g.s,
        )
        a1 = (temporal + np.pi) + up * g.nasal * rng.uniform(0.5, 0.9)
        _vessel(rng, vm, (g.dx, g.dy), a1, g.R * rng.uniform(0.4, 0.6), 6 * g.s, 2, rng.normal(0, 0.4), g.s)
    vm = np.clip(_soft(vm, 0.7 * g.s), 0, 1)
    _blend(img, vm, np.array([0.45, 0.06, 0.04], np.float32) * rng.uniform(0.8, 1.1), rng.uniform(0.75, 0.9))


def _photograph(rng, img: np.ndarray, g: _Frame, W: int, H: int) -> np.ndarray:
    """The field of view (vignetting, black outside), a class-blind global colour, the full size
    ``W`` x ``H``, sensor noise: the BGR uint8 photograph."""
    img *= np.clip(1 - 0.45 * (g.dist * g.dist * g.dist), 0, 1)[..., None]  # not ** 3: numpy's power varies
    fov = np.clip((1 - g.dist) * g.R / (2 * g.s), 0, 1)
    img *= fov[..., None]
    # rescale the field of view's mean to a target drawn the same way for every class
    inside = fov > 0.5
    red = rng.uniform(0.45, 0.75)
    target = np.array([red, red * rng.uniform(0.36, 0.5), red * rng.uniform(0.1, 0.2)], np.float32)
    img *= target / np.maximum(img[inside].mean(0), 1e-3)
    full = (g.w, g.h) != (W, H)
    img = cv2.resize(img, (W, H), interpolation=cv2.INTER_LINEAR) if full else img
    out = img * 255.0
    out += rng.normal(0, 2.0, (H, W, 1)).astype(np.float32)  # sensor noise
    out = np.clip(out, 0, 255).astype(np.uint8)
    fov_full = cv2.resize(fov, (W, H), interpolation=cv2.INTER_LINEAR) if full else fov
    out[fov_full < 0.02] = 0
    return cv2.cvtColor(out, cv2.COLOR_RGB2BGR)


def draw_fundus(rng: np.random.Generator, kind: str, size: tuple[int, int], eye: str):
    """One synthetic colour fundus photograph.

    kind: 'P', 'H' or 'N'; size: (width, height); eye: 'L' or 'R'.
    Returns (BGR uint8 image of shape (height, width, 3), (fovea_x, fovea_y) in its pixels).
    The layers are drawn in order at a working resolution of at most ``WORK_SIDE``, each
    drawing from ``rng`` in turn (so the same generator state gives the same photograph).
    """
    if kind not in ("P", "H", "N") or eye not in ("L", "R"):
        raise ValueError(f"kind must be P, H or N and eye L or R, got {kind!r}, {eye!r}")
    W, H = size
    f = min(1.0, WORK_SIDE / max(W, H))
    g = _frame(rng, max(16, int(round(W * f))), max(16, int(round(H * f))))
    img = _background(rng, g)
    _landmarks(rng, g, eye)
    # How far myopic degeneration has gone. The signs grow with it, each with its own scatter, and
    # the classes overlap as in real eyes: a mild PM eye (no atrophic patch, a small crescent) can
    # look like a highly myopic one, and a normal eye may show some tessellation or a thin crescent.
    sev = rng.uniform(0.0, 1.0) if kind == "P" else 0.0
    _tessellation(rng, img, g, kind)
    _peripapillary_atrophy(rng, img, g, kind, sev)
    if kind == "P":
        _patchy_atrophy(rng, img, g, sev)
    _macula_and_disc(rng, img, g)
    _vessel_tree(rng, img, g)
    return _photograph(rng, img, g, W, H), (float(g.fov_x / f), float(g.fov_y / f))


# -- the data set -------------------------------------------------------------------------


def _plan(seed, n_train_p, n_train_n, n_train_h, n_val_pm, n_val_non_pm):
    """(split, name, kind, label, rng seed) for every image, in a deterministic order."""
    items = []
    for kind, n in (("H", n_train_h), ("N", n_train_n), ("P", n_train_p)):
        items += [("train", f"{kind}{i:04d}.jpg", kind, int(kind == "P")) for i in range(1, n + 1)]
    rng = np.random.default_rng([seed, 99])
    n_h = int(round(n_val_non_pm * H_SHARE_OF_NON_PM))
    kinds = ["P"] * n_val_pm + ["H"] * n_h + ["N"] * (n_val_non_pm - n_h)
    kinds = [kinds[i] for i in rng.permutation(len(kinds))]
    items += [("valid", f"V{i:04d}.jpg", k, int(k == "P")) for i, k in enumerate(kinds, 1)]
    return [(*it, (seed, idx)) for idx, it in enumerate(items)]


def _render(args):
    split, name, kind, label, (seed, idx), scale, quality = args
    rng = np.random.default_rng([seed, idx, 1])
    W, H = SIZES[int(rng.integers(len(SIZES)))]
    size = (max(16, int(round(W * scale))), max(16, int(round(H * scale))))
    img, (fx, fy) = draw_fundus(rng, kind, size, "R" if rng.random() < 0.5 else "L")
    ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    if not ok:
        raise RuntimeError(f"cannot encode {name}")
    return split, name, label, buf.tobytes(), (round(fx, 1), round(fy, 1))


def _zip_bytes(entries: dict[str, bytes]) -> bytes:
    """A zip of ``entries``, stored (not deflated: deflate's bytes depend on the zlib build, e.g.
    zlib-ng; the JPEGs would not shrink anyway), with fixed dates."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf:
        for name, data in entries.items():
            zf.writestr(zipfile.ZipInfo(name, date_time=ZIP_DATE), data, zipfile.ZIP_STORED)
    return buf.getvalue()


def generate(
    out_dir,
    *,
    seed: int = 0,
    n_train_p: int = 213,
    n_train_n: int = 161,
    n_train_h: int = 26,
    n_val_pm: int = 211,
    n_val_non_pm: int = 189,
    scale: float = 1.0,
    jpeg_quality: int = 90,
    workers: int | None = None,
    progress: bool = True,
) -> None:
    """Write ``training.zip``, ``validation.zip`` and ``valid_gt.zip`` to ``out_dir``.

    Deterministic: the same arguments give byte-identical zips. Each zip is written to a
    temporary file and renamed, so a failure leaves no partial zip behind.
    """
    counts = dict(
        n_train_p=n_train_p, n_train_n=n_train_n, n_train_h=n_train_h, n_val_pm=n_val_pm, n_val_non_pm=n_val_non_pm
    )
    for k, v in counts.items():
        if not isinstance(v, (int, np.integer)) or v < 0:
            raise ValueError(f"{k} must be a whole number >= 0, got {v!r}")
    if n_train_p + n_train_n + n_train_h == 0 or n_val_pm + n_val_non_pm == 0:
        raise ValueError("both the training and the validation set need at least one image")
    if not scale > 0:
        raise ValueError(f"scale must be > 0, got {scale!r}")
    if not 1 <= jpeg_quality <= 100:
        raise ValueError(f"jpeg_quality must be in 1..100, got {jpeg_quality!r}")
    from tqdm import tqdm

    plan = [(*p, float(scale), jpeg_quality) for p in _plan(seed, **counts)]
    workers = workers or len(machine_share().cpus)  # this process's cores (the bytes do not depend on it)
    results = []
    with tqdm(total=len(plan), desc="synthesize", unit="img", disable=not progress) as bar:
        if workers > 1:
            with ProcessPoolExecutor(workers) as pool:
                for r in pool.map(_render, plan, chunksize=4):
                    results.append(r)
                    bar.update()
        else:
            for p in plan:
                results.append(_render(p))
                bar.update()

    train = {f"{TRAIN_DIR}/{name}": data for split, name, _, data, _ in results if split == "train"}
    valid = [(name, label, data, fov) for split, name, label, data, fov in results if split == "valid"]
    gt = pd.DataFrame(
        {
            "ID": range(1, len(valid) + 1),
            "imgName": [v[0] for v in valid],
            "Label": [v[1] for v in valid],
            "Fovea_X": [v[3][0] for v in valid],
            "Fovea_Y": [v[3][1] for v in valid],
        }
    )
    xlsx = io.BytesIO()
    gt.to_excel(xlsx, index=False)
    zips = {
        TRAIN_ZIP: _zip_bytes({NESTED_TRAIN_ZIP: _zip_bytes(train)}),
        VALID_ZIP: _zip_bytes({f"{VALID_DIR}/{v[0]}": v[2] for v in valid}),
        GT_ZIP: _zip_bytes({GT_FILE: _deterministic_xlsx(xlsx.getvalue())}),
    }
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as all_three:  # all written before any replaces its target
        for name, data in zips.items():
            all_three.enter_context(atomic_file(out_dir / name, "wb")).write(data)


def _deterministic_xlsx(data: bytes) -> bytes:
    """openpyxl stamps the creation time into docProps/core.xml; rewrite the package with fixed
    times, its parts stored (a valid xlsx; deflated, its bytes would depend on the zlib build)."""
    src = zipfile.ZipFile(io.BytesIO(data))
    entries = {}
    for info in src.infolist():
        content = src.read(info)
        if info.filename == "docProps/core.xml":
            import re

            content = re.sub(rb"(<dcterms:(created|modified)[^>]*>)[^<]*", rb"\g<1>2000-01-01T00:00:00Z", content)
        entries[info.filename] = content
    return _zip_bytes(entries)
