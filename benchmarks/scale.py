"""Does the pipeline scale with the number of images? Seconds per image and peak memory of
``preprocess`` and of one training epoch, at growing data sizes.

Synthetic photographs (a bright disc on a dark field with noise, ``--source-size`` px JPEGs)
in the labels stage's layout go through :func:`palm.data.preprocess.preprocess` and one epoch of
:class:`palm.training.train.Trainer` (``--model``, default LeNet, at ``--image-size`` px), each stage in
a fresh process that reports its own wall time and peak resident set size (``ru_maxrss``).
Goals (issue #22): from the smallest to the largest size, seconds per image grow at most
1.2x and peak memory at most 1.3x.

    python benchmarks/scale.py [--sizes 1000 4000 16000] [--image-size 64] [--work DIR]

Training seconds are those of the epoch loop (``epoch_seconds``: loading, augmentation and
steps), preprocess seconds those of the call; neither counts the interpreter's start-up.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def make_photos(root: Path, n: int, source_size: int, n_valid: int = 32) -> None:
    """``n`` training and ``n_valid`` validation JPEGs below ``root/raw`` (made once, reused)."""
    import cv2
    import numpy as np

    rng = np.random.default_rng(22)
    for split, count in (("train", n), ("valid", n_valid)):
        folder = root / "raw" / split
        folder.mkdir(parents=True, exist_ok=True)
        have = len(list(folder.glob("*.jpg")))
        for i in range(have, count):
            label = int(rng.random() < 0.5)
            img = rng.integers(0, 40, (source_size, source_size, 3), dtype=np.uint8)
            c = source_size // 2
            cv2.circle(img, (c, c), int(c * 0.9), (60, 90, 170 + 60 * label), -1)
            cv2.imwrite(str(folder / f"{split}{i:06d}_{label}.jpg"), img)


def labels_csv(root: Path, n: int, n_valid: int = 32) -> Path:
    import pandas as pd

    rows = []
    for split, count in (("train", n), ("valid", n_valid)):
        for p in sorted((root / "raw" / split).glob("*.jpg"))[:count]:
            label = int(p.stem[-1])
            rows.append({"image": f"{split}/{p.name}", "label": label, "split": split, "group": "NP"[label]})
    out = root / f"labels-{n}.csv"
    pd.DataFrame(rows).to_csv(out, index=False)
    return out


# -- the measured stages, each run in a child process ---------------------------------------
def child_preprocess(args) -> dict:
    from palm.data.preprocess import preprocess

    t0 = time.perf_counter()
    preprocess(
        args.labels, args.raw, args.shards, image_size=args.image_size, shard_size=args.shard_size, workers=args.workers
    )
    return {"seconds": time.perf_counter() - t0}


def child_train(args) -> dict:
    import yaml

    from palm.training.train import Trainer

    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["model"] = args.model
    params["image_size"] = args.image_size
    params["train"].update(
        epochs=1,
        batch_size=args.batch_size,
        holdout=0,
        ema=0,
        to_static=False,
        workers=0,
        device="cpu",
        amp="off",
        select="last",
    )
    params["models"][args.model] = {
        k: v for k, v in params["models"].get(args.model, {}).items() if k not in ("input_size", "to_static", "epochs")
    }
    out = Path(args.shards).parent / "run"
    t0 = time.perf_counter()
    Trainer(params, args.shards).run(out / "models", out / "checkpoints", out / "live")
    total = time.perf_counter() - t0
    history = json.loads((out / "checkpoints" / "checkpoint.json").read_text())["history"]
    return {"seconds": history[0]["epoch_seconds"], "run_seconds": total}


def run_child(stage: str, **kw) -> dict:
    cmd = [sys.executable, __file__, "--child", stage] + [f"--{k.replace('_', '-')}={v}" for k, v in kw.items()]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{stage} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[1000, 4000, 16000])
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--source-size", type=int, default=96)
    ap.add_argument("--shard-size", type=int, default=256)
    ap.add_argument("--workers", type=int, default=1, help="preprocess decoding threads")
    ap.add_argument("--model", default="lenet")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--work", help="folder for the photographs and shards (default: a temporary one)")
    ap.add_argument("--json", help="also write the results here")
    # child mode
    ap.add_argument("--child", choices=["preprocess", "train"], help=argparse.SUPPRESS)
    ap.add_argument("--labels", help=argparse.SUPPRESS)
    ap.add_argument("--raw", help=argparse.SUPPRESS)
    ap.add_argument("--shards", help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.child:
        result = (child_preprocess if args.child == "preprocess" else child_train)(args)
        result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
        print(json.dumps(result))
        return

    with tempfile.TemporaryDirectory(dir=args.work) as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        make_photos(root, max(args.sizes), args.source_size)
        print(
            f"made {max(args.sizes)} + 32 synthetic {args.source_size} px photographs in "
            f"{time.perf_counter() - t0:.1f}s",
            file=sys.stderr,
        )
        rows = []
        for n in args.sizes:
            labels = labels_csv(root, n)
            shards = root / f"shards-{n}" / "shards"
            pre = run_child(
                "preprocess",
                labels=labels,
                raw=root / "raw",
                shards=shards,
                image_size=args.image_size,
                shard_size=args.shard_size,
                workers=args.workers,
            )
            tr = run_child(
                "train", shards=shards, image_size=args.image_size, model=args.model, batch_size=args.batch_size
            )
            rows.append(
                {
                    "images": n,
                    "preprocess_s_per_image": pre["seconds"] / (n + 32),
                    "preprocess_peak_mb": pre["peak_rss_mb"],
                    "train_epoch_s_per_image": tr["seconds"] / n,
                    "train_peak_mb": tr["peak_rss_mb"],
                }
            )
            print(f"{n}: {rows[-1]}", file=sys.stderr)

    first, last = rows[0], rows[-1]
    cols = [
        ("preprocess_s_per_image", "preprocess s/image", "{:.2e}"),
        ("preprocess_peak_mb", "preprocess peak MB", "{:.0f}"),
        ("train_epoch_s_per_image", "train epoch s/image", "{:.2e}"),
        ("train_peak_mb", "train peak MB", "{:.0f}"),
    ]
    print(
        f"\n{args.model} at {args.image_size} px, shards of {args.shard_size}, batch {args.batch_size}, "
        f"{args.source_size} px JPEG sources\n"
    )
    print("| images | " + " | ".join(c[1] for c in cols) + " |")
    print("|---:|" + "---:|" * len(cols))
    for r in rows:
        print(f"| {r['images']} | " + " | ".join(fmt.format(r[k]) for k, _, fmt in cols) + " |")
    ratios = {k: last[k] / first[k] for k, _, _ in cols}
    print(f"| {last['images']}/{first['images']} | " + " | ".join(f"{ratios[k]:.2f}x" for k, _, _ in cols) + " |")
    goals = {
        "preprocess_s_per_image": 1.2,
        "train_epoch_s_per_image": 1.2,
        "preprocess_peak_mb": 1.3,
        "train_peak_mb": 1.3,
    }
    verdict = {k: ratios[k] <= g for k, g in goals.items()}
    print(
        "\ngoals (time <= 1.2x, memory <= 1.3x): "
        + ", ".join(f"{k} {'met' if ok else 'MISSED'}" for k, ok in verdict.items())
    )
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "ratios": ratios, "goals_met": verdict}, indent=1))


if __name__ == "__main__":
    main()
