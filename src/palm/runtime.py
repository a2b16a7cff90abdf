"""Choosing the device Paddle runs on (CPU threads are set in ``palm/__init__.py``)."""

from __future__ import annotations

import os


def select_device(device: str = "auto") -> str:
    """``auto``: a GPU when Paddle has CUDA and a GPU is present, else the CPU."""
    import paddle

    has_gpu = paddle.device.is_compiled_with_cuda() and paddle.device.cuda.device_count() > 0
    if device == "auto":
        device = "gpu" if has_gpu else "cpu"
    if device.startswith("gpu") and not has_gpu:
        from palm.errors import DataError

        raise DataError(f"device {device!r} asked for, but this Paddle has no usable GPU "
                        "(install paddlepaddle-gpu, or set train.device: cpu)")
    if device == "cpu":
        paddle.base.core.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", os.cpu_count() or 1)))
    paddle.set_device(device)
    return device
