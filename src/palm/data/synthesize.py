"""The ``synthesize`` stage: writes the embedded default data set to ``data/synthetic``.

It generates the three PALM zips (see :mod:`palm.data.synthetic`) only when the pipeline reads
its zips from ``data/synthetic`` (``data.source: palm`` and ``data.input: data/synthetic`` in
params.yaml, the default). When a user points ``data.input`` at the real download, or sets
``data.source: folder`` (their own photographs), it writes just a note, so that real data
never waits for synthetic images.
"""

from __future__ import annotations

import os
from pathlib import Path

from palm.errors import DataError
from palm.fsutil import atomic_dir
from palm.data.synthetic import generate

SYNTHETIC_DIR = Path("data/synthetic")
COUNT_KEYS = ("n_train_p", "n_train_n", "n_train_h", "n_val_pm", "n_val_non_pm")


def main(params: dict) -> None:
    source, data_input = params["data"]["source"], Path(params["data"]["input"])
    cfg = params.get("synthetic", {}) or {}
    if source != "palm" or os.path.normpath(data_input) != os.path.normpath(SYNTHETIC_DIR):
        with atomic_dir(SYNTHETIC_DIR) as tmp:
            (tmp / "SKIPPED.txt").write_text(
                f"data.source is {source}, data.input is {data_input}: the synthetic data set is not generated.\n")
        print(f"data.source = {source}, data.input = {data_input}: synthetic data not needed, skipped")
        return
    unknown = set(cfg) - {"seed", "scale", "jpeg_quality", *COUNT_KEYS}
    if unknown:
        raise DataError(f"params.yaml synthetic: unknown key(s) {', '.join(sorted(unknown))}")
    kwargs = {k: cfg[k] for k in cfg}
    with atomic_dir(SYNTHETIC_DIR) as tmp:
        generate(tmp, **kwargs)
    print(f"wrote synthetic PALM zips to {SYNTHETIC_DIR}")
