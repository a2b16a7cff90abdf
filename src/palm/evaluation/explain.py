"""The ``explain`` stage: Grad-CAM heatmaps (Selvaraju et al. 2017) for validation images.

For a few validation images (the most confident errors first, then PM and non-PM ones,
from the saved predictions) it writes a figure a person can read: the photograph at
``DISPLAY`` px (from the shards, at their full ``image_size``, not the network's smaller
input) beside the same photograph with the heatmap of the predicted class overlaid, under a
caption with the image's name, its label, the prediction, the PM probability (with the model's
test-time augmentation, :mod:`palm.serve.tta`: the mean over its views; the heatmap is the
un-flipped image's) and the threshold. PNGs in ``metrics/explain/`` that ``dvc plots show``
displays; file names say what the model did: ``V0012_label-PM_pred-nonPM_p0.31.png``.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pandas as pd

from palm.core.fsutil import atomic_dir
from palm.core.params import DEFAULT_THRESHOLD
from palm.core.runtime import configured_device, select_device
from palm.data.dataset import load_split
from palm.data.image import to_chw_float
from palm.nn.artifact import load
from palm.nn.modelinfo import fundus, input_size
from palm.nn.modelinfo import threshold as model_threshold
from palm.nn.modelinfo import tta as model_tta
from palm.nn.models import gradcam_layer
from palm.serve import tta
from palm.serve.gradcam import gradcam, overlay  # noqa: F401  (gradcam: also this module's, for its users)
from palm.serve.inference import eager

EXPLAIN_DIR = Path("metrics/explain")
DISPLAY = 512  # side of each of the two panels, pixels
CAPTION = 96  # height of the caption band, pixels


def figure(rgb: np.ndarray, cam: np.ndarray, lines: list[str], side: int = DISPLAY) -> np.ndarray:
    """RGB uint8 figure: ``rgb`` and its heatmap overlay, each ``side`` px, under the caption ``lines``."""
    photo = cv2.resize(rgb, (side, side), interpolation=cv2.INTER_CUBIC)
    heat = cv2.resize(cam.astype(np.float32), (side, side), interpolation=cv2.INTER_LINEAR).clip(0, 1)
    panels = np.hstack([photo, np.full((side, 8, 3), 255, np.uint8), overlay(photo, heat)])
    band = np.full((CAPTION, panels.shape[1], 3), 255, np.uint8)
    for i, line in enumerate(lines[:3]):
        cv2.putText(
            band,
            line,
            (12, 32 + 30 * i),
            cv2.FONT_HERSHEY_SIMPLEX,
            0.8 if i == 0 else 0.65,
            (0, 0, 0),
            2 if i == 0 else 1,
            cv2.LINE_AA,
        )
    return np.vstack([band, panels])


def caption(image: str, label: int, prob: float, threshold: float) -> list[str]:
    """The figure's caption: name, label, prediction (right or wrong), probability, threshold."""
    pred = prob >= threshold
    verdict = "correct" if pred == bool(label) else "WRONG"
    return [
        f"{Path(image).stem}: label {'PM' if label else 'non-PM'}, predicted {'PM' if pred else 'non-PM'} ({verdict})",
        f"PM probability {prob:.3f} (threshold {threshold:.3f})",
        "left: photograph; right: Grad-CAM evidence for the predicted class (red = most)",
    ]


def choose_images(preds: pd.DataFrame, n: int, threshold: float = DEFAULT_THRESHOLD) -> pd.DataFrame:
    """Up to ``n`` images: the most confident errors first (a third), then PM and non-PM in turn."""
    wrong = preds[preds.label != preds.predicted]
    wrong = wrong.loc[(wrong.probability - threshold).abs().sort_values(ascending=False, kind="stable").index]
    right = preds[preds.label == preds.predicted]
    picks = list(wrong.index[: max(1, n // 3)]) if len(wrong) else []
    pools = [list(right[right.label == 1].index), list(right[right.label == 0].index)]
    i = 0
    while len(picks) < min(n, len(preds)) and any(pools):
        if pools[i % 2]:
            picks.append(pools[i % 2].pop(0))
        i += 1
    return preds.loc[picks]


def explain(
    n_images: int = 12,
    shards_dir="data/shards",
    model_dir="models",
    predictions="metrics/predictions.csv",
    out_dir=EXPLAIN_DIR,
    device: str = "auto",
) -> list[Path]:
    select_device(device)
    model, info = load(model_dir)
    layer = gradcam_layer(info["model"], model)
    threshold = model_threshold(info)
    mode, engine = model_tta(info), eager(model, device)
    photos = load_split(shards_dir, "valid")  # full image_size, for the eye
    valid = photos.resized(input_size(info), fundus(info))  # what the network sees
    index = {name: i for i, name in enumerate(valid.images)}
    chosen = choose_images(pd.read_csv(predictions), n_images, threshold)
    written = []
    with atomic_dir(out_dir) as tmp:
        for _, row in chosen.iterrows():
            i = index[row.image]
            x = to_chw_float(valid.pixels[i])
            cam, prob = gradcam(model, layer, x)  # Grad-CAM of the image itself (not of its flipped views)
            if mode != "off":  # the probability the model gives: the mean over its views (the image's own: above)
                prob = float(tta.predict(engine, x[None], mode, first=[prob])[0])
            label = "PM" if row.label else "nonPM"
            pred = "PM" if prob >= threshold else "nonPM"
            name = f"{Path(row.image).stem}_label-{label}_pred-{pred}_p{prob:.2f}.png"
            fig = figure(photos.pixels[i], cam, caption(row.image, int(row.label), prob, threshold))
            cv2.imwrite(str(tmp / name), cv2.cvtColor(fig, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_PNG_COMPRESSION, 9])
            written.append(out_dir / name)
    return written


def main(params: dict) -> None:
    written = explain(params["explain"]["n_images"], device=configured_device(params))
    print(f"wrote {len(written)} Grad-CAM images to {EXPLAIN_DIR}")
