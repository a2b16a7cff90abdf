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

Hostile input: what decoding a request will cost is read from its images' headers first
(:func:`palm.serve.decode.decode_cost`) and held from one budget for all requests
(:class:`MemoryBudget`, 413 beyond it); :class:`Guard` refuses foreign ``Host`` names,
cross-origin writes, requests without the token (when there is one), oversized and slow bodies,
and turns any error escaping a route into one line of JSON; uvicorn's protocol gets a deadline
for the headers (:func:`header_timeout_protocol`); the audit log writes a request's rows in one
transaction or answers 503 (:class:`AuditLog`).
"""

from __future__ import annotations

import asyncio
import base64
import collections
import contextlib
import datetime
import functools
import hashlib
import hmac
import json
import os
import queue
import re
import socket
import sqlite3
import sys
import threading
import time
import traceback
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import cast

import cv2
import numpy as np
from fastapi import APIRouter, Depends, FastAPI, File, HTTPException, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool
from swagger_ui_bundle import swagger_ui_path  # Swagger UI's files, served here rather than from a CDN

from palm.core.errors import ConfigError, DataError
from palm.data.image import MAX_PIXELS, load_image, to_chw_float
from palm.nn import modelinfo
from palm.nn.models import gradcam_layer
from palm.serve.decode import Cost, Decoded, decode_cost, decode_one
from palm.serve.gradcam import gradcam, overlay
from palm.serve.predict import Predictor, gradable, record
from palm.serve.quality import SIDE

NOTICE = (
    "Research aid, not a diagnosis: the PM probability of a screening model, to be read by an "
    "eye-care professional with the photograph; never a reason to skip an examination."
)
DISPLAY = 384  # side of the Grad-CAM overlays, pixels
_BYTES_IO = re.compile(r" ?<_io\.BytesIO object at 0x[0-9a-f]+>")  # how Pillow names an upload it cannot identify


@dataclass(frozen=True)
class Limits:
    """What one request may carry and cost (413 beyond), and how long a client may take to send it.

    ``max_decode_bytes`` is the memory the service's requests may hold at once for their uploads
    and their decoding, shared by all requests: a request takes its uploads' size plus the cost
    of decoding its :data:`DECODE_AT_ONCE` costliest images (:func:`palm.serve.decode.decode_cost`,
    from the headers) before anything is decoded, waits its turn while others hold it, and is
    refused (413) when it alone would need more. Pixels per image: :data:`palm.data.image.MAX_PIXELS`,
    as for ``palm predict`` (that image's error, not the request's). A request's headers must arrive
    within ``header_timeout`` seconds and its body within ``body_timeout`` (408 beyond)."""

    max_request_bytes: int = 64 << 20
    max_images: int = 32
    max_decode_bytes: int = 1 << 30
    header_timeout: float = 10.0
    body_timeout: float = 60.0


#: names a request's ``Host`` may have by default (this computer); more with ``--allow-host``
LOOPBACK = frozenset({"127.0.0.1", "localhost", "::1"})
#: images of one request decoded at once (the decoding runs in threads, on this machine's cores)
DECODE_AT_ONCE = max(1, min(4, len(os.sched_getaffinity(0))))


@dataclass(frozen=True)
class Security:
    """Who may use the service: requests whose ``Host`` is one of ``hosts`` (403 otherwise; DNS
    rebinding), writes from the service's own origin only (a browser's cross-origin POST: 403), and
    with ``token``, ``/v1/`` only with ``Authorization: Bearer <token>`` (401 otherwise)."""

    hosts: frozenset = LOOPBACK
    token: str | None = None


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


class AuditError(Exception):
    """The audit log cannot record a request (its results are then not returned)."""


class AuditLog:
    """``--audit-log FILE``: one SQLite row per image scored; never the image or its name.

    A request's rows are written in one transaction, before its results are returned; when they
    cannot be (the database locked, read-only, deleted or full) :meth:`add` raises
    :class:`AuditError` and leaves no row of it, and the next request opens the file again, so
    the service records again as soon as the database can be written."""

    COLUMNS = "time TEXT, sha256 TEXT, quality TEXT, probability REAL, decision TEXT, model_version TEXT, error TEXT"
    TIMEOUT = 2.0  # seconds to wait for a lock another process holds

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.lock = threading.Lock()
        self.db: sqlite3.Connection | None = None
        try:
            self._open()
        except sqlite3.Error as exc:
            raise DataError(f"--audit-log {path}: cannot use it as an SQLite database ({exc})") from None

    def _open(self) -> sqlite3.Connection:
        if self.db is None:
            db = sqlite3.connect(self.path, timeout=self.TIMEOUT, check_same_thread=False, isolation_level=None)
            try:
                db.execute(f"CREATE TABLE IF NOT EXISTS predictions ({self.COLUMNS})")
            except sqlite3.Error:
                db.close()
                raise
            self.db = db
        return self.db

    def add(self, rows: list[tuple]) -> None:
        """Write ``rows`` together, or none of them (:class:`AuditError`)."""
        with self.lock:
            try:
                db = self._open()
                db.execute("BEGIN IMMEDIATE")
                try:
                    db.executemany("INSERT INTO predictions VALUES (?, ?, ?, ?, ?, ?, ?)", rows)
                    db.execute("COMMIT")
                except BaseException:
                    with contextlib.suppress(sqlite3.Error):
                        db.execute("ROLLBACK")
                    raise
            except (sqlite3.Error, OSError) as exc:
                if self.db is not None:  # opened again by the next request: a deleted or replaced file,
                    with contextlib.suppress(sqlite3.Error):  # a lock released, space freed
                        self.db.close()
                    self.db = None
                raise AuditError(str(exc) or type(exc).__name__) from None

    def close(self) -> None:
        with self.lock:
            if self.db is not None:
                self.db.close()
                self.db = None


class MemoryBudget:
    """Bytes that requests hold while they read and decode their images, granted first come,
    first served (:attr:`Limits.max_decode_bytes`)."""

    def __init__(self, total: int):
        self.total = self.free = total
        self.waiters: collections.deque = collections.deque()

    @contextlib.asynccontextmanager
    async def hold(self, n: int):
        if self.waiters or n > self.free:
            fut = asyncio.get_running_loop().create_future()
            self.waiters.append((n, fut))
            try:
                await fut
            except asyncio.CancelledError:
                if fut.cancelled():
                    with contextlib.suppress(ValueError):
                        self.waiters.remove((n, fut))
                    self._grant()
                else:
                    self._release(n)
                raise
        else:
            self.free -= n
        try:
            yield
        finally:
            self._release(n)

    def _release(self, n: int) -> None:
        self.free += n
        self._grant()

    def _grant(self) -> None:
        while self.waiters and self.waiters[0][0] <= self.free:
            n, fut = self.waiters.popleft()
            if not fut.done():
                self.free -= n
                fut.set_result(None)


class _Refused(Exception):
    """The body of a request was cut off: too large, or too slow (the answer is the guard's own)."""

    def __init__(self, status: int, detail: str):
        self.status, self.detail = status, detail


def _hostname(value: str) -> str:
    """``Host``/``Origin`` authority without its port, lower case (``[::1]:8000`` -> ``::1``)."""
    value = value.strip().lower()
    if value.startswith("["):
        return value[1 : value.find("]")] if "]" in value else value
    return value.rsplit(":", 1)[0] if value.count(":") == 1 else value


class Guard:
    """ASGI middleware in front of the application: refuses, with one line of JSON,

    - a ``Host`` the service does not answer to (403: a page elsewhere reaching it by DNS rebinding);
    - a write (POST...) whose ``Origin`` is not the service's own (403: a page elsewhere posting
      through a clinic's browser) or that a browser marks ``Sec-Fetch-Site: cross-site``;
    - with a token, a ``/v1/`` request without ``Authorization: Bearer <token>`` (401);
    - a body above ``max_request_bytes``, declared or counted as it arrives (413);
    - a body not received within ``body_timeout`` seconds (408);

    and answers an error of the application that escaped it as JSON (500, one line; the server
    logs one line, the traceback with ``PALM_DEBUG=1``) rather than as plain text."""

    def __init__(self, app, limits: Limits, security: Security = Security()):
        self.app, self.limits, self.security = app, limits, security
        self.token = security.token.encode() if security.token else None

    def refusal(self, scope) -> tuple[int, str] | None:
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        host = headers.get("host", "")
        if _hostname(host) not in self.security.hosts:
            return 403, (
                f"host {host!r} is not served here (palm serve --allow-host NAME serves the names "
                "this computer is reached by)"
            )
        if scope["method"] not in ("GET", "HEAD", "OPTIONS"):
            origin = headers.get("origin")
            if origin is not None and origin.split("://", 1)[-1].lower() != host.lower():
                return 403, f"cross-origin request from {origin!r} refused: only the service's own page may post"
            if headers.get("sec-fetch-site") == "cross-site":
                return 403, "cross-site request refused: only the service's own page may post"
        if self.token is not None and scope["path"].startswith("/v1/"):
            scheme, _, given = headers.get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), self.token):
                return 401, "this service needs its access token: Authorization: Bearer <token>"
        length = headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > self.limits.max_request_bytes:
            return 413, self.too_large
        return None

    @property
    def too_large(self) -> str:
        return (
            f"request too large: at most {self.limits.max_request_bytes / 2**20:g} MiB per request "
            "(send fewer or smaller images per request)"
        )

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        refused = self.refusal(scope)
        if refused is not None:
            return await _json(send, *refused, bearer=refused[0] == 401)
        received = 0
        deadline = None
        cut: _Refused | None = None
        started = complete = False

        async def guarded_receive():
            nonlocal received, deadline, cut, complete
            if complete:  # the body is in: waiting for a disconnect needs no deadline
                return await receive()
            loop = asyncio.get_running_loop()
            deadline = deadline or loop.time() + self.limits.body_timeout
            try:
                msg = await asyncio.wait_for(receive(), max(0.0, deadline - loop.time()))
            except TimeoutError:
                cut = _Refused(408, f"request body not received within {self.limits.body_timeout:g} s")
                raise cut from None
            if msg["type"] == "http.request":
                complete = not msg.get("more_body", False)
                received += len(msg.get("body", b""))
                if received > self.limits.max_request_bytes:
                    cut = _Refused(413, self.too_large)
                    raise cut
            return msg

        async def guarded_send(msg):
            nonlocal started
            if cut is not None:
                return  # the app's answer to the cut-off body: ours replaces it
            started = started or msg["type"] == "http.response.start"
            await send(msg)

        try:
            await self.app(scope, guarded_receive, guarded_send)
        except _Refused:
            pass
        except Exception as exc:  # noqa: BLE001 - one line for the client and for the log
            log_error(f"{scope['method']} {scope['path']}", exc)
            if not started:
                await _json(send, 500, f"internal error ({type(exc).__name__}); the service keeps running")
            return
        if cut is not None and not started:
            await _json(send, cut.status, cut.detail, close=True)


def log_error(where: str, exc: BaseException) -> None:
    """One line on the server's standard error (the traceback too with ``PALM_DEBUG=1``)."""
    print(f"palm serve: {where}: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
    if os.environ.get("PALM_DEBUG"):
        traceback.print_exception(exc)


async def _json(send, status: int, detail: str, bearer: bool = False, close: bool = False) -> None:
    body = json.dumps({"detail": detail}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if bearer:
        headers.append((b"www-authenticate", b"Bearer"))
    if close:  # the rest of a cut-off body is not read: the connection ends here
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
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
        return {
            "source": "model.json (no model card beside the weights)",
            "model": self.info["model"],
            "version": self.version,
            "weights_sha256": self.weights_sha256,
            "engine": p.engine,
            "intended_use": NOTICE,
            "threshold": p.threshold,
            "threshold_rule": self.info.get("threshold_rule"),
            "tta": modelinfo.tta(self.info),
            "input": {
                "formats": "JPEG, PNG, BMP, TIFF (as palm predict reads them)",
                "max_pixels": MAX_PIXELS,
                "decoded_to": p.image_size,
                "network_input": p.input_size,
                "fundus": p.fundus.record(),
            },
            "training": {
                k: v
                for k, v in self.info.items()
                if k not in ("model", "threshold", "threshold_rule", "tta", "image_size", "input_size", "fundus")
            },
        }

    def overlay_jpeg(self, data: bytes) -> str | None:
        """The Grad-CAM overlay of an upload as a JPEG data URL (run on the network's thread)."""
        if self.eager is None:
            return None
        p = self.predictor
        rgb = load_image(data, p.image_size)  # what the person sees
        cam, _ = gradcam(self.eager, self.layer, to_chw_float(load_image(data, p.image_size, p.input_size, p.fundus)))
        shown = cv2.resize(rgb, (DISPLAY, DISPLAY), interpolation=cv2.INTER_CUBIC)
        heat = cv2.resize(cam.astype(np.float32), (DISPLAY, DISPLAY), interpolation=cv2.INTER_LINEAR).clip(0, 1)
        ok, buf = cv2.imencode(
            ".jpg", cv2.cvtColor(overlay(shown, heat), cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 88]
        )
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
    memory: MemoryBudget
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
    parts = [
        f"{'.'.join(str(x) for x in e.get('loc', ()) if x != 'body') or 'request'}: {e.get('msg')}"
        for e in exc.errors()
    ]
    return JSONResponse({"detail": "; ".join(parts) + " (send images as multipart form field 'files')"}, 422)


@router.get("/docs", include_in_schema=False)
async def docs(request: Request):
    return get_swagger_ui_html(
        openapi_url=request.app.openapi_url,
        title="palm serve: API",
        swagger_js_url="/docs-assets/swagger-ui-bundle.js",
        swagger_css_url="/docs-assets/swagger-ui.css",
        swagger_favicon_url="data:,",
    )


@router.get("/", response_class=HTMLResponse, include_in_schema=False)
async def page():
    return (STATIC / "index.html").read_text(encoding="utf-8")


@router.get("/healthz")
async def healthz(svc: Service = Depends(service)):
    """Whether the service is up, and which model it runs: its version, engine and decision threshold."""
    return {
        "status": "ok",
        "model": svc.model.version,
        "engine": svc.model.predictor.engine,
        "threshold": svc.model.predictor.threshold,
    }


@router.get("/v1/model")
async def model_card(svc: Service = Depends(service)):
    """The model card: what the model is for, its data, metrics, threshold and inputs."""
    return svc.model.card()


@router.post("/v1/predict")
async def predict(
    files: list[UploadFile] = File(..., description="one or many photographs"),
    gradcam: bool = Query(False, description="add each Grad-CAM overlay (JPEG data URL)"),
    grade_all: bool = Query(False, description="also score images not judged gradable"),
    svc: Service = Depends(service),
):
    """Per image, the fields of ``palm predict``'s rows: image, quality, probability, predicted,
    diagnosis, error (an unreadable image is that image's error, not the request's).

    413: more than ``--max-images`` images, more than ``--max-request-mb``, or more memory to
    decode than ``--max-decode-mb`` (estimated from the images' headers, before decoding);
    503: the audit log cannot record the request (no results then)."""
    model, limits, batcher = svc.model, svc.limits, svc.batcher
    assert batcher is not None  # set by the application's lifespan, which serves the requests
    pred = model.predictor
    if len(files) > limits.max_images:
        raise HTTPException(413, f"too many images: at most {limits.max_images} per request, got {len(files)}")
    names = [f.filename or f"image {i + 1}" for i, f in enumerate(files)]
    sides = {pred.image_size, max(pred.image_size, SIDE)}  # palm.serve.decode.decode_one's decodings
    costs = await run_in_threadpool(_costs, [f.file for f in files], sides)
    need = sum(_size(f) for f in files) + sum(
        sorted((c.bytes for c in costs if isinstance(c, Cost)), reverse=True)[:DECODE_AT_ONCE]
    )
    if need > limits.max_decode_bytes:
        worst = max(range(len(files)), key=lambda i: costs[i].bytes if isinstance(costs[i], Cost) else 0)
        raise HTTPException(
            413,
            f"request needs ~{need / 2**20:,.0f} MiB to read and decode (the costliest image, "
            f"{names[worst]}: {costs[worst].what}, ~{costs[worst].bytes / 2**20:,.0f} MiB), "
            f"above the limit of {limits.max_decode_bytes / 2**20:g} MiB (palm serve "
            "--max-decode-mb); send fewer or smaller images (a JPEG costs the least)",
        )
    async with svc.memory.hold(need):
        datas = [await f.read() for f in files]
        at_once = asyncio.Semaphore(DECODE_AT_ONCE)

        async def decode(data: bytes, cost) -> Decoded:
            if not isinstance(cost, Cost):  # refused from its header: never decoded
                return Decoded(data, None, cost)
            async with at_once:
                return await run_in_threadpool(decode_one, data, pred.image_size, pred.input_size, True, pred.fundus)

        decoded = await asyncio.gather(*(decode(d, c) for d, c in zip(datas, costs)))
        futures = [
            batcher.score(to_chw_float(cast(np.ndarray, d.image))) if gradable(d, grade_all) else None for d in decoded
        ]
        rows: list[dict] = []
        anonymous: dict[int, str] = {}
        for name, d, fut in zip(names, decoded, futures):
            p = await asyncio.wrap_future(fut) if fut is not None else None
            rows.append(record(name, d, p, pred.threshold))
            if d.error:  # named as palm predict names a file (the audit log keeps the unnamed error)
                d_error = _BYTES_IO.sub("", d.error)
                rows[-1]["error"] = d_error.replace("<bytes>", name, 1)
                anonymous[len(rows) - 1] = d_error
        if gradcam:
            cams = [
                batcher.call(functools.partial(model.overlay_jpeg, data)) if "probability" in row else None
                for row, data in zip(rows, datas)
            ]
            for row, fut in zip(rows, cams):
                row["gradcam"] = await asyncio.wrap_future(fut) if fut is not None else None
        if svc.audit:  # recorded before the results are returned, all rows or none
            now = datetime.datetime.now(datetime.UTC).isoformat(timespec="milliseconds")
            try:
                await run_in_threadpool(
                    svc.audit.add,
                    [
                        (
                            now,
                            hashlib.sha256(data).hexdigest(),
                            row["quality"],
                            row.get("probability"),
                            row.get("diagnosis"),
                            model.version,
                            anonymous.get(i),
                        )
                        for i, (row, data) in enumerate(zip(rows, datas))
                    ],
                )
            except AuditError as exc:
                log_error(f"--audit-log {svc.audit.path}", exc)
                raise HTTPException(
                    503,
                    f"the audit log cannot record this request ({exc}); no results are "
                    "returned: try again once it can be written",
                ) from None
    return {"model": model.version, "threshold": pred.threshold, "notice": NOTICE, "results": rows}


def _costs(streams: list, sides: set[int]) -> list:
    """Each upload's :func:`palm.serve.decode.decode_cost`, or why it is not read (one line)."""
    out: list[Cost | str] = []
    for f in streams:
        try:
            out.append(decode_cost(f, sides))
        except DataError as exc:
            out.append(str(exc))
    return out


def _size(f: UploadFile) -> int:
    if f.size is not None:
        return f.size
    f.file.seek(0, os.SEEK_END)
    size = f.file.tell()
    f.file.seek(0)
    return size


async def internal_error(_request: Request, exc: Exception) -> JSONResponse:
    """What escaped a route: 500 and one line (:class:`Guard` logs it)."""
    return JSONResponse({"detail": f"internal error ({type(exc).__name__}); the service keeps running"}, 500)


def create_app(
    model: Model,
    limits: Limits = Limits(),
    audit_log: str | Path | None = None,
    batch_size: int = 16,
    security: Security = Security(),
) -> Guard:
    """The ASGI application serving ``model``: :data:`router`'s routes, the page's files and the
    API docs' files, behind :class:`Guard`."""
    app = FastAPI(
        title="palm serve",
        version=model.version,
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
        description=f"Pathologic myopia screening of fundus photographs. {NOTICE}",
    )
    app.state.service = Service(
        model, limits, AuditLog(audit_log) if audit_log else None, batch_size, MemoryBudget(limits.max_decode_bytes)
    )
    app.mount("/static", StaticFiles(directory=str(STATIC)), name="static")
    app.mount("/docs-assets", StaticFiles(directory=str(swagger_ui_path)), name="docs-assets")
    # Starlette calls a handler with the class it is registered for; its annotation takes any Exception
    app.add_exception_handler(RequestValidationError, one_line)  # type: ignore[arg-type]
    app.add_exception_handler(Exception, internal_error)
    app.include_router(router)
    return Guard(app, limits, security)


def listen(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port``: a one-line error when it cannot be had."""
    try:
        sock = socket.create_server(
            (host, port), family=socket.AF_INET6 if ":" in host else socket.AF_INET, reuse_port=False
        )
    except (OSError, OverflowError) as exc:
        raise ConfigError(
            f"--host {host} --port {port}: cannot listen there ({getattr(exc, 'strerror', None) or exc})"
        ) from None
    sock.set_inheritable(True)
    return sock


def every_interface(host: str) -> bool:
    return host in ("0.0.0.0", "::")


def header_timeout_protocol(seconds: float):
    """uvicorn's h11 protocol, with a deadline for a request's headers (uvicorn has none: a client
    could hold a connection forever by sending them a byte at a time): counted from the connection,
    or from the first byte after the previous answer; answered 408 and closed beyond."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    body = json.dumps({"detail": f"request headers not received within {seconds:g} s"}).encode()
    answer = (
        b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\nconnection: close\r\n"
        b"content-length: " + str(len(body)).encode() + b"\r\n\r\n" + body
    )

    class HeaderTimeout(H11Protocol):
        _header_timer = None

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._arm()

        def data_received(self, data: bytes) -> None:
            cycle = self.cycle
            if cycle is None or cycle.response_complete:
                self._arm()  # between requests: these bytes begin the next one's headers
            super().data_received(data)
            if self.cycle is not cycle:  # its headers are in
                self._disarm()

        def connection_lost(self, exc) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _arm(self) -> None:
            if self._header_timer is None:
                self._header_timer = self.loop.call_later(seconds, self._expired)

        def _disarm(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _expired(self) -> None:
            self._header_timer = None
            if (self.cycle is None or self.cycle.response_complete) and not self.transport.is_closing():
                self.transport.write(answer)
                self.transport.close()

    return HeaderTimeout


def serve(
    model_dir: str | Path = "models",
    host: str = "127.0.0.1",
    port: int = 8000,
    device: str = "auto",
    engine: str = "auto",
    audit_log: str | None = None,
    limits: Limits = Limits(),
    batch_size: int = 16,
    allow_hosts: tuple[str, ...] = (),
    token: str | None = None,
) -> None:
    """Load the model once, then serve it until interrupted (the address is taken first, so a
    port in use fails at once). Requests are answered for the names of this computer
    (:data:`LOOPBACK`), ``host`` itself (unless every interface) and ``allow_hosts``."""
    import uvicorn

    if not 0 <= port <= 65535:
        raise ConfigError(f"--port {port}: a port is a number from 0 to 65535")
    hosts = LOOPBACK | {_hostname(h) for h in allow_hosts} | (set() if every_interface(host) else {_hostname(host)})
    with listen(host, port) as sock:
        model = Model(model_dir, device=device, engine=engine)
        app = create_app(model, limits, audit_log, batch_size, Security(frozenset(hosts), token))
        bound = sock.getsockname()[1]
        where = (
            f"every interface, port {bound} (http://127.0.0.1:{bound}/ here; other computers by the names given "
            "with --allow-host)"
            if every_interface(host)
            else f"http://{'[' + host + ']' if ':' in host else host}:{bound}/"
        )
        print(
            f"palm serve: {model.version} ({model.predictor.engine}) at {where} (API docs: /docs)"
            f"{'; audit log ' + str(audit_log) if audit_log else ''}{'; token required for /v1/' if token else ''}",
            file=sys.stderr,
            flush=True,
        )
        config = uvicorn.Config(
            app,
            log_level="warning",
            access_log=False,
            timeout_keep_alive=5,
            http=header_timeout_protocol(limits.header_timeout),
        )
        uvicorn.Server(config).run(sockets=[sock])
