"""Score a seed (or network) ensemble from cross-validation runs, without training anything.

Each ``scripts/cross_validate.py`` run writes its out-of-fold predictions as CSV. Runs over the
same images and the same folds (the same ``--splits``, ``--folds`` and ``--fold-seed``) can be
averaged: for every image, the mean PM probability of the members is what an ensemble of the
members' fold networks would have answered. The result is written as one more run (CSV and
JSON, scored as ``cross_validate`` scores), so ``palm compare`` takes it like any other:

    python scripts/ensemble_oof.py cv/senet18-s0.csv cv/senet18-s1.csv --out cv/senet18-2seeds.json
    palm compare cv/senet18-2seeds.csv --baseline cv/senet18-s0.csv --metric auc accuracy

The JSON's ``members`` names the members' files. ``--out`` ends in ``.json``, names neither a
member nor a member's settings, and the two files are written both or neither. Exit status: 0
written; 1 bad input (a member unreadable, impossible numbers, members of other folds); 2 bad
usage (one member, a bad ``--out``); 3 internal error (one line).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd

from palm.core.errors import ConfigError, DataError, report
from palm.core.fsutil import check_writable
from palm.core.params import DEFAULT_THRESHOLD
from palm.evaluation.compare.runs import write_run
from palm.evaluation.metrics import score
from palm.evaluation.stats import check_predictions

KEYS = ["image", "group", "label", "fold"]


def read_member(path: Path) -> pd.DataFrame:
    """One run's out-of-fold predictions (image, group, label, fold, probability), checked."""
    try:
        oof = pd.read_csv(path, usecols=lambda c: c in {*KEYS, "probability"}, dtype={"group": str})
    except (OSError, ValueError, pd.errors.ParserError) as exc:
        raise DataError(f"{path}: not a cross-validation prediction file ({exc})") from None
    missing = {*KEYS, "probability"} - set(oof.columns)
    if missing:
        raise DataError(f"{path}: not a cross-validation prediction file (no {', '.join(sorted(missing))} column)")
    if not len(oof):
        raise DataError(f"{path}: no rows")
    if oof["image"].duplicated().any():
        raise DataError(f"{path}: an image appears twice")
    check_predictions(oof["label"], oof["probability"], name=str(path), images=oof["image"].astype(str))
    oof["probability"] = oof["probability"].astype("float64")
    return oof.sort_values("image", ignore_index=True)


def ensemble(paths: list[Path]) -> pd.DataFrame:
    """The members' mean probability per image; the members must hold the same images in the same folds."""
    members = [read_member(p) for p in paths]
    first = members[0]
    for path, m in zip(paths[1:], members[1:]):
        if not m[KEYS].fillna("").equals(first[KEYS].fillna("")):
            raise DataError(
                f"{path} and {paths[0]} differ in their images, labels or folds: "
                "only runs with the same --splits, --folds and --fold-seed can be averaged"
            )
    out = first[KEYS].copy()
    out["probability"] = sum(m["probability"] for m in members) / len(members)
    return out


def check_outputs(out: Path, members: list[Path]) -> tuple[Path, Path]:
    """The ensemble's CSV and JSON for ``--out``: refused (exit 2) unless it ends in ``.json``,
    names neither a member nor a member's settings (``X.json`` beside ``X.csv``), and both can be
    written."""

    if out.suffix != ".json":
        raise ConfigError(f"--out {out}: must end in .json (the predictions go beside it as {out.stem}.csv)")
    targets = (out.with_suffix(".csv"), out)
    inputs = {p.resolve() for m in members for p in (m, m.with_suffix(".json"))}
    for target in targets:
        if target.resolve() in inputs:
            raise ConfigError(f"--out {out}: would overwrite {target}, a member's predictions or settings")
        check_writable(target)
    return targets


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("members", nargs="+", type=Path, help="cross_validate.py prediction CSVs (two or more)")
    ap.add_argument("--out", type=Path, required=True, help="the ensemble's JSON (its CSV goes next to it)")
    args = ap.parse_args(argv)
    if len(args.members) < 2:
        ap.error("an ensemble needs two or more prediction files")
    try:
        outputs = check_outputs(args.out, args.members)
        oof = ensemble(args.members)
        scores = score(oof["label"], oof["probability"], DEFAULT_THRESHOLD)
        # one setting naming the members: palm compare groups runs by their settings, and the members'
        # own train.seed=N must not make the ensemble look like one seed of a member's recipe
        summary = {
            "model": "ensemble",
            "set": ["ensemble=" + "+".join(p.stem for p in args.members)],
            "members": [str(p) for p in args.members],
            "images": len(oof),
            **scores,
            "errors": scores["fp"] + scores["fn"],
        }
        write_run(oof, summary, *outputs)  # the CSV and the JSON: both or neither
    except Exception as exc:  # noqa: BLE001 - one line and the documented exit status
        return report(exc)

    def f(key):
        return "n/a" if scores.get(key) is None else f"{scores[key]:.4f}"

    print(
        f"{len(args.members)} members, {len(oof)} images: AUC {f('auc')} [{f('auc_ci_low')}, {f('auc_ci_high')}], "
        f"accuracy {f('accuracy')} [{f('accuracy_ci_low')}, {f('accuracy_ci_high')}], {summary['errors']} errors"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
