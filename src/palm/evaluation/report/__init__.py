"""The ``report`` stage: ``metrics/report.html``, one self-contained page a person reads.

From what the earlier stages wrote (``models/model.json``, ``metrics/eval.json``,
``metrics/predictions.csv``, ``metrics/explain/*.png``, ``data/labels/labels.csv``) it
makes a single HTML file with every image embedded (base64 PNG): the model and its
parameters, the data, every metric with its 95% interval, the ROC and precision-recall
curves, the reliability diagram, the histogram of PM probabilities per class, the confusion
matrix, the most confident errors with their Grad-CAM heatmaps, and a model card (intended
use, training data, limitations). Every number of ``eval.json`` in the page carries its key
(``data-key``) so a test can check it against the file.

The page is ``templates/report.html.j2`` (Jinja2, autoescaped: every value from the files is
escaped unless the template says otherwise); this module computes what it shows.
"""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import numpy as np
import pandas as pd
from jinja2 import Environment, PackageLoader, StrictUndefined

from palm.core.errors import DataError
from palm.core.fsutil import atomic_file, read_json
from palm.evaluation.metrics import reliability_table
from palm.nn.modelinfo import read_info

REPORT = Path("metrics/report.html")
N_ERRORS = 10
#: model.json's keys in the report's summary of the model
HEAD_KEYS = (
    "model",
    "image_size",
    "input_size",
    "threshold",
    "threshold_rule",
    "selected_epoch",
    "epochs",
    "n_train",
    "n_holdout",
    "train_seconds",
    "device",
)

# (key in eval.json, what it is) of the metrics shown with their 95% interval, in this order
WITH_INTERVAL = [
    ("accuracy", "Accuracy"),
    ("sensitivity", "Sensitivity (recall of PM)"),
    ("specificity", "Specificity"),
    ("precision", "Precision (PPV) at the validation set's prevalence"),
    ("npv", "NPV at the validation set's prevalence"),
    ("ppv_at_prevalence", "PPV at the screening prevalence"),
    ("npv_at_prevalence", "NPV at the screening prevalence"),
    ("f1", "F1"),
    ("auc", "ROC AUC"),
    ("brier", "Brier score (lower is better)"),
]
WITHOUT_INTERVAL = [
    ("ece", "Expected calibration error (10 bins; lower is better)"),
    ("loss", "Log loss (binary cross-entropy)"),
    ("sensitivity_at_specificity_90", "Sensitivity at specificity >= 0.90"),
    ("sensitivity_at_specificity_95", "Sensitivity at specificity >= 0.95"),
    ("specificity_at_sensitivity_90", "Specificity at sensitivity >= 0.90"),
    ("specificity_at_sensitivity_95", "Specificity at sensitivity >= 0.95"),
    ("threshold", "Operating threshold (PM if probability >= it)"),
    ("prevalence", "Screening prevalence assumed (evaluate.prevalence)"),
    ("prevalence_observed", "Prevalence of PM in the validation set"),
]


def fmt(value) -> str:
    """How a number is written in the report (3 decimals; counts as integers)."""
    if value is None:
        return "n/a"
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        return str(int(value))
    return f"{float(value):.3f}"


def png_data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _figure_png(draw, size=(4.6, 4.0)) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=size, dpi=110)
    try:
        draw(ax)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png")
    finally:
        plt.close(fig)
    return buf.getvalue()


def plots(labels: np.ndarray, probs: np.ndarray, metrics: dict) -> dict[str, bytes]:
    """ROC, precision-recall, reliability diagram and probability histogram, as PNG bytes."""
    from sklearn.metrics import precision_recall_curve, roc_curve

    threshold = float(metrics["threshold"])
    both = len(set(labels.tolist())) == 2

    def roc(ax):
        if both:
            fpr, tpr, _ = roc_curve(labels, probs)
            ax.plot(fpr, tpr, lw=2, label=f"AUC {fmt(metrics.get('auc'))}")
        ax.plot([0, 1], [0, 1], "k--", lw=1)
        if metrics.get("specificity") is not None:
            ax.plot(1 - metrics["specificity"], metrics["sensitivity"], "ro", label=f"threshold {threshold:.3f}")
        ax.set(xlabel="1 - specificity", ylabel="Sensitivity", title="ROC curve (validation)")
        ax.legend(loc="lower right")

    def pr(ax):
        if both:
            precision, recall, _ = precision_recall_curve(labels, probs)
            ax.plot(recall, precision, lw=2)
        ax.plot(metrics["sensitivity"], metrics["precision"], "ro", label=f"threshold {threshold:.3f}")
        ax.axhline(labels.mean(), color="k", ls="--", lw=1, label="prevalence (validation)")
        ax.set(
            xlabel="Recall (sensitivity)",
            ylabel="Precision (PPV)",
            title="Precision-recall (validation)",
            ylim=(0, 1.02),
        )
        ax.legend(loc="lower left")

    def reliability(ax):
        rows = reliability_table(labels, probs)
        ax.plot([0, 1], [0, 1], "k--", lw=1, label="perfect calibration")
        ax.plot(
            [r["mean_probability"] for r in rows],
            [r["fraction_pm"] for r in rows],
            "o-",
            lw=2,
            label=f"model (ECE {fmt(metrics.get('ece'))})",
        )
        for r in rows:
            ax.annotate(
                str(r["count"]),
                (r["mean_probability"], r["fraction_pm"]),
                textcoords="offset points",
                xytext=(4, -10),
                fontsize=7,
            )
        ax.set(
            xlabel="Mean predicted PM probability (10 bins)",
            ylabel="Observed fraction of PM",
            title="Reliability diagram (validation)",
            xlim=(0, 1),
            ylim=(0, 1),
        )
        ax.legend(loc="upper left")

    def histogram(ax):
        bins = np.linspace(0, 1, 21)
        ax.hist(probs[labels == 1], bins=bins, alpha=0.6, label="PM", color="tab:red")
        ax.hist(probs[labels == 0], bins=bins, alpha=0.6, label="non-PM", color="tab:blue")
        ax.axvline(threshold, color="k", ls="--", lw=1, label=f"threshold {threshold:.3f}")
        ax.set(xlabel="Predicted PM probability", ylabel="Images", title="PM probability per class (validation)")
        ax.legend(loc="upper center")

    return {
        "ROC curve": _figure_png(roc),
        "Precision-recall curve": _figure_png(pr),
        "Reliability diagram": _figure_png(reliability),
        "Histogram of PM probabilities": _figure_png(histogram),
    }


def rule_is_number(metrics: dict) -> bool:
    """Whether the operating threshold was a fixed number (else a rule chosen on the holdout)."""
    try:
        float(str(metrics.get("threshold_rule", "")))
    except ValueError:
        return False
    return True


def _errors(preds: pd.DataFrame, threshold: float, explain_dir: Path) -> list[dict]:
    """The most confident errors, with the heatmap the explain stage drew of each (or None)."""
    wrong = preds[(preds["probability"] >= threshold).astype(int) != preds["label"]].copy()
    wrong["confidence"] = (wrong["probability"] - threshold).abs()
    wrong = wrong.sort_values("confidence", ascending=False, kind="stable").head(N_ERRORS)
    heatmaps = {f.name.split("_label-")[0]: f for f in sorted(Path(explain_dir).glob("*.png"))}
    rows = []
    for _, r in wrong.iterrows():
        stem = Path(str(r["image"])).stem
        rows.append(
            {
                "image": str(r["image"]),
                "label": "PM" if r["label"] else "non-PM",
                "probability": f"{float(r['probability']):.3f}",
                "stem": stem,
                "heatmap": png_data_uri(heatmaps[stem].read_bytes()) if stem in heatmaps else None,
            }
        )
    return rows


def _read_inputs(eval_json: Path, predictions: Path, model_dir: Path, labels_csv: Path):
    """``(metrics, model info, predictions, labels)``, with one-line errors for what is missing."""
    metrics = read_json(eval_json)
    info = read_info(model_dir)
    try:
        return metrics, info, pd.read_csv(predictions), pd.read_csv(labels_csv)
    except FileNotFoundError as exc:
        raise DataError(f"{exc.filename}: not found; run the earlier stages first (dvc repro)") from None


def build_report(
    eval_json: Path, predictions: Path, model_dir: Path, explain_dir: Path, labels_csv: Path, params: dict
) -> str:
    """The report's HTML."""
    metrics, info, preds, labels_df = _read_inputs(eval_json, predictions, model_dir, labels_csv)
    y, p = preds["label"].to_numpy().astype(int), preds["probability"].to_numpy(dtype=float)
    counts = labels_df.groupby(["split", "label"]).size().unstack(fill_value=0)
    data = params.get("data") or {}
    return _template().render(
        info=info,
        metrics=metrics,
        head_keys=HEAD_KEYS,
        with_interval=WITH_INTERVAL,
        without_interval=WITHOUT_INTERVAL,
        config=[(str(k), json.dumps(v)) for k, v in (info.get("config") or {}).items()],
        splits=[
            {"name": str(split), "pm": int(row.get(1, 0)), "non_pm": int(row.get(0, 0)), "n": int(row.sum())}
            for split, row in counts.iterrows()
        ],
        n_split={split: int(counts.loc[split].sum()) if split in counts.index else 0 for split in ("train", "valid")},
        source=data.get("source", "palm"),
        data_input=str(data.get("input", "?")),
        figures={name: png_data_uri(png) for name, png in plots(y, p, metrics).items()},
        errors=_errors(preds, float(metrics["threshold"]), explain_dir),
        rule_is_number=rule_is_number(metrics),
    )


def page_template(package: str, name: str, **filters):
    """A page's Jinja2 template from ``package``'s ``templates/``, as every page of palm reads one:
    autoescaped, an undefined name an error, blocks trimmed."""
    env = Environment(
        loader=PackageLoader(package, "templates"),
        autoescape=True,
        undefined=StrictUndefined,
        keep_trailing_newline=True,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters.update(filters)
    return env.get_template(name)


def _template():
    return page_template("palm.evaluation.report", "report.html.j2", fmt=fmt)


def write_report(
    out: Path = REPORT,
    eval_json: Path = Path("metrics/eval.json"),
    predictions: Path = Path("metrics/predictions.csv"),
    model_dir: Path = Path("models"),
    explain_dir: Path = Path("metrics/explain"),
    labels_csv: Path = Path("data/labels/labels.csv"),
    params: dict | None = None,
) -> Path:
    page = build_report(
        Path(eval_json), Path(predictions), Path(model_dir), Path(explain_dir), Path(labels_csv), params or {}
    )
    with atomic_file(out, encoding="utf-8") as f:
        f.write(page)
    return Path(out)


def main(params: dict) -> None:
    out = write_report(params=params)
    print(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB)")
