"""The trained-model folder: the weights (:data:`palm.nn.weights.MODEL_WEIGHTS`, safetensors:
never unpickled) beside ``model.json`` (:mod:`palm.nn.modelinfo`, its description), saved
together and loaded as an eager network in eval mode.
"""

from __future__ import annotations

import contextlib
import shutil
from pathlib import Path

import numpy as np

from palm.core.errors import DataError
from palm.core.fsutil import atomic_dir
from palm.nn.card import ModelFiles, open_model
from palm.nn.modelinfo import MODEL_INFO, input_size, write_info
from palm.nn.models import build_model, main_logits, model_names
from palm.nn.weights import MODEL_WEIGHTS, check_model_dir, load_state_bytes


def save(model_dir: str | Path, weights_file: str | Path, info: dict) -> None:
    """``model_dir`` with the weights of ``weights_file`` and ``info``: both appear together, or not at all."""
    with atomic_dir(model_dir) as tmp:
        shutil.copyfile(weights_file, tmp / MODEL_WEIGHTS)
        write_info(tmp, info)


def load(model_dir: str | Path = "models"):
    """The saved model of ``model_dir`` in eval mode, and its ``model.json``: one-line errors
    for a bad folder (no description, pickled or ill-fitting weights, unknown network). Not
    checked against a model card (the pipeline's own stages load the model before its card is
    written); ``palm predict`` and the service go through :func:`palm.nn.card.open_model` with the check."""
    files = open_model(model_dir, read=(MODEL_WEIGHTS,))
    return network(files), files.info


def network(files: ModelFiles):
    """The eager network (eval mode) of a weights folder read by :func:`palm.nn.card.open_model`,
    built from the very bytes that were hashed (and checked against the card when asked)."""
    info = files.info
    if MODEL_WEIGHTS not in files.data:
        check_model_dir(files.given)  # why there is none (pickles refused, or missing)
        raise DataError(f"{files.given}: no {MODEL_WEIGHTS}; train a model first (dvc repro train)")
    weights = load_state_bytes(files.data[MODEL_WEIGHTS], files.path(MODEL_WEIGHTS))
    if info["model"] not in model_names():
        raise DataError(
            f"{files.path(MODEL_INFO)}: unknown model {info['model']!r} (known: {', '.join(model_names())})"
        )
    model = build_model(info["model"], image_size=input_size(info))
    expected = model.state_dict()
    wrong = [k for k, v in expected.items() if k not in weights or list(weights[k].shape) != list(v.shape)]
    if wrong or set(weights) - set(expected):
        raise DataError(
            f"{files.given}: the weights do not fit a {info['model']} at {input_size(info)} px "
            f"({len(wrong)} missing or of another shape, {len(set(weights) - set(expected))} unknown)"
        )
    model.set_state_dict(weights)
    model.eval()
    return model


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
