"""``palm serve``: a trained model behind a web page and an HTTP API (FastAPI on uvicorn).

- ``GET /``: a page where a person drops photographs and sees, for each, the gradability
  verdict, the PM probability, the decision at the model's threshold, a Grad-CAM overlay and
  the research-aid notice (``static/``: no external script, style or font);
- ``POST /v1/predict`` (multipart, field ``files``, one or many images; ``?gradcam=true`` adds
  each overlay as a JPEG data URL, ``?grade_all=true`` as ``palm predict --grade-all``): per
  image the fields of ``palm predict``'s rows;
- ``GET /v1/model``: the model card the weights were checked against when the service
  started (``card.json`` beside the weights when there is one, else what ``model.json`` said;
  never reread: the service answers from one loaded model and its card until it restarts); ``GET /healthz``; the OpenAPI docs at ``/docs`` (Swagger UI
  from the ``swagger-ui-bundle-v2`` package, not a CDN: the service needs no internet).

Every upload is read by :func:`palm.serve.decode.decode_one`, the function ``palm predict``
decodes its files with (orientation, colour modes, the pixel limit, the quality checks), from
memory: the service writes nothing but what Starlette spools to the temporary folder for a
large upload, and keeps nothing after the response. Only ``--audit-log FILE`` (SQLite) keeps,
per image, the time, its SHA-256, the verdict, the probability, the decision and the model
version: never the image or its name.

The images of all requests go to one queue; one thread runs the network on up to
``batch_size`` of them at a time (:class:`Batcher`), so concurrent requests share batches, and
uploads are read and decoded concurrently (an async server; decoding in worker threads), so a
slow upload does not hold the others up.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime
import hashlib
import json
import queue
import re
import socket
import sqlite3
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Callable

import cv2
import numpy as np
from fastapi import APIRouter, Depends, FastAPI, File, HTTPException, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool
from swagger_ui_bundle import swagger_ui_path   # Swagger UI's files, served here rather than from a CDN

from palm.data.image import MAX_PIXELS, load_image, to_chw_float
from palm.core.errors import ConfigError, DataError
from palm.nn import modelinfo
from palm.nn.models import gradcam_layer
from palm.serve.decode import decode_one
from palm.serve.gradcam import gradcam, overlay
from palm.serve.predict import Predictor, gradable, record

NOTICE = ("Research aid, not a diagnosis: the PM probability of a screening model, to be read by an "
          "eye-care professional with the photograph; never a reason to skip an examination.")
DISPLAY = 384               # side of the Grad-CAM overlays, pixels
_BYTES_IO = re.compile(r" ?<_io\.BytesIO object at 0x[0-9a-f]+>")   # how Pillow names an upload it cannot identify


@dataclass(frozen=True)
class Limits:
    """What one request may carry (413 beyond). Pixels per image: :data:`palm.data.image.MAX_PIXELS`,
    as for ``palm predict`` (that image's error, not the request's)."""

    max_request_bytes: int = 64 << 20
    max_images: int = 32


class Batcher:
    """One thread runs the network for every request: images queue, and each run takes up to
    ``batch_size`` of them (those that arrived within ``wait`` seconds of the first);
    other work for that thread (Grad-CAM, eager Paddle) queues with them."""

    def __init__(self, run_batch: Callable[[np.ndarray], np.ndarray], batch_size: int = 16, wait: float = 0.002):
        self.run_batch, self.batch_size, self.wait = run_batch, batch_size, wait
        self.queue: queue.Queue = queue.Queue()
        self.batches = self.images = 0
        self.thread = threading.Thread(target=self._loop, name="palm-serve-network", daemon=True)
        self.thread.start()

    def score(self, x_chw: np.ndarray) -> Future:
        """A future of the PM probability of one float32 CHW image."""
        fut: Future = Future()
        self.queue.put(("score", x_chw, fut))
        return fut

    def call(self, fn: Callable[[], object]) -> Future:
        """A future of ``fn()``, run on the network's thread."""
        fut: Future = Future()
        self.queue.put(("call", fn, fut))
        return fut

    def close(self) -> None:
        self.queue.put(None)
        self.thread.join(timeout=30)

    def _loop(self) -> None:
        while (item := self.queue.get()) is not None:
            items = [item]
            deadline = time.monotonic() + self.wait
            while sum(kind == "score" for kind, _, _ in items) < self.batch_size:
                try:
                    nxt = self.queue.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                if nxt is None:
                    self.queue.put(None)
                    break
                items.append(nxt)
            scores = [(x, fut) for kind, x, fut in items if kind == "score"]
            if scores:
                try:
                    probs = self.run_batch(np.stack([x for x, _ in scores]))
                    for (_, fut), p in zip(scores, probs):
                        fut.set_result(float(p))
                    self.batches += 1
                    self.images += len(scores)
                except Exception as exc:  # noqa: BLE001 - the requests waiting for it get the error
                    for _, fut in scores:
                        fut.set_exception(exc)
            for kind, fn, fut in items:
                if kind == "call":
                    try:
                        fut.set_result(fn())
                    except Exception as exc:  # noqa: BLE001
                        fut.set_exception(exc)


class AuditLog:
    """``--audit-log FILE``: one SQLite row per image scored; never the image or its name."""

    COLUMNS = "time TEXT, sha256 TEXT, quality TEXT, probability REAL, decision TEXT, model_version TEXT, error TEXT"

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            self.db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
            self.db.execute(f"CREATE TABLE IF NOT EXISTS predictions ({self.COLUMNS})")
        except sqlite3.Error as exc:
            raise DataError(f"--audit-log {path}: cannot use it as an SQLite database ({exc})") from None
        self.lock = threading.Lock()

    def add(self, rows: list[tuple]) -> None:
        with self.lock:
            self.db.executemany("INSERT INTO predictions VALUES (?, ?, ?, ?, ?, ?, ?)", rows)

    def close(self) -> None:
        self.db.close()


class _TooLarge(Exception):
    pass


class BodyLimit:
    """ASGI middleware: a request body above ``max_bytes`` is answered 413, whether its size is
    declared (``Content-Length``, refused before reading) or not (counted as it arrives)."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        message = (f"request too large: at most {self.max_bytes / 2**20:g} MiB per request "
                   "(send fewer or smaller images per request)")
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            return await _json(send, 413, message)
        received = 0
        too_large = False
        started = False

        async def counting_receive():
            nonlocal received, too_large
            msg = await receive()
            if msg["type"] == "http.request":
                received += len(msg.get("body", b""))
                if received > self.max_bytes:
                    too_large = True
                    raise _TooLarge
            return msg

        async def guarded_send(msg):
            nonlocal started
            if too_large:
                return                      # the app's answer to the cut-off body: ours replaces it
            started = started or msg["type"] == "http.response.start"
            await send(msg)

        try:
            await self.app(scope, counting_receive, guarded_send)
        except _TooLarge:
            pass
        if too_large and not started:
            await _json(send, 413, message)


async def _json(send, status: int, detail: str) -> None:
    body = json.dumps({"detail": detail}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})




class Model:
    """The model a service runs: the fast engine (:class:`palm.serve.predict.Predictor`), the eager
    network for Grad-CAM (``models/`` weights only: an exported graph has no layers to hook), the
    description (``card.json`` or ``model.json``) and a version (network name and weights hash)."""

    def __init__(self, model_dir: str | Path, device: str = "auto", engine: str = "auto"):
        self.dir = Path(model_dir)
        # one reading of the folder (Predictor.load): the engine, the Grad-CAM network, model.json,
        # the card and the hashes are of the same bytes, and stay together until the service restarts
        self.predictor = Predictor.load(self.dir, device=device, engine=engine, gradcam=True)
        self.info = self.predictor.info
        self.weights_sha256 = self.predictor.sha256[self.predictor.weights]
        self.version = self.predictor.version
        self.eager = self.predictor.layer
        self.layer = gradcam_layer(self.info["model"], self.eager) if self.eager is not None else None

    def card(self) -> dict:
        """The card the model was checked against when it was loaded (never read again: after a
        ``dvc repro`` during serving, the card on the disk describes other weights than these), else
        what its ``model.json`` said then."""
        if self.predictor.card is not None:
            return self.predictor.card
        p = self.predictor
        return {"source": "model.json (no model card beside the weights)", "model": self.info["model"],
                "version": self.version, "weights_sha256": self.weights_sha256, "engine": p.engine,
                "intended_use": NOTICE, "threshold": p.threshold,
                "threshold_rule": self.info.get("threshold_rule"), "tta": modelinfo.tta(self.info),
                "input": {"formats": "JPEG, PNG, BMP, TIFF (as palm predict reads them)",
                          "max_pixels": MAX_PIXELS, "decoded_to": p.image_size, "network_input": p.input_size,
                          "fundus": p.fundus.record()},
                "training": {k: v for k, v in self.info.items()
                             if k not in ("model", "threshold", "threshold_rule", "tta", "image_size", "input_size",
                                          "fundus")}}

    def overlay_jpeg(self, data: bytes) -> str | None:
        """The Grad-CAM overlay of an upload as a JPEG data URL (run on the network's thread)."""
        if self.eager is None:
            return None
        p = self.predictor
        rgb = load_image(data, p.image_size)                         # what the person sees
        cam, _ = gradcam(self.eager, self.layer, to_chw_float(load_image(data, p.image_size, p.input_size, p.fundus)))
        shown = cv2.resize(rgb, (DISPLAY, DISPLAY), interpolation=cv2.INTER_CUBIC)
        heat = cv2.resize(cam.astype(np.float32), (DISPLAY, DISPLAY), interpolation=cv2.INTER_LINEAR).clip(0, 1)
        ok, buf = cv2.imencode(".jpg", cv2.cvtColor(overlay(shown, heat), cv2.COLOR_RGB2BGR),
                               [cv2.IMWRITE_JPEG_QUALITY, 88])
        return "data:image/jpeg;base64," + base64.b64encode(buf.tobytes()).decode() if ok else None


STATIC = resources.files("palm.serve.page") / "static"
router = APIRouter()


@dataclass
class Service:
    """What the routes share (``app.state.service``): the model, the limits, the audit log and,
    while the application runs (its lifespan), the batcher."""

    model: Model
    limits: Limits
    audit: AuditLog | None
    batch_size: int
    batcher: Batcher | None = None


def service(request: Request) -> Service:
    """Dependency: the application's :class:`Service`."""
    return request.app.state.service


@contextlib.asynccontextmanager
async def lifespan(app: FastAPI):
    svc: Service = app.state.service
    svc.batcher = Batcher(svc.model.predictor.run_batch, svc.batch_size)
    try:
        yield
    finally:
        svc.batcher.close()
        svc.batcher = None
        if svc.audit:
            svc.audit.close()


async def one_line(_request: Request, exc: RequestValidationError) -> JSONResponse:
    """A request FastAPI cannot validate: 422 and one line."""
    parts = [f"{'.'.join(str(x) for x in e.get('loc', ()) if x != 'body') or 'request'}: {e.get('msg')}"
             for e in exc.errors()]
    return JSONResponse({"detail": "; ".join(parts) + " (send images as multipart form field 'files')"}, 422)


@router.get("/docs", include_in_schema=False)
async def docs(request: Request):
    return get_swagger_ui_html(openapi_url=request.app.openapi_url, title="palm serve: API",
                               swagger_js_url="/docs-assets/swagger-ui-bundle.js",
                               swagger_css_url="/docs-assets/swagger-ui.css", swagger_favicon_url="data:,")


@router.get("/", response_class=HTMLResponse, include_in_schema=False)
async def page():
    return (STATIC / "index.html").read_text(encoding="utf-8")


@router.get("/healthz")
async def healthz(svc: Service = Depends(service)):
    """Whether the service is up, and which model it runs."""
    return {"status": "ok", "model": svc.model.version, "engine": svc.model.predictor.engine}


@router.get("/v1/model")
async def model_card(svc: Service = Depends(service)):
    """The model card: what the model is for, its data, metrics, threshold and inputs."""
    return svc.model.card()


@router.post("/v1/predict")
async def predict(files: list[UploadFile] = File(..., description="one or many photographs"),
                  gradcam: bool = Query(False, description="add each Grad-CAM overlay (JPEG data URL)"),
                  grade_all: bool = Query(False, description="also score images not judged gradable"),
                  svc: Service = Depends(service)):
    """Per image, the fields of ``palm predict``'s rows: image, quality, probability, predicted,
    diagnosis, error (an unreadable image is that image's error, not the request's)."""
    model, limits, batcher = svc.model, svc.limits, svc.batcher
    pred = model.predictor
    if len(files) > limits.max_images:
        raise HTTPException(413, f"too many images: at most {limits.max_images} per request, got {len(files)}")
    names = [f.filename or f"image {i + 1}" for i, f in enumerate(files)]
    datas = [await f.read() for f in files]
    decoded = await asyncio.gather(*(run_in_threadpool(decode_one, d, pred.image_size, pred.input_size, True,
                                                       pred.fundus)
                                     for d in datas))
    futures = [batcher.score(to_chw_float(d.image)) if gradable(d, grade_all) else None for d in decoded]
    rows: list[dict] = []
    anonymous: dict[int, str] = {}
    for name, d, fut in zip(names, decoded, futures):
        p = await asyncio.wrap_future(fut) if fut is not None else None
        rows.append(record(name, d, p, pred.threshold))
        if d.error:   # named as palm predict names a file (the audit log keeps the unnamed error)
            d_error = _BYTES_IO.sub("", d.error)
            rows[-1]["error"] = d_error.replace("<bytes>", name, 1)
            anonymous[len(rows) - 1] = d_error
    if gradcam:
        cams = [batcher.call(lambda data=data: model.overlay_jpeg(data)) if "probability" in row else None
                for row, data in zip(rows, datas)]
        for row, fut in zip(rows, cams):
            row["gradcam"] = await asyncio.wrap_future(fut) if fut is not None else None
    if svc.audit:
        now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="milliseconds")
        await run_in_threadpool(svc.audit.add, [
            (now, hashlib.sha256(data).hexdigest(), row["quality"], row.get("probability"),
             row.get("diagnosis"), model.version, anonymous.get(i)) for i, (row, data) in enumerate(zip(rows, datas))])
    return {"model": model.version, "threshold": pred.threshold, "notice": NOTICE, "results": rows}


def create_app(model: Model, limits: Limits = Limits(), audit_log: str | Path | None = None,
               batch_size: int = 16) -> FastAPI:
    """The ASGI application serving ``model``: :data:`router`'s routes, the page's files and the
    API docs' files, behind :class:`BodyLimit`."""
    app = FastAPI(title="palm serve", version=model.version, lifespan=lifespan, docs_url=None, redoc_url=None,
                  description=f"Pathologic myopia screening of fundus photographs. {NOTICE}")
    app.state.service = Service(model, limits, AuditLog(audit_log) if audit_log else None, batch_size)
    app.mount("/static", StaticFiles(directory=str(STATIC)), name="static")
    app.mount("/docs-assets", StaticFiles(directory=str(swagger_ui_path)), name="docs-assets")
    app.add_exception_handler(RequestValidationError, one_line)
    app.include_router(router)
    return BodyLimit(app, limits.max_request_bytes)


def listen(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port``: a one-line error when it cannot be had."""
    try:
        sock = socket.create_server((host, port), family=socket.AF_INET6 if ":" in host else socket.AF_INET,
                                    reuse_port=False)
    except OSError as exc:
        raise ConfigError(f"--host {host} --port {port}: cannot listen there ({exc.strerror or exc})") from None
    sock.set_inheritable(True)
    return sock


def serve(model_dir: str | Path = "models", host: str = "127.0.0.1", port: int = 8000, device: str = "auto",
          engine: str = "auto", audit_log: str | None = None, limits: Limits = Limits(), batch_size: int = 16) -> None:
    """Load the model once, then serve it until interrupted (the address is taken first, so a
    port in use fails at once)."""
    import sys

    import uvicorn

    with listen(host, port) as sock:
        model = Model(model_dir, device=device, engine=engine)
        app = create_app(model, limits, audit_log, batch_size)
        print(f"palm serve: {model.version} ({model.predictor.engine}) at http://{host}:{sock.getsockname()[1]}/ "
              f"(API docs: /docs){'; audit log ' + str(audit_log) if audit_log else ''}", file=sys.stderr, flush=True)
        uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False)).run(sockets=[sock])
