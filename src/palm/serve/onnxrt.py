"""The model as ONNX: converted from the exported Paddle model (paddle2onnx), run by onnxruntime.

The ``export`` stage writes ``models_export/model.onnx`` with :func:`convert` (from
``inference.json`` + ``inference.pdiparams``, Paddle 3's program format) and checks it
against eager Paddle (:func:`max_difference`). :func:`onnx_engine` runs it with onnxruntime
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
from palm.nn import modelinfo
from palm.core.runtime import machine_share
from palm.serve.engine import Engine, sigmoid

ONNX_FILE = "model.onnx"
OPSET = 13                 # what paddle2onnx starts from (it raises the opset when an operator needs it)
PARITY_TOL = 1e-4          # |probability(onnxruntime) - probability(eager Paddle)| allowed at export


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
            data = paddle2onnx.export(str(model_dir / "inference.json"), str(model_dir / "inference.pdiparams"),
                                      save_file=None, opset_version=OPSET, verbose=False, enable_onnx_checker=True)
    except Exception as exc:  # noqa: BLE001 - paddle2onnx logs its error and then fails on its own variable
        reason = " ".join(log.getvalue().split())[:300] or f"{type(exc).__name__}: {exc}"
        raise RunError(f"{model_dir}: paddle2onnx {paddle2onnx.__version__} could not convert the model ({reason})") \
            from None
    finally:
        root.removeHandler(handler)
    if not data:
        raise RunError(f"{model_dir}: paddle2onnx {paddle2onnx.__version__} returned no model")
    Path(out_file).write_bytes(data)
    return Path(out_file)


def session(onnx_file: str | Path, threads: int | None = None):
    """An onnxruntime CPU session of ``onnx_file`` (``threads`` math threads; default: this run's share)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = int(threads or machine_share().threads)
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    try:
        return ort.InferenceSession(str(onnx_file), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 - onnxruntime's own error types for a broken file
        raise DataError(f"{onnx_file}: onnxruntime cannot load it ({str(exc).splitlines()[0][:200]})") from None


def engine_of(onnx_file: str | Path, threads: int | None = None) -> Engine:
    """The ONNX model of ``onnx_file`` as an :class:`~palm.serve.engine.Engine`."""
    import onnxruntime as ort

    sess = session(onnx_file, threads)
    name = sess.get_inputs()[0].name

    def run(x: np.ndarray) -> np.ndarray:
        return sigmoid(sess.run(None, {name: x})[0])

    return Engine(run, f"onnxruntime {ort.__version__} cpu")


def onnx_engine(model_dir: str | Path) -> tuple[Engine, dict]:
    """The ONNX model of an exported folder (``model.onnx``) and its ``model.json``."""
    info = modelinfo.read_info(model_dir)
    onnx_file = Path(model_dir) / ONNX_FILE
    if not onnx_file.is_file():
        raise DataError(f"{model_dir}: no {ONNX_FILE}; the onnxruntime engine runs the exported model "
                        "(--model models_export, written by dvc repro export)")
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        raise DataError("the onnxruntime engine needs onnxruntime: pip install \"palm-pipeline[onnx]\"") from None
    return engine_of(onnx_file), info


def max_difference(onnx_file: str | Path, reference, x: np.ndarray) -> float:
    """The largest |probability| difference between ``onnx_file`` (onnxruntime) and ``reference``
    (an engine, e.g. eager Paddle) on the batch ``x``, also for a batch of one (another shape)."""
    onnx = engine_of(onnx_file)
    diff = np.abs(onnx(x) - reference(x)).max()
    return float(max(diff, np.abs(onnx(x[:1]) - reference(x[:1])).max()))
