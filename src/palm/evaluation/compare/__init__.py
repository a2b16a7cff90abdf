"""``palm compare``: models scored on the same validation images, compared on the pairs.

Three concerns, one module each; this one puts them together:

- :mod:`palm.evaluation.stats`: the paired statistics (DeLong, McNemar with Newcombe's interval,
  the paired bootstrap, Holm, the verdict and the number of images that would resolve it),
  free of git and of formatting;
- :mod:`palm.evaluation.compare.runs`: the runs, read out of git (revisions, experiments) or
  prediction files, put in the same image order, grouped by seed;
- :mod:`palm.evaluation.compare.table` (Markdown, JSON) and :mod:`palm.evaluation.compare.page`
  (the HTML page, ``templates/compare.html.j2``): the presentation.

Every revision is compared with the baseline per metric, and the p-values are adjusted by
Holm across the revisions (``p_adjusted``; the group comparisons likewise, across the groups,
per metric and per view). **Seed groups** (revisions that differ only by ``train.seed``) are
summarised as mean, standard deviation (n - 1) and range of each metric across seeds; two
groups with seeds in common are compared twice (:func:`palm.evaluation.stats.over_seeds`): on
the seeds' paired differences (the training variance) and on the pooled predictions (the
sampling variance).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from palm.core.errors import ConfigError
from palm.core.params import MAX_BOOTSTRAP
from palm.evaluation.compare.runs import Run, align, experiments, groups, read_run
from palm.evaluation.metrics import BOOT_SEED, N_BOOT
from palm.evaluation.stats import ALPHA, METRICS, compare_pair, holm, metric_value, over_seeds, verdict

__all__ = ["Run", "compare", "compare_groups", "group_summary", "read_run", "worse", "METRICS"]


def group_summary(group: dict, metrics: list[str]) -> dict:
    """Mean, standard deviation (n - 1; None for one seed) and range of each metric across seeds."""
    runs = group["runs"]
    out = {
        "group": group["name"],
        "model": runs[0].model,
        "seeds": [r.seed for r in runs],
        "revs": [r.rev for r in runs],
        "metrics": {},
    }
    for m in metrics:
        v = np.array([metric_value(m, r.labels, r.probs, r.pred) for r in runs], np.float64)
        out["metrics"][m] = {
            "mean": float(v.mean()),
            "std": float(v.std(ddof=1)) if len(v) > 1 else None,
            "min": float(v.min()),
            "max": float(v.max()),
            "values": v.tolist(),
        }
    return out


def compare_groups(metric: str, ga: dict, gb: dict, n_boot: int = N_BOOT, seed: int = BOOT_SEED) -> list[dict]:
    """Group b against group a on their common seeds (at least two; else no record): over seeds
    and pooled (:func:`palm.evaluation.stats.over_seeds`)."""
    a_by, b_by = {r.seed: r for r in ga["runs"]}, {r.seed: r for r in gb["runs"]}
    common = [s for s in a_by if s in b_by]
    if len(common) < 2:
        return []
    labels = a_by[common[0]].labels
    base = {"a": ga["name"], "b": gb["name"], "metric": metric, "seeds": common}
    return [{**base, **rec} for rec in over_seeds(metric, labels, [(a_by[s], b_by[s]) for s in common], n_boot, seed)]


def compare(
    revs: list[str],
    baseline: str = "HEAD",
    metrics=METRICS,
    repo: str | Path = ".",
    n_boot: int = N_BOOT,
    seed: int = BOOT_SEED,
    alpha: float = ALPHA,
) -> dict:
    """Every revision of ``revs`` against ``baseline``, per metric; the seed groups and their
    comparisons. ``revs`` empty: every experiment of ``dvc exp show``."""
    metrics = list(dict.fromkeys(metrics))
    if not 1 <= n_boot <= MAX_BOOTSTRAP:
        raise ConfigError(f"--n-boot must be 1 to {MAX_BOOTSTRAP:,} (each resample holds every image), got {n_boot:,}")
    unknown = [m for m in metrics if m not in METRICS]
    if unknown:
        raise ConfigError(f"--metric: unknown metric(s) {', '.join(unknown)} (one of {', '.join(METRICS)})")
    if not revs:
        revs = experiments(repo)
        if not revs:
            raise ConfigError("no experiment to compare: dvc exp show lists none; name the revisions")
    base = read_run(baseline, repo)
    others = []
    for rev in dict.fromkeys(revs):
        if rev == baseline:
            continue
        run = read_run(rev, repo)
        if run.commit is not None and run.commit == base.commit:
            continue
        others.append(run)
    if not others:
        raise ConfigError(f"nothing to compare with the baseline {baseline}: name other revisions")
    align(base, others)
    runs = [base, *others]
    labels, n = base.labels, len(base.labels)

    records = []
    for m in metrics:
        family = []
        for r in others:
            res = compare_pair(m, labels, base, r, n_boot, seed)
            family.append({"a": base.rev, "b": r.rev, "metric": m, **res})
        for rec, padj in zip(family, holm([f["p_value"] for f in family])):
            rec["p_adjusted"] = padj
            rec["verdict"] = verdict(m, rec["diff"], padj, rec["n"], rec["ci_low"], rec["ci_high"], alpha)
        records += family

    grps = groups(runs)
    summaries = [group_summary(g, metrics) for g in grps]
    group_records = []
    base_group = next(g for g in grps if base in g["runs"])
    for m in metrics:
        family = []
        for g in grps:
            if g is not base_group:
                family += compare_groups(m, base_group, g, n_boot, seed)
        for kind in (0, 1):  # over seeds, pooled: two views of the same question, corrected apart
            part = family[kind::2]
            for rec, padj in zip(part, holm([f["p_value"] for f in part])):
                rec["p_adjusted"] = padj
                rec["verdict"] = verdict(m, rec["diff"], padj, rec["n"], rec["ci_low"], rec["ci_high"], alpha)
        group_records += family
    return {
        "baseline": base.rev,
        "n": n,
        "n_pm": int(labels.sum()),
        "alpha": alpha,
        "metrics": metrics,
        "records": records,
        "groups": summaries,
        "group_records": group_records,
        "runs": runs,
    }


def worse(result: dict) -> list[dict]:
    """The records whose verdict is ``worse`` (after correction)."""
    return [rec for rec in result["records"] if rec["verdict"] == "worse"]
