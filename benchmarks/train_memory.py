"""Resident memory of a training run, epoch by epoch: does it follow the data, or the checkpoints?

Trains ``--model`` (default: LeNet, whose weights grow with the image side: about 56 MB at
224 px, so each checkpoint of model, optimizer and weight average is about 0.3 GB) for
``--epochs`` on a tiny synthetic set, reading the process's resident set size (``VmRSS`` of
/proc/self/status) after each epoch's checkpoint is written, and its peak (``VmHWM``).
Steady state is the median of the epochs after the first two; the bound is peak <= 1.5 x steady.

    python benchmarks/train_memory.py [--model lenet] [--size 224] [--epochs 20] [--images 24]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

import palm  # noqa: F401  (CPU thread settings before paddle loads)
from palm.nn import checkpoint
from palm.training.train import Trainer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train import make_shards  # noqa: E402  (benchmarks/train.py: synthetic shards)

REPO = Path(__file__).resolve().parents[1]


def status(key: str) -> float:
    """A /proc/self/status field in MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    raise KeyError(key)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="lenet")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--images", type=int, default=24)
    args = ap.parse_args()
    import yaml

    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["model"], params["image_size"] = args.model, args.size
    params["train"].update({"epochs": args.epochs, "batch_size": 8, "warmup_epochs": 0, "to_static": False})
    params["models"] = {}
    rss = []
    real_save = checkpoint.save

    def save_and_measure(*a, **k):
        meta = real_save(*a, **k)
        rss.append(round(status("VmRSS")))
        print(f"epoch {len(rss)}: RSS {rss[-1]} MB", flush=True)
        return meta

    checkpoint.save = save_and_measure
    with tempfile.TemporaryDirectory() as tmp:
        shards = make_shards(Path(tmp), args.size, args.images)
        before = status("VmRSS")
        out = Path(tmp) / "run"
        Trainer(params, shards).run(out / "models", out / "checkpoints", out / "live")
        ckpt_mb = sum(p.stat().st_size for p in (out / "checkpoints").glob("*.safetensors")) / 2**20
    steady = statistics.median(rss[2:]) if len(rss) > 2 else rss[-1]
    peak = status("VmHWM")
    print(
        json.dumps(
            {
                "model": args.model,
                "size": args.size,
                "epochs": args.epochs,
                "images": args.images,
                "rss_before_training_mb": round(before),
                "rss_per_epoch_mb": rss,
                "steady_mb": round(steady),
                "max_epoch_rss_mb": max(rss),
                "peak_mb": round(peak),
                "checkpoint_files_mb": round(ckpt_mb),
                "peak_over_steady": round(peak / steady, 2),
                "max_epoch_over_steady": round(max(rss) / steady, 2),
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
