"""The ``export`` stage: the trained model as a Paddle Inference model (``paddle.jit.save``) and as ONNX.

Writes ``models_export/inference.*`` (graph and weights, in the format :mod:`palm.serve.inference`
owns: what its Paddle Inference engine runs, also loadable by ``paddle.jit.load``),
``models_export/model.onnx`` (:mod:`palm.serve.onnxrt`: converted by paddle2onnx, checked
against eager Paddle on synthetic fundus photographs, at most :data:`~palm.serve.onnxrt.PARITY_TOL`
apart) and a copy of ``model.json`` (with an ``onnx`` entry: converter, opset, the measured
difference). ``palm predict --model models_export`` runs from it, ``--engine onnxruntime``
without Paddle.
"""

from __future__ import annotations

import sys
from pathlib import Path

import cv2
import numpy as np

from palm.core.errors import DataError, RunError
from palm.core.fsutil import atomic_dir
from palm.core.runtime import configured_device, select_device
from palm.data.image import load_image, to_chw_float
from palm.data.synthetic import draw_fundus
from palm.nn.artifact import load
from palm.nn.modelinfo import fundus as fundus_of
from palm.nn.modelinfo import input_size, write_info
from palm.nn.weights import check_export_dir
from palm.serve import onnxrt
from palm.serve.inference import eager, save

EXPORT_DIR = Path("models_export")
N_CHECK = 6  # synthetic photographs the ONNX model is checked on


def check_photographs(image_size: int, size: int, n: int = N_CHECK, fundus=None) -> np.ndarray:
    """``n`` synthetic fundus photographs (PM, healthy, other; both eyes), as JPEG files read by
    :func:`palm.data.image.load_image` (enhanced by the model's ``fundus``): the network's input
    (float32 NCHW)."""
    images = []
    for i in range(n):
        bgr, _ = draw_fundus(np.random.default_rng(1000 + i), "PHN"[i % 3], (400 + 24 * i, 380), "LR"[i % 2])
        ok, jpeg = cv2.imencode(".jpg", bgr)
        images.append(load_image(jpeg.tobytes(), image_size, size, fundus))
    return to_chw_float(np.stack(images))


def export_onnx(model, info: dict, folder: Path) -> dict | None:
    """``folder/model.onnx`` from ``folder``'s Paddle export, checked against eager ``model``;
    what the ``onnx`` entry of the exported ``model.json`` says (None: paddle2onnx is not installed;
    ``{"error": why}``: the network could not be converted, or its ONNX model disagrees with Paddle:
    no ``model.onnx`` is written)."""
    try:
        import paddle2onnx
    except ImportError:
        print(
            "warning: paddle2onnx is not installed (it has no wheel for this Python); no ONNX model written",
            file=sys.stderr,
        )
        return None
    out = folder / onnxrt.ONNX_FILE
    try:
        onnxrt.convert(folder, out)
        x = check_photographs(int(info["image_size"]), input_size(info), fundus=fundus_of(info))
        diff = onnxrt.max_difference(out, eager(model, "cpu"), x, info)  # its signature checked too
        if not diff <= onnxrt.PARITY_TOL:
            raise RunError(
                f"its probabilities differ from eager Paddle's by {diff:.2e} (> {onnxrt.PARITY_TOL}) "
                "on synthetic photographs"
            )
    except (RunError, DataError) as exc:
        # a network the converter cannot express (e.g. vgg16 below 224 px: README): the Paddle export
        # stands, without model.onnx, and model.json says why
        out.unlink(missing_ok=True)
        why = str(exc).replace(str(out), onnxrt.ONNX_FILE).replace(str(folder), str(EXPORT_DIR))
        print(f"warning: no ONNX model for {info['model']}: {why}", file=sys.stderr)
        return {"error": why, "converter": f"paddle2onnx {paddle2onnx.__version__}"}
    import onnx

    graph = onnx.load(str(out), load_external_data=False)
    opset = max(o.version for o in graph.opset_import if o.domain in ("", "ai.onnx"))
    return {
        "file": onnxrt.ONNX_FILE,
        "converter": f"paddle2onnx {paddle2onnx.__version__}",
        "opset": opset,
        "max_abs_difference": diff,
        "checked_on": f"{len(x)} synthetic fundus photographs vs eager Paddle",
    }


def export(model_dir="models", out_dir=EXPORT_DIR, device: str = "auto") -> Path:
    select_device(device)
    model, info = load(model_dir)
    with atomic_dir(out_dir) as tmp:
        save(model, input_size(info), tmp)
        check_export_dir(tmp)  # the Paddle 3 format (JSON program + raw weights), nothing pickled
        write_info(tmp, {**info, "onnx": export_onnx(model, info, tmp)})
    return Path(out_dir)


def main(params: dict) -> None:
    out = export(device=configured_device(params))
    print(f"exported the inference model to {out}/")
