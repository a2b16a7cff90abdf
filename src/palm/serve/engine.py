"""What every inference engine is (Paddle Inference, eager Paddle, onnxruntime): a callable
from a float32 NCHW batch to PM probabilities. Imports no Paddle: the ONNX-only install uses it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np


@dataclass
class Engine:
    """A model ready to score batches: ``engine(x)`` -> probabilities (N,), float32 NCHW ``x``."""

    run: Callable[[np.ndarray], np.ndarray]
    name: str                            # e.g. "paddle-inference cpu onednn fp32", "eager cpu", "onnxruntime cpu"

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return self.run(np.ascontiguousarray(x, dtype=np.float32))


def sigmoid(logits: np.ndarray) -> np.ndarray:
    """Logits (N, 1) -> probabilities (N,), float32 (tanh form: no overflow for large logits)."""
    z = np.asarray(logits, dtype=np.float64).reshape(-1)
    return (0.5 * (1.0 + np.tanh(0.5 * z))).astype(np.float32)
