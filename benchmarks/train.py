"""Training throughput per model on this machine, and whether data loading costs anything.

For each model: images/s of training steps on in-memory random tensors (the network
alone), and the same number of steps fed by the pipeline's real loader (shards ->
FundusDataset with augmentation -> DataLoader). The ratio pipeline / in-memory should be
<= 1.05: data is never the bottleneck.

    python benchmarks/train.py [--models senet18 resnet50 ...] [--size 224] [--batch 16] [--steps 6]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import paddle

import palm  # noqa: F401  (CPU thread settings before paddle loads)
from palm.core.runtime import select_device
from palm.data.dataset import Augment, FundusDataset, load_split, make_loader
from palm.data.labels import build_labels
from palm.data.preprocess import preprocess
from palm.data.synthetic import generate
from palm.data.unzip import unzip_all
from palm.nn.models import build_model, training_loss


def make_shards(tmp: Path, size: int, n: int) -> Path:
    generate(
        tmp / "zips",
        seed=3,
        n_train_p=n // 2,
        n_train_n=n - n // 2,
        n_train_h=0,
        n_val_pm=1,
        n_val_non_pm=1,
        scale=0.25,
        progress=False,
    )
    unzip_all(tmp / "zips", tmp / "raw")
    build_labels(tmp / "raw").to_csv(tmp / "labels.csv", index=False)
    preprocess(tmp / "labels.csv", tmp / "raw", tmp / "shards", image_size=size)
    return tmp / "shards"


def time_steps(model, opt, batches) -> float:
    loss_fn = paddle.nn.BCEWithLogitsLoss()
    t0 = time.perf_counter()
    for x, y in batches:
        loss = training_loss(model(x), y, loss_fn)
        loss.backward()
        opt.step()
        opt.clear_grad()
        float(loss)
    return time.perf_counter() - t0


def bench(name: str, shards: Path, size: int, batch: int, steps: int, workers: int) -> dict:
    paddle.seed(0)
    model = build_model(name, image_size=size)
    model.train()
    opt = paddle.optimizer.AdamW(1e-4, parameters=model.parameters())
    x = paddle.randn([batch, 3, size, size])
    y = paddle.to_tensor(np.random.default_rng(0).integers(0, 2, (batch, 1)).astype("float32"))
    time_steps(model, opt, [(x, y)] * 2)  # warm-up
    t_mem = time_steps(model, opt, [(x, y)] * steps)
    ds = FundusDataset(
        load_split(shards, "train"),
        Augment(hflip=True, rotate_deg=10, scale=0.05, brightness=0.15, contrast=0.15),
        seed=0,
    )
    loader = make_loader(ds, batch, shuffle=True, workers=workers, drop_last=True)

    def pipeline_batches():
        n = 0
        while True:
            for b in loader:
                yield b
                n += 1
                if n == steps:
                    return
            ds.set_epoch(ds.epoch + 1)

    t_pipe = time_steps(model, opt, pipeline_batches())
    return {"model": name, "img_s": steps * batch / t_mem, "ratio": t_pipe / t_mem}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["lenet", "alexnet", "vgg16", "googlenet", "resnet50", "senet18"])
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--workers", type=int, default=0, help="DataLoader workers (train.workers)")
    args = ap.parse_args(argv)
    device = select_device("auto")
    print(
        f"device {device}, {os.cpu_count()} cores, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}, "
        f"batch {args.batch}, {args.size}px, {args.steps} timed steps after 2 warm-up steps"
    )
    with tempfile.TemporaryDirectory() as tmp:
        shards = make_shards(Path(tmp), args.size, max(2 * args.batch, 32))
        print(f"{'model':10s} {'train img/s':>12s} {'pipeline/in-memory':>20s}")
        for name in args.models:
            r = bench(name, shards, args.size, args.batch, args.steps, args.workers)
            print(f"{r['model']:10s} {r['img_s']:12.2f} {r['ratio']:20.3f}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
