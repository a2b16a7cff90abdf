"""K-fold cross-validation of a training recipe on the TRAINING images only.

For choosing defaults (``params.yaml``) without looking at the validation set: the training
split of the shards (or several splits pooled, ``splits``: when the "validation" split is itself a
sample of labelled training photographs, as palm-mini's is) is cut into ``k`` folds, stratified by group (H / N / P); for each fold
the recipe (``Trainer``, exactly as the ``train`` stage runs it, its own internal holdout
included) learns from the other folds and predicts this one. Every training image is
predicted once, by a network that never saw it, and the pooled out-of-fold predictions
are scored with :func:`palm.evaluation.metrics.score`: ~300 images instead of one 45-image holdout.
The same fold networks also predict under every test-time augmentation (:mod:`palm.serve.tta`):
the CSV's ``probability_<mode>`` columns and the summary's ``tta`` scores compare the modes paired,
without training again (``probability`` is the configured mode's).

``scripts/cross_validate.py`` is the command line.
"""

from __future__ import annotations

import copy
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from palm.core.errors import DataError
from palm.core.params import DEFAULT_THRESHOLD, TTA_MODES
from palm.data.dataset import Split, load_split
from palm.data.shards import SplitWriter, new_manifest, open_split, read_manifest, write_manifest
from palm.data.splits import fold_of
from palm.evaluation.evaluate import predict_valid_modes
from palm.evaluation.metrics import score
from palm.nn.modelinfo import tta
from palm.training.train import Trainer

FOLD_SHARD_SIZE = 256


def write_fold_shards(full: Split, folds: np.ndarray, fold: int, out_dir: Path, image_size: int) -> Path:
    """Shards whose ``train`` split is every other fold and whose ``valid`` split is ``fold``,
    copied a shard's worth at a time (:class:`palm.data.shards.SplitWriter`)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    manifest = new_manifest(image_size, {"image_size": image_size, "fold": fold})
    for name, part in (
        ("train", full.subset(np.flatnonzero(folds != fold))),
        ("valid", full.subset(np.flatnonzero(folds == fold))),
    ):
        writer = SplitWriter(out_dir, manifest, name, FOLD_SHARD_SIZE)
        for start in range(0, len(part), FOLD_SHARD_SIZE):
            chunk = part.subset(np.arange(start, min(start + FOLD_SHARD_SIZE, len(part))))
            writer.write(chunk.pixels[:], chunk.images, chunk.labels, chunk.groups)
        writer.close()
    write_manifest(out_dir, manifest)
    return out_dir


def pooled_split(shards_dir: str | Path, splits: tuple[str, ...]) -> Split:
    """The images of ``splits`` together, in that order (one split: :func:`load_split`)."""
    if len(splits) == 1:
        return load_split(shards_dir, splits[0])
    manifest = read_manifest(shards_dir)
    for name in splits:
        if name not in manifest["splits"]:
            raise DataError(f"{shards_dir}: no split {name!r} (have {', '.join(manifest['splits'])})")
    pooled = {"shards": [s for name in splits for s in manifest["splits"][name]["shards"]]}
    manifest = {**manifest, "splits": {**manifest["splits"], "+".join(splits): pooled}}
    full = Split(*open_split(shards_dir, "+".join(splits), manifest))
    if len(set(full.images)) != len(full.images):
        raise DataError(f"{shards_dir}: the splits {', '.join(splits)} share image names; cannot pool them")
    return full


def cross_validate(
    params: dict,
    shards_dir: str | Path = "data/shards",
    k: int = 3,
    seed: int = 0,
    work_dir: str | Path | None = None,
    splits: tuple[str, ...] = ("train",),
) -> tuple[pd.DataFrame, dict]:
    """Out-of-fold predictions (image, group, label, fold, probability) and their scores."""
    full = pooled_split(shards_dir, tuple(splits))
    folds = fold_of(full.labels, full.groups, k, seed)
    rows, runs = [], []
    with tempfile.TemporaryDirectory(dir=work_dir) as tmp:
        for fold in range(k):
            print(
                f"== fold {fold + 1}/{k}: learning from {int((folds != fold).sum())} images, "
                f"predicting {int((folds == fold).sum())}"
            )
            fold_dir = write_fold_shards(full, folds, fold, Path(tmp) / f"fold{fold}", full.pixels.shape[1])
            run_dir = Path(tmp) / f"run{fold}"
            Trainer(params, fold_dir).run(run_dir / "models", run_dir / "checkpoints", run_dir / "live")
            # as the evaluate stage predicts (the configured tta), and under every tta mode: the same networks
            held, by_mode, info = predict_valid_modes(fold_dir, run_dir / "models")
            columns = {"probability": by_mode[tta(info)], **{f"probability_{m}": by_mode[m] for m in TTA_MODES}}
            rows += [
                {
                    "image": img,
                    "group": g,
                    "label": int(lab),
                    "fold": fold,
                    **{c: round(float(p[i]), 6) for c, p in columns.items()},
                }
                for i, (img, g, lab) in enumerate(zip(held.images, held.groups, held.labels))
            ]
            runs.append(
                {"fold": fold, "selected_epoch": info["selected_epoch"], "train_seconds": info["train_seconds"]}
            )
            shutil.rmtree(run_dir, ignore_errors=True)
            shutil.rmtree(fold_dir, ignore_errors=True)
    oof = pd.DataFrame(rows)
    scores = score(oof["label"], oof["probability"], DEFAULT_THRESHOLD)
    summary = {
        "folds": k,
        "fold_seed": seed,
        "splits": list(splits),
        "images": len(oof),
        **scores,
        "errors": scores["fp"] + scores["fn"],
        "runs": runs,
        "tta": {m: score(oof["label"], oof[f"probability_{m}"], DEFAULT_THRESHOLD) for m in TTA_MODES},
    }
    return oof, summary


def apply_overrides(params: dict, items: list[str]) -> dict:
    """``params`` with ``key.sub=value`` items set (values read as YAML), as ``dvc exp run -S``."""
    params = copy.deepcopy(params)
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise DataError(f"expected KEY=VALUE, got {item!r}")
        *path, last = key.split(".")
        node = params
        for part in path:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise DataError(f"{item!r}: {part} is not a section of params.yaml")
        parsed = yaml.safe_load(value)
        if isinstance(parsed, str):  # YAML 1.1 reads 3e-4 as text; dvc's YAML 1.2 as a number
            try:
                parsed = float(parsed)
            except ValueError:
                pass
        node[last] = parsed
    return params
