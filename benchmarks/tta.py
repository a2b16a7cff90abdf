"""The cost of test-time augmentation (``train.tta``, :mod:`palm.serve.tta`) through the fast engine.

For SE-ResNet18 and ResNet50 at their default 96 px input (randomly initialised: speed does not
depend on the weights), exported and run by Paddle Inference with oneDNN on the CPU (what
``palm predict``, ``palm serve`` and evaluate use), ``--images`` random images are scored in
batches of ``--batch`` under each mode (the views of a batch go to the engine together, in
calls of at most ``palm.serve.tta.MAX_VIEW_BATCH`` images). The modes take turns within each
of ``--repeat`` rounds (so a change of load on the machine hits them alike); the best round
of each is kept. Printed: ms per image of each mode and its ratio to ``off`` of the same run
(decoding the photographs, which ``palm predict`` also pays, is not included: see
benchmarks/predict.py).

    python benchmarks/tta.py [--images 128] [--batch 16] [--repeat 3]
"""

from __future__ import annotations

import argparse
import tempfile
import time

import palm  # noqa: F401  (thread settings before paddle loads)

NETWORKS = (("senet18", 96), ("resnet50", 96))  # (model, input size)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=128)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--models", nargs="*", default=[n for n, _ in NETWORKS])
    args = ap.parse_args(argv)

    import numpy as np
    import paddle

    from palm.core.params import TTA_MODES
    from palm.core.runtime import machine_share
    from palm.nn.models import build_model
    from palm.serve import tta
    from palm.serve.inference import paddle_inference, save

    threads = machine_share().threads
    print(
        f"Paddle Inference, oneDNN fp32, {threads} thread(s); {args.images} images in batches of {args.batch}, "
        f"best of {args.repeat} rounds"
    )
    print("| model | input | tta | views | ms/image | x off |")
    print("|---|---|---|---|---|---|")
    for name, size in NETWORKS:
        if name not in args.models:
            continue
        paddle.seed(0)
        layer = build_model(name, image_size=size)
        with tempfile.TemporaryDirectory(prefix="palm-bench-") as tmp:
            save(layer, size, tmp)
            engine = paddle_inference(tmp, "cpu", "fp32", threads, size)
        x = np.random.default_rng(0).uniform(-1, 1, (args.images, 3, size, size)).astype(np.float32)
        for mode in TTA_MODES:  # warm-up: oneDNN builds its kernels per shape
            tta.predict(engine, x[: args.batch], mode)
        best = {m: float("inf") for m in TTA_MODES}
        for _ in range(args.repeat):
            for mode in TTA_MODES:
                t0 = time.perf_counter()
                for i in range(0, args.images, args.batch):
                    tta.predict(engine, x[i : i + args.batch], mode)
                best[mode] = min(best[mode], time.perf_counter() - t0)
        for mode in TTA_MODES:
            ms = 1000 * best[mode] / args.images
            print(
                f"| {name} | {size} | {mode} | {tta.N_VIEWS[mode]} | {ms:.2f} | {best[mode] / best['off']:.2f} |",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
