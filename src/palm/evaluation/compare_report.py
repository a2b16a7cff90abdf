"""``palm compare --html``: the comparison as one self-contained page, in the style of
``metrics/report.html`` (its figure helpers): the ROC curves of every compared revision
overlaid, a forest plot of the differences with their 95% intervals, the spread of each
metric across seeds, and thumbnails of the validation photographs on which a revision and the
baseline disagree (when the photographs are in this workspace's ``data/raw``).
"""

from __future__ import annotations

import html
from pathlib import Path

import numpy as np

from palm.evaluation.compare import LOWER_IS_BETTER, Run, _p
from palm.evaluation.report import _figure_png, png_data_uri


def img(png: bytes, alt: str, width: int | None = None) -> str:
    """An embedded PNG (a data URL), its ``alt`` escaped."""
    style = f' style="max-width:{width}px"' if width else ""
    return f'<img src="{png_data_uri(png)}" alt="{html.escape(alt)}"{style}>'

N_THUMBS = 24
THUMB_PX = 112
RAW = Path("data/raw")


def roc_overlay(runs: list[Run]) -> bytes:
    from sklearn.metrics import roc_auc_score, roc_curve

    def draw(ax):
        for r in runs:
            if len(set(r.labels.tolist())) == 2:
                fpr, tpr, _ = roc_curve(r.labels, r.probs)
                ax.plot(fpr, tpr, lw=1.5, label=f"{r.rev} (AUC {roc_auc_score(r.labels, r.probs):.3f})")
        ax.plot([0, 1], [0, 1], "k--", lw=1)
        ax.set(xlabel="1 - specificity", ylabel="Sensitivity", title="ROC curves (validation)")
        ax.legend(loc="lower right", fontsize=7)

    return _figure_png(draw, size=(5.5, 5.0))


def forest(records: list[dict], title: str) -> bytes:
    """One row per (revision, metric): the difference and its 95% interval; red worse, green better."""
    colour = {"better": "tab:green", "worse": "tab:red"}

    def draw(ax):
        for i, rec in enumerate(records):
            y = len(records) - 1 - i
            c = colour.get(rec["verdict"], "0.3")
            ax.plot([rec["ci_low"], rec["ci_high"]], [y, y], color=c, lw=2)
            ax.plot(rec["diff"], y, "o", color=c)
        ax.axvline(0, color="k", lw=1)
        ax.set_yticks(range(len(records)))
        ax.set_yticklabels([f"{rec['b']} vs {rec['a']}: {rec['metric']}"
                            + (" (lower better)" if rec["metric"] in LOWER_IS_BETTER else "")
                            for rec in reversed(records)], fontsize=7)
        ax.set(xlabel="difference (revision - baseline), 95% interval", title=title)

    return _figure_png(draw, size=(7.5, max(2.5, 0.28 * len(records) + 1.2)))


def seed_spread(groups: list[dict], metrics: list[str]) -> bytes:
    def draw(ax):
        width = 0.8 / max(1, len(groups))
        for gi, g in enumerate(groups):
            for mi, m in enumerate(metrics):
                v = g["metrics"][m]["values"]
                x = mi + (gi - (len(groups) - 1) / 2) * width
                ax.plot([x] * len(v), v, "o", alpha=0.7, color=f"C{gi}", label=g["group"] if mi == 0 else None)
                ax.plot([x - width / 3, x + width / 3], [np.mean(v)] * 2, color=f"C{gi}", lw=2)
        ax.set_xticks(range(len(metrics)))
        ax.set_xticklabels(metrics)
        ax.set(ylabel="value per seed (bar: mean)", title="Spread across train.seed")
        ax.legend(fontsize=7)

    return _figure_png(draw, size=(7.5, 4.0))


def find_image(name: str, raw: Path = RAW) -> Path | None:
    for candidate in (raw / name, raw / "PALM-Validation400" / name):
        if candidate.is_file():
            return candidate
    return next(iter(sorted(raw.rglob(Path(name).name))), None) if raw.is_dir() else None


def thumbnail(path: Path) -> bytes | None:
    import cv2

    im = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if im is None:
        return None
    scale = THUMB_PX / max(im.shape[:2])
    im = cv2.resize(im, (max(1, round(im.shape[1] * scale)), max(1, round(im.shape[0] * scale))),
                    interpolation=cv2.INTER_AREA)
    ok, buf = cv2.imencode(".png", im)
    return buf.tobytes() if ok else None


def disagreements(runs: list[Run], raw: Path = RAW) -> str:
    """Thumbnails of the images on which some revision's class differs from the baseline's."""
    esc = html.escape
    base, others = runs[0], runs[1:]
    differ = np.zeros(len(base.images), bool)
    for r in others:
        differ |= r.pred != base.pred
    idx = np.flatnonzero(differ)
    if not len(idx):
        return "<p>Every revision classifies every validation image as the baseline does.</p>"
    rows = "".join(
        f"<tr><td>{esc(base.images[i])}</td><td>{'PM' if base.labels[i] else 'non-PM'}</td>"
        + "".join(f"<td>{r.probs[i]:.3f}{' &#10003;' if r.pred[i] == base.labels[i] else ' &#10007;'}</td>"
                  for r in runs) + "</tr>" for i in idx)
    table = ("<table><tr><th>image</th><th>truth</th>" + "".join(f"<th>{esc(r.rev)}</th>" for r in runs)
             + f"</tr>{rows}</table>")
    head = (f"<p>{len(idx)} image(s) on which a revision's class differs from the baseline's "
            "(PM probability; &#10003; right, &#10007; wrong).</p>")
    if not raw.is_dir():
        return head + (f"<p class='warn'>No thumbnails: the photographs are not in this workspace "
                       f"(<code>{esc(str(raw))}</code> is missing; <code>dvc pull</code> or "
                       "<code>dvc repro unzip</code> brings them).</p>") + table
    figs, missing = "", 0
    for i in idx[:N_THUMBS]:
        path = find_image(base.images[i], raw)
        png = thumbnail(path) if path else None
        if png is None:
            missing += 1
            continue
        figs += (f"<figure>{img(png, base.images[i])}<figcaption>{esc(Path(base.images[i]).name)} "
                 f"({'PM' if base.labels[i] else 'non-PM'})</figcaption></figure>")
    note = f"<p>{missing} of them not found in <code>{esc(str(raw))}</code>.</p>" if missing else ""
    more = f"<p>The first {N_THUMBS} shown.</p>" if len(idx) > N_THUMBS else ""
    return head + figs + note + more + table


def _rows(records: list[dict]) -> str:
    esc = html.escape
    return "".join(
        f"<tr><td>{esc(str(rec['b']))}</td><td>{esc(str(rec['a']))}</td><td>{esc(rec['metric'])}</td>"
        f"<td>{rec['diff']:+.3f}</td><td>{rec['ci_low']:+.3f} &ndash; {rec['ci_high']:+.3f}</td>"
        f"<td>{_p(rec['p_value'])}</td><td>{_p(rec['p_adjusted'])}</td><td>{esc(rec['test'])}</td>"
        f"<td>{esc(rec['verdict'])}</td></tr>" for rec in records)


def page(result: dict, raw: Path = RAW) -> str:
    esc = html.escape
    runs, metrics = result["runs"], result["metrics"]
    head = "<tr><th>revision</th><th>vs</th><th>metric</th><th>diff</th><th>95% interval</th><th>p</th>" \
           "<th>p (Holm)</th><th>test</th><th>verdict</th></tr>"
    rev_rows = "".join(f"<tr><td>{esc(r.rev)}</td><td>{esc(r.commit[:10] if r.commit else 'workspace')}</td>"
                       f"<td>{esc(r.model)}</td><td>{esc(str(r.seed))}</td></tr>" for r in runs)
    figs = f"<figure>{img(roc_overlay(runs), 'ROC curves')}<figcaption>ROC curves</figcaption></figure>"
    figs += (f"<figure>{img(forest(result['records'], 'Paired differences against ' + result['baseline']), 'forest')}"
             "<figcaption>Forest plot</figcaption></figure>")
    groups = ""
    if any(len(g["seeds"]) > 1 for g in result["groups"]):
        cells = "".join(
            "<tr><td>" + esc(g["group"]) + "</td><td>" + esc(", ".join(map(str, g["seeds"]))) + "</td>"
            + "".join(f"<td>{g['metrics'][m]['mean']:.3f}"
                      + (f" &plusmn; {g['metrics'][m]['std']:.3f}" if g['metrics'][m]['std'] is not None else "")
                      + f" ({g['metrics'][m]['min']:.3f}..{g['metrics'][m]['max']:.3f})</td>" for m in metrics)
            + "</tr>" for g in result["groups"])
        groups = ("<h2>Seeds</h2><p>Revisions whose parameters differ only by <code>train.seed</code>: "
                  "mean &plusmn; sd (min..max) across seeds.</p><table><tr><th>group</th><th>seeds</th>"
                  + "".join(f"<th>{esc(m)}</th>" for m in metrics) + f"</tr>{cells}</table>"
                  + f"<figure>{img(seed_spread(result['groups'], metrics), 'seed spread')}</figure>")
        if result["group_records"]:
            groups += (f"<h3>Groups against the baseline's group</h3><table>{head}{_rows(result['group_records'])}"
                       "</table>")
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<title>Pathologic myopia screening: paired comparison against {esc(result['baseline'])}</title>
<style>
body {{ font-family: system-ui, sans-serif; max-width: 1100px; margin: 1.5em auto; padding: 0 1em; color: #222; }}
table {{ border-collapse: collapse; margin: 0.5em 0 1.2em; }}
th, td {{ border: 1px solid #ccc; padding: 3px 8px; text-align: left; }}
td {{ font-variant-numeric: tabular-nums; }}
.warn {{ background: #fff3cd; border: 1px solid #e0c36c; padding: 0.6em 1em; }}
figure {{ display: inline-block; margin: 0.4em; vertical-align: top; }}
figcaption {{ text-align: center; font-size: 0.9em; color: #555; }}
</style></head><body>
<h1>Pathologic myopia screening &mdash; paired comparison</h1>
<p>Baseline <b>{esc(result['baseline'])}</b>; {result['n']} validation images ({result['n_pm']} PM), the same
for every revision, so each difference is tested on the pairs: DeLong for ROC AUC, exact McNemar with
Newcombe's paired interval for accuracy, sensitivity and specificity, a seeded paired bootstrap for the
Brier score and F1; p-values adjusted by Holm across the revisions, per metric (alpha {result['alpha']}).</p>
<h2>Revisions</h2>
<table><tr><th>revision</th><th>commit</th><th>model</th><th>seed</th></tr>{rev_rows}</table>
<h2>Differences against the baseline</h2>
<table>{head}{_rows(result['records'])}</table>
{figs}
{groups}
<h2>Images on which the networks disagree</h2>
{disagreements(runs, raw)}
</body></html>
"""
