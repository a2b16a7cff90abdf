"""The ``evaluate`` stage: predicts the validation set with the saved model and scores it.

Writes ``metrics/predictions.csv`` (image, label, probability, predicted) and computes
every number in ``metrics/eval.json`` from that file with :func:`palm.evaluation.metrics.score`
(intervals, calibration, operating characteristics), so the reported figures are exactly
those of the saved predictions. The operating threshold is the one ``models/model.json``
stores (chosen at training time, never on the validation set). ROC and precision-recall
curves, the confusion matrix and the reliability diagram go to ``metrics/eval/plots``
(dvclive), the histogram of PM probabilities per class to
``metrics/eval/plots/histogram.json``, for ``dvc plots show``. The three outputs are written all
or none (:func:`palm.core.fsutil.atomic_outputs`).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
from dvclive import Live

from palm.core.fsutil import atomic_outputs, writing
from palm.core.params import TTA_MODES
from palm.core.runtime import configured_device, select_device
from palm.data.dataset import load_split
from palm.data.image import to_chw_float
from palm.evaluation.metrics import DEFAULT_PREVALENCE, ECE_BINS, N_BOOT, score
from palm.nn.modelinfo import fundus, input_size, threshold, tta
from palm.serve.inference import load_engine
from palm.serve.tta import MAX_VIEW_BATCH, N_VIEWS, combine, view_probabilities

PREDICTIONS = Path("metrics/predictions.csv")
EVAL_JSON = Path("metrics/eval.json")
EVAL_PLOTS = Path("metrics/eval")
HISTOGRAM = EVAL_PLOTS / "plots" / "histogram.json"
HIST_BINS = 20


def predict_valid(shards_dir: str | Path, model_dir: str | Path, batch_size: int = 32, device: str = "auto"):
    """The trained model of ``model_dir`` on the ``valid`` split of ``shards_dir``, as the model
    takes it (enhanced as it was trained, resized to its input size): ``(split, probabilities, model info)``. Scored by
    :func:`palm.serve.inference.load_engine` (Paddle Inference; eager Paddle if it cannot run),
    with the model's test-time augmentation (``model.json``'s ``tta``, :mod:`palm.serve.tta`)."""
    valid, by_mode, info = predict_valid_modes(shards_dir, model_dir, (), batch_size, device)
    return valid, by_mode[tta(info)], info


def predict_valid_modes(
    shards_dir: str | Path, model_dir: str | Path, modes=TTA_MODES, batch_size: int = 32, device: str = "auto"
):
    """As :func:`predict_valid`, the probabilities under each test-time augmentation of ``modes``
    and the model's own, from one pass over the views: ``(split, {mode: probabilities}, info)``."""
    engine, info = load_engine(model_dir, device=device)
    modes = list(dict.fromkeys([*modes, tta(info)]))
    n = max(N_VIEWS[m] for m in modes)
    valid = load_split(shards_dir, "valid", size=input_size(info), fundus=fundus(info))
    views = [
        view_probabilities(
            engine, to_chw_float(valid.pixels[i : i + batch_size]), n, max(MAX_VIEW_BATCH, batch_size)
        )  # off: one call per batch, as ever
        for i in range(0, len(valid), batch_size)
    ]
    per_view = np.concatenate(views, axis=1) if views else np.zeros((n, 0), np.float32)
    return valid, {m: combine(per_view, m) for m in modes}, info


def probability_histogram(labels, probs, n_bins: int = HIST_BINS) -> list[dict]:
    """Rows (bin centre, number of PM and of non-PM images) of the PM probabilities, ``n_bins``
    equal bins of [0, 1]: how well the classes separate and where the threshold cuts."""
    labels = np.asarray(labels).astype(int)
    edges = np.linspace(0, 1, n_bins + 1)
    pm, _ = np.histogram(np.asarray(probs)[labels == 1], bins=edges)
    non, _ = np.histogram(np.asarray(probs)[labels == 0], bins=edges)
    return [
        {"probability": round(float(c), 4), "PM": int(a), "non_PM": int(b)}
        for c, a, b in zip((edges[:-1] + edges[1:]) / 2, pm, non)
    ]


def evaluate(
    shards_dir: str | Path = "data/shards",
    model_dir: str | Path = "models",
    batch_size: int = 32,
    prevalence: float = DEFAULT_PREVALENCE,
    n_boot: int = N_BOOT,
    device: str = "auto",
) -> dict:
    select_device(device)

    valid, probs, info = predict_valid(shards_dir, model_dir, batch_size, device)
    cut = threshold(info)
    preds = pd.DataFrame(
        {
            "image": valid.images,
            "label": valid.labels,
            "probability": probs.round(6),
            "predicted": (probs >= cut).astype(int),
        }
    )
    # the three outputs are staged beside their targets and put in place together: a failure
    # anywhere leaves the previous ones as they were, never a new predictions.csv beside an old eval.json
    with atomic_outputs() as out:
        with out.open(PREDICTIONS, newline="") as f:
            preds.to_csv(f, index=False)

        saved = pd.read_csv(out.staged(PREDICTIONS))  # the reported numbers come from the saved file
        metrics = {
            "model": info["model"],
            "threshold_rule": str(info.get("threshold_rule", cut)),
            **score(saved["label"], saved["probability"], cut, prevalence=prevalence, n_boot=n_boot),
        }
        with out.open(EVAL_JSON) as f:
            json.dump(metrics, f, indent=1)

        plots = out.dir(EVAL_PLOTS)
        y, p = saved["label"].to_numpy(), saved["probability"].to_numpy()
        live = Live(str(plots), dvcyaml=False, save_dvc_exp=False)
        live.log_sklearn_plot("roc", y, p, name="roc.json")
        live.log_sklearn_plot("precision_recall", y, p, name="precision_recall.json")
        live.log_sklearn_plot("calibration", y, p, name="calibration.json", n_bins=ECE_BINS)  # metrics.calibration_bins
        live.log_sklearn_plot("confusion_matrix", y, saved["predicted"].to_numpy(), name="confusion_matrix.json")
        live.end()
        histogram = plots / HISTOGRAM.relative_to(EVAL_PLOTS)
        histogram.parent.mkdir(parents=True, exist_ok=True)
        with writing(HISTOGRAM), open(histogram, "w") as f:
            json.dump(probability_histogram(y, p), f, indent=1)
    return metrics


def main(params: dict) -> None:
    cfg = params["evaluate"]
    m = evaluate(
        batch_size=cfg["batch_size"],
        prevalence=cfg["prevalence"],
        n_boot=cfg["bootstrap"],
        device=configured_device(params),
    )
    print(json.dumps(m, indent=1))
