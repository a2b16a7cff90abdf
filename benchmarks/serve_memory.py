"""Peak memory of the costliest requests ``palm serve`` accepts (issue 40): its decoding budget at work.

``palm serve`` with its default limits (``--max-decode-mb 1024``) and the benchmark model of
``serve.py`` (decoded to 224 px) is sent, for each case, 32 PNGs of zeros (tens of kB each)
whose decoding the service estimates from their headers just below half the budget (two are
decoded at once on two cores): 16-bit greyscale and 8-bit RGBA, the costliest modes per pixel;
then one size larger, which must be refused (413) without being decoded. Printed per case: the
status, the time, and the server's resident memory before the request and at its peak (VmHWM,
reset before each request through /proc/PID/clear_refs; Linux).

    python benchmarks/serve_memory.py
"""

from __future__ import annotations

import struct
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

import httpx

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from serve import HOST, free_port, save_model  # noqa: E402

MiB = 1 << 20
CASES = [("16-bit greyscale", 4500, 16, 0), ("8-bit RGBA", 3450, 8, 6), ("16-bit greyscale, too large", 4600, 16, 0)]


def png(width: int, height: int, bit_depth: int, color_type: int) -> bytes:
    """A PNG of zeros, compressed row by row."""
    channels = {0: 1, 2: 3, 4: 2, 6: 4}[color_type]
    row = b"\0" * (1 + width * channels * bit_depth // 8)
    z = zlib.compressobj(9)
    idat = b"".join(z.compress(row) for _ in range(height)) + z.flush()

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0))
        + chunk(b"IDAT", idat)
        + chunk(b"IEND", b"")
    )


def status(pid: int, field: str) -> int:
    return next(
        int(line.split()[1]) * 1024
        for line in Path(f"/proc/{pid}/status").read_text().splitlines()
        if line.startswith(field + ":")
    )


def main() -> None:
    from palm.serve.decode import decode_cost

    with tempfile.TemporaryDirectory() as tmp:
        models = save_model(Path(tmp) / "models")
        port = free_port()
        proc = subprocess.Popen(
            [sys.executable, "-m", "palm.cli", "serve", "--model", str(models), "--port", str(port)],
            stderr=subprocess.DEVNULL,
        )
        url = f"http://{HOST}:{port}"
        try:
            for _ in range(400):
                try:
                    if httpx.get(url + "/healthz", timeout=1).status_code == 200:
                        break
                except httpx.TransportError:
                    time.sleep(0.25)
            for label, side, bit_depth, color_type in CASES:
                image = png(side, side, bit_depth, color_type)
                cost = decode_cost(image, [224]).bytes
                Path(f"/proc/{proc.pid}/clear_refs").write_text("5")
                before, t0 = status(proc.pid, "VmRSS"), time.perf_counter()
                r = httpx.post(
                    url + "/v1/predict",
                    files=[("files", (f"{i}.png", image)) for i in range(32)],
                    params={"grade_all": "true"},
                    timeout=900,
                )
                peak = status(proc.pid, "VmHWM")
                print(
                    f"{label}: 32 x {side}x{side} PNG ({len(image) / 1e3:.0f} kB each, ~{cost / MiB:.0f} MiB each "
                    f"to decode): HTTP {r.status_code} in {time.perf_counter() - t0:.1f} s; resident "
                    f"{before / MiB:.0f} MiB before, peak {peak / MiB:.0f} MiB (+{(peak - before) / MiB:.0f} MiB)",
                    flush=True,
                )
        finally:
            proc.terminate()
            proc.wait(timeout=60)


if __name__ == "__main__":
    main()
