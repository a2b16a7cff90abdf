"""What every inference engine is (Paddle Inference, eager Paddle, onnxruntime): a callable
from a float32 NCHW batch to PM probabilities. Imports no Paddle: the ONNX-only install uses it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from palm.core.errors import RunError

INPUT_NAME = "image"  # the network's one input, as the export names it (float32 NCHW)


@dataclass
class Engine:
    """A model ready to score batches: ``engine(x)`` -> probabilities (N,), float32 NCHW ``x``."""

    run: Callable[[np.ndarray], np.ndarray]
    name: str  # e.g. "paddle-inference cpu onednn fp32", "eager cpu", "onnxruntime cpu"

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return self.run(np.ascontiguousarray(x, dtype=np.float32))


def sigmoid(logits: np.ndarray) -> np.ndarray:
    """Logits (N, 1) -> probabilities (N,), float32 (tanh form: no overflow for large logits)."""
    z = np.asarray(logits, dtype=np.float64).reshape(-1)
    return (0.5 * (1.0 + np.tanh(0.5 * z))).astype(np.float32)


def probabilities(logits, n: int) -> np.ndarray:
    """The probabilities (N,) of a batch of ``n`` images from an engine's logits, which must be
    ``(n,)`` or ``(n, 1)``: any other shape (``(n, 2)``, ``(1,)``...) is a :class:`RunError`, never
    reshaped into rows that belong to other images."""
    shape = tuple(np.shape(logits))
    if shape not in ((n,), (n, 1)):
        raise RunError(
            f"the network gave logits of shape {list(shape)} for {n} image(s), not [{n}] or [{n}, 1]: "
            "not a PM classifier of this project's export"
        )
    return sigmoid(logits)
