"""The ``synthesize`` stage: writes the embedded default data set to ``data/synthetic``.

It generates the three PALM zips (see :mod:`palm.synthetic`) only when the pipeline reads
its zips from ``data/synthetic`` (``data.zips_dir`` in params.yaml, the default). When a
user points ``data.zips_dir`` at the real download, it writes just a note, so that real
data never waits for synthetic images.
"""

from __future__ import annotations

import os
from pathlib import Path

from palm.errors import DataError
from palm.fsutil import atomic_dir
from palm.synthetic import generate

SYNTHETIC_DIR = Path("data/synthetic")
COUNT_KEYS = ("n_train_p", "n_train_n", "n_train_h", "n_val_pm", "n_val_non_pm")


def main(params: dict) -> None:
    zips_dir = Path(params["data"]["zips_dir"])
    cfg = params.get("synthetic", {}) or {}
    if os.path.normpath(zips_dir) != os.path.normpath(SYNTHETIC_DIR):
        with atomic_dir(SYNTHETIC_DIR) as tmp:
            (tmp / "SKIPPED.txt").write_text(
                f"data.zips_dir is {zips_dir}: the synthetic data set is not generated.\n")
        print(f"data.zips_dir = {zips_dir}: synthetic data not needed, skipped")
        return
    unknown = set(cfg) - {"seed", "scale", "jpeg_quality", *COUNT_KEYS}
    if unknown:
        raise DataError(f"params.yaml synthetic: unknown key(s) {', '.join(sorted(unknown))}")
    kwargs = {k: cfg[k] for k in cfg}
    with atomic_dir(SYNTHETIC_DIR) as tmp:
        generate(tmp, **kwargs)
    print(f"wrote synthetic PALM zips to {SYNTHETIC_DIR}")
