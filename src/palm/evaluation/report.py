"""The ``report`` stage: ``metrics/report.html``, one self-contained page a person reads.

From what the earlier stages wrote (``models/model.json``, ``metrics/eval.json``,
``metrics/predictions.csv``, ``metrics/explain/*.png``, ``data/labels/labels.csv``) it
makes a single HTML file with every image embedded (base64 PNG): the model and its
parameters, the data, every metric with its 95% interval, the ROC and precision-recall
curves, the reliability diagram, the histogram of PM probabilities per class, the confusion
matrix, the most confident errors with their Grad-CAM heatmaps, and a model card (intended
use, training data, limitations). Every number of ``eval.json`` in the page carries its key
(``data-key``) so a test can check it against the file.
"""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path

import numpy as np
import pandas as pd

from palm.nn.modelinfo import read_info
from palm.errors import DataError
from palm.fsutil import atomic_file
from palm.evaluation.metrics import reliability_table

REPORT = Path("metrics/report.html")
N_ERRORS = 10

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


def num(key: str, metrics: dict) -> str:
    """An eval.json number, tagged with its key."""
    return f'<span class="num" data-key="{html.escape(key)}">{fmt(metrics.get(key))}</span>'


def png_data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def img(png: bytes, alt: str, width: int | None = None) -> str:
    style = f' style="max-width:{width}px"' if width else ""
    return f'<img src="{png_data_uri(png)}" alt="{html.escape(alt)}"{style}>'


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
        ax.set(xlabel="Recall (sensitivity)", ylabel="Precision (PPV)", title="Precision-recall (validation)",
               ylim=(0, 1.02))
        ax.legend(loc="lower left")

    def reliability(ax):
        rows = reliability_table(labels, probs)
        ax.plot([0, 1], [0, 1], "k--", lw=1, label="perfect calibration")
        ax.plot([r["mean_probability"] for r in rows], [r["fraction_pm"] for r in rows], "o-", lw=2,
                label=f"model (ECE {fmt(metrics.get('ece'))})")
        for r in rows:
            ax.annotate(str(r["count"]), (r["mean_probability"], r["fraction_pm"]), textcoords="offset points",
                        xytext=(4, -10), fontsize=7)
        ax.set(xlabel="Mean predicted PM probability (10 bins)", ylabel="Observed fraction of PM",
               title="Reliability diagram (validation)", xlim=(0, 1), ylim=(0, 1))
        ax.legend(loc="upper left")

    def histogram(ax):
        bins = np.linspace(0, 1, 21)
        ax.hist(probs[labels == 1], bins=bins, alpha=0.6, label="PM", color="tab:red")
        ax.hist(probs[labels == 0], bins=bins, alpha=0.6, label="non-PM", color="tab:blue")
        ax.axvline(threshold, color="k", ls="--", lw=1, label=f"threshold {threshold:.3f}")
        ax.set(xlabel="Predicted PM probability", ylabel="Images", title="PM probability per class (validation)")
        ax.legend(loc="upper center")

    return {"ROC curve": _figure_png(roc), "Precision-recall curve": _figure_png(pr),
            "Reliability diagram": _figure_png(reliability), "Histogram of PM probabilities": _figure_png(histogram)}


def threshold_origin(metrics: dict) -> str:
    """Where the operating threshold came from, in a sentence."""
    rule = str(metrics.get("threshold_rule", ""))
    try:
        float(rule)
    except ValueError:
        return (f"The threshold was chosen by the rule <code>{html.escape(rule)}</code> on the internal holdout of "
                "the training images, never on the validation set.")
    return ("The threshold is a fixed number (<code>train.threshold</code>; 0.5 by default, or one chosen on "
            "out-of-fold predictions of the training images by <code>scripts/cross_validate.py --threshold</code>).")


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"{path}: not found; run the earlier stages first (dvc repro)") from None
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: not valid JSON ({exc})") from None


def _model_tables(info: dict) -> tuple[str, str]:
    """Rows of the model's summary and of all its training parameters."""
    esc = html.escape
    model_rows = "".join(f"<tr><th>{esc(str(k))}</th><td>{esc(json.dumps(v))}</td></tr>"
                         for k, v in (info.get("config") or {}).items())
    head_rows = "".join(f"<tr><th>{esc(k)}</th><td>{esc(str(info.get(k)))}</td></tr>" for k in
                        ("model", "image_size", "input_size", "threshold", "threshold_rule", "selected_epoch",
                         "epochs", "n_train", "n_holdout", "train_seconds", "device"))
    return head_rows, model_rows


def _metric_tables(metrics: dict) -> tuple[str, str, str]:
    """Rows of the metrics with intervals, of the others, and the confusion matrix."""
    esc = html.escape
    ci_rows = "".join(
        f"<tr><th>{esc(label)}</th><td>{num(key, metrics)}</td>"
        f"<td>{num(key + '_ci_low', metrics)} &ndash; {num(key + '_ci_high', metrics)}</td></tr>"
        for key, label in WITH_INTERVAL)
    other_rows = "".join(f"<tr><th>{esc(label)}</th><td>{num(key, metrics)}</td></tr>"
                         for key, label in WITHOUT_INTERVAL)
    confusion = (f"<table class='cm'><tr><td></td><th>predicted PM</th><th>predicted non-PM</th></tr>"
                 f"<tr><th>PM</th><td>{num('tp', metrics)}</td><td>{num('fn', metrics)}</td></tr>"
                 f"<tr><th>non-PM</th><td>{num('fp', metrics)}</td><td>{num('tn', metrics)}</td></tr></table>")
    return ci_rows, other_rows, confusion


def _errors(preds: pd.DataFrame, threshold: float, explain_dir: Path) -> tuple[str, str]:
    """Rows of the most confident errors, and the heatmaps the explain stage drew of them."""
    esc = html.escape
    wrong = preds[(preds["probability"] >= threshold).astype(int) != preds["label"]].copy()
    wrong["confidence"] = (wrong["probability"] - threshold).abs()
    wrong = wrong.sort_values("confidence", ascending=False, kind="stable").head(N_ERRORS)
    heatmaps = {f.name.split("_label-")[0]: f for f in sorted(Path(explain_dir).glob("*.png"))}
    error_rows, error_figs = "", ""
    for _, r in wrong.iterrows():
        stem = Path(str(r["image"])).stem
        error_rows += (f"<tr><td>{esc(str(r['image']))}</td><td>{'PM' if r['label'] else 'non-PM'}</td>"
                       f"<td>{float(r['probability']):.3f}</td><td>{'yes' if stem in heatmaps else 'no'}</td></tr>")
        if stem in heatmaps:
            error_figs += (f"<figure>{img(heatmaps[stem].read_bytes(), 'Grad-CAM of ' + stem, 900)}"
                           f"<figcaption>{esc(stem)}</figcaption></figure>")
    if not len(wrong):
        error_rows = "<tr><td colspan='4'>no errors on the validation set</td></tr>"
    return error_rows, error_figs


def _data_source(params: dict) -> str:
    """Where the photographs came from, as a phrase (``data.source`` and ``data.input``)."""
    esc = html.escape
    data = params.get("data") or {}
    data_input, source = str(data.get("input", "?")), data.get("source", "palm")
    if source == "palm" and "synthetic" in data_input:
        return ("the <b>synthetic</b> PALM-like set drawn by <code>palm.data.synthetic</code> "
                "(not medical data: no clinical conclusion may be drawn from these numbers)")
    if source == "folder":
        return f"the photographs and labels of the folder <code>{esc(data_input)}</code>"
    return ("the iChallenge-PM / PALM fundus photographs (PALM challenge, ISBI 2019; Baidu Research "
            "and the Zhongshan Ophthalmic Center, Sun Yat-sen University), as found in "
            f"<code>{esc(data_input)}</code>")


def _read_inputs(eval_json: Path, predictions: Path, model_dir: Path, labels_csv: Path):
    """``(metrics, model info, predictions, labels)``, with one-line errors for what is missing."""
    metrics = _read_json(eval_json)
    info = read_info(model_dir)
    try:
        return metrics, info, pd.read_csv(predictions), pd.read_csv(labels_csv)
    except FileNotFoundError as exc:
        raise DataError(f"{exc.filename}: not found; run the earlier stages first (dvc repro)") from None


def build_report(eval_json: Path, predictions: Path, model_dir: Path, explain_dir: Path, labels_csv: Path,
                 params: dict) -> str:
    """The report's HTML."""
    metrics, info, preds, labels_df = _read_inputs(eval_json, predictions, model_dir, labels_csv)
    y, p = preds["label"].to_numpy().astype(int), preds["probability"].to_numpy(dtype=float)
    head_rows, model_rows = _model_tables(info)
    counts = labels_df.groupby(["split", "label"]).size().unstack(fill_value=0)
    data_rows = "".join(f"<tr><th>{html.escape(str(split))}</th><td>{int(row.get(1, 0))}</td>"
                        f"<td>{int(row.get(0, 0))}</td><td>{int(row.sum())}</td></tr>" for split, row in counts.iterrows())
    ci_rows, other_rows, confusion = _metric_tables(metrics)
    figs = "".join(f"<figure>{img(png, name)}<figcaption>{html.escape(name)}</figcaption></figure>"
                   for name, png in plots(y, p, metrics).items())
    error_rows, error_figs = _errors(preds, float(metrics["threshold"]), explain_dir)
    data_source = _data_source(params)
    n_split = {split: int(counts.loc[split].sum()) if split in counts.index else 0 for split in ("train", "valid")}
    origin = "collection" if (params.get("data") or {}).get("source") == "folder" else "challenge data set"
    return _page(info, metrics, head_rows, model_rows, data_source, data_rows, ci_rows, other_rows, confusion,
                 figs, error_rows, error_figs, n_split, origin)


def _page(info, metrics, head_rows, model_rows, data_source, data_rows, ci_rows, other_rows, confusion,  # noqa: PLR0913
          figs, error_rows, error_figs, n_split, origin) -> str:
    """The page around the sections (a template: HTML, not logic)."""
    esc = html.escape
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<title>Pathologic myopia screening: {esc(str(info.get('model')))} evaluation report</title>
<style>
body {{ font-family: system-ui, sans-serif; max-width: 1100px; margin: 1.5em auto; padding: 0 1em; color: #222; }}
table {{ border-collapse: collapse; margin: 0.5em 0 1.2em; }}
th, td {{ border: 1px solid #ccc; padding: 3px 8px; text-align: left; }}
td .num, td {{ font-variant-numeric: tabular-nums; }}
.warn {{ background: #fff3cd; border: 1px solid #e0c36c; padding: 0.6em 1em; }}
figure {{ display: inline-block; margin: 0.4em; vertical-align: top; }}
figcaption {{ text-align: center; font-size: 0.9em; color: #555; }}
.cm td {{ text-align: center; min-width: 7em; font-size: 1.2em; }}
details {{ margin: 0.5em 0 1em; }}
</style></head><body>
<h1>Pathologic myopia screening &mdash; evaluation report</h1>
<p class="warn"><b>A research screening aid, not a diagnosis.</b> This model has not been validated
for clinical use; every positive or doubtful result needs an ophthalmologist.</p>

<h2>Model</h2>
<table>{head_rows}</table>
<details><summary>All training parameters (<code>models/model.json</code>)</summary><table>{model_rows}</table></details>

<h2>Data</h2>
<p>Trained and validated on {data_source}.</p>
<table><tr><th>split</th><th>PM</th><th>non-PM</th><th>images</th></tr>{data_rows}</table>

<h2>Metrics on the validation set</h2>
<p>{num('n', metrics)} images, {num('n_pm', metrics)} with PM. Intervals:
{esc(str(metrics.get('ci_method')))} (<code>ci_method</code>). {threshold_origin(metrics)}</p>
<table><tr><th>metric</th><th>estimate</th><th>95% interval</th></tr>{ci_rows}</table>
<table><tr><th>metric</th><th>value</th></tr>{other_rows}</table>

<h3>Confusion matrix (rows: truth)</h3>
{confusion}

<h2>Plots</h2>
{figs}

<h2>The most confident errors</h2>
<table><tr><th>image</th><th>label</th><th>PM probability</th><th>heatmap below</th></tr>{error_rows}</table>
{error_figs}

<h2>Model card</h2>
<dl>
<dt><b>Intended use</b></dt><dd>A research screening aid that flags colour fundus photographs likely to show
pathologic myopia, for review by an eye-care professional. Not a diagnosis, not a medical device.
<code>palm predict</code> flags pictures that are not gradable fundus photographs (quality column) and does not
diagnose them.</dd>
<dt><b>Training data</b></dt><dd>{data_source[0].upper() + data_source[1:]}; training split: {n_split['train']}
images, validation split: {n_split['valid']} images.</dd>
<dt><b>Limitations</b></dt><dd><ul>
<li>Single-source data: the photographs come from one {origin} (one population, one set of
cameras); performance on other cameras, populations or image quality is unknown.</li>
<li>A small validation set: one image moves accuracy by {fmt(1 / max(int(metrics.get('n') or 1), 1))}; read the
intervals, not only the estimates.</li>
<li>The validation set's PM prevalence ({fmt(metrics.get('prevalence_observed'))}) is far above a screening
population's; the PPV a clinic would see is the one at the screening prevalence
({fmt(metrics.get('prevalence'))}), not the raw precision.</li>
<li>The pipeline's default data (<code>data.input: data/synthetic</code>) is synthetic, drawn by a program: it is
not medical data, and metrics on it say nothing about eyes.</li>
<li>Grad-CAM heatmaps show where the network looked, not why; they are coarse (the last convolutional layer).</li>
</ul></dd>
</dl>
</body></html>
"""


def write_report(out: Path = REPORT, eval_json: Path = Path("metrics/eval.json"),
                 predictions: Path = Path("metrics/predictions.csv"), model_dir: Path = Path("models"),
                 explain_dir: Path = Path("metrics/explain"), labels_csv: Path = Path("data/labels/labels.csv"),
                 params: dict | None = None) -> Path:
    page = build_report(Path(eval_json), Path(predictions), Path(model_dir), Path(explain_dir), Path(labels_csv),
                        params or {})
    with atomic_file(out, encoding="utf-8") as f:
        f.write(page)
    return Path(out)


def main(params: dict) -> None:
    out = write_report(params=params)
    print(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB)")
