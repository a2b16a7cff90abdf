"""``model.json``, the description of a trained-model folder: its one writer and one reader.

Paddle-free (JSON only), so that what only reads a model's description (the report, a
comparison of models) does not load Paddle nor depend on the networks' code. ``models/``
(the ``train`` stage), ``models_export/`` (the ``export`` stage) and any folder handed to
``palm predict --model`` hold a ``model.json`` with:

- ``model``: the network's name in :data:`palm.nn.models.MODELS`;
- ``image_size``: the side of the square images ``preprocess`` decodes (what a new photograph
  is decoded to); ``input_size``: the side the network takes (older files: ``image_size``);
- ``fundus``: the enhancement of a photograph before the network (:mod:`palm.data.fundus`,
  ``train.fundus``; absent: none);
- ``threshold``: PM if the probability is at least this (:data:`palm.core.params.DEFAULT_THRESHOLD`
  if absent), and ``threshold_rule``, where it came from;
- ``tta``: the test-time augmentation its probability is computed with (:mod:`palm.serve.tta`;
  ``off`` if absent);
- what the training run was (``selected_epoch``, ``epochs``, ``device``, ``config``, ...), for people.

The weights beside it, and loading the network, are :mod:`palm.nn.artifact`'s.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from palm.core.errors import ConfigError, DataError

# DEFAULT_THRESHOLD: a model whose model.json names none
from palm.core.params import CLAHE_MODES, DEFAULT_THRESHOLD, MAX_LOCAL_NORM, TTA_MODES, Side, check
from palm.data.fundus import Fundus

MODEL_INFO = "model.json"


def write_info(folder: str | Path, info: dict) -> None:
    """``folder/model.json`` (the caller makes ``folder`` appear atomically)."""
    (Path(folder) / MODEL_INFO).write_text(json.dumps(info, indent=1), encoding="utf-8")


def read_info(model_dir: str | Path) -> dict:
    """``model_dir/model.json``, checked: a one-line error naming the file when it is missing or broken."""
    path = Path(model_dir) / MODEL_INFO
    if not path.is_file():
        raise DataError(f"{model_dir}: no {MODEL_INFO}; train a model first (dvc repro) or give --model DIR")
    return parse_info(path.read_bytes(), path)


def parse_info(data: bytes, path: str | Path) -> dict:
    """The model description in the bytes ``data`` of ``path`` (read once by the caller, who may
    have hashed them: :func:`palm.nn.card.open_model`), checked strictly: every key that decides
    an answer has its type (``"threshold": true`` is not a number, ``"image_size": 64.0`` not a
    side). A :class:`DataError` when it is not a JSON object naming its network, a
    :class:`ConfigError` (exit 2, one line naming the file and each bad key) for a bad value."""
    try:
        info = json.loads(data.decode("utf-8"))
        if not isinstance(info, dict) or not isinstance(info.get("model"), str):
            raise ValueError("no 'model' name")
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: not a valid model description ({type(exc).__name__}: {exc})") from None
    try:
        check(ModelInfo, info, str(path))  # each bad key named
    except ConfigError as exc:
        raise ConfigError("; ".join(str(exc).splitlines())) from None  # one line
    if input_size(info) > int(info["image_size"]):
        raise ConfigError(
            f"{path}: input_size = {input_size(info)}: must not be above image_size ({info['image_size']})"
        )
    return info


Probability = Annotated[float, Field(ge=0, le=1, allow_inf_nan=False)]


class FundusInfo(BaseModel):
    """``model.json``'s ``fundus`` (:class:`palm.core.params.FundusParams`' keys), strictly typed:
    JSON has true and false, so no ``off`` read as false here."""

    model_config = ConfigDict(extra="forbid", strict=True)
    crop: bool | None = None
    local_norm: Annotated[float, Field(ge=0, le=MAX_LOCAL_NORM, allow_inf_nan=False)] | None = None
    clahe: Literal[CLAHE_MODES] | None = None  # type: ignore[valid-type]


class ModelInfo(BaseModel):
    """The values of ``model.json``, checked strictly (no coercion: a bool is not a number, a
    string not a side, a float not a whole number): those that decide a diagnosis or a cost, and
    those of the training run that the card and the report quote. Other keys are allowed (a
    record for people)."""

    model_config = ConfigDict(extra="allow", strict=True)
    model: str
    image_size: Side
    input_size: Side | None = None
    threshold: Probability = DEFAULT_THRESHOLD
    threshold_rule: str | None = None
    tta: Literal[TTA_MODES] = "off"  # type: ignore[valid-type]
    fundus: FundusInfo | None = None
    selected_epoch: Annotated[int, Field(ge=0)] | None = None
    epochs: Annotated[int, Field(ge=0)] | None = None
    config: dict | None = None
    onnx: dict | None = None


def input_size(info: dict) -> int:
    """The side of the images the model takes (``model.json``; older files: ``image_size``)."""
    return int(info.get("input_size") or info["image_size"])


def fundus(info: dict) -> Fundus:
    """How the model's photographs are enhanced before the resize (older files: not at all)."""
    return Fundus.of(info.get("fundus"))


def threshold(info: dict) -> float:
    """The operating threshold: PM if the probability is at least this."""
    return float(info.get("threshold", DEFAULT_THRESHOLD))


def tta(info: dict) -> str:
    """The test-time augmentation the model's probability is computed with (``off`` if not named)."""
    return info.get("tta") or "off"
