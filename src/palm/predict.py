"""Applying a trained model to new photographs (``palm predict``).

The images go through :func:`palm.image.load_image`, the very function the ``preprocess``
stage uses, so a new photograph is seen exactly as the training images were. Each one is
first checked by :func:`palm.quality.check_file`: a picture that is not a gradable fundus
photograph (too dark, overexposed, blurred, no circular fundus, too small) is listed with
that reason and no diagnosis, unless ``grade_all`` is asked for.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from palm.errors import DataError
from palm.image import load_image, to_chw_float

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff"}


def find_images(paths: Iterable[str | Path]) -> list[Path]:
    """Files as given, and the image files found (recursively, sorted) in the folders given."""
    found: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found.extend(sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES))
        else:
            found.append(p)
    return found


@dataclass
class Predictor:
    """A trained classifier: from ``models/`` (weights) or from the exported inference model."""

    run_batch: object       # callable: float32 NCHW array -> probabilities (N,)
    image_size: int         # what preprocess decodes to
    input_size: int         # what the network takes
    threshold: float
    name: str

    @classmethod
    def load(cls, model_dir: str | Path = "models", device: str = "auto") -> "Predictor":
        """The model of ``model_dir``, never unpickling: ``model.safetensors`` (:mod:`palm.weights`), or a
        Paddle 3 exported model (``inference.json`` + ``inference.pdiparams``); anything else is refused."""
        import paddle
        import paddle.nn.functional as F

        from palm.runtime import select_device

        from palm.evaluate import load_trained, read_model_info
        from palm.weights import check_export_dir

        model_dir = Path(model_dir)
        info = read_model_info(model_dir)
        exported = [p.name for p in model_dir.iterdir() if p.name.startswith("inference.")]
        select_device(device)
        if exported:
            prefix = check_export_dir(model_dir)
            try:
                layer = paddle.jit.load(prefix)
            except Exception as exc:  # a damaged file: Paddle's own error types
                raise DataError(f"{model_dir}: cannot load the exported model ({type(exc).__name__}: "
                                f"{str(exc).strip().splitlines()[0] if str(exc).strip() else ''})") from None
        else:
            layer, info = load_trained(model_dir)
        layer.eval()

        def run_batch(x: np.ndarray) -> np.ndarray:
            from palm.models import main_logits

            with paddle.no_grad():
                logits = main_logits(layer(paddle.to_tensor(x)))
            return F.sigmoid(logits.astype("float32")).numpy().reshape(-1)

        from palm.evaluate import input_size

        return cls(run_batch, int(info["image_size"]), input_size(info), float(info.get("threshold", 0.5)),
                   info["model"])

    def predict(self, files: list[Path], batch_size: int = 16, progress: bool = True,
                grade_all: bool = False) -> Iterator[dict]:
        """Yield one record per file, in order: its ``quality`` (``ok`` or why it is not gradable)
        and probability and class, or the error. Ungradable images get no probability unless
        ``grade_all``."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        from tqdm import tqdm

        from palm.quality import OK, check_file

        bar = tqdm(total=len(files), desc="predict", unit="img", disable=not progress or len(files) < 2)
        for start in range(0, len(files), batch_size):
            chunk = files[start:start + batch_size]
            images, records = [], []
            for f in chunk:
                try:
                    quality = check_file(f)
                    rec = {"image": str(f), "quality": quality, "error": None}
                    if quality == OK or grade_all:
                        images.append(load_image(f, self.image_size, self.input_size))
                        rec["graded"] = True
                    records.append(rec)
                except DataError as exc:
                    records.append({"image": str(f), "quality": None, "error": str(exc)})
                except Exception as exc:  # noqa: BLE001 - one image's failure is that image's row
                    records.append({"image": str(f), "quality": None, "error": f"{f}: {type(exc).__name__}: {exc}"})
            probs = iter(self.run_batch(to_chw_float(np.stack(images))) if images else [])
            for rec in records:
                if rec.pop("graded", False):
                    p = float(next(probs))
                    rec.update(probability=round(p, 6), predicted=int(p >= self.threshold),
                               diagnosis="PM" if p >= self.threshold else "non-PM")
                yield rec
            bar.update(len(chunk))
        bar.close()
