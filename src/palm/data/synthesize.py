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

from palm.core.fsutil import atomic_dir
from palm.data.synthetic import generate

SYNTHETIC_DIR = Path("data/synthetic")


def main(params: dict) -> None:
    source, data_input = params["data"]["source"], Path(params["data"]["input"])
    cfg = params.get("synthetic", {}) or {}
    if source != "palm" or os.path.normpath(data_input) != os.path.normpath(SYNTHETIC_DIR):
        with atomic_dir(SYNTHETIC_DIR) as tmp:
            (tmp / "SKIPPED.txt").write_text(
                f"data.source is {source}, data.input is {data_input}: the synthetic data set is not generated.\n"
            )
        print(f"data.source = {source}, data.input = {data_input}: synthetic data not needed, skipped")
        return
    with atomic_dir(SYNTHETIC_DIR) as tmp:  # cfg: generate's arguments, checked by palm.core.params.SyntheticParams
        generate(tmp, **cfg)
    print(f"wrote synthetic PALM zips to {SYNTHETIC_DIR}")
