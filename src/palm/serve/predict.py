"""Applying a trained model to new photographs (``palm predict``).

The images go through :func:`palm.data.image.load_image`, the very function the ``preprocess``
stage uses, so a new photograph is seen exactly as the training images were; they are
decoded in worker processes while the network, run by Paddle Inference
(:mod:`palm.serve.inference`), scores the previous batch. Each one is also checked by
:mod:`palm.serve.quality` (on the same decoded image): a picture that is not a gradable fundus
photograph (too dark, overexposed, blurred, no circular fundus, too small) is listed with
that reason and no diagnosis, unless ``grade_all`` is asked for.
"""

from __future__ import annotations

import stat
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
from tqdm import tqdm

from palm.errors import ConfigError
from palm.nn import artifact
from palm.serve.decode import decode_stream
from palm.data.image import IMAGE_SUFFIXES, to_chw_float
from palm.serve.inference import load_engine
from palm.serve.quality import OK

FEW_FILES = 64      # below this, decoded in the main process: starting the workers takes ~0.6 s (2 cores)


def find_images(paths: Iterable[str | Path]) -> list[Path]:
    """Files as given, and the image files found (recursively, sorted) in the folders given."""
    found: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found.extend(sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES))
        elif p.exists() and not p.is_file():  # a FIFO would hang the decoder, a device never end
            kind = "a FIFO" if stat.S_ISFIFO(p.stat().st_mode) else "not a regular file"
            raise ConfigError(f"{p}: {kind}; refusing to read it (give image files or folders)")
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
    engine: str = "eager"   # which engine runs it (palm.serve.inference)

    @classmethod
    def load(cls, model_dir: str | Path = "models", device: str = "auto", engine: str = "auto",
             precision: str = "fp32") -> "Predictor":
        """The model of ``model_dir``, run by :func:`palm.serve.inference.load_engine` (Paddle Inference
        by default, eager Paddle as the fallback)."""
        run, info = load_engine(model_dir, device=device, engine=engine, precision=precision)
        return cls(run, int(info["image_size"]), artifact.input_size(info), artifact.threshold(info),
                   info["model"], run.name)

    def predict(self, files: list[Path], batch_size: int = 16, progress: bool = True,
                workers: int | None = None, grade_all: bool = False) -> Iterator[dict]:
        """Yield one record per file, in order: its ``quality`` (``ok`` or why it is not gradable)
        and probability and class, or the error. Ungradable images get no probability unless
        ``grade_all``.

        The images are decoded by ``workers`` processes (default: one per core; 0: none)
        while the network scores the previous batch (:func:`palm.serve.decode.decode_stream`)."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        if workers is None and len(files) < FEW_FILES:
            workers = 0          # starting the decoding processes would take longer than decoding these
        bar = tqdm(total=len(files), desc="predict", unit="img", disable=not progress or len(files) < 2)
        decoded = decode_stream(files, self.image_size, self.input_size, workers, ahead=2 * batch_size,
                                check_quality=True)
        while chunk := list(islice(decoded, batch_size)):
            graded = [d for d in chunk if d.error is None and (d.quality == OK or grade_all)]
            probs = iter(self.run_batch(to_chw_float(np.stack([d.image for d in graded]))) if graded else [])
            for d in chunk:
                rec = {"image": str(d.file), "quality": d.quality, "error": d.error}
                if d.error is None and (d.quality == OK or grade_all):
                    p = float(next(probs))
                    rec.update(probability=round(p, 6), predicted=int(p >= self.threshold),
                               diagnosis="PM" if p >= self.threshold else "non-PM")
                yield rec
            bar.update(len(chunk))
        bar.close()
