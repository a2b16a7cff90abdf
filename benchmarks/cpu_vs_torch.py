"""Paddle vs PyTorch CPU training speed on the same network, measured in one run.

ResNet50 and VGG16 (both with one output logit) are built in both frameworks; each takes
training steps (forward, BCE loss, backward, optimizer step) on the same random batch.
Printed: median seconds per step after warm-up, and the Paddle/PyTorch throughput ratio.
Paddle runs with the project's default CPU settings (set on ``import palm``);
PyTorch is a benchmark-only extra: ``pip install -e ".[bench]"``.

    python benchmarks/cpu_vs_torch.py [--models resnet50 vgg16] [--batch 10] [--steps 5] [--size 224]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import palm  # noqa: F401  (thread settings before paddle or torch load)


def paddle_step_times(name: str, batch: int, size: int, steps: int, amp: str) -> list[float]:
    import contextlib

    import paddle

    from palm.core.runtime import select_device
    from palm.nn.models import build_model

    select_device("cpu")
    paddle.seed(0)
    model = build_model(name, image_size=size)
    model.train()
    opt = paddle.optimizer.Momentum(0.01, momentum=0.9, parameters=model.parameters())
    ctx = (lambda: paddle.amp.auto_cast(dtype="bfloat16", level="O1")) if amp == "bf16" else contextlib.nullcontext
    return paddle_timed_steps(model, opt, paddle.randn([batch, 3, size, size]), ctx, steps)


def paddle_timed_steps(model, opt, x, ctx, steps: int, warmup: int = 2) -> list[float]:
    """Seconds of each training step (forward under ``ctx``, BCE loss, backward, optimizer
    step) on the batch ``x`` with random 0/1 labels, after ``warmup`` untimed steps."""
    import numpy as np
    import paddle

    y = paddle.to_tensor(np.random.default_rng(0).integers(0, 2, (x.shape[0], 1)).astype("float32"))
    loss_fn = paddle.nn.BCEWithLogitsLoss()
    times = []
    for _ in range(steps + warmup):
        t0 = time.perf_counter()
        with ctx():
            out = model(x)
        loss = loss_fn(out.astype("float32"), y)
        loss.backward()
        opt.step()
        opt.clear_grad()
        float(loss)
        times.append(time.perf_counter() - t0)
    return times[warmup:]


def torch_models():
    import torch.nn as nn

    class Bottleneck(nn.Module):
        def __init__(self, cin, width, stride):
            super().__init__()
            cout = width * 4
            self.body = nn.Sequential(
                nn.Conv2d(cin, width, 1, bias=False),
                nn.BatchNorm2d(width),
                nn.ReLU(inplace=True),
                nn.Conv2d(width, width, 3, stride, 1, bias=False),
                nn.BatchNorm2d(width),
                nn.ReLU(inplace=True),
                nn.Conv2d(width, cout, 1, bias=False),
                nn.BatchNorm2d(cout),
            )
            self.down = (
                nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
                if stride != 1 or cin != cout
                else nn.Identity()
            )
            self.relu = nn.ReLU(inplace=True)

        def forward(self, x):
            return self.relu(self.body(x) + self.down(x))

    def resnet50():
        layers, cin = [], 64
        for width, blocks, stride in ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)):
            for i in range(blocks):
                layers.append(Bottleneck(cin, width, stride if i == 0 else 1))
                cin = width * 4
        return nn.Sequential(
            nn.Conv2d(3, 64, 7, 2, 3, bias=False),
            nn.BatchNorm2d(64),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(3, 2, 1),
            *layers,
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(2048, 1),
        )

    def vgg16():  # with batch norm, like the project's default vgg16
        layers, cin = [], 3
        for v in (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"):
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(cin, v, 3, padding=1), nn.BatchNorm2d(v), nn.ReLU(inplace=True)]
                cin = v
        return nn.Sequential(
            *layers,
            nn.AdaptiveAvgPool2d(7),
            nn.Flatten(),
            nn.Linear(512 * 49, 4096),
            nn.ReLU(True),
            nn.Dropout(),
            nn.Linear(4096, 4096),
            nn.ReLU(True),
            nn.Dropout(),
            nn.Linear(4096, 1),
        )

    return {"resnet50": resnet50, "vgg16": vgg16}


def torch_step_times(name: str, batch: int, size: int, steps: int, amp: str) -> list[float]:
    import contextlib

    import torch

    torch.manual_seed(0)
    model = torch_models()[name]()
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x = torch.randn(batch, 3, size, size)
    y = torch.randint(0, 2, (batch, 1)).float()
    loss_fn = torch.nn.BCEWithLogitsLoss()
    ctx = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if amp == "bf16" else contextlib.nullcontext
    times = []
    for _ in range(steps + 2):
        t0 = time.perf_counter()
        with ctx():
            out = model(x)
        loss = loss_fn(out.float(), y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        loss.item()
        times.append(time.perf_counter() - t0)
    return times[2:]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["resnet50", "vgg16"])
    ap.add_argument("--batch", type=int, default=10)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--amp", nargs="+", default=["fp32"], choices=["fp32", "bf16"])
    args = ap.parse_args(argv)
    try:
        import torch
    except ImportError:
        sys.exit("PyTorch is not installed: pip install -e '.[bench]'")
    import os

    print(
        f"{os.cpu_count()} cores, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}, "
        f"torch {torch.__version__} ({torch.get_num_threads()} threads), batch {args.batch}, {args.size}px"
    )
    print(f"{'model':10s} {'amp':5s} {'paddle s/step':>14s} {'torch s/step':>13s} {'paddle/torch throughput':>24s}")
    for name in args.models:
        for amp in args.amp:
            tp = statistics.median(paddle_step_times(name, args.batch, args.size, args.steps, amp))
            tt = statistics.median(torch_step_times(name, args.batch, args.size, args.steps, amp))
            print(f"{name:10s} {amp:5s} {tp:14.3f} {tt:13.3f} {tt / tp:24.2f}", flush=True)


if __name__ == "__main__":
    main()
