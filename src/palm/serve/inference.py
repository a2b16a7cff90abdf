"""The fast inference path: a trained model run through Paddle Inference (``paddle.inference``).

This module owns the exported inference model (``paddle.jit.save`` output, written by the
``export`` stage with :func:`save`: ``inference.json`` + ``inference.pdiparams`` in Paddle 3; the
older pickled ``inference.pdmodel`` format is refused by :func:`palm.nn.weights.check_export_dir`)
and the engines that run a model:

| engine | where | what |
|---|---|---|
| ``paddle-inference`` | CPU | oneDNN, one thread per core of this run (``palm.core.runtime``); ``bf16``: oneDNN bfloat16 |
| ``paddle-inference`` | GPU | CUDA, through TensorRT (fp32) when this Paddle is built with it |
| ``eager`` | any | ``layer(x)`` in eager Paddle: the fallback, and the reference of the parity tests |

``load_engine`` picks ``paddle-inference`` by default, for an exported model and for a
``models/`` folder of weights alike (the weights are exported to a temporary folder first:
about 0.2 s for SE-ResNet18); when Paddle Inference cannot be built it says why on stderr and
falls back to eager (which builds the network again: only on that rare path). Every engine maps a float32 NCHW
batch to PM probabilities (N,), and refuses logits of another shape than (N,) or (N, 1).

The folder is read once (:func:`palm.nn.card.open_model`): every engine runs from the bytes that
were hashed (written to a private temporary folder for Paddle Inference, which reads files),
never from the folder again.
"""

from __future__ import annotations

import contextlib
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import paddle
import paddle.inference as pi

from palm.core.errors import DataError
from palm.core.runtime import machine_share, select_device
from palm.nn import artifact, modelinfo
from palm.nn.card import ModelFiles, open_model
from palm.nn.models import main_logits
from palm.nn.weights import MODEL_WEIGHTS, check_export_dir
from palm.serve.engine import INPUT_NAME, Engine, probabilities, sigmoid  # noqa: F401 (sigmoid: benchmarks)

PREFIX = "inference"  # models_export/inference.json + inference.pdiparams
EXPORT_FILES = (PREFIX + ".json", PREFIX + ".pdiparams")
ENGINES = ("auto", "paddle-inference", "eager")
PRECISIONS = ("fp32", "bf16")
GPU_MEMORY_MB = 256  # initial GPU memory pool of a Paddle Inference predictor
TRT_MAX_BATCH = 64


def save(layer, input_size: int, out_dir: str | Path) -> None:
    """``layer`` (eval mode) as an inference model in ``out_dir`` (batch size left free)."""
    layer.eval()
    spec = [paddle.static.InputSpec([None, 3, input_size, input_size], "float32", name=INPUT_NAME)]
    paddle.jit.save(layer, str(Path(out_dir) / PREFIX), input_spec=spec)


def program_file(model_dir: str | Path) -> Path | None:
    """The exported graph in ``model_dir`` (Paddle 3's ``.json``), or None."""
    f = Path(model_dir) / (PREFIX + ".json")
    return f if f.is_file() else None


def configure(
    config,
    device: str,
    precision: str = "fp32",
    threads: int = 1,
    tensorrt: bool = False,
    input_size: int | None = None,
) -> str:
    """Set up a ``paddle.inference.Config`` for ``device`` ("cpu" or "gpu:N"); returns what it chose.

    CPU: oneDNN, ``threads`` math threads, bf16 kernels when ``precision == "bf16"``.
    GPU: CUDA on device N; with ``tensorrt`` a TensorRT fp32 engine for batches of 1 to
    ``TRT_MAX_BATCH`` images of ``input_size`` px.
    """
    if precision not in PRECISIONS:
        raise DataError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    config.disable_glog_info()
    if device.startswith("gpu"):
        if precision != "fp32":
            raise DataError(f"precision {precision} is a CPU (oneDNN) option; on the GPU use fp32")
        config.enable_use_gpu(GPU_MEMORY_MB, int(device.partition(":")[2] or 0))
        if not tensorrt:
            return f"paddle-inference {device} cuda fp32"
        config.enable_tensorrt_engine(
            workspace_size=1 << 30,
            max_batch_size=TRT_MAX_BATCH,
            min_subgraph_size=3,
            precision_mode=pi.PrecisionType.Float32,
            use_static=False,
            use_calib_mode=False,
        )
        shape = lambda n: {INPUT_NAME: [n, 3, input_size, input_size]}  # noqa: E731
        config.set_trt_dynamic_shape_info(shape(1), shape(TRT_MAX_BATCH), shape(16))
        return f"paddle-inference {device} tensorrt fp32"
    config.disable_gpu()
    config.set_cpu_math_library_num_threads(int(threads))
    config.enable_onednn()
    if precision == "bf16":
        config.enable_onednn_bfloat16()
    return f"paddle-inference cpu onednn {precision}"


def has_tensorrt() -> bool:
    """Whether this Paddle is built with TensorRT and finds its libraries."""
    try:
        return pi.get_trt_compile_version()[0] > 0 and pi.get_trt_runtime_version()[0] > 0
    except Exception:  # noqa: BLE001  (no TensorRT library on this machine)
        return False


def paddle_inference(
    model_dir: str | Path, device: str, precision: str = "fp32", threads: int = 1, input_size: int | None = None
) -> Engine:
    """A Paddle Inference predictor of the exported model in ``model_dir``."""
    prog = program_file(model_dir)
    if prog is None:
        raise DataError(f"{model_dir}: no exported inference model ({PREFIX}.json); run the export stage")
    config = pi.Config(str(prog), str(prog.with_suffix(".pdiparams")))
    name = configure(config, device, precision, threads, device.startswith("gpu") and has_tensorrt(), input_size)
    predictor = pi.create_predictor(config)
    x_in = predictor.get_input_handle(predictor.get_input_names()[0])
    y_out = predictor.get_output_handle(predictor.get_output_names()[0])

    def run(x: np.ndarray) -> np.ndarray:
        x_in.reshape(list(x.shape))
        x_in.copy_from_cpu(x)
        predictor.run()
        return probabilities(y_out.copy_to_cpu(), len(x))

    return Engine(run, name)


def eager(layer, device: str) -> Engine:
    """The network as an ordinary eager Paddle layer (the fallback and the reference)."""
    layer.eval()

    def run(x: np.ndarray) -> np.ndarray:
        with paddle.no_grad():
            logits = main_logits(layer(paddle.to_tensor(x)))
        return probabilities(logits.astype("float32").numpy(), len(x))

    return Engine(run, f"eager {device}")


def load_engine(
    model_dir: str | Path = "models", device: str = "auto", engine: str = "auto", precision: str = "fp32"
) -> tuple[Engine, dict]:
    """The trained model of ``model_dir`` (``models/`` weights or an export) ready to score
    batches, and its ``model.json``: the folder read once (:func:`open_files`), not checked
    against a model card (evaluate runs before the card is written; ``palm predict`` checks it:
    :meth:`palm.serve.predict.Predictor.load`). ``engine``: auto (Paddle Inference, eager if
    that fails), paddle-inference or eager (:func:`engine_of`)."""
    files = open_files(model_dir)
    return engine_of(files, device, engine, precision), files.info


def export_files(model_dir: str | Path) -> tuple[str, ...]:
    """The files a Paddle engine reads from ``model_dir``: the export's program and weights, or ``models/``' weights."""
    return EXPORT_FILES if is_export(model_dir) else (MODEL_WEIGHTS,)


def open_files(model_dir: str | Path, check: bool = False) -> ModelFiles:
    """``model_dir`` read once (:func:`palm.nn.card.open_model`): ``model.json`` and the files a
    Paddle engine runs, hashed (``check``: against the folder's model card)."""
    folder = Path(model_dir)
    return open_model(folder, read=export_files(folder) if folder.is_dir() else (), check=check)


def engine_of(
    files: ModelFiles, device: str = "auto", engine: str = "auto", precision: str = "fp32", layer=None
) -> Engine:
    """The model of ``files`` (read by :func:`open_files`) ready to score batches, run from the
    bytes that were read and hashed, never from the folder again. ``layer``: the eager network of
    a weights folder when the caller has built it already (:func:`palm.nn.artifact.network`).

    One path: the inference program (the export's own, or the weights exported, :func:`program`),
    written to a private temporary folder, goes to Paddle Inference; on failure, or with
    ``engine="eager"``, the network runs eagerly (:func:`eager_layer`)."""
    if engine not in ENGINES:
        raise DataError(f"engine must be one of {', '.join(ENGINES)}, got {engine!r}")
    if precision not in PRECISIONS:
        raise DataError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    device = select_device(device)
    if is_export(files.dir):
        check_export_dir(files.given)  # Paddle 3's JSON program and raw weights; older pickled formats refused
        missing = [n for n in EXPORT_FILES if n not in files.data]
        if missing:
            raise DataError(
                f"{files.given}: exported model incomplete, no {', '.join(missing)} (re-export: dvc repro export)"
            )
    if engine != "eager":
        size = modelinfo.input_size(files.info)
        try:
            with program(files, layer) as prog_dir:  # the predictor reads the files when it is created
                return paddle_inference(prog_dir, device, precision, machine_share().threads, size)
        except DataError:
            raise
        except Exception as exc:  # noqa: BLE001  (any failure of Paddle Inference: fall back, say why)
            if engine == "paddle-inference":
                raise DataError(f"{files.given}: Paddle Inference failed: {exc}") from None
            print(
                f"warning: Paddle Inference unavailable ({str(exc).splitlines()[0][:200]}); "
                "running the model in eager Paddle (slower)",
                file=sys.stderr,
            )
    return eager(eager_layer(files, layer), device)


def is_export(model_dir: str | Path) -> bool:
    """Whether ``model_dir`` holds an exported inference model (rather than ``models/`` weights)."""
    return any(p.name.startswith(PREFIX + ".") for p in Path(model_dir).iterdir())


@contextlib.contextmanager
def program(files: ModelFiles, layer=None) -> Iterator[Path]:
    """A private temporary folder (removed on exit) with the inference program of ``files``: the
    export's bytes as read, or for weights an export of the network (about 0.2 s for SE-ResNet18)."""
    with tempfile.TemporaryDirectory(prefix="palm-model-") as tmp_name:  # mode 0700: only this user
        tmp = Path(tmp_name)
        if is_export(files.dir):
            for name in EXPORT_FILES:
                (tmp / name).write_bytes(files.data[name])
        else:
            save(layer if layer is not None else artifact.network(files), modelinfo.input_size(files.info), tmp)
        yield tmp


def eager_layer(files: ModelFiles, layer=None):
    """The network of ``files`` as an eager layer in eval mode (an export's too, from its bytes as read)."""
    if layer is not None:
        return layer
    if is_export(files.dir):
        with program(files) as tmp:
            loaded = paddle.jit.load(str(tmp / PREFIX))
        loaded.eval()
        return loaded
    return artifact.network(files)
