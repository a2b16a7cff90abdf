"""The model card's reader and the weights check: a model is run only with the weights its card describes.

The ``card`` stage (:mod:`palm.evaluation.model_card`) writes ``models_card/card.json`` (and
``card.md``, the same for people) beside ``models/`` and ``models_export/``: what the model is
for, its data, its validated metrics, and the SHA-256 of every weights file of the run
(``weights``: a list of ``{"path", "sha256", "bytes"}``, paths relative to the repository).

:func:`verify` is called by the one loading path of ``palm predict`` and the service
(:meth:`palm.serve.predict.Predictor.load`): when a card is found for a model folder
(:func:`find_card`: ``card.json`` in the folder itself, else ``models_card/card.json`` beside
it), each weights file of the folder must be listed in it with the same SHA-256, or the model
is refused with one line. A folder with no card is run unchecked (a model trained outside the
pipeline, or before its card was written).

This module imports neither Paddle nor onnxruntime: the ONNX-only install uses it too.
"""

from __future__ import annotations

import json
from pathlib import Path

from palm.core.errors import DataError
from palm.core.fsutil import sha256_file

CARD_DIR = Path("models_card")
CARD_JSON = "card.json"
CARD_MD = "card.md"
SCHEMA = "palm-model-card/1"
#: the files that hold a model's weights or graph, in any of its forms (what an engine reads)
WEIGHT_FILES = ("model.safetensors", "inference.json", "inference.pdiparams", "model.onnx")




def find_card(model_dir: str | Path) -> Path | None:
    """The card of the model in ``model_dir``: ``model_dir/card.json``, else
    ``models_card/card.json`` beside ``model_dir``; None when there is neither."""
    model_dir = Path(model_dir)
    for candidate in (model_dir / CARD_JSON, model_dir.absolute().parent / CARD_DIR / CARD_JSON):
        if candidate.is_file():
            return candidate
    return None


def read_card(path: str | Path) -> dict:
    """``card.json`` at ``path``, checked: a one-line error naming the file when it is broken."""
    path = Path(path)
    try:
        card = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(card, dict) or card.get("schema") != SCHEMA:
            raise ValueError(f"schema is not {SCHEMA}")
        for w in card["weights"]:
            if not (isinstance(w["path"], str) and len(str(w["sha256"])) == 64):
                raise ValueError("a weights entry without a path or a SHA-256")
    except FileNotFoundError:
        raise DataError(f"{path}: model card not found") from None
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: not a valid model card ({type(exc).__name__}: {exc})") from None
    return card


def verify(model_dir: str | Path) -> Path | None:
    """Check the weights files of ``model_dir`` against its card (:func:`find_card`); return the
    card's path (None: no card, nothing checked). A file the card does not list, or lists with
    another SHA-256, is a :class:`DataError` of one line."""
    card_path = find_card(model_dir)
    if card_path is None:
        return None
    listed: dict[str, set[str]] = {}
    for w in read_card(card_path)["weights"]:
        listed.setdefault(Path(w["path"]).name, set()).add(str(w["sha256"]).lower())
    for name in WEIGHT_FILES:
        f = Path(model_dir) / name
        if not f.is_file():
            continue
        if name not in listed:
            raise DataError(f"{f}: not described by the model card {card_path}; refusing weights the card does "
                            "not vouch for (rerun the pipeline: dvc repro)")
        digest = sha256_file(f)
        if digest not in listed[name]:
            raise DataError(f"{f}: SHA-256 {digest[:12]}... does not match the model card {card_path} "
                            f"({', '.join(sorted(h[:12] + '...' for h in listed[name]))}); refusing these weights "
                            "(other or altered weights: rerun dvc repro, or use the card that came with them)")
    return card_path
