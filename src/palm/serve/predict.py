"""Applying a trained model to new photographs (``palm predict``).

The images go through :func:`palm.data.image.load_image`, the very function the ``preprocess``
stage uses, then the model's fundus enhancement (``model.json``'s ``fundus``) as the training
loader applied it, so a new photograph is seen exactly as the training images were; they are
decoded in worker processes while the network, run by Paddle Inference
(:mod:`palm.serve.inference`), scores the previous batch. Each one is also checked by
:mod:`palm.serve.quality` (on the same decoded image): a picture that is not a gradable fundus
photograph (too dark, overexposed, blurred, no circular fundus, too small) is listed with
that reason and no diagnosis, unless ``grade_all`` is asked for.
"""

from __future__ import annotations

import stat
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any, cast

import numpy as np
from tqdm import tqdm

from palm.core.errors import ConfigError
from palm.data.fundus import Fundus
from palm.data.image import to_chw_float
from palm.data.layout import IMAGE_SUFFIXES
from palm.nn import modelinfo
from palm.nn.card import open_model
from palm.nn.weights import MODEL_WEIGHTS
from palm.serve import tta
from palm.serve.decode import Decoded, decode_stream
from palm.serve.quality import OK

FEW_FILES = 64  # below this, decoded in the main process: starting the workers takes ~0.6 s (2 cores)


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


def gradable(d: Decoded, grade_all: bool = False) -> bool:
    """Whether ``d`` gets a probability: it was read, and is a gradable photograph (or ``grade_all``)."""
    return d.error is None and (d.quality == OK or grade_all)


def record(image: str, d: Decoded, probability: float | None, threshold: float) -> dict:
    """One row of ``palm predict`` (and of ``palm serve``'s answers): the image's quality and
    probability and class at ``threshold``, or the error."""
    rec: dict[str, Any] = {"image": image, "quality": d.quality, "error": d.error}
    if probability is not None:
        rec.update(
            probability=round(probability, 6),
            predicted=int(probability >= threshold),
            diagnosis="PM" if probability >= threshold else "non-PM",
        )
    return rec


@dataclass
class Predictor:
    """A trained classifier: from ``models/`` (weights) or from the exported inference model.

    One loaded model and what it was loaded from, together until it is dropped: the engine, the
    ``model.json`` whose threshold, sizes, enhancement and test-time augmentation it answers with,
    the hashes of the files it was read from and the model card they were checked against, all
    from one reading of the folder (:func:`palm.nn.card.open_model`). Nothing here reads the
    folder again: ``palm serve``'s ``/v1/model`` reports this card, not the one on the disk now."""

    run_batch: Callable[[np.ndarray], np.ndarray]  # float32 NCHW array -> probabilities (N,)
    image_size: int  # what preprocess decodes to
    input_size: int  # what the network takes
    threshold: float
    name: str
    engine: str = "eager"  # which engine runs it (palm.serve.inference)
    fundus: Fundus = Fundus()  # the enhancement before the resize to input_size (model.json; none)
    info: dict = field(default_factory=dict)  # model.json, as read and checked
    card: dict | None = None  # the model card the files were checked against (None: none found)
    card_path: Path | None = None
    sha256: dict = field(default_factory=dict)  # SHA-256 of each file that decides an answer (palm.nn.card.CARD_FILES)
    weights: str = ""  # which of them holds the weights that run
    layer: object = None  # the eager network of a weights folder (load(gradcam=True)), same bytes

    @property
    def version(self) -> str:
        """The network's name and the first 12 hex digits of the SHA-256 of the weights that run."""
        return f"{self.name}-{self.sha256.get(self.weights, '?' * 12)[:12]}"

    @classmethod
    def load(
        cls,
        model_dir: str | Path = "models",
        device: str = "auto",
        engine: str = "auto",
        precision: str = "fp32",
        gradcam: bool = False,
    ) -> Predictor:
        """The model of ``model_dir``, run by :func:`palm.serve.inference.engine_of` (Paddle Inference
        by default, eager Paddle as the fallback), or with ``engine="onnxruntime"`` by
        :func:`palm.serve.onnxrt.engine_of_files` (no Paddle imported). The folder is read once
        (symbolic links resolved): ``model.json`` and the files the engine runs are hashed, checked
        against the model card (a file the card does not list with its SHA-256 is refused), and
        the engine is built from those same bytes. ``gradcam``: also keep the eager network of a
        weights folder (for Grad-CAM), built from the same bytes. The probability is the mean over
        the views of ``model.json``'s ``tta`` (:mod:`palm.serve.tta`)."""
        layer = None
        if engine == "onnxruntime":
            from palm.serve.onnxrt import ONNX_FILE, engine_of_files

            files = open_model(model_dir, read=(ONNX_FILE,), check=True)
            run, weights = engine_of_files(files), ONNX_FILE
        else:
            from palm.nn import artifact  # imports Paddle
            from palm.serve import inference

            files = inference.open_files(model_dir, check=True)
            weights = inference.export_files(files.dir)[-1]  # model.safetensors or inference.pdiparams
            if gradcam and MODEL_WEIGHTS in files.data:
                layer = artifact.network(files)
            run = inference.engine_of(files, device=device, engine=engine, precision=precision, layer=layer)
        info = files.info
        run = tta.wrap(run, modelinfo.tta(info))  # model.json's test-time augmentation (off: the engine itself)
        return cls(
            run,
            int(info["image_size"]),
            modelinfo.input_size(info),
            modelinfo.threshold(info),
            info["model"],
            run.name,
            modelinfo.fundus(info),
            info=info,
            card=files.card,
            card_path=files.card_path,
            sha256=dict(files.sha256),
            weights=weights,
            layer=layer,
        )

    def predict(
        self,
        files: list[Path],
        batch_size: int = 16,
        progress: bool = True,
        workers: int | None = None,
        grade_all: bool = False,
    ) -> Iterator[dict]:
        """Yield one record per file, in order: its ``quality`` (``ok`` or why it is not gradable)
        and probability and class, or the error. Ungradable images get no probability unless
        ``grade_all``.

        The images are decoded by ``workers`` processes (default: one per core; 0: none)
        while the network scores the previous batch (:func:`palm.serve.decode.decode_stream`)."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        if workers is None and len(files) < FEW_FILES:
            workers = 0  # starting the decoding processes would take longer than decoding these
        bar = tqdm(total=len(files), desc="predict", unit="img", disable=not progress or len(files) < 2)
        decoded = decode_stream(
            files,
            self.image_size,
            self.input_size,
            workers,
            ahead=2 * batch_size,
            check_quality=True,
            fundus=self.fundus,
        )
        while chunk := list(islice(decoded, batch_size)):
            graded = [d for d in chunk if gradable(d, grade_all)]
            probs = iter(
                self.run_batch(to_chw_float(np.stack([cast(np.ndarray, d.image) for d in graded]))) if graded else []
            )
            for d in chunk:
                yield record(str(d.file), d, float(next(probs)) if gradable(d, grade_all) else None, self.threshold)
            bar.update(len(chunk))
        bar.close()
