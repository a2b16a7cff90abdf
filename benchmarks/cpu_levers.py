"""Each CPU speed lever of Paddle, measured against the project's default in one run.

One training step of ResNet50 (forward, BCE loss, backward, optimizer step) on a random
batch; every lever runs in a fresh process (flags and OpenMP settings are read when Paddle
loads) and is printed as images/s and as a ratio to the default configuration, measured
in the same run. Levers: oneDNN flags, bf16 autocast O1/O2, static graph
(``paddle.jit.to_static``), NHWC layout, batch size, thread count and binding.

    python benchmarks/cpu_levers.py [--steps 3] [--levers default bf16_o1 ...]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

from cpu_vs_torch import paddle_timed_steps  # noqa: E402  (this folder is on sys.path when run as a script)

# name: (environment changes, child options)
LEVERS = {
    "default": ({}, {}),
    "onednn_flags": ({"FLAGS_use_onednn": "1", "FLAGS_use_mkldnn": "1"}, {}),
    "bf16_o1": ({}, {"amp": "O1"}),
    "bf16_o2": ({}, {"amp": "O2"}),
    "to_static": ({}, {"static": True}),
    "nhwc": ({}, {"nhwc": True}),
    "batch_16": ({}, {"batch": 16}),
    "batch_32": ({}, {"batch": 32}),
    "one_thread": ({"OMP_NUM_THREADS": "1"}, {}),
    "threads_bound": ({"OMP_PROC_BIND": "close", "OMP_PLACES": "cores"}, {}),
    "threads_spinning": ({"OMP_WAIT_POLICY": "ACTIVE"}, {}),
}


def resnet50_nhwc():
    """ResNet50 (one logit) written with data_format="NHWC" (paddle.vision's is NCHW only)."""
    import paddle.nn as nn

    f = "NHWC"

    def conv_bn(cin, cout, k, stride=1, pad=0):
        return [
            nn.Conv2D(cin, cout, k, stride, pad, bias_attr=False, data_format=f),
            nn.BatchNorm2D(cout, data_format=f),
        ]

    class Bottleneck(nn.Layer):
        def __init__(self, cin, width, stride):
            super().__init__()
            cout = width * 4
            self.body = nn.Sequential(
                *conv_bn(cin, width, 1),
                nn.ReLU(),
                *conv_bn(width, width, 3, stride, 1),
                nn.ReLU(),
                *conv_bn(width, cout, 1),
            )
            self.down = nn.Sequential(*conv_bn(cin, cout, 1, stride)) if stride != 1 or cin != cout else None
            self.relu = nn.ReLU()

        def forward(self, x):
            return self.relu(self.body(x) + (x if self.down is None else self.down(x)))

    layers, cin = [], 64
    for width, blocks, stride in ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)):
        for i in range(blocks):
            layers.append(Bottleneck(cin, width, stride if i == 0 else 1))
            cin = width * 4
    return nn.Sequential(
        *conv_bn(3, 64, 7, 2, 3),
        nn.ReLU(),
        nn.MaxPool2D(3, 2, 1, data_format=f),
        *layers,
        nn.AdaptiveAvgPool2D(1, data_format=f),
        nn.Flatten(),
        nn.Linear(2048, 1),
    )


def child(opts: dict) -> dict:
    import contextlib

    import paddle

    import palm  # noqa: F401  (the project's thread settings, unless the lever overrides them)
    from palm.core.runtime import select_device
    from palm.nn.models import build_model

    select_device("cpu")
    paddle.seed(0)
    batch, size = opts.get("batch", 10), opts["size"]
    model = resnet50_nhwc() if opts.get("nhwc") else build_model("resnet50", image_size=size)
    model.train()
    opt = paddle.optimizer.AdamW(0.001, parameters=model.parameters())
    amp = opts.get("amp")
    if amp == "O2":
        model, opt = paddle.amp.decorate(model, opt, level="O2", dtype="bfloat16")
    if opts.get("static"):
        model = paddle.jit.to_static(model, full_graph=True)
    x = paddle.randn([batch, size, size, 3] if opts.get("nhwc") else [batch, 3, size, size])
    ctx = (lambda: paddle.amp.auto_cast(dtype="bfloat16", level=amp)) if amp else contextlib.nullcontext
    step = statistics.median(paddle_timed_steps(model, opt, x, ctx, opts["steps"]))
    return {"s_per_step": step, "img_per_s": batch / step}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--levers", nargs="+", default=list(LEVERS), choices=list(LEVERS))
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print("RESULT " + json.dumps(child(json.loads(args.child))))
        return
    levers = ["default"] + [name for name in args.levers if name != "default"]
    print(f"ResNet50 training step, {args.size}px, batch 10 unless said, {os.cpu_count()} cores")
    print(f"{'lever':18s} {'s/step':>8s} {'img/s':>7s} {'vs default':>11s}")
    base = None
    for name in levers:
        env, opts = LEVERS[name]
        opts = {"steps": args.steps, "size": args.size, **opts}
        proc = subprocess.run(
            [sys.executable, __file__, "--child", json.dumps(opts)],
            capture_output=True,
            text=True,
            env={**os.environ, **env},
        )
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode or not lines:
            reason = (proc.stderr.strip().splitlines() or ["no output"])[-1][:60]
            print(f"{name:18s} failed (exit {proc.returncode}): {reason}", flush=True)
            continue
        r = json.loads(lines[-1][7:])
        base = base or r["img_per_s"]
        print(f"{name:18s} {r['s_per_step']:8.2f} {r['img_per_s']:7.2f} {r['img_per_s'] / base:10.2f}x", flush=True)


if __name__ == "__main__":
    main()
