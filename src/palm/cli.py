"""The ``palm`` command: ``palm predict PATH... [--model DIR] [--out preds.csv]``."""

from __future__ import annotations

import argparse
import csv
import sys

from palm.errors import DataError

FIELDS = ["image", "probability", "predicted", "diagnosis", "error"]


def cmd_predict(args) -> int:
    from palm.predict import Predictor, find_images

    files = find_images(args.paths)
    if not files:
        print("error: no image files found in " + " ".join(args.paths), file=sys.stderr)
        return 2
    predictor = Predictor.load(args.model, device=args.device, engine=args.engine, precision=args.precision)
    out = open(args.out, "w", newline="", encoding="utf-8") if args.out else sys.stdout
    failed = 0
    try:
        writer = csv.DictWriter(out, fieldnames=FIELDS, extrasaction="ignore")
        writer.writeheader()
        for rec in predictor.predict(files, batch_size=args.batch_size, progress=not args.quiet,
                                     workers=args.workers):
            if rec["error"]:
                failed += 1
                print(f"skipped: {rec['error']}", file=sys.stderr)
            writer.writerow(rec)
            out.flush()
    finally:
        if out is not sys.stdout:
            out.close()
    done = len(files) - failed
    print(f"{predictor.name} ({predictor.engine}): predicted {done} image(s)"
          + (f", {failed} could not be read" if failed else "")
          + (f"; wrote {args.out}" if args.out else ""), file=sys.stderr)
    return 1 if failed else 0


def count(text: str) -> int:
    """argparse type: a whole number >= 0."""
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"must be a whole number >= 0, got {text!r}")
    return int(text)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="palm", description="Pathologic myopia screening with a trained PALM model.")
    sub = ap.add_subparsers(dest="command", required=True)
    p = sub.add_parser("predict", help="PM probability and class for image files or folders")
    p.add_argument("paths", nargs="+", help="image files or folders (searched recursively)")
    p.add_argument("--model", default="models",
                   help="folder of the trained model: models/ (weights) or models_export/ (inference model); "
                        "default: %(default)s")
    p.add_argument("--out", help="write the predictions to this CSV file (default: standard output)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--device", default="auto",
                   help="auto (a GPU if there is one, else the CPU), cpu, gpu or gpu:N; default: %(default)s")
    p.add_argument("--engine", default="auto", choices=["auto", "paddle-inference", "eager"],
                   help="auto: Paddle Inference (oneDNN on the CPU, CUDA/TensorRT on a GPU), eager Paddle "
                        "if that cannot run; default: %(default)s")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"],
                   help="bf16: oneDNN bfloat16 kernels on the CPU (faster, probabilities move; README); "
                        "default: %(default)s")
    p.add_argument("--workers", type=count, default=None,
                   help="image decoding processes (default: one per core; 0: decode in the main process)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_predict)
    args = ap.parse_args(argv)
    try:
        return args.func(args)
    except DataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
