"""The ``export`` stage: the trained model as a Paddle Inference model (``paddle.jit.save``).

Writes ``models_export/inference.*`` (graph and weights, in the format :mod:`palm.serve.inference`
owns: what its Paddle Inference engine runs, also loadable by ``paddle.jit.load``) and a copy
of ``model.json``; ``palm predict --model models_export`` runs from it.
"""

from __future__ import annotations

from pathlib import Path

from palm.nn.artifact import load
from palm.nn.modelinfo import input_size, write_info
from palm.fsutil import atomic_dir
from palm.serve.inference import save
from palm.runtime import configured_device, select_device
from palm.nn.weights import check_export_dir

EXPORT_DIR = Path("models_export")


def export(model_dir="models", out_dir=EXPORT_DIR, device: str = "auto") -> Path:
    select_device(device)
    model, info = load(model_dir)
    with atomic_dir(out_dir) as tmp:
        save(model, input_size(info), tmp)
        check_export_dir(tmp)  # the Paddle 3 format (JSON program + raw weights), nothing pickled
        write_info(tmp, info)
    return Path(out_dir)


def main(params: dict) -> None:
    out = export(device=configured_device(params))
    print(f"exported the inference model to {out}/")
