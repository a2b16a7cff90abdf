"""Screening speed: ``palm predict`` against its two limits (decoding, the network), in one run.

For the default network (SE-ResNet18: photographs decoded to 224 px, network at 96 px) and
for ResNet50 at 224 px, with randomly initialised weights (speed does not depend on them):

(a) decoding alone: ``palm.serve.decode.decode_stream`` on full-size synthetic JPEGs, one process
    per core;
(b) the network alone, per engine, on a batch of ``--batch`` random images: eager Paddle,
    Paddle Inference with oneDNN off, with oneDNN (what ``palm predict`` uses), with oneDNN
    bf16 (``--precision bf16``); and for ResNet50 PyTorch eager, fp32 and bf16 autocast
    (a benchmark-only extra: ``pip install -e ".[bench]"``);
(c) ``palm predict`` end to end (``Predictor.predict``: decoding in worker processes while
    the network runs; model loading excluded, timed separately) on full-size synthetic
    JPEGs of both sizes of the real data, 1444x1444 and 2124x2056.

Printed: images/s of each, and the ratios end-to-end / min(decode, network) (goal >= 0.8;
decoding and the network share the cores, so end-to-end cannot exceed 1 / (1/decode +
1/network), also printed as a ratio) and Paddle's best engine / PyTorch's best for ResNet50
(goal >= 1.0).

    python benchmarks/predict.py [--images 256] [--batch 16] [--repeat 3]
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import sys
import tempfile
import time
from pathlib import Path

import palm  # noqa: F401  (thread settings before paddle or torch load)

NETWORKS = (("senet18", 224, 96), ("resnet50", 224, 224))  # (model, image_size, input_size)
PHOTO_SIZES = ((1444, 1444), (2124, 2056))
NET = "Paddle Inference + oneDNN (palm predict)"


def photos(folder: Path, size: tuple[int, int], n: int, distinct: int = 8) -> list[Path]:
    """``n`` full-size synthetic fundus JPEGs (``distinct`` drawings, repeated under new names)."""
    import cv2
    import numpy as np

    from palm.data.synthetic import draw_fundus

    folder.mkdir(parents=True, exist_ok=True)
    first = []
    for i in range(distinct):
        img, _ = draw_fundus(np.random.default_rng(i), "PHN"[i % 3], size, "LR"[i % 2])
        f = folder / f"I{i:05d}.jpg"
        cv2.imwrite(str(f), img, [cv2.IMWRITE_JPEG_QUALITY, 95])
        first.append(f)
    files = list(first)
    for i in range(distinct, n):
        files.append(shutil.copyfile(first[i % distinct], folder / f"I{i:05d}.jpg"))
    return files


def best_rates(jobs: dict, repeat: int) -> dict[str, float]:
    """Images/s of each job ``name: (fn, n_images)``: the fastest of ``repeat`` rounds after a
    warm-up round, each round running every job once, so that jobs compared with each other
    see the same load (this machine is shared)."""
    best = dict.fromkeys(jobs, 0.0)
    for r in range(repeat + 1):
        for name, (fn, n) in jobs.items():
            t0 = time.perf_counter()
            fn()
            if r:
                best[name] = max(best[name], n / (time.perf_counter() - t0))
    return best


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def decode_job(files, image_size, input_size):
    from palm.serve.decode import decode_stream

    return lambda: all(d.error is None for d in decode_stream(files, image_size, input_size))


def save_model(folder: Path, name: str, image_size: int, input_size: int) -> Path:
    import paddle

    from palm.core.params import DEFAULT_THRESHOLD
    from palm.nn.modelinfo import write_info
    from palm.nn.models import build_model
    from palm.nn.weights import MODEL_WEIGHTS, save_state

    folder.mkdir(parents=True)
    paddle.seed(0)
    model = build_model(name, image_size=input_size)
    save_state(model.state_dict(), folder / MODEL_WEIGHTS)
    write_info(
        folder, {"model": name, "image_size": image_size, "input_size": input_size, "threshold": DEFAULT_THRESHOLD}
    )
    return folder


def paddle_engines(models: Path, export: Path, batch: int, input_size: int) -> dict:
    """Jobs: one batch through each Paddle engine."""
    import numpy as np
    import paddle.inference as pi

    from palm.core.runtime import machine_share
    from palm.serve.inference import load_engine, sigmoid

    x = np.random.default_rng(0).uniform(-1, 1, (batch, 3, input_size, input_size)).astype("float32")
    eager, _ = load_engine(models, device="cpu", engine="eager")
    # Paddle Inference without oneDNN: configured here, palm.serve.inference always enables it on the CPU
    config = pi.Config(str(export / "inference.json"), str(export / "inference.pdiparams"))
    config.disable_gpu()
    config.disable_onednn()
    config.set_cpu_math_library_num_threads(machine_share().threads)
    config.disable_glog_info()
    predictor = pi.create_predictor(config)
    x_in = predictor.get_input_handle(predictor.get_input_names()[0])
    y_out = predictor.get_output_handle(predictor.get_output_names()[0])

    def plain():
        x_in.reshape(list(x.shape))
        x_in.copy_from_cpu(x)
        predictor.run()
        return sigmoid(y_out.copy_to_cpu())

    fp32, _ = load_engine(export, device="cpu", engine="paddle-inference", precision="fp32")
    bf16, _ = load_engine(export, device="cpu", engine="paddle-inference", precision="bf16")
    return {
        "Paddle eager": (lambda: eager(x), batch),
        "Paddle Inference, oneDNN off": (plain, batch),
        NET: (lambda: fp32(x), batch),
        "Paddle Inference + oneDNN bf16": (lambda: bf16(x), batch),
    }


def torch_engines(batch: int, size: int) -> dict:
    """Jobs: one batch through PyTorch eager, fp32 and bf16 autocast (none without torch)."""
    try:
        import torch
    except ImportError:
        print("(PyTorch not installed: pip install -e '.[bench]'; its rows are left out)", file=sys.stderr)
        return {}
    sys.path.insert(0, str(Path(__file__).parent))
    from cpu_vs_torch import torch_models

    from palm.core.runtime import machine_share

    torch.set_num_threads(machine_share().threads)
    torch.manual_seed(0)
    model = torch_models()["resnet50"]().eval()
    x = torch.randn(batch, 3, size, size)

    def job(ctx):
        def run():
            with torch.inference_mode(), ctx():
                return torch.sigmoid(model(x).float())

        return run, batch

    return {
        "PyTorch eager fp32": job(contextlib.nullcontext),
        "PyTorch eager bf16 autocast": job(lambda: torch.autocast("cpu", dtype=torch.bfloat16)),
    }


def end_to_end_job(model_dir: Path, files, batch: int):
    """(job: Predictor.predict on ``files``, seconds Predictor.load took)."""
    from palm.serve.predict import Predictor

    t0 = time.perf_counter()
    predictor = Predictor.load(model_dir, device="cpu")
    load_s = time.perf_counter() - t0

    def run():
        assert all(r["error"] is None for r in predictor.predict(files, batch_size=batch, progress=False))

    return (run, len(files)), load_s


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=256, help="photographs per size (default: %(default)s)")
    ap.add_argument("--batch", type=int, default=16, help="batch of the network (palm predict's default)")
    ap.add_argument("--repeat", type=int, default=3, help="timed rounds, the fastest counts")
    args = ap.parse_args(argv)

    from palm.core.runtime import machine_share, select_device
    from palm.serve.export import export

    select_device("cpu")
    print(
        f"{len(machine_share().cpus)} core(s), {args.images} photographs per size, batch {args.batch}; "
        f"images/s, fastest of {args.repeat} rounds after a warm-up round (the jobs of a comparison "
        "interleaved in each round)"
    )
    rows, ratios = [], []
    with tempfile.TemporaryDirectory(prefix="palm-bench-") as tmp:
        tmp = Path(tmp)
        folders = {size: photos(tmp / f"{size[0]}x{size[1]}", size, args.images) for size in PHOTO_SIZES}
        two = folders[PHOTO_SIZES[0]][:2]
        start = min(timed(decode_job(two, 224, 224)) for _ in range(3))
        print(
            f"starting the decoding processes and decoding 2 photographs: {start:.2f} s (paid once per "
            "palm predict run, and by every timed run of decoding and of palm predict below)"
        )
        for name, image_size, input_size in NETWORKS:
            label = f"{name} ({image_size} px decoded, {input_size} px network)"
            models = save_model(tmp / name / "models", name, image_size, input_size)
            export(models, tmp / name / "export", device="cpu")
            jobs = paddle_engines(models, tmp / name / "export", args.batch, input_size)
            if name == "resnet50":
                jobs |= torch_engines(args.batch, input_size)
            nets = best_rates(jobs, args.repeat)
            for engine, rate in nets.items():
                rows.append((label, f"network alone: {engine}", rate))
            for size, files in folders.items():
                e2e_job, load_s = end_to_end_job(tmp / name / "export", files, args.batch)
                got = best_rates(
                    {
                        "decode": (decode_job(files, image_size, input_size), len(files)),
                        "net": jobs[NET],
                        "e2e": e2e_job,
                    },
                    args.repeat,
                )
                dec, net, e2e = got["decode"], got["net"], got["e2e"]
                rows.append((label, f"decoding alone, {size[0]}x{size[1]} JPEGs, all cores", dec))
                rows.append((label, f"network alone ({NET}), in the same rounds", net))
                rows.append(
                    (label, f"palm predict end to end, {size[0]}x{size[1]} (load {load_s:.1f} s excluded)", e2e)
                )
                ratios.append(
                    (f"{name} {size[0]}x{size[1]}: end-to-end / min(decode, network)", e2e / min(dec, net), ">= 0.8")
                )
                # decoding and the network share the same cores: together they cannot beat this
                ratios.append(
                    (
                        f"{name} {size[0]}x{size[1]}: end-to-end / (1 / (1/decode + 1/network))",
                        e2e * (1 / dec + 1 / net),
                        "1.0 = no overlap loss",
                    )
                )
            if name == "resnet50" and any(k.startswith("PyTorch") for k in nets):
                best_paddle = max(v for k, v in nets.items() if k.startswith("Paddle"))
                best_torch = max(v for k, v in nets.items() if k.startswith("PyTorch"))
                ratios.append(("resnet50: Paddle's best engine / PyTorch's best", best_paddle / best_torch, ">= 1.0"))
                best_fp32 = max(v for k, v in nets.items() if k.startswith("Paddle") and "bf16" not in k)
                ratios.append(
                    (
                        "resnet50: Paddle's best fp32 / PyTorch eager fp32",
                        best_fp32 / nets["PyTorch eager fp32"],
                        ">= 1.0",
                    )
                )
    print()
    print("| network | measured | images/s |")
    print("|---|---|---|")
    for label, what, rate in rows:
        print(f"| {label} | {what} | {rate:.1f} |")
    print()
    print("| ratio | value | goal |")
    print("|---|---|---|")
    for what, value, goal in ratios:
        print(f"| {what} | {value:.2f} | {goal} |")


if __name__ == "__main__":
    main()
