"""`palm serve` under hostile input (issue 40): a request's memory is bounded before decoding,
the audit log fails closed, the page reads a model card, and the service trusts no caller.

One hardened server (a subprocess, as a clinic starts it: a model card beside the weights, an
access token, an audit log, a small decoding budget, short timeouts) serves the model that
`tests/test_serve.py` saves; the audit log's failures are injected in-process (TestClient).
"""

from __future__ import annotations

import io
import json
import socket
import sqlite3
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import cv2
import httpx
import numpy as np
import pytest
from PIL import Image

from conftest import ENV
from palm.cli import main as palm_main
from test_serve import CHROMIUM, CHROMIUM_ARGS, free_port, save_model, serving

TOKEN = "s3cret-token-of-the-clinic-0123456789"
BUDGET_MB = 200
MiB = 1 << 20


def png(width: int, height: int, bit_depth: int = 16, color_type: int = 0) -> bytes:
    """A PNG of zeros written row by row (never the whole image in memory): 8000 x 8000 16-bit grey
    is the issue's 124 kB file that costs ~1.3 GB to decode."""
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


def rss(pid: int, field: str = "VmHWM") -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise AssertionError(field)


def reset_peak(pid: int) -> None:
    Path(f"/proc/{pid}/clear_refs").write_text("5")  # VmHWM back to the current resident size


def write_card(models: Path) -> dict:
    """A model card as the card stage writes one (the fields the page reads), listing model.json and the weights."""
    from palm.core.fsutil import sha256_file
    from palm.nn.card import SCHEMA

    card = {
        "schema": SCHEMA,
        "name": "PALM PM screening",
        "intended_use": "research",
        "model": {"network": "senet18", "image_size": 64, "input_size": 48},
        "decision": {"threshold": 0.5, "threshold_rule": "fixed 0.5", "tta": "off", "rule": "PM if p >= t"},
        "files": [
            {"path": f"models/{name}", "sha256": sha256_file(models / name)}
            for name in ("model.json", "model.safetensors")
        ],
    }
    (models / "card.json").write_text(json.dumps(card))
    return card


@pytest.fixture(scope="module")
def hardened(tmp_path_factory):
    """(base URL, folder, server pid) of a `palm serve` with a card, a token, an audit log, a
    decoding budget of 200 MiB and timeouts of 2 s (headers) and 3 s (body)."""
    from palm.data.synthetic import draw_fundus

    tmp = tmp_path_factory.mktemp("hardened")
    write_card(save_model(tmp / "models"))
    photo, _ = draw_fundus(np.random.default_rng(0), "P", (600, 640), "L")
    cv2.imwrite(str(tmp / "fundus.jpg"), photo)
    (tmp / "token").write_text(TOKEN + "\n")
    with serving(
        tmp,
        [
            "--audit-log",
            str(tmp / "audit.sqlite"),
            "--token-file",
            str(tmp / "token"),
            "--allow-host",
            "clinic.example",
            "--max-decode-mb",
            str(BUDGET_MB),
            "--max-request-mb",
            "16",
            "--header-timeout",
            "2",
            "--body-timeout",
            "3",
        ],
    ) as (url, proc):
        yield url, tmp, proc.pid
    assert "Traceback" not in (tmp / "serve.log").read_text()


AUTH = {"Authorization": f"Bearer {TOKEN}"}


def post(url: str, files: list[tuple[str, bytes]], headers=None, **params) -> httpx.Response:
    return httpx.post(
        url + "/v1/predict",
        files=[("files", f) for f in files],
        params=params,
        headers={**AUTH, **(headers or {})},
        timeout=120,
    )


def audit_rows(tmp: Path) -> int:
    with sqlite3.connect(tmp / "audit.sqlite") as db:
        return db.execute("SELECT COUNT(*) FROM predictions").fetchone()[0]


# --- class 1: a request's memory is bounded from the headers, before decoding --------------------

MEASURE = r"""
import sys
from palm.data.image import decode
data = open(sys.argv[1], "rb").read()
def field(name):
    return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith(name + ":"))
open("/proc/self/clear_refs", "w").write("5")
before = field("VmRSS")
try:
    decode(data, int(sys.argv[2]))
except Exception:
    pass
print(field("VmHWM") - before)
"""


def cases(side: int = 1200) -> dict[str, bytes]:
    """An image of every mode and bit depth the decoder reads (noise: nothing compresses away)."""
    rng = np.random.default_rng(0)

    def noise(channels=None, dtype=np.uint8, hi=256):
        return rng.integers(0, hi, (side, side) + ((channels,) if channels else ()), dtype=dtype)

    out = {}

    def save(name, im, fmt, **kw):
        buf = io.BytesIO()
        im.save(buf, fmt, **kw)
        out[name] = buf.getvalue()

    save("png 1-bit", Image.fromarray(noise()).convert("1"), "PNG")
    save("png L", Image.fromarray(noise()), "PNG")
    save("png I;16", Image.fromarray(noise(None, np.uint16, 65535)), "PNG")
    save("png RGB", Image.fromarray(noise(3)), "PNG")
    save("png RGBA", Image.fromarray(noise(4)), "PNG")
    save("png LA", Image.fromarray(noise(4)).convert("LA"), "PNG")
    save("png P", Image.fromarray(noise(3)).convert("P"), "PNG")
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: turned a quarter
    save("png RGBA turned", Image.fromarray(noise(4)), "PNG", exif=exif.tobytes())
    save("bmp RGB", Image.fromarray(noise(3)), "BMP")
    save("tiff RGB", Image.fromarray(noise(3)), "TIFF", compression="tiff_deflate")
    save("tiff I;16", Image.fromarray(noise(None, np.uint16, 65535)), "TIFF", compression="tiff_lzw")
    save("tiff CMYK", Image.fromarray(noise(4), "RGBA").convert("CMYK"), "TIFF")
    save("tiff F", Image.fromarray(noise().astype(np.float32)), "TIFF")
    save("jpeg RGB", Image.fromarray(noise(3)), "JPEG", exif=exif.tobytes())
    save("jpeg progressive 4:4:4", Image.fromarray(noise(3)), "JPEG", progressive=True, subsampling=0)
    save("jpeg CMYK", Image.fromarray(noise(4), "RGBA").convert("CMYK"), "JPEG")
    for name, arr in (("png RGB 16-bit", noise(3, np.uint16, 65535)), ("png RGBA 16-bit", noise(4, np.uint16, 65535))):
        out[name] = cv2.imencode(".png", arr)[1].tobytes()
    return out


def test_the_cost_read_from_the_header_bounds_what_decoding_takes_for_every_mode(tmp_path):
    """decode_cost (header only) >= the peak memory decode() really takes, per mode and bit depth."""
    from palm.serve.decode import decode_cost

    for name, data in cases().items():
        f = tmp_path / "image"
        f.write_bytes(data)
        for side in (64, 224) if name.startswith("jpeg") else (224,):  # only a JPEG is decoded at a reduced size
            peak = int(
                subprocess.run(
                    [sys.executable, "-c", MEASURE, str(f), str(side)],
                    env=ENV,
                    check=True,
                    capture_output=True,
                    text=True,
                ).stdout
            )
            cost = decode_cost(data, [side])
            assert cost.bytes >= peak, f"{name} at {side}: estimated {cost.bytes / MiB:.1f} MiB, took {peak / MiB:.1f}"
            assert cost.bytes <= 3 * peak + 16 * MiB, (
                f"{name}: estimate {cost.bytes / MiB:.1f} MiB far above {peak / MiB:.1f}"
            )


def test_a_request_that_would_need_too_much_memory_is_refused_before_decoding(hardened):
    """The issue's example: a 124 kB 16-bit greyscale PNG of 8000 x 8000 (~1.3 GB to decode), and 32 of them."""
    url, tmp, pid = hardened
    bomb = png(8000, 8000, 16, 0)
    assert len(bomb) < 200_000
    before = audit_rows(tmp)
    reset_peak(pid)
    start = rss(pid, "VmRSS")
    for n in (1, 32):
        r = post(url, [(f"bomb{i}.png", bomb) for i in range(n)])
        assert r.status_code == 413, r.text
        detail = r.json()["detail"]
        assert "\n" not in detail and "8000x8000 I;16 PNG" in detail and f"limit of {BUDGET_MB} MiB" in detail
    # ... and 16-bit RGBA, palette, 8-bit: every mode is judged from its header
    for bit_depth, color_type in ((16, 6), (8, 6), (8, 2), (8, 0)):
        r = post(url, [("big.png", png(6000, 6000, bit_depth, color_type))])
        assert r.status_code == 413, (bit_depth, color_type, r.text)
    assert rss(pid) - start < 64 * MiB, "the refused images were decoded"
    assert audit_rows(tmp) == before
    ok = post(url, [("fundus.jpg", (tmp / "fundus.jpg").read_bytes())])
    assert ok.status_code == 200 and ok.json()["results"][0]["quality"] == "ok"


def test_the_worst_request_accepted_stays_within_the_budget(hardened, capsys):
    """32 images each just small enough that the two decoded at once fit the budget: the server's
    peak resident memory grows by no more than the budget."""
    from palm.serve.decode import decode_cost

    url, tmp, pid = hardened
    side = 1900  # 16-bit greyscale: ~97 MiB each to decode
    image = png(side, side, 16, 0)
    cost = decode_cost(image, [64, 224]).bytes
    assert 2 * cost + 32 * len(image) <= BUDGET_MB * MiB < 2 * decode_cost(png(2100, 2100, 16, 0), [224]).bytes
    reset_peak(pid)
    start = rss(pid, "VmRSS")
    r = post(url, [(f"i{i}.png", image) for i in range(32)], grade_all="true")
    assert r.status_code == 200, r.text
    assert all(row["error"] is None and "probability" in row for row in r.json()["results"])
    grew = rss(pid) - start
    with capsys.disabled():
        print(
            f"\nworst accepted request (32 x {side}x{side} 16-bit PNG, budget {BUDGET_MB} MiB): peak resident "
            f"memory +{grew / MiB:.0f} MiB"
        )
    assert grew <= BUDGET_MB * MiB


# --- class 2: the audit log fails closed ---------------------------------------------------------


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    """An in-process service with an audit log (TestClient), and its Service."""
    from fastapi.testclient import TestClient

    from palm.serve.service import Model, create_app

    tmp = tmp_path_factory.mktemp("audit")
    app = create_app(Model(save_model(tmp / "models"), device="cpu"), audit_log=tmp / "audit.sqlite")
    with TestClient(app, base_url="http://127.0.0.1", raise_server_exceptions=False) as c:
        yield c, app.app.state.service, tmp / "audit.sqlite"


BROKEN = [(f"broken{i}.jpg", f"not a jpeg {i}".encode() * 20) for i in range(32)]  # 32 rows, several pages


def count(db: Path) -> int:
    with sqlite3.connect(db) as c:
        return c.execute("SELECT COUNT(*) FROM predictions").fetchone()[0]


@pytest.mark.parametrize("failure", ["locked", "read-only", "deleted", "full"])
def test_an_audit_log_that_cannot_be_written_is_a_503_with_no_results_and_no_rows(client, failure, capsys):
    c, svc, db = client
    assert c.post("/v1/predict", files=[("files", f) for f in BROKEN[:2]]).status_code == 200
    before = count(db)
    holder = None
    if failure == "locked":  # another process holds the write lock
        holder = sqlite3.connect(db, isolation_level=None)
        holder.execute("BEGIN EXCLUSIVE")
    elif failure == "read-only":  # (as root, chmod would not stop it: SQLite's own read-only)
        svc.audit.db.execute("PRAGMA query_only = ON")
    elif failure == "deleted":
        db.unlink()
    else:  # full: no page beyond those the file has
        pages = svc.audit.db.execute("PRAGMA page_count").fetchone()[0]
        svc.audit.db.execute(f"PRAGMA max_page_count = {pages}")
    r = c.post("/v1/predict", files=[("files", f) for f in BROKEN])
    assert r.status_code == 503, r.text
    body = r.json()
    assert set(body) == {"detail"} and "\n" not in body["detail"] and "audit log cannot record" in body["detail"]
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("\n") == 1 and "--audit-log" in err
    if holder is not None:
        holder.execute("ROLLBACK")
        holder.close()
    if failure != "deleted":
        assert count(db) == before, "rows of a request whose results were not returned"
    # the server keeps running, and records again as soon as the database can be written
    assert c.get("/healthz").status_code == 200
    again = c.post("/v1/predict", files=[("files", f) for f in BROKEN[:3]])
    assert again.status_code == 200 and len(again.json()["results"]) == 3
    assert count(db) == (0 if failure == "deleted" else before) + 3


def test_an_error_escaping_a_route_is_one_line_of_json(client, monkeypatch, capsys):
    import palm.serve.service

    c, _, _ = client
    monkeypatch.setattr(palm.serve.service, "decode_cost", lambda *_: 1 / 0)
    r = c.post("/v1/predict", files=[("files", BROKEN[0])])
    assert r.status_code == 500 and r.json() == {
        "detail": "internal error (ZeroDivisionError); the service keeps running"
    }
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "ZeroDivisionError" in err and "Traceback" not in err


# --- class 4: the page with a model card ---------------------------------------------------------


def test_the_page_reads_the_model_card_and_asks_for_the_token(hardened):
    from playwright.sync_api import sync_playwright

    url, tmp, _ = hardened
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            page.goto(url + "/")
            page.wait_for_selector("#token-form:not([hidden])", timeout=30_000)  # /v1/model asked for it
            page.fill("#token", TOKEN)
            page.click("#token-form button")
            page.wait_for_function("document.getElementById('model').textContent.includes('at least')")
            header = page.locator("#model").inner_text()
            assert "[object Object]" not in header
            assert header.startswith("Model PALM PM screening, senet18 (version senet18-")
            assert header.endswith("PM when the probability is at least 0.500")
            page.set_input_files("#files", [str(tmp / "fundus.jpg")])
            page.wait_for_selector("#count:has-text('1 of 1 done')", timeout=60_000)
            assert page.locator(".card[data-name='fundus.jpg'] [data-field=quality]").inner_text() == "gradable"
            assert page.locator("#token-form").is_hidden()
        finally:
            browser.close()


# --- class 5: the service trusts no caller --------------------------------------------------------


def test_foreign_hosts_cross_origin_writes_and_missing_tokens_are_refused(hardened):
    url, tmp, _ = hardened
    port = url.rsplit(":", 1)[1]
    photo = [("fundus.jpg", (tmp / "fundus.jpg").read_bytes())]
    before = audit_rows(tmp)
    # DNS rebinding: a page at evil.example whose name now points here
    r = httpx.get(url + "/v1/model", headers={"Host": f"evil.example:{port}", **AUTH})
    assert r.status_code == 403 and "evil.example" in r.json()["detail"]
    # another site's page posting through the clinic's browser
    for headers in (
        {"Origin": "http://evil.example"},
        {"Origin": "null"},
        {"Sec-Fetch-Site": "cross-site"},
        {"Origin": f"http://127.0.0.1:{int(port) + 1}"},
    ):
        r = post(url, photo, headers=headers)
        assert r.status_code == 403 and "cross-" in r.json()["detail"], headers
    # no token, a wrong one: 401, and the page itself and /healthz stay open
    for auth in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}):
        r = httpx.post(url + "/v1/predict", files=[("files", photo[0])], headers=auth)
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer" and "token" in r.json()["detail"]
    assert httpx.get(url + "/v1/model").status_code == 401
    assert httpx.get(url + "/").status_code == 200 and httpx.get(url + "/healthz").status_code == 200
    assert audit_rows(tmp) == before, "a refused request was audited"
    # the service's own page (same origin), the clinic's name (--allow-host), and plain clients: served
    assert post(url, photo, headers={"Origin": url, "Sec-Fetch-Site": "same-origin"}).status_code == 200
    assert (
        httpx.get(url + "/v1/model", headers={"Host": f"clinic.example:{port}", **AUTH}).json()["name"]
        == "PALM PM screening"
    )
    assert httpx.get(url + "/healthz", headers={"Host": f"localhost:{port}"}).status_code == 200


def test_slow_clients_are_cut_off(hardened):
    url, tmp, _ = hardened
    port = int(url.rsplit(":", 1)[1])

    def answer(sock: socket.socket) -> bytes:
        sock.settimeout(10)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
        return data

    for partial in (b"", b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n"):  # headers never finished
        with socket.create_connection(("127.0.0.1", port)) as s:
            s.sendall(partial)
            t0 = time.monotonic()
            got = answer(s)
            assert 1.5 < time.monotonic() - t0 < 6 and got.startswith(b"HTTP/1.1 408"), got
    with socket.create_connection(("127.0.0.1", port)) as s:  # a body that stalls
        s.sendall(
            (
                "POST /v1/predict HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer "
                + TOKEN
                + "\r\nContent-Type: multipart/form-data; boundary=b\r\nContent-Length: 100000\r\n\r\n--b\r\n"
            ).encode()
        )
        t0 = time.monotonic()
        got = answer(s)
        assert 2.5 < time.monotonic() - t0 < 8 and got.startswith(b"HTTP/1.1 408"), got
        assert b"not received within 3 s" in got
    assert httpx.get(url + "/healthz").status_code == 200


@pytest.mark.parametrize(
    "args, message",
    [
        (["--host", ""], "argument --host: must be an address"),
        (["--host", "a b"], "argument --host: not an IP address or host name"),
        (["--port", "70000"], "argument --port: must be a port number from 0 to 65535"),
        (["--port", "-1"], "argument --port: must be a port number from 0 to 65535"),
        (["--allow-host", "evil.example/x"], "argument --allow-host: not an IP address or host name"),
    ],
)
def test_bad_addresses_are_usage_errors(args, message, capsys):
    with pytest.raises(SystemExit) as exc:
        palm_main(["serve", *args])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("palm serve: error: ") and message in err[-1]


def test_a_token_file_that_is_missing_or_weak_is_a_one_line_error(tmp_path, capsys, monkeypatch):
    models = save_model(tmp_path / "models")
    (tmp_path / "weak").write_text("short\n")
    for extra, message in (
        (["--token-file", str(tmp_path / "none")], "cannot read it"),
        (["--token-file", str(tmp_path / "weak")], "at least 16 printable characters"),
    ):
        assert palm_main(["serve", "--model", str(models), "--port", str(free_port()), *extra]) == 2
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and message in err
    monkeypatch.setenv("PALM_SERVE_TOKEN", "  ")
    assert palm_main(["serve", "--model", str(models), "--port", str(free_port())]) == 2
    assert "PALM_SERVE_TOKEN" in capsys.readouterr().err
