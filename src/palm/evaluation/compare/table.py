"""``palm compare``'s outputs as text: the Markdown tables it prints (fit for a pull-request
comment) and the JSON of ``--json``."""

from __future__ import annotations

import math


def _f(v, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "n/a"
    return f"{v:.{digits}f}"


def _p(v) -> str:
    if v is None or not math.isfinite(v):
        return "n/a"
    return "<0.001" if v < 0.001 else f"{v:.3f}"


def seed_label(seed) -> str:
    """A run's seed as shown: "?" when its settings do not say (not "None")."""
    return "?" if seed is None else str(seed)


def _short_test(test: str) -> str:
    return test.split(" (")[0] if test.startswith("paired bootstrap") else test.replace(", Newcombe interval", "")


def markdown(result: dict) -> str:
    """The comparison as Markdown tables (fit for a pull-request comment)."""
    files = any(r.rev.endswith(".csv") and r.commit is None for r in result["runs"])
    kind = "images" if files else "validation images"  # prediction files: out-of-fold ones, often
    out = [
        f"Baseline **{result['baseline']}**, {result['n']} {kind} ({result['n_pm']} PM); "
        f"diff = revision - baseline, 95% interval; p adjusted by Holm across the revisions, per metric.",
        "",
        "| revision | model | seed | metric | baseline | revision | diff [95% CI] | p | p (Holm) | test | verdict |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    runs = {r.rev: r for r in result["runs"]}
    for rec in result["records"]:
        run = runs[rec["b"]]
        out.append(
            f"| {rec['b']} | {run.model} | {seed_label(run.seed)} | {rec['metric']} | {_f(rec['value_a'])} | "
            f"{_f(rec['value_b'])} | {rec['diff']:+.3f} [{rec['ci_low']:+.3f}, {rec['ci_high']:+.3f}] | "
            f"{_p(rec['p_value'])} | {_p(rec['p_adjusted'])} | {_short_test(rec['test'])} | {rec['verdict']} |"
        )
    if any(len(g["seeds"]) > 1 for g in result["groups"]):
        out += [
            "",
            "Seed groups (revisions that differ only by train.seed): mean ± sd (min..max) across seeds.",
            "",
            "| group | seeds | " + " | ".join(result["metrics"]) + " |",
            "|---|---|" + "---|" * len(result["metrics"]),
        ]
        for g in result["groups"]:
            cells = []
            for m in result["metrics"]:
                s = g["metrics"][m]
                sd = f" ± {s['std']:.3f}" if s["std"] is not None else ""
                cells.append(f"{s['mean']:.3f}{sd} ({s['min']:.3f}..{s['max']:.3f})")
            out.append(f"| {g['group']} | {', '.join(seed_label(s) for s in g['seeds'])} | " + " | ".join(cells) + " |")
    if result["group_records"]:
        out += [
            "",
            "| group | vs | metric | diff [95% CI] | p | p (Holm) | test | verdict |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for rec in result["group_records"]:
            out.append(
                f"| {rec['b']} | {rec['a']} | {rec['metric']} | {rec['diff']:+.3f} "
                f"[{rec['ci_low']:+.3f}, {rec['ci_high']:+.3f}] | {_p(rec['p_value'])} | "
                f"{_p(rec['p_adjusted'])} | {rec['test'].split(' (')[0]} | {rec['verdict']} |"
            )
    return "\n".join(out)


RECORD_KEYS = ("a", "b", "metric", "diff", "ci_low", "ci_high", "p_value", "p_adjusted", "test", "verdict")


def _clean(v):
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {k: _clean(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_clean(x) for x in v]
    return v


def to_json(result: dict) -> dict:
    """``records`` (the issue's keys, plus value_a, value_b, n), ``groups`` and ``group_records``."""
    extra = ("value_a", "value_b", "n")
    return _clean(
        {
            "baseline": result["baseline"],
            "n": result["n"],
            "n_pm": result["n_pm"],
            "alpha": result["alpha"],
            "records": [{k: rec[k] for k in (*RECORD_KEYS, *extra) if k in rec} for rec in result["records"]],
            "groups": [{k: g[k] for k in ("group", "model", "seeds", "revs", "metrics")} for g in result["groups"]],
            "group_records": [{k: rec[k] for k in (*RECORD_KEYS, "seeds", "n")} for rec in result["group_records"]],
            "revisions": [{"rev": r.rev, "commit": r.commit, "model": r.model, "seed": r.seed} for r in result["runs"]],
        }
    )
