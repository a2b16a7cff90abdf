"""Paired comparison of models scored on the same validation images: ``palm compare``.

Two networks that scored the **same** images make paired predictions, so their difference is
tested on the pairs, which is far more sensitive than comparing two separate 95% intervals:

- **ROC AUC**: DeLong's test for two correlated AUCs (DeLong, DeLong & Clarke-Pearson 1988),
  computed with the fast midrank algorithm of Sun & Xu (IEEE SPL 2014); normal interval and
  two-sided p-value of the difference.
- **accuracy, sensitivity, specificity** (at each revision's own threshold: the ``predicted``
  column): McNemar's exact test on the discordant pairs (``scipy.stats.binomtest``, two-sided,
  p = 0.5), with Newcombe's hybrid score interval for a difference of paired proportions
  (Newcombe 1998, method 10: the Wilson intervals of the two proportions and their
  correlation). Sensitivity uses the PM images only, specificity the non-PM ones.
- **Brier score, F1**: a paired, stratified bootstrap (``n_boot`` resamples, fixed seed: the
  same resampled images for both networks, as many PM and non-PM images as the data has);
  percentile interval, and the two-sided percentile p-value (twice the smaller share of
  resampled differences on either side of 0, at least 2 / (n_boot + 1)), which is below 0.05
  exactly when the interval leaves 0 out.
- **Holm's step-down correction** across the revisions compared with the baseline, per metric
  (``p_adjusted``; the group comparisons likewise, across the groups, per metric and per view). A verdict is ``better`` / ``worse`` when ``p_adjusted < alpha``, otherwise
  "no difference detectable with n images", with roughly how many images would resolve a
  difference of this size (80% power at ``alpha``: n x ((1.96 + 0.84) x SE / |diff|)^2, SE from
  the interval's width, the same class mix assumed).

**Seeds.** Revisions whose ``params.yaml`` differ only by ``train.seed`` form a *group*,
summarised as mean, standard deviation (n - 1) and range of each metric across seeds. Two
groups with seeds in common are compared twice: on the seeds' paired differences (mean and a
t interval over seeds: the training variance) and on the pooled predictions (the difference of
the metric averaged over the common seeds, with a paired bootstrap over images that resamples
the same images for every seed of both groups: the sampling variance).

**Revisions** are read from git without checking anything out (``git show
REV:metrics/predictions.csv`` and ``REV:params.yaml``): an experiment's name (``refs/exps``),
a branch, a tag, a commit, or ``workspace`` (the files on disk). With no revision named, every
experiment of ``dvc exp show`` is compared with the baseline.
"""

from __future__ import annotations

import io
import json
import math
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from palm.core.errors import ConfigError, DataError, listing
from palm.evaluation.metrics import BOOT_SEED, N_BOOT, _bootstrap, wilson_interval
from palm.core.params import DEFAULT_THRESHOLD

PREDICTIONS = "metrics/predictions.csv"
PARAMS = "params.yaml"
WORKSPACE = "workspace"
METRICS = ("auc", "accuracy", "sensitivity", "specificity", "brier", "f1")
LOWER_IS_BETTER = {"brier"}
TESTS = {"auc": "DeLong", "accuracy": "exact McNemar", "sensitivity": "exact McNemar",
         "specificity": "exact McNemar", "brier": "paired bootstrap", "f1": "paired bootstrap"}
ALPHA = 0.05
Z95 = 1.959963984540054
Z_POWER = 0.8416212335729143  # 80% power


# ---------------------------------------------------------------- the statistics


def delong(labels, probs_a, probs_b) -> dict:
    """DeLong's test of AUC(b) - AUC(a) on the same images, by the fast midrank algorithm.

    Returns ``auc_a``, ``auc_b``, ``diff`` (b - a), ``var`` (its variance), the 95% interval
    ``ci_low``/``ci_high`` and the two-sided ``p_value``. Identical rankings give a variance
    of 0: p = 1 and the interval [0, 0].
    """
    from scipy.stats import norm, rankdata

    labels = np.asarray(labels).astype(int)
    scores = np.vstack([np.asarray(probs_a, np.float64), np.asarray(probs_b, np.float64)])
    pos, neg = labels == 1, labels == 0
    m, n = int(pos.sum()), int(neg.sum())
    if m < 2 or n < 2:
        raise DataError(f"DeLong's test needs at least 2 PM and 2 non-PM images, got {m} and {n}")
    x, y = scores[:, pos], scores[:, neg]
    tx, ty = rankdata(x, axis=1), rankdata(y, axis=1)         # midranks within each class
    tz = rankdata(np.hstack([x, y]), axis=1)                  # and over all the images
    aucs = (tz[:, :m].sum(axis=1) - m * (m + 1) / 2) / (m * n)
    v10 = (tz[:, :m] - tx) / n          # per PM image: share of non-PM images ranked below it
    v01 = 1 - (tz[:, m:] - ty) / m      # per non-PM image: share of PM images ranked above it
    cov = np.cov(v10) / m + np.cov(v01) / n
    diff = float(aucs[1] - aucs[0])
    var = float(max(cov[0, 0] + cov[1, 1] - 2 * cov[0, 1], 0.0))
    if var <= 1e-15:
        p = 1.0 if abs(diff) < 1e-12 else 0.0
        half = 0.0
    else:
        p = float(2 * norm.sf(abs(diff) / math.sqrt(var)))
        half = Z95 * math.sqrt(var)
    return {"auc_a": float(aucs[0]), "auc_b": float(aucs[1]), "diff": diff, "var": var,
            "ci_low": diff - half, "ci_high": diff + half, "p_value": p}


def newcombe_paired_interval(both: int, only_a: int, only_b: int, neither: int,
                             level: float = 0.95) -> tuple[float, float]:
    """Newcombe's (1998, method 10) interval for p_b - p_a, two proportions on the same subjects.

    ``both``: successes of both; ``only_a``/``only_b``: of one only; ``neither``. Hybrid score:
    the Wilson intervals of p_a and p_b combined with the correlation phi of the pairs.
    """
    n = both + only_a + only_b + neither
    if n == 0:
        return (math.nan, math.nan)
    pa, pb = (both + only_a) / n, (both + only_b) / n
    la, ua = wilson_interval(both + only_a, n, level)
    lb, ub = wilson_interval(both + only_b, n, level)
    den = (both + only_a) * (only_b + neither) * (both + only_b) * (only_a + neither)
    phi = (both * neither - only_a * only_b) / math.sqrt(den) if den > 0 else 0.0
    d = pb - pa
    lower = math.sqrt(max((pb - lb) ** 2 - 2 * phi * (pb - lb) * (ua - pa) + (ua - pa) ** 2, 0.0))
    upper = math.sqrt(max((ub - pb) ** 2 - 2 * phi * (ub - pb) * (pa - la) + (pa - la) ** 2, 0.0))
    return (d - lower, d + upper)


def mcnemar(correct_a, correct_b) -> dict:
    """McNemar's exact test of two classifiers' 0/1 ``correct`` on the same images.

    ``diff`` = share correct of b - of a, with Newcombe's paired interval; the p-value is the
    two-sided exact binomial test of the discordant pairs (b right a wrong vs a right b wrong).
    """
    from scipy.stats import binomtest

    a, b = np.asarray(correct_a, bool), np.asarray(correct_b, bool)
    both, neither = int((a & b).sum()), int((~a & ~b).sum())
    only_a, only_b = int((a & ~b).sum()), int((~a & b).sum())
    n = len(a)
    discordant = only_a + only_b
    p = float(binomtest(only_b, discordant, 0.5).pvalue) if discordant else 1.0
    low, high = newcombe_paired_interval(both, only_a, only_b, neither)
    return {"a": (both + only_a) / n, "b": (both + only_b) / n, "diff": (only_b - only_a) / n,
            "ci_low": low, "ci_high": high, "p_value": p, "only_a": only_a, "only_b": only_b, "n": n}


def paired_bootstrap(labels, probs_a, pred_a, probs_b, pred_b, metric: str, n_boot: int = N_BOOT,
                     seed: int = BOOT_SEED) -> np.ndarray:
    """``metric`` (``brier``, ``f1``, ``auc``, ``accuracy``...) of b minus a on ``n_boot``
    stratified resamples, the same resampled images for both (the resampling depends on the
    labels and the seed only)."""
    labels = np.asarray(labels).astype(int)
    boot_a = _bootstrap(labels, np.asarray(probs_a, np.float64), np.asarray(pred_a, np.float64), 0.5, n_boot, seed)
    boot_b = _bootstrap(labels, np.asarray(probs_b, np.float64), np.asarray(pred_b, np.float64), 0.5, n_boot, seed)
    return np.asarray(boot_b[metric] - boot_a[metric], np.float64)


def bootstrap_summary(diff: float, boots: np.ndarray, level: float = 0.95) -> dict:
    """Percentile interval and shifted-null two-sided p-value of a bootstrap distribution."""
    boots = boots[~np.isnan(boots)]
    if not len(boots):
        return {"diff": diff, "ci_low": math.nan, "ci_high": math.nan, "p_value": math.nan}
    low, high = np.percentile(boots, [50 * (1 - level), 100 - 50 * (1 - level)])
    # two-sided percentile p-value: twice the smaller share of resamples on either side of 0,
    # so that p < 1 - level exactly when the percentile interval leaves 0 out
    below, above = int((boots <= 0).sum()), int((boots >= 0).sum())
    p = 2 * min(below + 1, above + 1) / (len(boots) + 1)
    return {"diff": diff, "ci_low": float(low), "ci_high": float(high), "p_value": float(min(p, 1.0))}


def holm(p_values) -> list[float]:
    """Holm's step-down adjusted p-values (the same order as given; NaN stays NaN)."""
    p = np.asarray(p_values, np.float64)
    out = np.full(len(p), np.nan)
    ok = np.flatnonzero(~np.isnan(p))
    order = ok[np.argsort(p[ok], kind="stable")]
    m, running = len(order), 0.0
    for i, k in enumerate(order):
        running = max(running, min(1.0, (m - i) * p[k]))
        out[k] = running
    return out.tolist()


def images_needed(diff: float, ci_low: float, ci_high: float, n: int, alpha: float = ALPHA) -> int | None:
    """Roughly how many images a paired test needs to resolve ``diff`` with 80% power (the
    standard error read off the 95% interval, scaled as 1/sqrt(n)); None for a zero difference."""
    from scipy.stats import norm

    if not all(math.isfinite(v) for v in (diff, ci_low, ci_high)) or abs(diff) < 1e-12 or ci_high <= ci_low:
        return None
    se = (ci_high - ci_low) / (2 * Z95)
    need = n * ((norm.isf(alpha / 2) + Z_POWER) * se / abs(diff)) ** 2
    return int(float(f"{need:.2g}")) if need >= 10 else int(math.ceil(need))


UNITS = {"sensitivity": "PM images", "specificity": "non-PM images"}


def verdict(metric: str, diff: float, p_adjusted: float, n: int, ci_low: float, ci_high: float,
            alpha: float = ALPHA) -> str:
    """``better``, ``worse`` (b against a, after correction) or why no difference is detectable
    (sensitivity counts the PM images, specificity the non-PM ones)."""
    if math.isfinite(p_adjusted) and p_adjusted < alpha and diff != 0:
        good = diff < 0 if metric in LOWER_IS_BETTER else diff > 0
        return "better" if good else "worse"
    need = images_needed(diff, ci_low, ci_high, n, alpha)
    unit = UNITS.get(metric, "images")
    if need is None:
        return f"no difference detectable with {n} {unit}" + (" (identical)" if abs(diff) < 1e-12 else "")
    return f"no difference detectable with {n} {unit} (~{need:,} would resolve this size)"


# ---------------------------------------------------------------- metrics of one run


def metric_value(metric: str, labels, probs, pred) -> float:
    """A metric of one run's predictions (threshold metrics from its ``predicted`` column)."""
    from sklearn.metrics import roc_auc_score

    labels, pred = np.asarray(labels).astype(int), np.asarray(pred).astype(int)
    probs = np.asarray(probs, np.float64)
    if metric == "auc":
        return float(roc_auc_score(labels, probs)) if len(set(labels.tolist())) == 2 else math.nan
    if metric == "brier":
        return float(np.mean((probs - labels) ** 2))
    tp = int(((pred == 1) & (labels == 1)).sum())
    fp = int(((pred == 1) & (labels == 0)).sum())
    tn = int(((pred == 0) & (labels == 0)).sum())
    fn = int(((pred == 0) & (labels == 1)).sum())
    ratio = {"accuracy": (tp + tn, len(labels)), "sensitivity": (tp, tp + fn), "specificity": (tn, tn + fp),
             "f1": (2 * tp, 2 * tp + fp + fn)}[metric]
    return ratio[0] / ratio[1] if ratio[1] else math.nan


def compare_pair(metric: str, labels, a: "Run", b: "Run", n_boot: int = N_BOOT, seed: int = BOOT_SEED) -> dict:
    """One paired test of ``metric``, run b against run a (the same images, in the same order)."""
    labels = np.asarray(labels).astype(int)
    if metric == "auc":
        r = delong(labels, a.probs, b.probs)
        return {"value_a": r["auc_a"], "value_b": r["auc_b"], "diff": r["diff"], "ci_low": r["ci_low"],
                "ci_high": r["ci_high"], "p_value": r["p_value"], "test": "DeLong", "n": len(labels)}
    if metric in ("accuracy", "sensitivity", "specificity"):
        keep = {"accuracy": np.ones(len(labels), bool), "sensitivity": labels == 1, "specificity": labels == 0}[metric]
        if not keep.any():
            raise DataError(f"{metric}: no {'PM' if metric == 'sensitivity' else 'non-PM'} image to compare on")
        r = mcnemar((a.pred == labels)[keep], (b.pred == labels)[keep])
        return {"value_a": r["a"], "value_b": r["b"], "diff": r["diff"], "ci_low": r["ci_low"],
                "ci_high": r["ci_high"], "p_value": r["p_value"], "n": int(keep.sum()),
                "test": f"exact McNemar ({r['only_a']} vs {r['only_b']} discordant), Newcombe interval"}
    if metric in ("brier", "f1"):
        va, vb = metric_value(metric, labels, a.probs, a.pred), metric_value(metric, labels, b.probs, b.pred)
        boots = paired_bootstrap(labels, a.probs, a.pred, b.probs, b.pred, metric, n_boot, seed)
        r = bootstrap_summary(vb - va, boots)
        return {"value_a": va, "value_b": vb, **r, "n": len(labels),
                "test": f"paired bootstrap ({n_boot} resamples, seed {seed})"}
    raise ConfigError(f"--metric: unknown metric {metric!r} (one of {', '.join(METRICS)})")


# ---------------------------------------------------------------- revisions


@dataclass
class Run:
    """One revision's validation predictions and parameters."""

    rev: str                      # as the user named it
    commit: str | None            # the commit read (None: the workspace)
    params: dict
    images: list[str]
    labels: np.ndarray
    probs: np.ndarray
    pred: np.ndarray
    extra: dict = field(default_factory=dict)

    @property
    def model(self) -> str:
        return str(self.params.get("model", "?"))

    @property
    def seed(self):
        return (self.params.get("train") or {}).get("seed")


def _git(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(["git", *args], cwd=cwd, capture_output=True)
    except FileNotFoundError:
        raise ConfigError("git is not installed: palm compare reads revisions from git") from None


def resolve(rev: str, repo: Path = Path(".")) -> str | None:
    """The commit of a revision: ``workspace`` -> None; a branch, tag or commit; else an
    experiment's name (``refs/exps/.../NAME``)."""
    if rev == WORKSPACE:
        return None
    proc = _git(["rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}"], repo)
    if proc.returncode == 0:
        return proc.stdout.decode().strip()
    refs = _git(["for-each-ref", "--format=%(refname) %(objectname)", "refs/exps/"], repo).stdout.decode().split("\n")
    found = [line.split()[1] for line in refs if line.strip() and line.split()[0].rsplit("/", 1)[-1] == rev]
    if len(found) == 1:
        return found[0]
    if len(found) > 1:
        raise ConfigError(f"{rev}: more than one experiment has this name; name one by its commit")
    raise ConfigError(f"{rev}: no such revision or experiment (a branch, a commit, an experiment's name or "
                      f"'{WORKSPACE}')")


def read_file_at(commit: str | None, path: str, repo: Path, rev: str) -> bytes:
    if commit is None:
        try:
            return (repo / path).read_bytes()
        except FileNotFoundError:
            raise DataError(f"{WORKSPACE}: {path} not found (run dvc repro evaluate)") from None
    proc = _git(["show", f"{commit}:{path}"], repo)
    if proc.returncode:
        raise DataError(f"{rev}: {path} is not committed in this revision ({commit[:8]}); was it evaluated?")
    return proc.stdout


def _file_params(csv: Path) -> dict:
    """What a predictions file says of its run: ``scripts/cross_validate.py`` writes its settings
    beside its out-of-fold predictions (``X.json`` next to ``X.csv``); ``train.seed=N`` in them is
    the seed, so that seeds group as experiments' do. An ensemble of runs
    (``scripts/ensemble_oof.py``: its JSON lists ``members``) has no seed of its own: "-"."""
    try:
        summary = json.loads(csv.with_suffix(".json").read_text())
    except (OSError, ValueError):
        return {}
    sets = [str(s) for s in summary.get("set") or []]
    seed = "-" if summary.get("members") else next(
        (s.split("=", 1)[1] for s in sets if s.startswith("train.seed=")), "0")
    return {"model": summary.get("model", "?"), "set": [s for s in sets if not s.startswith("train.seed=")],
            "train": {"seed": seed}}


def read_run(rev: str, repo: str | Path = ".") -> Run:
    """A revision's ``metrics/predictions.csv`` and ``params.yaml``, read from git (or the disk);
    or a predictions file named by its path (``*.csv``: e.g. cross-validation's out-of-fold
    predictions, whose ``predicted`` column is probability >= 0.5 when it has none)."""
    repo = Path(repo)
    as_file = rev.endswith(".csv") and Path(rev).is_file()
    commit = None if as_file else resolve(rev, repo)
    raw = Path(rev).read_bytes() if as_file else read_file_at(commit, PREDICTIONS, repo, rev)
    try:
        df = pd.read_csv(io.BytesIO(raw))
        if as_file and "predicted" not in df.columns and "probability" in df.columns:
            df["predicted"] = (df["probability"] >= DEFAULT_THRESHOLD).astype(int)
        missing = {"image", "label", "probability", "predicted"} - set(df.columns)
        if missing:
            raise DataError(f"{rev}: {PREDICTIONS} has no column(s) {', '.join(sorted(missing))}")
        labels, probs, pred = (df["label"].to_numpy().astype(int), df["probability"].to_numpy(np.float64),
                               df["predicted"].to_numpy().astype(int))
    except (ValueError, pd.errors.ParserError) as exc:
        raise DataError(f"{rev}: {PREDICTIONS} is not a predictions table ({exc})") from None
    if not len(df):
        raise DataError(f"{rev}: {PREDICTIONS} has no rows")
    if df["image"].duplicated().any():
        raise DataError(f"{rev}: {PREDICTIONS} lists image(s) twice: {listing(df['image'][df['image'].duplicated()])}")
    if as_file:
        return Run(rev, None, _file_params(Path(rev)), df["image"].astype(str).tolist(), labels, probs, pred)
    try:
        params = yaml.safe_load(read_file_at(commit, PARAMS, repo, rev)) or {}
    except DataError:
        params = {}
    except yaml.YAMLError as exc:
        raise DataError(f"{rev}: {PARAMS} is not valid YAML ({exc})") from None
    return Run(rev, commit, params if isinstance(params, dict) else {}, df["image"].astype(str).tolist(),
               labels, probs, pred)


def experiments(repo: str | Path = ".") -> list[str]:
    """The names (else commits) of the successful experiments that ``dvc exp show`` lists."""
    try:
        proc = subprocess.run(["dvc", "exp", "show", "--json", "--no-fetch"], cwd=repo, capture_output=True, text=True)
    except FileNotFoundError:
        raise ConfigError("dvc is not installed: name the revisions to compare") from None
    if proc.returncode:
        raise ConfigError(f"dvc exp show failed: {(proc.stderr or proc.stdout).strip().splitlines()[-1:]}")
    names = []
    for row in json.loads(proc.stdout or "[]"):
        for exp in row.get("experiments") or []:
            for rev in exp.get("revs") or []:
                status = (rev.get("data") or {}).get("status")
                if rev.get("rev") and status in (None, "Success"):
                    names.append(rev.get("name") or rev["rev"])
    return list(dict.fromkeys(names))


def align(base: Run, runs: list[Run]) -> None:
    """Put every run's rows in the baseline's image order; refuse different image lists or labels."""
    order = {img: i for i, img in enumerate(base.images)}
    for r in runs:
        if r is base:
            continue
        if set(r.images) != set(base.images):
            only_b = sorted(set(r.images) - set(base.images))
            only_a = sorted(set(base.images) - set(r.images))
            raise DataError(
                f"{base.rev} and {r.rev} were scored on different images: "
                + "; ".join(part for part in (
                    f"only in {base.rev}: {listing(only_a, 5)}" if only_a else "",
                    f"only in {r.rev}: {listing(only_b, 5)}" if only_b else "") if part))
        idx = np.argsort([order[i] for i in r.images])
        r.images = [r.images[i] for i in idx]
        r.labels, r.probs, r.pred = r.labels[idx], r.probs[idx], r.pred[idx]
        if not np.array_equal(r.labels, base.labels):
            bad = [img for img, x, y in zip(base.images, base.labels, r.labels) if x != y]
            raise DataError(f"{base.rev} and {r.rev} label the same images differently: {listing(bad, 5)}")


# ---------------------------------------------------------------- seed groups


def _without_seed(params: dict) -> str:
    p = json.loads(json.dumps(params, default=str))
    (p.get("train") or {}).pop("seed", None)
    return json.dumps(p, sort_keys=True)


def groups(runs: list[Run]) -> list[dict]:
    """Runs whose params differ only by ``train.seed``, as groups ``{"name", "runs"}`` (first
    seen first); a group is named by its model, with a number when two groups share one."""
    keyed: dict[str, list[Run]] = {}
    for r in runs:
        keyed.setdefault(_without_seed(r.params), []).append(r)
    out, used = [], {}
    for members in keyed.values():
        model = members[0].model
        used[model] = used.get(model, 0) + 1
        members = sorted(members, key=lambda r: (not isinstance(r.seed, int), r.seed if isinstance(r.seed, int) else 0))
        out.append({"name": model if used[model] == 1 else f"{model}#{used[model]}", "runs": members})
    return out


def group_summary(group: dict, metrics: list[str]) -> dict:
    """Mean, standard deviation (n - 1; None for one seed) and range of each metric across seeds."""
    runs = group["runs"]
    out = {"group": group["name"], "model": runs[0].model, "seeds": [r.seed for r in runs],
           "revs": [r.rev for r in runs], "metrics": {}}
    for m in metrics:
        v = np.array([metric_value(m, r.labels, r.probs, r.pred) for r in runs], np.float64)
        out["metrics"][m] = {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if len(v) > 1 else None,
                             "min": float(v.min()), "max": float(v.max()), "values": v.tolist()}
    return out


def compare_groups(metric: str, ga: dict, gb: dict, n_boot: int = N_BOOT, seed: int = BOOT_SEED) -> list[dict]:
    """Group b against group a on their common seeds: over seeds (t interval of the per-seed
    differences) and pooled (the seed-averaged difference, paired bootstrap over images)."""
    from scipy import stats

    a_by, b_by = {r.seed: r for r in ga["runs"]}, {r.seed: r for r in gb["runs"]}
    common = [s for s in a_by if s in b_by]
    if len(common) < 2:
        return []
    labels = a_by[common[0]].labels
    diffs = np.array([metric_value(metric, labels, b_by[s].probs, b_by[s].pred)
                      - metric_value(metric, labels, a_by[s].probs, a_by[s].pred) for s in common])
    mean, k = float(diffs.mean()), len(diffs)
    sd = float(diffs.std(ddof=1))
    if sd > 0:
        half = float(stats.t.isf(0.025, k - 1) * sd / math.sqrt(k))
        p = float(stats.ttest_1samp(diffs, 0.0).pvalue)
    else:
        half, p = 0.0, (1.0 if mean == 0 else 0.0)
    n = int({"sensitivity": labels.sum(), "specificity": (1 - labels).sum()}.get(metric, len(labels)))
    base = {"a": ga["name"], "b": gb["name"], "metric": metric, "seeds": common}
    over_seeds = {**base, "diff": mean, "ci_low": mean - half, "ci_high": mean + half, "p_value": p,
                  "test": f"t over {k} seeds' paired differences (training variance)", "n": n}
    boots = np.mean([paired_bootstrap(labels, a_by[s].probs, a_by[s].pred, b_by[s].probs, b_by[s].pred,
                                      metric, n_boot, seed) for s in common], axis=0)
    pooled = {**base, **bootstrap_summary(mean, boots), "n": n,
              "test": f"pooled over {k} seeds, paired bootstrap over images ({n_boot} resamples; sampling variance)"}
    return [over_seeds, pooled]


# ---------------------------------------------------------------- the comparison


def label_of(run: Run) -> str:
    return run.rev


def compare(revs: list[str], baseline: str = "HEAD", metrics=METRICS, repo: str | Path = ".",
            n_boot: int = N_BOOT, seed: int = BOOT_SEED, alpha: float = ALPHA) -> dict:
    """Every revision of ``revs`` against ``baseline``, per metric; the seed groups and their
    comparisons. ``revs`` empty: every experiment of ``dvc exp show``."""
    metrics = list(dict.fromkeys(metrics))
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
    return {"baseline": base.rev, "n": n, "n_pm": int(labels.sum()), "alpha": alpha, "metrics": metrics,
            "records": records, "groups": summaries, "group_records": group_records, "runs": runs}


# ---------------------------------------------------------------- outputs


def _f(v, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "n/a"
    return f"{v:.{digits}f}"


def _p(v) -> str:
    if v is None or not math.isfinite(v):
        return "n/a"
    return "<0.001" if v < 0.001 else f"{v:.3f}"


def _short_test(test: str) -> str:
    return test.split(" (")[0] if test.startswith("paired bootstrap") else test.replace(", Newcombe interval", "")


def markdown(result: dict) -> str:
    """The comparison as Markdown tables (fit for a pull-request comment)."""
    files = any(r.rev.endswith(".csv") and r.commit is None for r in result["runs"])
    kind = "images" if files else "validation images"   # prediction files: out-of-fold ones, often
    out = [f"Baseline **{result['baseline']}**, {result['n']} {kind} ({result['n_pm']} PM); "
           f"diff = revision - baseline, 95% interval; p adjusted by Holm across the revisions, per metric.", "",
           "| revision | model | seed | metric | baseline | revision | diff [95% CI] | p | p (Holm) | test | verdict |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
    runs = {r.rev: r for r in result["runs"]}
    for rec in result["records"]:
        run = runs[rec["b"]]
        out.append(f"| {rec['b']} | {run.model} | {run.seed} | {rec['metric']} | {_f(rec['value_a'])} | "
                   f"{_f(rec['value_b'])} | {rec['diff']:+.3f} [{rec['ci_low']:+.3f}, {rec['ci_high']:+.3f}] | "
                   f"{_p(rec['p_value'])} | {_p(rec['p_adjusted'])} | {_short_test(rec['test'])} | {rec['verdict']} |")
    if any(len(g["seeds"]) > 1 for g in result["groups"]):
        out += ["", "Seed groups (revisions that differ only by train.seed): mean ± sd (min..max) across seeds.", "",
                "| group | seeds | " + " | ".join(result["metrics"]) + " |",
                "|---|---|" + "---|" * len(result["metrics"])]
        for g in result["groups"]:
            cells = []
            for m in result["metrics"]:
                s = g["metrics"][m]
                sd = f" ± {s['std']:.3f}" if s["std"] is not None else ""
                cells.append(f"{s['mean']:.3f}{sd} ({s['min']:.3f}..{s['max']:.3f})")
            out.append(f"| {g['group']} | {', '.join(str(s) for s in g['seeds'])} | " + " | ".join(cells) + " |")
    if result["group_records"]:
        out += ["", "| group | vs | metric | diff [95% CI] | p | p (Holm) | test | verdict |",
                "|---|---|---|---|---|---|---|---|"]
        for rec in result["group_records"]:
            out.append(f"| {rec['b']} | {rec['a']} | {rec['metric']} | {rec['diff']:+.3f} "
                       f"[{rec['ci_low']:+.3f}, {rec['ci_high']:+.3f}] | {_p(rec['p_value'])} | "
                       f"{_p(rec['p_adjusted'])} | {rec['test'].split(' (')[0]} | {rec['verdict']} |")
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
    return _clean({
        "baseline": result["baseline"], "n": result["n"], "n_pm": result["n_pm"], "alpha": result["alpha"],
        "records": [{k: rec[k] for k in (*RECORD_KEYS, *extra) if k in rec} for rec in result["records"]],
        "groups": [{k: g[k] for k in ("group", "model", "seeds", "revs", "metrics")} for g in result["groups"]],
        "group_records": [{k: rec[k] for k in (*RECORD_KEYS, "seeds", "n")} for rec in result["group_records"]],
        "revisions": [{"rev": r.rev, "commit": r.commit, "model": r.model, "seed": r.seed} for r in result["runs"]],
    })


def worse(result: dict) -> list[dict]:
    """The records whose verdict is ``worse`` (after correction)."""
    return [rec for rec in result["records"] if rec["verdict"] == "worse"]
