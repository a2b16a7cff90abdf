"""The ``evaluate`` stage: predicts the validation set with the saved model and scores it.

Writes ``metrics/predictions.csv`` (image, label, probability, predicted) and computes
every number in ``metrics/eval.json`` from that file, so the reported figures are exactly
those of the saved predictions. ROC curve and confusion matrix go to
``metrics/eval/plots`` (dvclive) for ``dvc plots show``.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd

from palm.errors import DataError
from palm.fsutil import atomic_file

PREDICTIONS = Path("metrics/predictions.csv")
EVAL_JSON = Path("metrics/eval.json")
EVAL_PLOTS = Path("metrics/eval")


def load_trained(model_dir: str | Path = "models"):
    """The saved model in eval mode, and its ``model.json``: one-line errors for a bad folder."""
    from palm.models import build_model, model_names
    from palm.weights import check_model_dir, load_state

    model_dir = Path(model_dir)
    info = read_model_info(model_dir)
    weights = load_state(check_model_dir(model_dir))
    if info["model"] not in model_names():
        raise DataError(f"{model_dir}/model.json: unknown model {info['model']!r} "
                        f"(known: {', '.join(model_names())})")
    model = build_model(info["model"], image_size=input_size(info))
    expected = model.state_dict()
    wrong = [k for k, v in expected.items() if k not in weights or list(weights[k].shape) != list(v.shape)]
    if wrong or set(weights) - set(expected):
        raise DataError(f"{model_dir}: the weights do not fit a {info['model']} at {input_size(info)} px "
                        f"({len(wrong)} missing or of another shape, {len(set(weights) - set(expected))} unknown)")
    model.set_state_dict(weights)
    model.eval()
    return model, info


def read_model_info(model_dir: str | Path) -> dict:
    """``model_dir/model.json``, checked: a one-line error naming the file when it is missing or broken."""
    path = Path(model_dir) / "model.json"
    if not path.is_file():
        raise DataError(f"{model_dir}: no model.json; train a model first (dvc repro) or give --model DIR")
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(info, dict) or not isinstance(info.get("model"), str):
            raise ValueError("no 'model' name")
        size = int(info.get("input_size") or info["image_size"])
        if not (int(info["image_size"]) >= 1 and size >= 1):
            raise ValueError("sizes must be positive")
        float(info.get("threshold", 0.5))
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: not a valid model description ({type(exc).__name__}: {exc})") from None
    return info


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


def predict_valid(shards_dir: str | Path, model_dir: str | Path, batch_size: int = 32):
    """The trained model of ``model_dir`` on the ``valid`` split of ``shards_dir``, resized to
    the model's input size: ``(split, probabilities, model info)``."""
    from palm.dataset import FundusDataset, load_split, make_loader
    from palm.train import predict_probs

    model, info = load_trained(model_dir)
    valid = load_split(shards_dir, "valid", size=input_size(info))
    probs = predict_probs(model, make_loader(FundusDataset(valid), batch_size, shuffle=False), contextlib.nullcontext)
    return valid, probs, info


def evaluate(shards_dir: str | Path = "data/shards", model_dir: str | Path = "models", batch_size: int = 32,
             device: str = "auto") -> dict:
    from dvclive import Live

    from palm.runtime import select_device

    select_device(device)

    valid, probs, info = predict_valid(shards_dir, model_dir, batch_size)
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

    m = evaluate(batch_size=params["evaluate"]["batch_size"], device=configured_device(params))
    print(json.dumps(m, indent=1))
