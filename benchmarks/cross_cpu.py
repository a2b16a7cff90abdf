"""What the fixed code paths cost (issue 37, docs/reproducibility.md), against the libraries'
own CPU dispatch, measured in the same run.

``pinned`` is what palm runs (palm.core.runtime: OpenCV's baseline code without IPP, numpy's
x86-64-v2 loops, MKL's CNR mode COMPATIBLE,STRICT, oneDNN capped at SSE4.1); ``dispatch`` lets
every library choose by the CPU (OpenCV optimised, numpy's AVX2/AVX-512 loops, MKL_CBWR=AUTO,
oneDNN at its best ISA). Each runs in a fresh process (the switches are read when a library
loads), alternately, ``--repeat`` times; the best time of each is kept. Work timed:

- synthesize: one full-size synthetic photograph drawn and JPEG-encoded (``_render``, 2124x2056);
- preprocess: one full-size JPEG decoded and resized to 224 px (``load_image``);
- augment: the training augmentation of 16 images at 224 px (``Augment`` of params.yaml);
- train step: SE-ResNet18 at 96 px, batch 16, forward, loss, backward, AdamW (the default network);
- predict: Paddle Inference + oneDNN (what ``palm predict`` runs), SE-ResNet18 at 96 px, batch 16.

Printed: seconds of each, and pinned / dispatch (above 1: the pinning is slower). ``--configs``
releases one pin at a time instead (``mkl_auto``, ``opencv_optimised``, ``numpy_simd``,
``onednn_all``) to say which costs what.

    python benchmarks/cross_cpu.py [--repeat 3] [--steps 5] [--work train_step ...] [--configs dispatch mkl_auto ...]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

DISPATCH = {"MKL_CBWR": "AUTO", "NPY_DISABLE_CPU_FEATURES": "", "ONEDNN_MAX_CPU_ISA": "ALL", "PALM_BENCH_CV_OPT": "1"}
# one pin at a time released, to say which costs what (--configs)
CONFIGS = {
    "pinned": {},
    "dispatch": DISPATCH,
    "mkl_auto": {"MKL_CBWR": "AUTO"},
    "opencv_optimised": {"PALM_BENCH_CV_OPT": "1"},
    "numpy_simd": {"NPY_DISABLE_CPU_FEATURES": ""},
    "onednn_all": {"ONEDNN_MAX_CPU_ISA": "ALL"},
}
WORK = ("synthesize", "preprocess", "augment", "train_step", "predict")


def child(steps: int, work: set[str]) -> dict[str, float]:
    import palm  # noqa: F401  (the pins, unless the environment overrides them)
    from palm.core.runtime import fixed_opencv

    cv2 = fixed_opencv()
    if os.environ.get("PALM_BENCH_CV_OPT") == "1":
        cv2.setUseOptimized(True)
    import numpy as np
    import paddle

    from palm.data.dataset import Augment
    from palm.data.image import load_image
    from palm.data.synthetic import _render
    from palm.nn.models import build_model
    from palm.serve.inference import paddle_inference, save

    def best(fn, n=steps):
        fn()
        times = []
        for _ in range(n):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return min(times)

    out = {}
    plan = ("train", "P0001.jpg", "P", 1, (2026, 1), 1.0, 90)
    jpeg = {}

    def synth():
        jpeg["bytes"] = _render(plan)[3]

    if work & {"synthesize", "preprocess"}:
        out["synthesize"] = best(synth)
        out["preprocess"] = best(lambda: load_image(jpeg["bytes"], 224), 10 * steps)
    imgs = np.random.default_rng(0).integers(0, 255, (16, 224, 224, 3), dtype=np.uint8)
    aug = Augment(hflip=True, vflip=True, rotate_deg=25, scale=0.1, brightness=0.15, contrast=0.15)
    if "augment" in work:
        out["augment"] = best(lambda: [aug(im, np.random.default_rng(i)) for i, im in enumerate(imgs)], 10 * steps)
    paddle.set_device("cpu")
    paddle.seed(0)
    model = build_model("senet18", image_size=96)
    opt = paddle.optimizer.AdamW(parameters=model.parameters(), learning_rate=1e-3, weight_decay=1e-4)
    x = paddle.to_tensor(np.random.default_rng(1).standard_normal((16, 3, 96, 96)).astype("float32"))
    y = paddle.to_tensor(np.random.default_rng(2).integers(0, 2, (16, 1)).astype("float32"))
    loss_fn = paddle.nn.BCEWithLogitsLoss()

    def step():
        loss = loss_fn(model(x), y)
        loss.backward()
        opt.step()
        opt.clear_grad()
        float(loss)

    if "train_step" in work:
        out["train_step"] = best(step)
    if "predict" in work:
        with tempfile.TemporaryDirectory() as tmp:
            save(model, 96, tmp)
            engine = paddle_inference(tmp, "cpu", threads=len(os.sched_getaffinity(0)))
            out["predict"] = best(lambda: engine(x.numpy()), 3 * steps)
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=3, help="fresh processes per configuration")
    ap.add_argument(
        "--steps",
        type=int,
        default=5,
        help="timed repetitions in each process (best kept; x10 for the short work, x3 for predict)",
    )
    ap.add_argument("--work", nargs="+", default=list(WORK), choices=WORK)
    ap.add_argument(
        "--configs",
        nargs="+",
        default=["dispatch"],
        choices=[c for c in CONFIGS if c != "pinned"],
        help="what to compare the pinned run with: everything released (dispatch) or one pin released",
    )
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.steps, set(args.work))))
        return
    names = ["pinned", *args.configs]
    best = {name: {} for name in names}
    for _ in range(args.repeat):
        for name in names:
            proc = subprocess.run(
                [sys.executable, __file__, "--child", "--steps", str(args.steps), "--work", *args.work],
                env={**os.environ, **CONFIGS[name]},
                capture_output=True,
                text=True,
                check=True,
            )
            for k, v in json.loads(proc.stdout.splitlines()[-1]).items():
                best[name][k] = min(v, best[name].get(k, v))
    print(f"{'work':<12} {'pinned s':>10} " + " ".join(f"{n + ' s':>18} {'pinned/' + n:>24}" for n in args.configs))
    for k in args.work:
        p = best["pinned"][k]
        print(f"{k:<12} {p:>10.4f} " + " ".join(f"{best[n][k]:>18.4f} {p / best[n][k]:>24.2f}" for n in args.configs))


if __name__ == "__main__":
    main()
