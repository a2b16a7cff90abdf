"""Grad-CAM (Selvaraju et al. 2017): where in a photograph an eager network found its evidence.

Used by the ``explain`` stage's figures (:mod:`palm.evaluation.explain`) and by ``palm serve``'s
page (:mod:`palm.serve.service`).
"""

from __future__ import annotations

import cv2
import numpy as np
import paddle
import paddle.nn.functional as F

from palm.nn.models import main_logits


def gradcam(model, layer, image_chw: np.ndarray) -> tuple[np.ndarray, float]:
    """Heatmap in [0, 1] of the input's size, and the PM probability, for one CHW float image.

    The heatmap shows the evidence for the predicted class: for the PM logit when the model
    says PM, for its negative when it says non-PM.
    """
    captured = {}

    def hook(_layer, _inputs, output):
        captured["act"] = output

    handle = layer.register_forward_post_hook(hook)
    try:
        x = paddle.to_tensor(image_chw[None])
        logit = main_logits(model(x))
    finally:
        handle.remove()
    act = captured["act"]
    target = logit.sum() if float(logit.sum()) >= 0 else -logit.sum()
    (grad,) = paddle.grad([target], [act])
    weights = grad.mean(axis=[2, 3], keepdim=True)  # per-channel importance
    cam = F.relu((weights * act).sum(axis=1))[0].numpy()
    h, w = image_chw.shape[1:]
    cam = cv2.resize(cam.astype(np.float32), (w, h), interpolation=cv2.INTER_LINEAR)
    cam -= cam.min()
    if cam.max() > 0:
        cam /= cam.max()
    return cam, float(F.sigmoid(logit).numpy().ravel()[0])


def overlay(rgb: np.ndarray, cam: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    """RGB uint8 image with the heatmap (JET colours) blended over it."""
    heat = cv2.applyColorMap((cam * 255).astype(np.uint8), cv2.COLORMAP_JET)[..., ::-1]
    return (rgb.astype(np.float32) * (1 - alpha) + heat.astype(np.float32) * alpha).clip(0, 255).astype(np.uint8)
