"""`palm serve`: the page driven in a real browser, the API posted to, its limits and its audit log.

One server (a subprocess, as a clinic starts it) on a free loopback port serves a tiny
SE-ResNet18 saved as the train stage saves one; the page is driven in Debian's chromium
through Playwright (`.ci/run` installs chromium when it is missing).
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import os
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import httpx
import numpy as np
import paddle
import pytest

from conftest import ENV, PALM_MINI, requires_palm_mini
from palm.cli import main as palm_main

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
]
MAX_IMAGES = 4


def save_model(folder: Path) -> Path:
    """A (randomly initialised) SE-ResNet18 folder as the train stage writes one: photographs
    decoded to 64 px, the network at 48 px."""
    from palm.nn.models import build_model
    from palm.nn.weights import save_state

    folder.mkdir(parents=True)
    paddle.seed(1)
    save_state(build_model("senet18", image_size=48).state_dict(), folder / "model.safetensors")
    (folder / "model.json").write_text(
        json.dumps(
            {"model": "senet18", "image_size": 64, "input_size": 48, "threshold": 0.5, "threshold_rule": "fixed 0.5"}
        )
    )
    return folder


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serving(tmp: Path, options: list[str]):
    """(base URL, server process) of `palm serve --model tmp/models` with ``options``, logging to
    ``tmp/serve.log``, once its /healthz answers; stopped on leaving."""
    port = free_port()
    with open(tmp / "serve.log", "w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "palm.cli", "serve", "--model", str(tmp / "models"), "--port", str(port), *options],
            cwd=tmp,
            env=ENV,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        url = f"http://127.0.0.1:{port}"
        try:
            for _ in range(240):
                try:
                    if httpx.get(url + "/healthz", timeout=1).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                assert proc.poll() is None, (tmp / "serve.log").read_text()
                time.sleep(0.25)
            else:
                raise AssertionError("palm serve did not start in 60 s:\n" + (tmp / "serve.log").read_text())
            yield url, proc
        finally:
            proc.terminate()
            proc.wait(timeout=30)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """(base URL, folder with the model, photographs and the audit log) of a running `palm serve`."""
    from palm.data.synthetic import draw_fundus

    tmp = tmp_path_factory.mktemp("serve")
    save_model(tmp / "models")
    photo, _ = draw_fundus(np.random.default_rng(0), "P", (600, 640), "L")
    cv2.imwrite(str(tmp / "fundus.jpg"), photo)
    cv2.imwrite(str(tmp / "black.png"), np.zeros((400, 400, 3), np.uint8))
    (tmp / "broken.jpg").write_bytes(b"not a jpeg")
    with serving(
        tmp,
        [
            "--audit-log",
            str(tmp / "audit.sqlite"),
            "--max-images",
            str(MAX_IMAGES),
            "--max-request-mb",
            "1",
        ],
    ) as (url, _):
        yield url, tmp
    assert sorted(p.name for p in tmp.iterdir()) == [
        "audit.sqlite",
        "black.png",
        "broken.jpg",
        "fundus.jpg",
        "models",
        "serve.log",
    ], "the service wrote files of its own"


def cli_probability(tmp: Path, image: str) -> float:
    out = tmp / "cli.csv"
    assert palm_main(["predict", str(tmp / image), "--model", str(tmp / "models"), "--out", str(out), "--quiet"]) == 0
    (row,) = csv.DictReader(out.open())
    out.unlink()
    return float(row["probability"])


def post(url: str, tmp: Path, names, **params) -> httpx.Response:
    files = [("files", (n, (tmp / n).read_bytes())) for n in names]
    return httpx.post(url + "/v1/predict", files=files, params=params, timeout=120)


def test_the_api_answers_per_image_as_palm_predict_does(served):
    url, tmp = served
    r = post(url, tmp, ["fundus.jpg", "black.png", "broken.jpg"])
    assert r.status_code == 200, r.text
    body = r.json()
    fundus, black, broken = body["results"]
    assert [x["image"] for x in body["results"]] == ["fundus.jpg", "black.png", "broken.jpg"]
    # the same file gives the same probability through the API as through `palm predict`
    assert fundus["quality"] == "ok" and fundus["error"] is None
    assert abs(fundus["probability"] - cli_probability(tmp, "fundus.jpg")) <= 2e-6
    assert fundus["predicted"] == int(fundus["probability"] >= 0.5)
    assert fundus["diagnosis"] == ("PM" if fundus["predicted"] else "non-PM")
    assert black["quality"] == "too dark" and "probability" not in black and black["error"] is None
    assert broken["error"].startswith("broken.jpg: cannot decode image") and "BytesIO" not in broken["error"]
    assert body["threshold"] == 0.5 and body["model"].startswith("senet18-") and "not a diagnosis" in body["notice"]
    # Grad-CAM on request, for the gradable image only
    cams = post(url, tmp, ["fundus.jpg", "black.png"], gradcam="true").json()["results"]
    assert cams[0]["gradcam"].startswith("data:image/jpeg;base64,") and cams[1]["gradcam"] is None
    assert post(url, tmp, ["black.png"], grade_all="true").json()["results"][0]["probability"] >= 0


def test_model_card_health_and_docs(served):
    url, tmp = served
    card = httpx.get(url + "/v1/model").json()
    sha = hashlib.sha256((tmp / "models" / "model.safetensors").read_bytes()).hexdigest()
    assert card["model"] == "senet18" and card["weights_sha256"] == sha and card["threshold"] == 0.5
    assert card["version"] == "senet18-" + sha[:12] and card["input"]["network_input"] == 48
    assert card["input"]["fundus"] == {"crop": False, "local_norm": 0.0, "clahe": "off"}  # model.json: none
    health = httpx.get(url + "/healthz").json()
    assert health["status"] == "ok" and health["model"] == card["version"]
    assert "/v1/predict" in httpx.get(url + "/openapi.json").json()["paths"]
    assert httpx.get(url + "/docs").status_code == 200


def test_limits_are_one_line_errors_with_their_status(served):
    url, tmp = served
    too_many = post(url, tmp, ["black.png"] * (MAX_IMAGES + 1))
    assert (
        too_many.status_code == 413
        and too_many.json()["detail"] == f"too many images: at most {MAX_IMAGES} per request, got {MAX_IMAGES + 1}"
    )
    none = httpx.post(url + "/v1/predict", data={"x": "1"})
    assert none.status_code == 422 and "files" in none.json()["detail"] and "\n" not in none.json()["detail"]
    big = b"\xff" * (1 << 20)
    declared = httpx.post(url + "/v1/predict", files=[("files", ("big.jpg", big))])
    assert declared.status_code == 413 and "at most 1 MiB" in declared.json()["detail"]

    def chunks():  # no Content-Length: the service counts the bytes as they come
        boundary = b'--b\r\nContent-Disposition: form-data; name="files"; filename="x.jpg"\r\n\r\n'
        yield boundary
        for _ in range(40):
            yield b"\0" * 65536
        yield b"\r\n--b--\r\n"

    streamed = httpx.post(
        url + "/v1/predict", content=chunks(), headers={"content-type": "multipart/form-data; boundary=b"}
    )
    assert streamed.status_code == 413 and "at most 1 MiB" in streamed.json()["detail"]
    assert httpx.get(url + "/healthz").status_code == 200


def test_concurrent_requests_share_batches_and_agree(served):
    url, tmp = served
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda _: post(url, tmp, ["fundus.jpg", "fundus.jpg"]), range(8)))
    assert all(a.status_code == 200 for a in answers)
    probs = {r["probability"] for a in answers for r in a.json()["results"]}
    assert max(probs) - min(probs) <= 2e-6


def test_a_slow_upload_does_not_hold_up_the_others(served):
    url, tmp = served
    port = int(url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port)) as slow:
        head = (
            b"POST /v1/predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: multipart/form-data; boundary=b\r\n"
            b'Content-Length: 500000\r\n\r\n--b\r\nContent-Disposition: form-data; name="files"; '
            b'filename="slow.jpg"\r\n\r\n'
        )
        slow.sendall(head + (tmp / "fundus.jpg").read_bytes()[:1000])  # ... and the rest never comes
        t0 = time.perf_counter()
        r = post(url, tmp, ["fundus.jpg"])
        assert r.status_code == 200 and r.json()["results"][0]["quality"] == "ok"
        assert time.perf_counter() - t0 < 20


def test_v1_model_is_the_card_of_the_model_loaded_not_of_the_files_on_the_disk_now(served):
    """Issue 40: /v1/model reread the card while the old network answered. A card and an edited
    model.json appearing during serving change neither /v1/model nor the answers (restart to load them)."""
    url, tmp = served
    from palm.core.fsutil import sha256_file
    from palm.nn.card import SCHEMA

    before = httpx.get(url + "/v1/model").json()
    info_file = tmp / "models" / "model.json"
    original = info_file.read_bytes()
    info_file.write_text(json.dumps({**json.loads(original), "threshold": 0.9}))
    card = {
        "schema": SCHEMA,
        "name": "PALM PM screening",
        "intended_use": "research",
        "files": [
            {"path": f"models/{f.name}", "sha256": sha256_file(f)}
            for f in (tmp / "models" / "model.safetensors", info_file)
        ],
    }
    (tmp / "models" / "card.json").write_text(json.dumps(card))
    try:
        assert httpx.get(url + "/v1/model").json() == before and before["threshold"] == 0.5
        assert post(url, tmp, ["fundus.jpg"]).json()["threshold"] == 0.5
    finally:
        (tmp / "models" / "card.json").unlink()
        info_file.write_bytes(original)


def test_the_audit_log_keeps_hashes_and_decisions_never_images_or_names(served):
    url, tmp = served
    db = tmp / "audit.sqlite"
    before = sqlite3.connect(db).execute("SELECT COUNT(*) FROM predictions").fetchone()[0]
    body = post(url, tmp, ["fundus.jpg", "broken.jpg"]).json()
    rows = sqlite3.connect(db).execute("SELECT * FROM predictions").fetchall()[before:]
    assert len(rows) == 2
    sha = hashlib.sha256((tmp / "fundus.jpg").read_bytes()).hexdigest()
    _, digest, quality, prob, decision, version, error = rows[0]
    assert (digest, quality, prob, decision, version, error) == (
        sha,
        "ok",
        body["results"][0]["probability"],
        body["results"][0]["diagnosis"],
        body["model"],
        None,
    )
    assert rows[1][6].startswith("<bytes>: cannot decode image")
    raw = db.read_bytes()
    assert b"fundus.jpg" not in raw and b"broken.jpg" not in raw and (tmp / "fundus.jpg").read_bytes()[:64] not in raw


def test_the_page_in_a_browser(served):
    """A person drops a fundus photograph and a black image on the page and reads the results."""
    from playwright.sync_api import sync_playwright

    url, tmp = served
    expected = cli_probability(tmp, "fundus.jpg")
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1100, "height": 900})
            outside = []
            page.on(
                "request",
                lambda req: outside.append(req.url) if not req.url.startswith((url, "blob:", "data:")) else None,
            )
            page.goto(url + "/")
            assert "not a diagnosis" in page.locator("#notice").inner_text()
            page.set_input_files("#files", [str(tmp / "fundus.jpg"), str(tmp / "black.png")])
            page.wait_for_selector("#count:has-text('2 of 2 done')", timeout=60_000)
            page.wait_for_function("document.querySelectorAll('.card[data-state=done]').length == 2")
            fundus = page.locator(".card[data-name='fundus.jpg']")
            black = page.locator(".card[data-name='black.png']")
            assert fundus.locator("[data-field=quality]").inner_text() == "gradable"
            shown = float(fundus.locator("[data-field=probability]").inner_text())
            assert abs(shown - expected) <= 0.0005  # shown to 3 decimals
            assert fundus.locator("[data-field=diagnosis]").inner_text() == ("PM" if expected >= 0.5 else "non-PM")
            assert fundus.locator("img").get_attribute("src").startswith("data:image/jpeg;base64,")  # Grad-CAM
            assert "Research aid, not a diagnosis" in fundus.inner_text()
            assert black.locator("[data-field=quality]").inner_text() == "not gradable: too dark"
            assert black.locator("[data-field=probability]").count() == 0
            page.screenshot(
                path=os.environ.get("PALM_SERVE_SCREENSHOT") or str(tmp.parent / "page.png"), full_page=True
            )
            page.goto(url + "/docs")  # the API docs render from the service's own files
            page.get_by_text("/v1/predict", exact=True).first.wait_for(timeout=30_000)
            assert outside == [], f"the page or the docs fetched from elsewhere: {outside}"
        finally:
            browser.close()


def test_batcher_puts_concurrent_images_in_one_batch():
    from palm.serve.service import Batcher

    sizes = []
    release = threading.Event()

    def run(x):
        release.wait(5)
        sizes.append(len(x))
        return x.reshape(len(x), -1).mean(axis=1)

    b = Batcher(run, batch_size=4, wait=0.05)
    try:
        futs = [b.score(np.full((3, 2, 2), i, np.float32)) for i in range(6)]
        release.set()
        assert [f.result(10) for f in futs] == [float(i) for i in range(6)]
    finally:
        b.close()
    assert sizes == [4, 2]


def test_serve_without_a_model_is_a_one_line_error(tmp_path, capsys):
    assert palm_main(["serve", "--model", str(tmp_path / "nothing"), "--port", str(free_port())]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "model.json" in err


@requires_palm_mini
@pytest.mark.realdata
def test_real_photographs_score_the_same_through_the_api_and_palm_predict(served, tmp_path):
    import zipfile

    url, tmp = served
    with zipfile.ZipFile(PALM_MINI / "validation.zip") as zf:
        for name in [n for n in zf.namelist() if n.lower().endswith(".jpg")][:6]:
            (tmp_path / Path(name).name).write_bytes(zf.read(name))
    files = sorted(p.name for p in tmp_path.glob("*.jpg"))
    api = (
        post(url, tmp_path, files[:MAX_IMAGES]).json()["results"]
        + post(url, tmp_path, files[MAX_IMAGES:]).json()["results"]
    )
    out = tmp_path / "cli.csv"
    palm_main(
        ["predict", *(str(tmp_path / f) for f in files), "--model", str(tmp / "models"), "--out", str(out), "--quiet"]
    )
    cli = list(csv.DictReader(out.open()))
    assert len(api) == len(cli) == 6
    for a, c in zip(api, cli):
        assert a["image"] == Path(c["image"]).name and a["quality"] == c["quality"]
        assert abs(a["probability"] - float(c["probability"])) <= 2e-6, (a, c)


def test_serve_on_a_port_in_use_is_a_one_line_error(tmp_path, capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert palm_main(["serve", "--model", str(save_model(tmp_path / "models")), "--port", str(port)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and f"--port {port}: cannot listen there" in err
