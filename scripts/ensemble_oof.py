"""Score a seed (or network) ensemble from cross-validation runs, without training anything.

Each ``scripts/cross_validate.py`` run writes its out-of-fold predictions as CSV. Runs over the
same images and the same folds (the same ``--splits``, ``--folds`` and ``--fold-seed``) can be
averaged: for every image, the mean PM probability of the members is what an ensemble of the
members' fold networks would have answered. The result is written as one more run (CSV and
JSON, scored as ``cross_validate`` scores), so ``palm compare`` takes it like any other:

    python scripts/ensemble_oof.py cv/senet18-s0.csv cv/senet18-s1.csv --out cv/senet18-2seeds.json
    palm compare cv/senet18-2seeds.csv --baseline cv/senet18-s0.csv --metric auc accuracy

The JSON's ``members`` names the members' files.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pandas as pd

from palm.core.errors import DataError, PalmError, report
from palm.evaluation.metrics import score
from palm.core.fsutil import atomic_file
from palm.core.params import DEFAULT_THRESHOLD

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
    if oof["image"].duplicated().any():
        raise DataError(f"{path}: an image appears twice")
    return oof.sort_values("image", ignore_index=True)


def ensemble(paths: list[Path]) -> pd.DataFrame:
    """The members' mean probability per image; the members must hold the same images in the same folds."""
    members = [read_member(p) for p in paths]
    first = members[0]
    for path, m in zip(paths[1:], members[1:]):
        if not m[KEYS].fillna("").equals(first[KEYS].fillna("")):
            raise DataError(f"{path} and {paths[0]} differ in their images, labels or folds: "
                            "only runs with the same --splits, --folds and --fold-seed can be averaged")
    out = first[KEYS].copy()
    out["probability"] = sum(m["probability"] for m in members) / len(members)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("members", nargs="+", type=Path, help="cross_validate.py prediction CSVs (two or more)")
    ap.add_argument("--out", type=Path, required=True, help="the ensemble's JSON (its CSV goes next to it)")
    args = ap.parse_args(argv)
    if len(args.members) < 2:
        ap.error("an ensemble needs two or more prediction files")
    try:
        oof = ensemble(args.members)
    except PalmError as exc:
        return report(exc)
    scores = score(oof["label"], oof["probability"], DEFAULT_THRESHOLD)
    # one setting naming the members: palm compare groups runs by their settings, and the members'
    # own train.seed=N must not make the ensemble look like one seed of a member's recipe
    summary = {"model": "ensemble", "set": ["ensemble=" + "+".join(p.stem for p in args.members)],
               "members": [str(p) for p in args.members], "images": len(oof), **scores,
               "errors": scores["fp"] + scores["fn"]}
    with atomic_file(args.out.with_suffix(".csv"), newline="") as f:
        oof.to_csv(f, index=False)
    with atomic_file(args.out) as f:
        json.dump(summary, f, indent=1)
    print(f"{len(args.members)} members, {len(oof)} images: AUC {scores['auc']:.4f} "
          f"[{scores['auc_ci_low']:.4f}, {scores['auc_ci_high']:.4f}], accuracy {scores['accuracy']:.4f} "
          f"[{scores['accuracy_ci_low']:.4f}, {scores['accuracy_ci_high']:.4f}], {summary['errors']} errors")
    return 0


if __name__ == "__main__":
    sys.exit(main())
