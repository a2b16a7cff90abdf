"""The ``evaluate`` stage: predicts the validation set with the saved model and scores it.

Writes ``metrics/predictions.csv`` (image, label, probability, predicted) and computes
every number in ``metrics/eval.json`` from that file, so the reported figures are exactly
those of the saved predictions. ROC curve and confusion matrix go to
``metrics/eval/plots`` (dvclive) for ``dvc plots show``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd

from palm.fsutil import atomic_file

PREDICTIONS = Path("metrics/predictions.csv")
EVAL_JSON = Path("metrics/eval.json")
EVAL_PLOTS = Path("metrics/eval")


def load_trained(model_dir: str | Path = "models"):
    """The saved model in eval mode, and its ``model.json``."""
    import paddle

    from palm.models import build_model

    model_dir = Path(model_dir)
    info = json.loads((model_dir / "model.json").read_text())
    model = build_model(info["model"], image_size=input_size(info))
    model.set_state_dict(paddle.load(str(model_dir / "model.pdparams")))
    model.eval()
    return model, info


def input_size(info: dict) -> int:
    """The side of the images the model takes (``model.json``; older files: ``image_size``)."""
    return int(info.get("input_size") or info["image_size"])


def score(labels, probs, threshold: float) -> dict:
    """All reported metrics, from labels and predicted probabilities."""
    from sklearn.metrics import confusion_matrix, f1_score, log_loss, precision_score, recall_score, roc_auc_score

    labels = np.asarray(labels).astype(int)
    probs = np.asarray(probs, dtype=np.float64)
    pred = (probs >= threshold).astype(int)
    tn, fp, fn, tp = confusion_matrix(labels, pred, labels=[0, 1]).ravel()
    both = len(set(labels.tolist())) == 2
    return {
        "accuracy": float((pred == labels).mean()),
        "auc": float(roc_auc_score(labels, probs)) if both else None,
        "precision": float(precision_score(labels, pred, zero_division=0)),
        "sensitivity": float(recall_score(labels, pred, zero_division=0)),
        "specificity": float(tn / (tn + fp)) if tn + fp else None,
        "f1": float(f1_score(labels, pred, zero_division=0)),
        "loss": float(log_loss(labels, np.clip(probs, 1e-7, 1 - 1e-7), labels=[0, 1])),
        "n": int(len(labels)),
        "threshold": float(threshold),
        "tp": int(tp), "fp": int(fp), "tn": int(tn), "fn": int(fn),
    }


def predict_valid(shards_dir: str | Path, model_dir: str | Path, batch_size: int = 32, device: str = "auto"):
    """The trained model of ``model_dir`` on the ``valid`` split of ``shards_dir``, resized to
    the model's input size: ``(split, probabilities, model info)``. Scored by
    :func:`palm.inference.load_engine` (Paddle Inference; eager Paddle if it cannot run)."""
    from palm.dataset import load_split
    from palm.image import to_chw_float
    from palm.inference import load_engine

    engine, info = load_engine(model_dir, device=device)
    valid = load_split(shards_dir, "valid", size=input_size(info))
    probs = [engine(to_chw_float(valid.pixels[i:i + batch_size])) for i in range(0, len(valid), batch_size)]
    return valid, np.concatenate(probs) if probs else np.zeros(0, np.float32), info


def evaluate(shards_dir: str | Path = "data/shards", model_dir: str | Path = "models", batch_size: int = 32,
             device: str = "auto") -> dict:
    from dvclive import Live

    from palm.runtime import select_device

    select_device(device)

    valid, probs, info = predict_valid(shards_dir, model_dir, batch_size, device)
    threshold = float(info.get("threshold", 0.5))
    preds = pd.DataFrame({"image": valid.images, "label": valid.labels, "probability": probs.round(6),
                          "predicted": (probs >= threshold).astype(int)})
    with atomic_file(PREDICTIONS, newline="") as f:
        preds.to_csv(f, index=False)

    saved = pd.read_csv(PREDICTIONS)  # the reported numbers come from the saved file
    metrics = {"model": info["model"], **score(saved["label"], saved["probability"], threshold)}
    with atomic_file(EVAL_JSON) as f:
        json.dump(metrics, f, indent=1)

    shutil.rmtree(EVAL_PLOTS, ignore_errors=True)
    live = Live(str(EVAL_PLOTS), dvcyaml=False, save_dvc_exp=False)
    live.log_sklearn_plot("roc", saved["label"].to_numpy(), saved["probability"].to_numpy(), name="roc.json")
    live.log_sklearn_plot("confusion_matrix", saved["label"].to_numpy(), saved["predicted"].to_numpy(),
                          name="confusion_matrix.json")
    live.end()
    return metrics


def main(params: dict) -> None:
    from palm.runtime import configured_device

    m = evaluate(batch_size=int((params.get("evaluate") or {}).get("batch_size", 32)),
                 device=configured_device(params))
    print(json.dumps(m, indent=1))
