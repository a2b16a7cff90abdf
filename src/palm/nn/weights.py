"""The one format of saved weights and checkpoints: safetensors for tensors, JSON for the rest.

``paddle.load`` unpickles, and a pickle can run any code when it is loaded: a ``model.pdparams``
from someone else is a program. This module never unpickles. A state (a network's, an
optimizer's, a learning-rate schedule's, or a nested dict of them) is written as:

- its tensors, as numpy arrays in a `safetensors <https://huggingface.co/docs/safetensors>`_
  file (a JSON header and raw bytes: it cannot carry code), keyed by their path in the
  nested dict (``model/conv1.weight``);
- everything else (numbers, strings, lists: epochs, learning-rate state, history), as JSON in
  the same file's header metadata, with each tensor replaced by ``{"__tensor__": key}``.

Reading refuses anything that is not such a file, and :func:`check_model_dir` /
:func:`check_export_dir` refuse the pickled formats (``.pdparams``, ``.pdckpt``, the
older exported ``inference.pdmodel`` and its ``.pdiparams.info``) with one line naming the folder.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from palm.core.errors import DataError
from palm.core.fsutil import atomic_file

MODEL_WEIGHTS = "model.safetensors"
META_KEY = "palm_state"
#: files that Paddle (or Python) reads by unpickling: never loaded
PICKLED_SUFFIXES = (".pdparams", ".pdckpt", ".pdopt", ".pdmodel", ".pdiparams.info", ".pkl", ".pickle")


def _is_tensor(value) -> bool:
    return isinstance(value, np.ndarray) or (
        type(value).__name__ in ("Tensor", "EagerParamBase", "ParamBase") and hasattr(value, "numpy")
    )


def _to_numpy(value) -> np.ndarray | None:
    if isinstance(value, np.ndarray):
        return value
    if type(value).__name__ in ("Tensor", "EagerParamBase", "ParamBase") and hasattr(value, "numpy"):
        arr = value.numpy()
        if str(getattr(value, "dtype", "")).endswith("bfloat16"):
            raise DataError("cannot save a bfloat16 tensor as numpy (train.amp bf16 keeps float32 weights)")
        return np.asarray(arr)
    return None


def flatten(state: Any, prefix: str = "") -> tuple[dict[str, np.ndarray], Any]:
    """``(tensors, tree)``: the arrays of ``state`` by key, and ``state`` as JSON with references."""
    tensors: dict[str, np.ndarray] = {}
    return tensors, _walk(state, prefix, tensors)


def _walk(value, path: str, tensors: dict[str, np.ndarray]):
    # a module-level function, not a closure: a recursive closure is a reference cycle that kept
    # every checkpoint's arrays alive until the garbage collector's next full pass (resident
    # memory climbed one checkpoint per epoch and fell every few epochs)
    lazy = isinstance(tensors, _Lazy)
    arr = (value if _is_tensor(value) else None) if lazy else _to_numpy(value)
    if arr is not None:
        key = path or "tensor"
        if key in tensors:
            raise ValueError(f"two tensors at {key!r}")
        tensors[key] = arr if lazy else np.ascontiguousarray(arr)
        return {"__tensor__": key}
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            if not isinstance(k, str) or "/" in k:
                raise ValueError(f"state key {k!r} must be a string without '/'")
            out[k] = _walk(v, f"{path}/{k}" if path else k, tensors)
        return out
    if isinstance(value, (list, tuple)):
        return [_walk(v, f"{path}/{i}", tensors) for i, v in enumerate(value)]
    if isinstance(value, np.generic):
        return value.item()
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise ValueError(f"cannot save {type(value).__name__} at {path!r} (tensors, numbers, strings only)")


def unflatten(tree: Any, tensors: dict[str, np.ndarray]) -> Any:
    if isinstance(tree, dict):
        if set(tree) == {"__tensor__"}:
            key = tree["__tensor__"]
            if key not in tensors:
                raise DataError(f"tensor {key!r} is missing")
            return tensors[key]
        return {k: unflatten(v, tensors) for k, v in tree.items()}
    if isinstance(tree, list):
        return [unflatten(v, tensors) for v in tree]
    return tree


#: numpy dtypes by their safetensors names
_DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
}
_NAMES = {np.dtype(v): k for k, v in _DTYPES.items()}


def save_state(state: Any, path: str | Path) -> Path:
    """Write ``state`` to ``path`` (safetensors + JSON metadata) atomically, synced to disk.

    The file is written a tensor at a time (the format: an 8-byte little-endian header length,
    the JSON header with each tensor's dtype, shape and byte range, then the bytes): only one
    tensor's copy is in memory at once, not the whole state twice over (a checkpoint of LeNet at
    224 px raised the peak resident memory by 0.7 GB). :func:`load_state` reads it with the
    safetensors library, which checks it."""
    refs: dict[str, Any] = {}
    tree = _walk(state, "", _Lazy(refs))
    header, offset, order = {}, 0, []
    for key, value in refs.items():
        dtype, shape = _describe(value, key)
        size = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        header[key] = {"dtype": _NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
        order.append((key, value, dtype, size))
    header["__metadata__"] = {META_KEY: json.dumps(tree)}
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    with atomic_file(path, "wb", fsync=True) as f:
        f.write(len(text).to_bytes(8, "little"))
        f.write(text)
        for key, value, dtype, size in order:
            arr = np.ascontiguousarray(_to_numpy(value), dtype=dtype)
            if arr.nbytes != size:
                raise ValueError(f"tensor {key!r} changed while it was saved")
            f.write(arr.reshape(-1).view(np.uint8).data)
            del arr
    return Path(path)


class _Lazy(dict):
    """The tensors of a state by key, kept as they are (converted one at a time when written)."""

    def __init__(self, refs: dict):
        super().__init__()
        self.refs = refs

    def __contains__(self, key):
        return key in self.refs

    def __setitem__(self, key, value):
        self.refs[key] = value


def _describe(value, key: str) -> tuple[np.dtype, tuple[int, ...]]:
    """The numpy dtype and shape of a tensor or array, without copying it."""
    if isinstance(value, np.ndarray):
        dtype, shape = value.dtype, value.shape
    else:
        name = str(value.dtype).rsplit(".", 1)[-1]
        if name == "bfloat16":
            raise DataError("cannot save a bfloat16 tensor as numpy (train.amp bf16 keeps float32 weights)")
        dtype, shape = np.dtype(name), tuple(value.shape)
    if dtype not in _NAMES:
        raise ValueError(f"cannot save tensor {key!r} of dtype {dtype}")
    return np.dtype(dtype), tuple(int(v) for v in shape)


def load_state(path: str | Path) -> Any:
    """The state saved by :func:`save_state` at ``path`` (tensors as numpy arrays)."""
    from safetensors import safe_open

    path = Path(path)
    if path.name.endswith(PICKLED_SUFFIXES):
        raise DataError(f"{path}: a pickle file, which can run code when loaded; refusing to read it")
    try:
        with safe_open(str(path), framework="numpy") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        tree = json.loads(meta[META_KEY]) if META_KEY in meta else {k: {"__tensor__": k} for k in tensors}
        return unflatten(tree, tensors)
    except FileNotFoundError:
        raise DataError(f"{path}: not found") from None
    except DataError as exc:
        raise DataError(f"{path}: {exc}") from None
    except Exception as exc:  # safetensors raises its own error types for a malformed header
        raise DataError(f"{path}: not a safetensors weights file ({type(exc).__name__}: {exc})") from None


def load_state_bytes(data: bytes, path: str | Path) -> Any:
    """The state saved by :func:`save_state`, from the bytes ``data`` of the file ``path`` (read
    once by the caller, who hashed them: the weights checked are the weights loaded)."""
    from safetensors.numpy import load

    try:
        tensors = load(bytes(data))  # checks the header and the byte ranges
        size = int.from_bytes(data[:8], "little")
        meta = json.loads(bytes(data[8 : 8 + size])).get("__metadata__") or {}
        tree = json.loads(meta[META_KEY]) if META_KEY in meta else {k: {"__tensor__": k} for k in tensors}
        return unflatten(tree, tensors)
    except DataError as exc:
        raise DataError(f"{path}: {exc}") from None
    except Exception as exc:  # safetensors raises its own error types for a malformed header
        raise DataError(f"{path}: not a safetensors weights file ({type(exc).__name__}: {exc})") from None


def _pickled_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.is_file() and p.name.endswith(PICKLED_SUFFIXES))


def check_model_dir(folder: str | Path) -> Path:
    """``folder/model.safetensors``, or a one-line error (naming the folder) if it is missing or pickled."""
    folder = Path(folder)
    weights = folder / MODEL_WEIGHTS
    if weights.is_file():
        return weights
    pickled = _pickled_files(folder) if folder.is_dir() else []
    if pickled:
        raise DataError(
            f"{folder}: refusing {', '.join(pickled)}: pickle files can run code when loaded; "
            f"this project reads only {MODEL_WEIGHTS} (retrain: dvc repro train)"
        )
    raise DataError(f"{folder}: no {MODEL_WEIGHTS}; train a model first (dvc repro train)")


def check_export_dir(folder: str | Path) -> str:
    """The path prefix of a Paddle 3 exported model (``inference.json`` + ``inference.pdiparams``)
    for ``paddle.jit.load``; the older pickled formats are refused."""
    folder = Path(folder)
    pickled = _pickled_files(folder)
    if pickled:
        raise DataError(
            f"{folder}: refusing an exported model with {', '.join(pickled)} (the older format, "
            "read by unpickling, which can run code); re-export it: dvc repro export"
        )
    missing = [n for n in ("inference.json", "inference.pdiparams") if not (folder / n).is_file()]
    if missing:
        raise DataError(f"{folder}: exported model incomplete, no {', '.join(missing)} (re-export: dvc repro export)")
    return str(folder / "inference")


def to_paddle(state: Any) -> Any:
    """numpy arrays in a loaded state -> paddle tensors (for ``set_state_dict``)."""
    import paddle

    if isinstance(state, np.ndarray):
        return paddle.to_tensor(state)
    if isinstance(state, dict):
        return {k: to_paddle(v) for k, v in state.items()}
    if isinstance(state, list):
        return [to_paddle(v) for v in state]
    return state
