"""The model as ONNX: converted from the exported Paddle model (paddle2onnx), run by onnxruntime.

The ``export`` stage writes ``models_export/model.onnx`` with :func:`convert` (from
``inference.json`` + ``inference.pdiparams``, Paddle 3's program format) and checks it
against eager Paddle (:func:`max_difference`). A model is run only once its signature is the
export's for its ``model.json`` (:func:`check_signature`: input, output, their shapes). :func:`onnx_engine` runs it with onnxruntime
on the CPU: ``palm predict --engine onnxruntime --model models_export`` needs neither Paddle
nor paddle2onnx (``pip install "palm-pipeline[onnx]"``). This module imports them only inside
the functions that need them.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
from pathlib import Path

import numpy as np

from palm.core.errors import DataError, RunError
from palm.core.runtime import machine_share
from palm.nn.card import ModelFiles, open_model
from palm.nn.modelinfo import input_size
from palm.serve.engine import INPUT_NAME, Engine, probabilities

ONNX_FILE = "model.onnx"
OPSET = 13  # what paddle2onnx starts from (it raises the opset when an operator needs it)
PARITY_TOL = 1e-4  # |probability(onnxruntime) - probability(eager Paddle)| allowed at export


def convert(model_dir: str | Path, out_file: str | Path) -> Path:
    """``model_dir``'s exported Paddle model (``inference.json``/``.pdiparams``) as ONNX in ``out_file``.

    paddle2onnx's own ONNX optimisation runs; its optional Polygraphy constant folding does not
    (it would pip-install packages while converting; onnxruntime folds constants when it loads
    the model). A conversion failure is a :class:`RunError` naming the operator paddle2onnx reports."""
    import paddle2onnx

    model_dir = Path(model_dir)
    log = io.StringIO()
    handler = logging.StreamHandler(log)
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        with open(os.devnull, "w") as null, contextlib.redirect_stdout(null):
            data = paddle2onnx.export(
                str(model_dir / "inference.json"),
                str(model_dir / "inference.pdiparams"),
                save_file=None,
                opset_version=OPSET,
                verbose=False,
                enable_onnx_checker=True,
            )
    except Exception as exc:  # noqa: BLE001 - paddle2onnx logs its error and then fails on its own variable
        reason = " ".join(log.getvalue().split())[:300] or f"{type(exc).__name__}: {exc}"
        raise RunError(
            f"{model_dir}: paddle2onnx {paddle2onnx.__version__} could not convert the model ({reason})"
        ) from None
    finally:
        root.removeHandler(handler)
    if not data:
        raise RunError(f"{model_dir}: paddle2onnx {paddle2onnx.__version__} returned no model")
    Path(out_file).write_bytes(data)
    return Path(out_file)


def session(onnx_model: str | Path | bytes, threads: int | None = None, name: str | Path | bytes | None = None):
    """An onnxruntime CPU session of ``onnx_model`` (a file, or its bytes as read: ``name`` is then
    the file named in messages); ``threads`` math threads, default: this run's share."""
    import onnxruntime as ort

    name = name or onnx_model
    source = onnx_model if isinstance(onnx_model, bytes) else str(onnx_model)
    options = ort.SessionOptions()
    options.intra_op_num_threads = int(threads or machine_share().threads)
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    try:
        return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 - onnxruntime's own error types for a broken file
        raise DataError(f"{name!s}: onnxruntime cannot load it ({str(exc).splitlines()[0][:200]})") from None


def _dims(arg) -> str:
    return "[" + ", ".join(str(d) if isinstance(d, int) else "N" for d in arg.shape) + "]"


def check_signature(sess, info: dict, name: str | Path | bytes) -> None:
    """The ONNX model of ``sess`` is what the export writes for the model of ``info`` (``model.json``),
    else a one-line :class:`DataError` naming ``name``: one input ``image``, float32, of shape
    [N, 3, S, S] (S = ``input_size``; each dimension checked where the model fixes it, the batch
    left free); one output, float32, [N] or [N, 1]. A batch of two blank images is then run: its
    output must be [2] or [2, 1] (what the graph declares is not what it computes; a model that
    gave [N, 2] handed rows each other's logits)."""
    size = input_size(info)
    want_in = f"one input {INPUT_NAME!r}, float32 [N, 3, {size}, {size}], and one output, float32 [N] or [N, 1]"
    ins, outs = sess.get_inputs(), sess.get_outputs()

    def refuse(what: str):
        raise DataError(f"{name!s}: {what}; the model.json beside it wants {want_in}")

    if len(ins) != 1 or len(outs) != 1:
        refuse(f"{len(ins)} input(s) ({', '.join(repr(i.name) for i in ins)}) and {len(outs)} output(s)")
    (x,), (y,) = ins, outs
    if x.name != INPUT_NAME:
        refuse(f"input {x.name!r}")
    for arg, what in ((x, "input"), (y, "output")):
        if arg.type != "tensor(float)":
            refuse(f"{what} of type {arg.type}")
    shape = list(x.shape or [])
    wanted = [None, 3, size, size]
    if (
        len(shape) != 4
        or isinstance(shape[0], int)
        or any(isinstance(d, int) and d != w for d, w in zip(shape[1:], wanted[1:]))
    ):
        refuse(f"input of shape {_dims(x)}" + (" (a fixed batch size)" if shape and isinstance(shape[0], int) else ""))
    out = list(y.shape or [])
    if len(out) not in (1, 2) or (len(out) == 2 and isinstance(out[1], int) and out[1] != 1):
        refuse(f"output of shape {_dims(y)}")
    probe = np.zeros((2, 3, size, size), np.float32)
    try:
        got = np.shape(sess.run(None, {x.name: probe})[0])
    except Exception as exc:  # noqa: BLE001 - onnxruntime's own error types
        refuse(f"it cannot run a batch of 2 ({str(exc).splitlines()[0][:160]})")
    if got not in ((2,), (2, 1)):
        refuse(f"output of shape {list(got)} for a batch of 2")


def engine_of(
    onnx_model: str | Path | bytes,
    threads: int | None = None,
    info: dict | None = None,
    name: str | Path | bytes | None = None,
) -> Engine:
    """The ONNX model of ``onnx_model`` (a file, or its bytes as read) as an
    :class:`~palm.serve.engine.Engine`, its signature checked against ``info`` (``model.json``) when given."""
    import onnxruntime as ort

    name = name or onnx_model
    sess = session(onnx_model, threads, name)
    if info is not None:
        check_signature(sess, info, name)
    input_name = sess.get_inputs()[0].name

    def run(x: np.ndarray) -> np.ndarray:
        return probabilities(sess.run(None, {input_name: x})[0], len(x))

    return Engine(run, f"onnxruntime {ort.__version__} cpu")


def onnx_engine(model_dir: str | Path, check: bool = False) -> tuple[Engine, dict]:
    """The ONNX model of an exported folder (``model.onnx``) and its ``model.json``, each read
    once (:func:`palm.nn.card.open_model`; ``check``: against the folder's model card)."""
    files = open_model(model_dir, read=(ONNX_FILE,), check=check)
    return engine_of_files(files), files.info


def engine_of_files(files: ModelFiles) -> Engine:
    """The ONNX model of ``files`` (read by :func:`palm.nn.card.open_model`), run from the bytes that
    were read and hashed, its signature checked against their ``model.json`` (:func:`check_signature`)."""
    if ONNX_FILE not in files.data:
        raise DataError(
            f"{files.given}: no {ONNX_FILE}; the onnxruntime engine runs the exported model "
            "(--model models_export, written by dvc repro export)"
        )
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        raise DataError('the onnxruntime engine needs onnxruntime: pip install "palm-pipeline[onnx]"') from None
    return engine_of(files.data[ONNX_FILE], info=files.info, name=files.path(ONNX_FILE))


def max_difference(onnx_file: str | Path, reference, x: np.ndarray, info: dict | None = None) -> float:
    """The largest |probability| difference between ``onnx_file`` (onnxruntime) and ``reference``
    (an engine, e.g. eager Paddle) on the batch ``x``, also for a batch of one (another shape);
    with ``info`` (``model.json``), the signature is checked first (:func:`check_signature`)."""
    onnx = engine_of(onnx_file, info=info)
    diff = np.abs(onnx(x) - reference(x)).max()
    return float(max(diff, np.abs(onnx(x[:1]) - reference(x[:1])).max()))
