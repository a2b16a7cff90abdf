"""The trained-model artifact: a folder holding the weights and ``model.json``.

This module is the one writer and the one reader of that folder's description. ``models/``
(the ``train`` stage), ``models_export/`` (the ``export`` stage) and any folder handed to
``palm predict --model`` hold a ``model.json`` with:

- ``model``: the network's name in :data:`palm.nn.models.MODELS`;
- ``image_size``: the side of the square images ``preprocess`` decodes (what a new photograph
  is decoded to); ``input_size``: the side the network takes (older files: ``image_size``);
- ``threshold``: PM if the probability is at least this (:data:`palm.evaluation.metrics.DEFAULT_THRESHOLD` if absent),
  and ``threshold_rule``, where it came from;
- what the training run was (``selected_epoch``, ``epochs``, ``device``, ``config``, ...), for people.

The weights are :data:`palm.nn.weights.MODEL_WEIGHTS` (safetensors: never unpickled).
"""

from __future__ import annotations

import contextlib
import json
import shutil
from pathlib import Path

import numpy as np

from typing import Annotated, Optional

from pydantic import BaseModel, ConfigDict, Field

from palm.errors import ConfigError, DataError
from palm.params import Side, check
from palm.fsutil import atomic_dir
from palm.evaluation.metrics import DEFAULT_THRESHOLD  # a model whose model.json names none
from palm.nn.models import build_model, main_logits, model_names
from palm.nn.weights import MODEL_WEIGHTS, check_model_dir, load_state

MODEL_INFO = "model.json"


def write_info(folder: str | Path, info: dict) -> None:
    """``folder/model.json`` (the caller makes ``folder`` appear atomically)."""
    (Path(folder) / MODEL_INFO).write_text(json.dumps(info, indent=1), encoding="utf-8")


def save(model_dir: str | Path, weights_file: str | Path, info: dict) -> None:
    """``model_dir`` with the weights of ``weights_file`` and ``info``: both appear together, or not at all."""
    with atomic_dir(model_dir) as tmp:
        shutil.copyfile(weights_file, tmp / MODEL_WEIGHTS)
        write_info(tmp, info)


def read_info(model_dir: str | Path) -> dict:
    """``model_dir/model.json``, checked: a one-line error naming the file when it is missing or broken."""
    path = Path(model_dir) / MODEL_INFO
    if not path.is_file():
        raise DataError(f"{model_dir}: no {MODEL_INFO}; train a model first (dvc repro) or give --model DIR")
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(info, dict) or not isinstance(info.get("model"), str):
            raise ValueError("no 'model' name")
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: not a valid model description ({type(exc).__name__}: {exc})") from None
    check(ModelInfo, info, str(path))  # a ConfigError (exit 2) naming the file and each bad key
    if input_size(info) > int(info["image_size"]):
        raise ConfigError(f"{path}: input_size = {input_size(info)}: must not be above image_size "
                          f"({info['image_size']})")
    return info


class ModelInfo(BaseModel):
    """The values of ``model.json`` that decide a diagnosis or a cost, checked as params.yaml's are."""

    model_config = ConfigDict(extra="allow")
    model: str
    image_size: Side
    input_size: Optional[Side] = None
    threshold: Annotated[float, Field(ge=0, le=1, allow_inf_nan=False)] = DEFAULT_THRESHOLD


def input_size(info: dict) -> int:
    """The side of the images the model takes (``model.json``; older files: ``image_size``)."""
    return int(info.get("input_size") or info["image_size"])


def threshold(info: dict) -> float:
    """The operating threshold: PM if the probability is at least this."""
    return float(info.get("threshold", DEFAULT_THRESHOLD))


def load(model_dir: str | Path = "models"):
    """The saved model of ``model_dir`` in eval mode, and its ``model.json``: one-line errors
    for a bad folder (no description, pickled or ill-fitting weights, unknown network)."""
    model_dir = Path(model_dir)
    info = read_info(model_dir)
    weights = load_state(check_model_dir(model_dir))
    if info["model"] not in model_names():
        raise DataError(f"{model_dir}/{MODEL_INFO}: unknown model {info['model']!r} "
                        f"(known: {', '.join(model_names())})")
    model = build_model(info["model"], image_size=input_size(info))
    expected = model.state_dict()
    wrong = [k for k, v in expected.items() if k not in weights or list(weights[k].shape) != list(v.shape)]
    if wrong or set(weights) - set(expected):
        raise DataError(f"{model_dir}: the weights do not fit a {info['model']} at {input_size(info)} px "
                        f"({len(wrong)} missing or of another shape, {len(set(weights) - set(expected))} unknown)")
    model.set_state_dict(weights)
    model.eval()
    return model, info


def predict_probs(model, loader, amp_ctx=contextlib.nullcontext) -> np.ndarray:
    """PM probabilities of an eager network over the ``(x, y)`` batches of ``loader``, in order."""
    import paddle
    import paddle.nn.functional as F

    model.eval()
    out = []
    with paddle.no_grad():
        for x, _ in loader:
            with amp_ctx():
                logits = main_logits(model(x))
            out.append(F.sigmoid(logits.astype("float32")).numpy().reshape(-1))
    return np.concatenate(out) if out else np.zeros(0)
