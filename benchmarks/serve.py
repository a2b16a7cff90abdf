"""Load on ``palm serve``: requests/s and latency at 1, 4 and 16 clients, memory over many requests.

On this machine's loopback interface only, bounded in count and time. The default network
(SE-ResNet18: photographs decoded to 224 px, network at 96 px), randomly initialised (speed
does not depend on the weights), serves full-size synthetic JPEGs (1444x1444, as the PALM
photographs) from ``palm serve`` started as a clinic starts it (a subprocess); clients post one
photograph per request (``POST /v1/predict``, no Grad-CAM).

Printed, as a Markdown table: per number of concurrent clients, requests (= images) per second,
p50 and p95 latency and failed requests; then ``palm predict``'s rate (``Predictor.predict``,
model loading excluded) on the same files and model, and the ratio (goal >= 0.8); then the
server's resident memory (VmRSS) after a warm-up and after ``--rss-requests`` more requests
(goal <= 1.1x).

    python benchmarks/serve.py [--requests 200] [--rss-requests 10000] [--max-seconds 120]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import palm  # noqa: F401  (thread settings before paddle loads)

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from predict import photos  # noqa: E402  (full-size synthetic fundus JPEGs)

HOST = "127.0.0.1"


def save_model(folder: Path, name: str = "senet18", image_size: int = 224, input_size: int = 96) -> Path:
    import paddle

    from palm.nn.models import build_model
    from palm.nn.weights import save_state

    folder.mkdir(parents=True)
    paddle.seed(0)
    save_state(build_model(name, image_size=input_size).state_dict(), folder / "model.safetensors")
    (folder / "model.json").write_text(
        json.dumps({"model": name, "image_size": image_size, "input_size": input_size, "threshold": 0.5})
    )
    return folder


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


async def load(url: str, bodies: list[bytes], clients: int, n: int, max_seconds: float) -> dict:
    """``n`` requests (fewer if ``max_seconds`` runs out) from ``clients`` concurrent clients."""
    import httpx

    latencies: list[float] = []
    failed = 0
    sent = 0
    deadline = time.perf_counter() + max_seconds

    async def client(http):
        nonlocal sent, failed
        while sent < n and time.perf_counter() < deadline:
            body = bodies[sent % len(bodies)]
            sent += 1
            t0 = time.perf_counter()
            try:
                r = await http.post(url, files=[("files", ("photo.jpg", body, "image/jpeg"))])
                ok = r.status_code == 200 and r.json()["results"][0].get("probability") is not None
            except httpx.HTTPError:
                ok = False
            latencies.append(time.perf_counter() - t0)
            failed += not ok

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(timeout=120, limits=limits) as http:
        t0 = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(clients)))
        wall = time.perf_counter() - t0
    lat = sorted(latencies)
    q = lambda p: lat[min(len(lat) - 1, int(p * len(lat)))] * 1000  # noqa: E731
    return {
        "clients": clients,
        "requests": len(lat),
        "rps": len(lat) / wall,
        "p50_ms": q(0.5),
        "p95_ms": q(0.95),
        "failed": failed,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=200, help="requests per client count (default %(default)s)")
    ap.add_argument("--clients", default="1,4,16")
    ap.add_argument(
        "--rss-requests",
        type=int,
        default=10_000,
        help="requests between the two memory readings (default %(default)s)",
    )
    ap.add_argument("--max-seconds", type=float, default=120, help="bound on each phase (default %(default)s)")
    ap.add_argument("--predict-images", type=int, default=128, help="images for palm predict's rate")
    args = ap.parse_args()

    import httpx

    from palm.serve.predict import Predictor

    logging.getLogger("httpx").setLevel(logging.WARNING)  # not a line per request

    with tempfile.TemporaryDirectory(prefix="palm-bench-serve-") as tmp:
        tmp = Path(tmp)
        models = save_model(tmp / "models")
        files = photos(tmp / "photos", (1444, 1444), args.predict_images)
        bodies = [f.read_bytes() for f in files[:8]]

        predictor = Predictor.load(models)
        list(predictor.predict(files[:16], progress=False))  # warm-up
        t0 = time.perf_counter()
        n = sum(1 for _ in predictor.predict(files, progress=False))
        predict_rate = n / (time.perf_counter() - t0)
        del predictor

        port = free_port()
        proc = subprocess.Popen(
            [sys.executable, "-m", "palm.cli", "serve", "--model", str(models), "--host", HOST, "--port", str(port)],
            stderr=subprocess.PIPE,
            text=True,
        )
        base = f"http://{HOST}:{port}"
        try:
            for _ in range(600):
                try:
                    if httpx.get(base + "/healthz", timeout=1).status_code == 200:
                        break
                except httpx.TransportError:
                    time.sleep(0.2)
            url = base + "/v1/predict"
            asyncio.run(load(url, bodies, 4, 64, args.max_seconds))  # warm-up
            rows = [
                asyncio.run(load(url, bodies, int(c), args.requests, args.max_seconds)) for c in args.clients.split(",")
            ]
            rss_before = rss_mib(proc.pid)
            t0 = time.perf_counter()
            many = asyncio.run(load(url, bodies, 4, args.rss_requests, args.max_seconds * 10))
            rss_after = rss_mib(proc.pid)
            many_s = time.perf_counter() - t0
        finally:
            proc.terminate()
            proc.wait(timeout=30)

    print("| clients | requests | requests/s | p50 ms | p95 ms | failed |")
    print("|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['clients']} | {r['requests']} | {r['rps']:.1f} | {r['p50_ms']:.0f} | {r['p95_ms']:.0f} | {r['failed']} |"
        )
    best = max(r["rps"] for r in rows)
    print(
        f"\npalm predict on the same files and model: {predict_rate:.1f} images/s; "
        f"palm serve's best / palm predict = {best / predict_rate:.2f} (goal >= 0.8)"
    )
    print(
        f"resident memory of the server: {rss_before:.0f} MiB after warm-up, {rss_after:.0f} MiB after "
        f"{many['requests']} more requests at 4 clients ({many_s:.0f} s, {many['failed']} failed): "
        f"{rss_after / rss_before:.3f}x (goal <= 1.1)"
    )


if __name__ == "__main__":
    main()
