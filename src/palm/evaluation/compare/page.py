"""``palm compare --html``: the comparison as one self-contained page, in the style of
``metrics/report.html`` (its figure helpers): the ROC curves of every compared revision
overlaid, a forest plot of the differences with their 95% intervals, the spread of each
metric across seeds, and thumbnails of the validation photographs on which a revision and the
baseline disagree (when the photographs are in this workspace's ``data/raw``; an image a
predictions file names outside it, by an absolute path or ``..``, is listed, never shown).

The page is ``templates/compare.html.j2`` (Jinja2, autoescaped: every revision name, image
name and test is escaped unless the template says otherwise); this module computes what it shows.
"""

from __future__ import annotations

from pathlib import Path, PurePath
from typing import Any

import numpy as np

from palm.evaluation.compare.runs import Run
from palm.evaluation.compare.table import _p, seed_label
from palm.evaluation.report import _figure_png, page_template, png_data_uri
from palm.evaluation.stats import LOWER_IS_BETTER

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
        ax.set_yticklabels(
            [
                f"{rec['b']} vs {rec['a']}: {rec['metric']}"
                + (" (lower better)" if rec["metric"] in LOWER_IS_BETTER else "")
                for rec in reversed(records)
            ],
            fontsize=7,
        )
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


def inside(name: str) -> bool:
    """Whether an image name stays inside the folder it is looked up in: not an absolute path,
    no ``..`` (a predictions file may name any path; only the project's photographs are shown)."""
    path = PurePath(name)
    return not path.is_absolute() and ".." not in path.parts and not path.drive


def find_image(name: str, raw: Path = RAW) -> Path | None:
    """The photograph ``name`` in ``raw`` (or its validation folder, or anywhere below it by file
    name); None when it is not there or ``name`` points outside ``raw``."""
    if not inside(name):
        return None
    for candidate in (raw / name, raw / "PALM-Validation400" / name):
        if candidate.is_file():
            return candidate
    return next(iter(sorted(raw.rglob(PurePath(name).name))), None) if raw.is_dir() else None


def thumbnail(path: Path) -> bytes | None:
    import cv2

    im = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if im is None:
        return None
    scale = THUMB_PX / max(im.shape[:2])
    im = cv2.resize(
        im, (max(1, round(im.shape[1] * scale)), max(1, round(im.shape[0] * scale))), interpolation=cv2.INTER_AREA
    )
    ok, buf = cv2.imencode(".png", im)
    return buf.tobytes() if ok else None


def disagreements(runs: list[Run], raw: Path = RAW) -> dict:
    """The images on which some revision's class differs from the baseline's, and thumbnails of
    the first :data:`N_THUMBS` of them found in ``raw``."""
    base, others = runs[0], runs[1:]
    differ = np.zeros(len(base.images), bool)
    for r in others:
        differ |= r.pred != base.pred
    idx = np.flatnonzero(differ)
    rows = [
        {
            "image": base.images[i],
            "truth": "PM" if base.labels[i] else "non-PM",
            "cells": [(f"{r.probs[i]:.3f}", bool(r.pred[i] == base.labels[i])) for r in runs],
        }
        for i in idx
    ]
    out: dict[str, Any] = {
        "rows": rows,
        "revs": [r.rev for r in runs],
        "raw": str(raw),
        "no_raw": not raw.is_dir(),
        "thumbs": [],
        "missing": 0,
        "outside": [],
        "more": len(idx) > N_THUMBS,
        "shown": N_THUMBS,
    }
    if not len(idx) or out["no_raw"]:
        return out
    for i in idx[:N_THUMBS]:
        if not inside(base.images[i]):
            out["outside"].append(base.images[i])
            continue
        path = find_image(base.images[i], raw)
        png = thumbnail(path) if path else None
        if png is None:
            out["missing"] += 1
            continue
        out["thumbs"].append(
            {
                "uri": png_data_uri(png),
                "image": base.images[i],
                "caption": f"{Path(base.images[i]).name} ({'PM' if base.labels[i] else 'non-PM'})",
            }
        )
    return out


def _rows(records: list[dict]) -> list[dict]:
    return [
        {
            "b": str(rec["b"]),
            "a": str(rec["a"]),
            "metric": rec["metric"],
            "diff": f"{rec['diff']:+.3f}",
            "ci_low": f"{rec['ci_low']:+.3f}",
            "ci_high": f"{rec['ci_high']:+.3f}",
            "p": _p(rec["p_value"]),
            "p_adjusted": _p(rec["p_adjusted"]),
            "test": rec["test"],
            "verdict": rec["verdict"],
        }
        for rec in records
    ]


def _seeds(result: dict) -> dict | None:
    """The seed groups' table, figure and comparisons; None when no group has two seeds."""
    if not any(len(g["seeds"]) > 1 for g in result["groups"]):
        return None
    metrics = result["metrics"]

    def cell(s: dict) -> dict:
        return {
            "mean": f"{s['mean']:.3f}",
            "std": None if s["std"] is None else f"{s['std']:.3f}",
            "min": f"{s['min']:.3f}",
            "max": f"{s['max']:.3f}",
        }

    return {
        "groups": [
            {
                "group": g["group"],
                "seeds": ", ".join(map(seed_label, g["seeds"])),
                "cells": [cell(g["metrics"][m]) for m in metrics],
            }
            for g in result["groups"]
        ],
        "spread": png_data_uri(seed_spread(result["groups"], metrics)),
        "records": _rows(result["group_records"]),
    }


def page(result: dict, raw: Path = RAW) -> str:
    """The page's HTML."""
    runs = result["runs"]
    return _template().render(
        baseline=result["baseline"],
        n=result["n"],
        n_pm=result["n_pm"],
        alpha=result["alpha"],
        metrics=result["metrics"],
        revisions=[
            {
                "rev": r.rev,
                "commit": r.commit[:10] if r.commit else "workspace",
                "model": r.model,
                "seed": seed_label(r.seed),
            }
            for r in runs
        ],
        records=_rows(result["records"]),
        roc=png_data_uri(roc_overlay(runs)),
        forest=png_data_uri(forest(result["records"], "Paired differences against " + result["baseline"])),
        seeds=_seeds(result),
        disagree=disagreements(runs, raw),
    )


def _template():
    return page_template("palm.evaluation.compare", "compare.html.j2")
