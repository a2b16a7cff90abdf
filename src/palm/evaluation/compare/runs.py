"""The runs ``palm compare`` compares: revisions read out of git, prediction files, and seed groups.

**Revisions** are read from git without checking anything out (``git show
REV:metrics/predictions.csv`` and ``REV:params.yaml``): an experiment's name (``refs/exps``),
a branch, a tag, a commit, or ``workspace`` (the files on disk). With no revision named, every
experiment of ``dvc exp show`` is compared with the baseline. A revision may also be a
predictions file named by its path (``*.csv``, e.g. cross-validation's out-of-fold predictions).

**Seeds.** Revisions whose ``params.yaml`` differ only by ``train.seed`` form a *group*
(:func:`groups`).
"""

from __future__ import annotations

import io
import json
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from palm.core.errors import ConfigError, DataError, listing
from palm.core.fsutil import atomic_outputs
from palm.core.params import DEFAULT_THRESHOLD
from palm.evaluation.stats import check_predictions

PREDICTIONS = "metrics/predictions.csv"
PARAMS = "params.yaml"
WORKSPACE = "workspace"


@dataclass
class Run:
    """One revision's validation predictions and parameters."""

    rev: str  # as the user named it
    commit: str | None  # the commit read (None: the workspace)
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
    raise ConfigError(
        f"{rev}: no such revision or experiment (a branch, a commit, an experiment's name or '{WORKSPACE}')"
    )


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


def write_run(predictions: pd.DataFrame, summary: dict, csv: Path, settings: Path) -> None:
    """Write a run as a predictions file and its settings beside it (what :func:`read_run` reads
    from a ``*.csv`` and :func:`_file_params` from the JSON next to it): both or neither."""
    with atomic_outputs() as out:
        with out.open(csv, newline="") as f:
            predictions.to_csv(f, index=False)
        with out.open(settings) as f:
            json.dump(summary, f, indent=1)


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
    seed = (
        "-" if summary.get("members") else next((s.split("=", 1)[1] for s in sets if s.startswith("train.seed=")), "0")
    )
    return {
        "model": summary.get("model", "?"),
        "set": [s for s in sets if not s.startswith("train.seed=")],
        "train": {"seed": seed},
    }


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
    except (ValueError, pd.errors.ParserError) as exc:
        raise DataError(f"{rev}: {PREDICTIONS} is not a predictions table ({exc})") from None
    guessed = as_file and "predicted" not in df.columns  # out-of-fold predictions: no class of their own
    missing = {"image", "label", "probability", *(() if guessed else ("predicted",))} - set(df.columns)
    if missing:
        raise DataError(f"{rev}: {PREDICTIONS} has no column(s) {', '.join(sorted(missing))}")
    if not len(df):
        raise DataError(f"{rev}: {PREDICTIONS} has no rows")
    if df["image"].duplicated().any():
        raise DataError(f"{rev}: {PREDICTIONS} lists image(s) twice: {listing(df['image'][df['image'].duplicated()])}")
    check_predictions(
        df["label"],
        df["probability"],
        None if guessed else df["predicted"],
        name=rev if as_file else f"{rev}: {PREDICTIONS}",
        images=df["image"].astype(str),
    )
    labels, probs = df["label"].to_numpy(np.float64).astype(int), df["probability"].to_numpy(np.float64)
    pred = (probs >= DEFAULT_THRESHOLD).astype(int) if guessed else df["predicted"].to_numpy(np.float64).astype(int)
    if as_file:
        return Run(rev, None, _file_params(Path(rev)), df["image"].astype(str).tolist(), labels, probs, pred)
    try:
        params = yaml.safe_load(read_file_at(commit, PARAMS, repo, rev)) or {}
    except DataError:
        params = {}
    except yaml.YAMLError as exc:
        raise DataError(f"{rev}: {PARAMS} is not valid YAML ({exc})") from None
    return Run(
        rev, commit, params if isinstance(params, dict) else {}, df["image"].astype(str).tolist(), labels, probs, pred
    )


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
                + "; ".join(
                    part
                    for part in (
                        f"only in {base.rev}: {listing(only_a, 5)}" if only_a else "",
                        f"only in {r.rev}: {listing(only_b, 5)}" if only_b else "",
                    )
                    if part
                )
            )
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
    seen first); a group is named by its model, with a number when two groups share one.

    A run whose settings are unknown (no ``params.yaml`` in its revision, no settings beside its
    predictions file) is a group of its own: nothing says it is a seed of another run's recipe.
    Nor are two runs of the same seed one group (two runs of one recipe and seed, e.g. with
    other folds): each seed is in a group once."""
    keyed: dict[str, list[list[Run]]] = {}
    for i, r in enumerate(runs):
        key = _without_seed(r.params) if r.params else f"unknown settings #{i}"
        family = keyed.setdefault(key, [])
        home = next((g for g in family if all(m.seed != r.seed for m in g)), None)
        if home is None:
            family.append(home := [])
        home.append(r)
    out: list[dict] = []
    used: dict[str, int] = {}
    for members in (g for family in keyed.values() for g in family):
        model = members[0].model
        used[model] = used.get(model, 0) + 1
        members = sorted(members, key=lambda r: (not isinstance(r.seed, int), r.seed if isinstance(r.seed, int) else 0))
        out.append({"name": model if used[model] == 1 else f"{model}#{used[model]}", "runs": members})
    return out
