"""K-fold cross-validation of params.yaml's training recipe on the training images only.

For tuning defaults without ever looking at the validation set (``palm.training.crossval``): each
fold of the TRAINING split of the shards (``data/shards``, written by ``dvc repro
preprocess``) is predicted by the recipe trained on the other folds, and the pooled
out-of-fold predictions are scored. Compare recipes with ``--set``, as ``dvc exp run -S``:

    python scripts/cross_validate.py                                   # params.yaml as it is
    python scripts/cross_validate.py --set train.holdout=0.15 train.select=best
    python scripts/cross_validate.py --set model=alexnet --out metrics/cv-alexnet.json
    python scripts/cross_validate.py --splits train valid --folds 5    # palm-mini: all 400 photographs

Writes ``--out`` (JSON: the scores and the settings) and, next to it, the out-of-fold
predictions as CSV: both or neither, and ``--out`` is checked before any training (it ends in
``.json``; both files can be written, over nothing but regular files). Exit status: 0 done;
1 bad data; 2 bad usage (an option out of range, an ``--out`` that cannot be written); 3 a
failed run or internal error (one line).

``--threshold RULE`` (``youden``, ``sensitivity>=0.95``, ...) also chooses the operating
threshold on the out-of-fold predictions (never the validation set) and scores them at it;
set the number it prints as ``train.threshold`` in params.yaml. Its cost is the k extra
trainings of the cross-validation (3 x ~4 min for SE-ResNet18 on palm-mini).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from palm.core.config import load_params
from palm.core.errors import ConfigError, report
from palm.core.fsutil import check_writable
from palm.evaluation.compare.runs import write_run
from palm.evaluation.metrics import choose_threshold, parse_threshold, score


def whole(low: int):
    """argparse type: a whole number >= ``low`` (bad usage, exit 2, otherwise)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a whole number, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
        return value

    return parse


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--folds", type=whole(2), default=3)
    ap.add_argument("--fold-seed", type=whole(0), default=0, help="seed of the assignment of images to folds (>= 0)")
    ap.add_argument("--shards", default="data/shards")
    ap.add_argument(
        "--splits",
        nargs="+",
        default=["train"],
        metavar="SPLIT",
        help="splits of the shards pooled into the folds (default: train only). "
        "'train valid' only where the validation images are a sample of the "
        "training photographs (palm-mini), never a real validation set",
    )
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="parameters changed for this run")
    ap.add_argument("--out", type=Path, default=Path("metrics/crossval.json"))
    ap.add_argument(
        "--threshold",
        metavar="RULE",
        help="choose the operating threshold on the out-of-fold predictions: youden, sensitivity>=X or specificity>=X",
    )
    args = ap.parse_args(argv)
    outputs = (args.out.with_suffix(".csv"), args.out)
    try:
        if args.out.suffix != ".json":
            raise ConfigError(
                f"--out {args.out}: must end in .json (the predictions go beside it as {args.out.stem}.csv)"
            )
        for target in outputs:  # before the k trainings, not after them
            check_writable(target)
        from palm.training.crossval import apply_overrides, cross_validate  # Paddle: seconds to import

        params = apply_overrides(load_params(args.params), args.set)
        rule = parse_threshold(args.threshold) if args.threshold else None
        oof, summary = cross_validate(params, args.shards, k=args.folds, seed=args.fold_seed, splits=tuple(args.splits))
        if rule is not None:
            t = choose_threshold(oof["label"], oof["probability"], rule)
            at = score(oof["label"], oof["probability"], t)
            summary["threshold_rule"], summary["chosen_threshold"] = str(rule), t
            summary.update(
                {
                    f"at_threshold_{k}": at[k]
                    for k in ("accuracy", "sensitivity", "specificity", "precision", "fp", "fn")
                }
            )
        summary = {"model": params["model"], "set": args.set, **summary}
        write_run(oof, summary, *outputs)  # the CSV and the JSON: both or neither
    except Exception as exc:  # noqa: BLE001 - one line and the documented exit status
        return report(exc)
    print(json.dumps({k: v for k, v in summary.items() if k != "runs"}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
