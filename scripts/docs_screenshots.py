"""The documentation's screenshots, taken in headless Chromium from a real (tiny) run, never drawn.

    python scripts/docs_screenshots.py                 # everything: run, pages, docs/images/*.png
    python scripts/docs_screenshots.py --work /tmp/w   # keep (and reuse) the tiny run's repository
    python scripts/docs_screenshots.py --site results  # also the built site's home page and one guide

It copies this repository's pipeline into a fresh git + DVC repository (``--work``), shrinks the
synthetic set and the training (``TINY``: a few minutes on 2 cores), runs ``dvc repro``, commits
that baseline (SE-ResNet18) and two experiments (LeNet; SE-ResNet18 with another seed), then opens in Debian's
Chromium (``/usr/bin/chromium``, through Playwright) and photographs:

- ``docs/images/report.png``: ``metrics/report.html``, the report page of the run;
- ``docs/images/compare.png``: ``palm compare --html``'s page for the two experiments;
- ``docs/images/plots-diff-roc.png``: ``dvc plots diff``'s ROC overlay (its page loads Vega from a
  CDN; the script answers those requests with the npm packages of the same versions, ``npm pack``'d
  once into ``--work``, so it needs no network beyond the npm registry);
- ``docs/images/serve.png``: ``palm serve``'s page after two synthetic photographs and a black
  image were dropped on it.

The figures are the tiny run's (a few dozen synthetic images, 64 px, 3 epochs): they show what
the pages look like, not how well a network does (that is results.md). PNGs are reduced to 256
colours to stay small.
"""

from __future__ import annotations

import argparse
import contextlib
import http.server
import io
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--no-first-run",
    "--disable-component-update",
    "--disable-sync",
]
#: params.yaml changes of the tiny run: a few dozen synthetic photographs at 64 px, 3 epochs
TINY = {
    "synthetic": dict(n_train_p=24, n_train_n=20, n_train_h=4, n_val_pm=20, n_val_non_pm=20, scale=0.15),
    "image_size": 64,
    "train": dict(epochs=3, warmup_epochs=0),
    "evaluate": dict(bootstrap=200),
    "explain": dict(n_images=6),
}
EXPERIMENTS = {"lenet": ["-S", "model=lenet"], "senet18-seed1": ["-S", "train.seed=1"]}
#: the CDN scripts of dvc plots' page (dvc_render.vega) -> (npm package, file inside it)
VEGA = {
    "vega@5.20.2": "build/vega.min.js",
    "vega-lite@5.2.0": "build/vega-lite.min.js",
    "vega-embed@6.18.2": "build/vega-embed.min.js",
}


def run(cmd: list[str], cwd: Path, env: dict | None = None) -> str:
    print("+", " ".join(cmd), file=sys.stderr)
    proc = subprocess.run(
        cmd,
        cwd=cwd,
        capture_output=True,
        text=True,
        env={
            **os.environ,
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
            "PYTHONPATH": str(REPO / "src"),
            **(env or {}),
        },
    )
    if proc.returncode:
        sys.exit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc.stdout


def tiny_run(work: Path) -> Path:
    """``work/palm``: the pipeline's tiny baseline run and two experiments, committed (reused if done)."""
    repo = work / "palm"
    if (repo / "compare.html").is_file():
        return repo
    if repo.exists():
        shutil.rmtree(repo)
    repo.mkdir(parents=True)
    for name in ("dvc.yaml", "params.yaml", ".dvcignore", ".gitignore"):
        shutil.copy2(REPO / name, repo / name)
    for name in ("stages", "src", "scripts"):
        shutil.copytree(REPO / name, repo / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    params = yaml.safe_load((repo / "params.yaml").read_text())
    for key, value in TINY.items():
        params[key] = {**params[key], **value} if isinstance(value, dict) else value
    for over in params["models"].values():
        over.pop("epochs", None)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    for cmd in (
        ["git", "init", "-q"],
        ["git", "config", "user.email", "docs@example.com"],
        ["git", "config", "user.name", "docs"],
        ["dvc", "init", "-q"],
        ["dvc", "config", "core.autostage", "true"],
        ["dvc", "config", "core.analytics", "false"],
        ["git", "add", "-A"],
        ["git", "commit", "-qm", "tiny pipeline"],
        ["dvc", "repro", "-q"],
        ["git", "add", "-A"],
        ["git", "commit", "-qm", "tiny baseline"],
    ):
        run(cmd, repo)
    for name, sets in EXPERIMENTS.items():  # each from the baseline: the workspace is restored after it
        run(["dvc", "exp", "run", "-q", "-n", name, *sets], repo)
        run(["git", "checkout", "-q", "--", "."], repo)
        run(["dvc", "checkout", "-q", "-f"], repo)
    run(["palm", "compare", "--baseline", "HEAD", *EXPERIMENTS, "--html", "compare.html"], repo)
    run(
        [
            "dvc",
            "plots",
            "diff",
            "HEAD",
            *EXPERIMENTS,
            "--targets",
            "metrics/eval/plots/sklearn/roc.json",
            "-o",
            "plots-diff",
        ],
        repo,
    )
    return repo


def vega_scripts(work: Path) -> dict[str, bytes]:
    """The CDN URL's tail (``vega@5.20.2``) -> that script, from ``npm pack`` of the same version."""
    cache = work / "npm"
    cache.mkdir(parents=True, exist_ok=True)
    out = {}
    for spec, inner in VEGA.items():
        name, version = spec.split("@")
        tgz = cache / f"{name}-{version}.tgz"
        if not tgz.is_file():
            run(["npm", "pack", "--silent", spec], cache)
        import tarfile

        with tarfile.open(tgz) as tar:
            out[spec] = tar.extractfile(f"package/{inner}").read()
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def http_folder(folder: Path):
    """A loopback HTTP server of ``folder``; yields its URL."""
    handler = lambda *a, **k: http.server.SimpleHTTPRequestHandler(*a, directory=str(folder), **k)  # noqa: E731
    http.server.SimpleHTTPRequestHandler.log_message = lambda *a: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()


@contextlib.contextmanager
def palm_serve(repo: Path):
    """``palm serve --model models`` of the tiny run on a free port; yields its URL."""
    import urllib.request

    port = free_port()
    log = open(repo / "serve.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "palm.cli", "serve", "--model", "models", "--port", str(port)],
        cwd=repo,
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, "PYTHONPATH": str(REPO / "src")},
    )
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(240):
            with contextlib.suppress(OSError):
                if urllib.request.urlopen(url + "/healthz", timeout=1).status == 200:
                    break
            if proc.poll() is not None:
                sys.exit("palm serve stopped:\n" + (repo / "serve.log").read_text())
            time.sleep(0.25)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()


def small_png(png: bytes, path: Path) -> None:
    """Write ``png`` reduced to 256 colours (the pages are flat colours and text)."""
    from PIL import Image

    image = Image.open(io.BytesIO(png)).convert("RGB").quantize(colors=256, method=Image.Quantize.MEDIANCUT)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, optimize=True)
    print(f"wrote {path} ({path.stat().st_size // 1024} KiB)", file=sys.stderr)


def shoot(
    page, url: str, path: Path, width: int = 1100, height: int = 1300, full_page: bool = False, wait=None
) -> None:
    page.set_viewport_size({"width": width, "height": height})
    page.goto(url)
    page.wait_for_load_state("networkidle")
    if wait:
        wait(page)
    small_png(page.screenshot(full_page=full_page), path)


def serve_page(page, url: str, repo: Path, out: Path) -> None:
    """Drop a PM and a non-PM synthetic photograph and a black image on palm serve's page."""
    import cv2
    import numpy as np
    import pandas as pd

    labels = pd.read_csv(repo / "data" / "labels" / "labels.csv")
    valid = labels[labels["split"] == "valid"]
    photos = [repo / "data" / "raw" / valid[valid["label"] == y]["image"].iloc[0] for y in (1, 0)]
    drop = repo / "dropped"
    drop.mkdir(exist_ok=True)
    files = []
    for name, src in zip(("photograph-1.jpg", "photograph-2.jpg"), photos):
        shutil.copy2(src, drop / name)
        files.append(drop / name)
    cv2.imwrite(str(drop / "black.png"), np.zeros((400, 400, 3), np.uint8))
    files.append(drop / "black.png")
    page.set_viewport_size({"width": 1100, "height": 900})
    page.goto(url + "/")
    page.set_input_files("#files", [str(f) for f in files])
    page.wait_for_selector(f"#count:has-text('{len(files)} of {len(files)} done')", timeout=120_000)
    page.wait_for_function(f"document.querySelectorAll('.card[data-state=done]').length == {len(files)}")
    small_png(page.screenshot(full_page=True), out)


def site_pages(page, out: Path) -> None:
    """The built site (mkdocs build into a temporary folder): its home page and the getting-started guide."""
    with tempfile.TemporaryDirectory() as tmp:
        run([sys.executable, "-m", "mkdocs", "build", "--strict", "-q", "-d", tmp], REPO)
        with http_folder(Path(tmp)) as url:
            shoot(page, url + "/", out / "docs-site-home.png", width=1280, height=900)
            shoot(page, url + "/getting-started/", out / "docs-site-getting-started.png", width=1280, height=1400)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, help="folder of the tiny run (kept and reused; default: a temporary one)")
    ap.add_argument("--out", type=Path, default=REPO / "docs" / "images", help="where the PNGs go")
    ap.add_argument("--site", type=Path, help="also photograph the built site's home page and a guide into this folder")
    ap.add_argument("--only-site", action="store_true", help="only the site's pages (with --site)")
    args = ap.parse_args(argv)
    from playwright.sync_api import sync_playwright

    with contextlib.ExitStack() as stack:
        work = args.work or Path(stack.enter_context(tempfile.TemporaryDirectory()))
        work.mkdir(parents=True, exist_ok=True)
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            page = browser.new_page(device_scale_factor=1)
            if not args.only_site:
                repo = tiny_run(work)
                scripts = vega_scripts(work)
                page.route(
                    "https://cdn.jsdelivr.net/npm/**",
                    lambda route: route.fulfill(
                        body=scripts[route.request.url.rsplit("/npm/", 1)[1]], content_type="text/javascript"
                    ),
                )
                with http_folder(repo) as url:
                    shoot(page, url + "/metrics/report.html", args.out / "report.png", height=1500)
                    shoot(page, url + "/compare.html", args.out / "compare.png", height=2400)
                    shoot(
                        page,
                        url + "/plots-diff/index.html",
                        args.out / "plots-diff-roc.png",
                        width=900,
                        height=520,
                        wait=lambda p: p.wait_for_selector("canvas, svg", timeout=30_000),
                    )
                with palm_serve(repo) as url:
                    serve_page(page, url, repo, args.out / "serve.png")
            if args.site:
                site_pages(page, args.site)
            browser.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
