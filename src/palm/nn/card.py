"""The model card's reader, and the one way a model folder is read: once, hashed, checked against its card.

The ``card`` stage (:mod:`palm.evaluation.model_card`) writes ``models_card/card.json`` (and
``card.md``, the same for people) beside ``models/`` and ``models_export/``: what the model is
for, its data, its validated metrics, and the SHA-256 of every file of the run that decides an
answer (``files``: a list of ``{"path", "sha256", "bytes"}``, paths relative to the repository):
each folder's ``model.json`` (the network, the sizes, the threshold, the test-time augmentation,
the enhancement) and its weights or graph (:data:`WEIGHT_FILES`).

:func:`open_model` reads a model folder for every engine (``palm predict``, the service,
evaluate, export): the folder's symbolic links are resolved first, then each file an engine
needs is read **once**, hashed, and loaded from those same bytes (never read again from the
disk: a file swapped after the check is not what runs). With ``check=True`` (``palm predict``
and ``palm serve``: :meth:`palm.serve.predict.Predictor.load`), when a card is found for the
folder (:func:`find_card`: ``card.json`` in the folder itself, else ``models_card/card.json``
beside it), every file of :data:`CARD_FILES` in the folder must be listed in it with the same
SHA-256, all from one folder of the card, or the model is refused with one line. A folder with
no card is run unchecked (a model trained outside the pipeline, or before its card was written).

This module imports neither Paddle nor onnxruntime: the ONNX-only install uses it too.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from palm.core.errors import DataError
from palm.nn.modelinfo import MODEL_INFO, parse_info

CARD_DIR = Path("models_card")
CARD_JSON = "card.json"
CARD_MD = "card.md"
SCHEMA = "palm-model-card/2"
#: the files that hold a model's weights or graph, in any of its forms (what an engine reads)
WEIGHT_FILES = ("model.safetensors", "inference.json", "inference.pdiparams", "model.onnx")
#: every file of a model folder that decides an answer: what the card lists, what is checked
CARD_FILES = (MODEL_INFO, *WEIGHT_FILES)


@dataclass(frozen=True)
class ModelFiles:
    """A model folder as read by :func:`open_model`: ``model.json`` and the files an engine
    needs, each read once; the hashes of every file of :data:`CARD_FILES` found there; the card
    they were checked against (None: no card, or not checked)."""

    dir: Path  # the folder, symbolic links resolved
    given: Path  # the folder as named by the caller (for messages)
    info: dict  # model.json, parsed from the bytes hashed
    data: dict[str, bytes] = field(repr=False)  # the bytes of the files read, by name
    sha256: dict[str, str]  # every file of CARD_FILES present, by name
    card: dict | None = None
    card_path: Path | None = None

    def path(self, name: str) -> Path:
        """``name`` in the folder, as the caller named the folder."""
        return self.given / name


def find_card(model_dir: str | Path) -> Path | None:
    """The card of the model in ``model_dir``: ``model_dir/card.json``, else
    ``models_card/card.json`` beside ``model_dir`` (symbolic links resolved first: a folder
    reached through a link has the card of the folder it is); None when there is neither."""
    model_dir = Path(model_dir).resolve()
    for candidate in (model_dir / CARD_JSON, model_dir.parent / CARD_DIR / CARD_JSON):
        if candidate.is_file():
            return candidate
    return None


def read_card(path: str | Path, data: bytes | None = None) -> dict:
    """``card.json`` at ``path`` (or its bytes ``data``), checked: a one-line error naming the file when it is broken."""
    path = Path(path)
    try:
        card = json.loads((path.read_bytes() if data is None else data).decode("utf-8"))
        if isinstance(card, dict) and card.get("schema") == "palm-model-card/1":
            raise ValueError(
                f"written by an older palm ({card['schema']}, whose hashes do not cover {MODEL_INFO}); "
                "rerun dvc repro card"
            )
        if not isinstance(card, dict) or card.get("schema") != SCHEMA:
            raise ValueError(f"schema is not {SCHEMA}")
        for w in card["files"]:
            if not (isinstance(w["path"], str) and isinstance(w["sha256"], str) and len(w["sha256"]) == 64):
                raise ValueError("a files entry without a path or a SHA-256")
    except FileNotFoundError:
        raise DataError(f"{path}: model card not found") from None
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: not a valid model card ({type(exc).__name__}: {exc})") from None
    return card


def read_regular(path: Path) -> bytes | None:
    """The bytes of the regular file ``path`` (following links), read in one go; None when there
    is none. Anything else there (a FIFO, a device, a folder) is a one-line error, never read."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # a FIFO opens without waiting for a writer
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as exc:
        raise DataError(f"{path}: cannot read it ({exc.strerror or exc})") from None
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            raise DataError(f"{path}: not a regular file; refusing to read it")
        return f.read()


def _sha256_regular(path: Path) -> str | None:
    data = read_regular(path)
    return None if data is None else hashlib.sha256(data).hexdigest()


def open_model(model_dir: str | Path, read: Iterable[str] = (), check: bool = False) -> ModelFiles:
    """The model folder ``model_dir`` read once (:class:`ModelFiles`): its symbolic links resolved,
    ``model.json`` and the files ``read`` (those present) read and hashed, every other file of
    :data:`CARD_FILES` hashed; with ``check``, checked against the folder's card (:func:`check_files`)."""
    given = Path(model_dir)
    try:
        folder = given.resolve(strict=True)
    except FileNotFoundError:
        raise DataError(
            f"{given}: no such folder, no {MODEL_INFO}; train a model first (dvc repro) or give --model DIR"
        ) from None
    except (OSError, RuntimeError) as exc:  # a loop of symbolic links, a folder that cannot be searched
        raise DataError(f"{given}: cannot open the model folder ({getattr(exc, 'strerror', None) or exc})") from None
    if not folder.is_dir():
        raise DataError(f"{given}: not a folder; --model takes the folder of a trained model")
    wanted = {MODEL_INFO, *read}
    data: dict[str, bytes] = {}
    digests: dict[str, str] = {}
    for name in CARD_FILES:
        if name in wanted:
            blob = read_regular(folder / name)
            if blob is not None:
                data[name] = blob
                digests[name] = hashlib.sha256(blob).hexdigest()
        else:
            digest = _sha256_regular(folder / name)
            if digest is not None:
                digests[name] = digest
    if MODEL_INFO not in data:
        raise DataError(f"{given}: no {MODEL_INFO}; train a model first (dvc repro) or give --model DIR")
    card = card_path = None
    if check and (card_path := find_card(folder)) is not None:
        card = read_card(card_path, read_regular(card_path))
        check_files(card, card_path, given, digests)
    info = parse_info(data[MODEL_INFO], given / MODEL_INFO)  # after the card: an altered file is named as such
    return ModelFiles(folder, given, info, data, digests, card, card_path)


def check_files(card: dict, card_path: Path, folder: Path, digests: dict[str, str]) -> None:
    """Every file of ``digests`` (name: SHA-256, the files of ``folder``) listed by ``card`` with
    that SHA-256, all from one model folder of the card; else a one-line :class:`DataError`."""
    groups: dict[str, dict[str, str]] = {}
    for entry in card["files"]:
        p = PurePosixPath(entry["path"])
        groups.setdefault(str(p.parent), {})[p.name] = entry["sha256"].lower()
    for name, digest in sorted(digests.items(), key=lambda kv: kv[0] != MODEL_INFO):  # the weights first
        f = folder / name
        listed = sorted({g[name] for g in groups.values() if name in g})
        if not listed:
            raise DataError(
                f"{f}: not described by the model card {card_path}; refusing a model the card does "
                "not vouch for (rerun the pipeline: dvc repro)"
            )
        if digest not in listed:
            raise DataError(
                f"{f}: SHA-256 {digest[:12]}... does not match the model card {card_path} "
                f"({', '.join(h[:12] + '...' for h in listed)}); refusing this model "
                "(other or altered files: rerun dvc repro, or use the card that came with them)"
            )
    if not any(all(g.get(n) == d for n, d in digests.items()) for g in groups.values()):
        raise DataError(
            f"{folder}: its files ({', '.join(sorted(digests))}) are listed by the model card {card_path} "
            "but for different model folders; refusing a mixed model (rerun dvc repro)"
        )


def verify(model_dir: str | Path) -> Path | None:
    """Check the files of ``model_dir`` against its card (:func:`find_card`); return the card's
    path (None: no card, nothing checked). A file the card does not list, or lists with another
    SHA-256, is a :class:`DataError` of one line."""
    return open_model(model_dir, check=True).card_path
