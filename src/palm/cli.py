"""The ``palm`` command: ``palm predict PATH... [--model DIR] [--out preds.csv]``, ``palm serve`` and
``palm compare [REV ...] [--baseline REV] [--metric M ...] [--json PATH] [--html PATH] [--fail-if-worse]``."""

from __future__ import annotations

import argparse
import contextlib
import csv
import signal
import sys

from palm.core.config import Terminated, _terminate
from palm.core.errors import EXIT_CONFIG, EXIT_DATA, EXIT_OK, ConfigError, DataError, report
from palm.core.fsutil import atomic_file
from palm.core.params import MAX_BOOTSTRAP

FIELDS = ["image", "quality", "probability", "predicted", "diagnosis", "error"]

EXIT_CODES = """exit status:
  0  every image was predicted
  1  some images could not be read or decoded (their rows in the CSV say why; the others are predicted)
  2  bad usage: a bad option, no images found, an unusable --model folder (or weights whose SHA-256 its model
     card does not list), an --out that cannot be written or is not a regular file (a device, a FIFO, a link)
  3  internal error (one line; PALM_DEBUG=1 shows the traceback)
  130/143  interrupted (Ctrl-C) / terminated (SIGTERM): no partial --out file is left"""


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def cmd_predict(args) -> int:
    # imported here, not at the top: it loads Paddle (seconds), which `palm --help` and a bad
    # argument do not need
    from palm.serve.predict import Predictor, find_images

    _handle_signals()  # importing Paddle installs its own SIGTERM handler (a C++ crash dump, no clean-up)
    files = find_images(args.paths)
    if not files:
        raise ConfigError("no image files found in " + " ".join(args.paths))
    with contextlib.ExitStack() as stack:
        out = sys.stdout
        if args.out and args.out != "-":  # opened before the model loads: a folder that cannot be written fails at once
            try:
                out = stack.enter_context(atomic_file(args.out, "w", newline="", encoding="utf-8"))
            except OSError as exc:
                raise ConfigError(f"--out {args.out}: cannot write there ({exc.strerror or exc})") from None
        try:
            predictor = Predictor.load(args.model, device=args.device, engine=args.engine, precision=args.precision)
        except DataError as exc:
            raise ConfigError(f"--model: {exc}") from None
        _handle_signals()  # again: a Paddle engine imports Paddle only as the model loads (onnxruntime: never)
        failed = ungradable = 0
        writer = csv.DictWriter(out, fieldnames=FIELDS, extrasaction="ignore")
        writer.writeheader()
        for rec in predictor.predict(
            files, batch_size=args.batch_size, progress=not args.quiet, grade_all=args.grade_all, workers=args.workers
        ):
            if rec["error"]:
                failed += 1
                print(f"skipped: {rec['error']}", file=sys.stderr)
            elif rec["quality"] != "ok":
                ungradable += 1
            writer.writerow(rec)
            out.flush()
    done = len(files) - failed - (0 if args.grade_all else ungradable)
    print(
        f"{predictor.name} ({predictor.engine}): predicted {done} image(s)"
        + (f", {failed} could not be read" if failed else "")
        + (
            f", {ungradable} not gradable fundus photographs (see the quality column"
            + (")" if args.grade_all else "; --grade-all to diagnose them anyway)")
            if ungradable
            else ""
        )
        + (f"; wrote {args.out}" if args.out and args.out != "-" else ""),
        file=sys.stderr,
    )
    return EXIT_DATA if failed else EXIT_OK


def cmd_serve(args) -> int:
    try:
        from palm.serve.service import Limits, serve
    except ImportError as exc:
        raise ConfigError(f'palm serve needs the serve extra (pip install -e ".[cpu,serve]"): {exc}') from None
    try:
        serve(
            args.model,
            host=args.host,
            port=args.port,
            device=args.device,
            engine=args.engine,
            audit_log=args.audit_log,
            batch_size=args.batch_size,
            allow_hosts=tuple(args.allow_host),
            token=_token(args.token_file),
            limits=Limits(
                max_request_bytes=args.max_request_mb << 20,
                max_images=args.max_images,
                max_decode_bytes=args.max_decode_mb << 20,
                header_timeout=args.header_timeout,
                body_timeout=args.body_timeout,
            ),
        )
    except DataError as exc:
        raise ConfigError(str(exc) if str(exc).startswith("--") else f"--model: {exc}") from None
    return EXIT_OK


TOKEN_ENV = "PALM_SERVE_TOKEN"
MIN_TOKEN = 16


def _token(token_file: str | None) -> str | None:
    """The access token: the first line of ``--token-file``, else ``$PALM_SERVE_TOKEN``, else none
    (never given on the command line, where other users of the computer could read it)."""
    import os

    if token_file is not None:
        try:
            with open(token_file, encoding="utf-8") as f:
                token, where = f.readline().strip(), f"--token-file {token_file}"
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(
                f"--token-file {token_file}: cannot read it ({getattr(exc, 'strerror', None) or exc})"
            ) from None
    elif os.environ.get(TOKEN_ENV) is not None:
        token, where = os.environ[TOKEN_ENV].strip(), TOKEN_ENV
    else:
        return None
    if len(token) < MIN_TOKEN or any(c.isspace() or not c.isprintable() for c in token):
        raise ConfigError(
            f"{where}: the token must be at least {MIN_TOKEN} printable characters without spaces "
            "(e.g. python -c 'import secrets; print(secrets.token_urlsafe())')"
        )
    return token


def port_number(text: str) -> int:
    """argparse type: a TCP port, 0 (any free port) to 65535."""
    if not text.isdigit() or int(text) > 65535:
        raise argparse.ArgumentTypeError(f"must be a port number from 0 to 65535, got {text!r}")
    return int(text)


def host_address(text: str) -> str:
    """argparse type: an address or name to listen on, never empty (an empty host would silently
    mean every interface)."""
    import ipaddress
    import re

    name = text.strip()
    if not name:
        raise argparse.ArgumentTypeError(
            "must be an address: 127.0.0.1 (this computer only), 0.0.0.0 or :: "
            "(every interface), or this computer's address or name"
        )
    try:
        return str(ipaddress.ip_address(name.strip("[]")))
    except ValueError:
        if re.fullmatch(
            r"(?=.{1,253}$)[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\.?",
            name,
        ):
            return name
    raise argparse.ArgumentTypeError(f"not an IP address or host name: {text!r}")


def seconds(text: str) -> float:
    """argparse type: a number of seconds above 0."""
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0 < value < 1e6:
        raise argparse.ArgumentTypeError(f"must be a number of seconds above 0, got {text!r}")
    return value


SERVE_EPILOG = """API: POST /v1/predict (multipart field 'files'), GET /v1/model, GET /healthz, docs at /docs.
Research aid, not a diagnosis.

HTTP status (a JSON body {"detail": "one line"}):
  200  answered (an image that cannot be read is that image's error in its row)
  401  --token-file/$PALM_SERVE_TOKEN set and /v1/ asked without the token
  403  a Host not served (see --allow-host), or a cross-origin POST (another site's page)
  408  headers or body not received in time (--header-timeout, --body-timeout)
  413  too many images, too many bytes, or too much memory to decode (--max-images, --max-request-mb,
       --max-decode-mb; judged from the images' headers before decoding)
  422  no 'files' field
  503  the --audit-log cannot be written (nothing is returned; the next request tries again)
  500  internal error (one line; the service keeps running)

exit status:
  0  stopped (Ctrl-C, SIGTERM)
  2  bad usage: a bad option (--host, --port, a token shorter than 16 characters), an unusable --model
     folder or --audit-log, an address that cannot be listened on
  3  internal error (one line; PALM_DEBUG=1 shows the traceback)"""

COMPARE_EXIT_CODES = """exit status:
  0  compared (and, with --fail-if-worse, no revision is significantly worse than the baseline)
  1  --fail-if-worse: a revision is significantly worse on a --metric after Holm's correction;
     or bad input: the revisions were scored on different images, a predictions file is unreadable
     or holds impossible numbers (a label or class not 0 or 1, a probability outside [0, 1], NaN)
  2  bad usage: an unknown revision or metric, nothing to compare, --n-boot out of range, an output
     that cannot be written or is not a regular file (a device, a FIFO, a symbolic link); --json
     and --html are written both or neither
  3  internal error (one line; PALM_DEBUG=1 shows the traceback)"""


def cmd_compare(args) -> int:
    import json
    import time

    from palm.core.fsutil import atomic_outputs, check_writable
    from palm.evaluation.compare import METRICS, compare, worse
    from palm.evaluation.compare.page import page
    from palm.evaluation.compare.table import markdown, to_json

    start = time.perf_counter()
    outputs = {"--json": args.json, "--html": args.html}
    for flag, path in outputs.items():
        if path == "-":
            raise ConfigError(f"{flag} -: standard output carries the Markdown table; name a file")
        if path:  # before the tests run: a path that cannot be written fails at once
            check_writable(path)
    result = compare(args.revs, baseline=args.baseline, metrics=args.metric or METRICS, n_boot=args.n_boot)
    # both rendered, then written together: all the outputs or none
    texts = {
        path: text()
        for path, text in (
            (args.json, lambda: json.dumps(to_json(result), indent=1)),
            (args.html, lambda: page(result)),
        )
        if path
    }
    print(markdown(result))
    try:
        with atomic_outputs() as out:
            for path, text in texts.items():
                with out.open(path, encoding="utf-8") as f:
                    f.write(text)
    except OSError as exc:
        raise ConfigError(f"{exc.filename or ', '.join(texts)}: cannot write there ({exc.strerror or exc})") from None
    bad = worse(result)
    print(
        f"compared {len(result['runs']) - 1} revision(s) with {result['baseline']} on {result['n']} images "
        f"in {time.perf_counter() - start:.1f} s" + "".join(f"; wrote {p}" for p in (args.json, args.html) if p),
        file=sys.stderr,
    )
    if args.fail_if_worse and bad:
        print(
            "worse than the baseline: "
            + ", ".join(f"{r['b']} ({r['metric']} {r['diff']:+.3f}, p adjusted {r['p_adjusted']:.3g})" for r in bad),
            file=sys.stderr,
        )
        return EXIT_DATA
    return EXIT_OK


def n_boot(text: str) -> int:
    """argparse type: bootstrap resamples, 1 to MAX_BOOTSTRAP (the memory is resamples x images x 8 bytes)."""
    value = positive_int(text)
    if value > MAX_BOOTSTRAP:
        raise argparse.ArgumentTypeError(
            f"must be at most {MAX_BOOTSTRAP:,} (each resample holds every image), got {value:,}"
        )
    return value


def count(text: str) -> int:
    """argparse type: a whole number >= 0."""
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"must be a whole number >= 0, got {text!r}")
    return int(text)


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="palm",
        description="Pathologic myopia screening with a trained PALM model.",
        epilog=EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = ap.add_subparsers(dest="command", required=True)
    p = sub.add_parser(
        "predict",
        help="PM probability and class for image files or folders",
        epilog=EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("paths", nargs="+", help="image files or folders (searched recursively)")
    p.add_argument(
        "--model",
        default="models",
        help="folder of the trained model: models/ (weights) or models_export/ (inference model); default: %(default)s",
    )
    p.add_argument(
        "--out",
        help="write the predictions to this CSV file, never over anything but a regular "
        "file ('-' or none: standard output)",
    )
    p.add_argument("--batch-size", type=positive_int, default=16, help="images per batch (at least 1)")
    p.add_argument(
        "--device",
        default="auto",
        help="auto (a GPU if there is one, else the CPU), cpu, gpu or gpu:N; default: %(default)s",
    )
    p.add_argument(
        "--engine",
        default="auto",
        choices=["auto", "paddle-inference", "eager", "onnxruntime"],
        help="auto: Paddle Inference (oneDNN on the CPU, CUDA/TensorRT on a GPU), eager Paddle "
        "if that cannot run; onnxruntime: models_export/model.onnx on the CPU, without Paddle "
        '(pip install "palm-pipeline[onnx]"); default: %(default)s',
    )
    p.add_argument(
        "--precision",
        default="fp32",
        choices=["fp32", "bf16"],
        help="bf16: oneDNN bfloat16 kernels on the CPU (faster, probabilities move; benchmarks/README.md); "
        "default: %(default)s",
    )
    p.add_argument(
        "--workers",
        type=count,
        default=None,
        help="image decoding processes (default: one per core; 0: decode in the main process)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument(
        "--grade-all",
        action="store_true",
        help="also diagnose images whose quality is not ok (too dark, overexposed, blurred, "
        "no circular fundus, too small); by default they are listed without a diagnosis",
    )
    p.set_defaults(func=cmd_predict)

    s = sub.add_parser(
        "serve",
        help="a web page and an HTTP API that screen photographs with a trained model",
        epilog=SERVE_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    s.add_argument(
        "--model", default="models", help="folder of the trained model (as palm predict); default: %(default)s"
    )
    s.add_argument(
        "--host",
        default="127.0.0.1",
        type=host_address,
        help="address to listen on; default: %(default)s (this computer only); 0.0.0.0 or :: for every "
        "interface (then name the computer's addresses with --allow-host)",
    )
    s.add_argument(
        "--port", type=port_number, default=8000, help="port, 0 to 65535 (0: any free port); default: %(default)s"
    )
    s.add_argument(
        "--allow-host",
        action="append",
        default=[],
        metavar="NAME",
        type=host_address,
        help="also answer requests addressed to NAME (a name or address other computers reach this "
        "one by; repeatable); by default only 127.0.0.1, localhost, ::1 and --host",
    )
    s.add_argument(
        "--token-file",
        metavar="FILE",
        help=f"require the token on this file's first line (at least {MIN_TOKEN} characters) for /v1/: "
        f"'Authorization: Bearer TOKEN' (the page asks for it); default: ${TOKEN_ENV} if set, else none",
    )
    s.add_argument(
        "--audit-log",
        metavar="FILE",
        help="record each image's time, SHA-256, verdict, probability, decision and model version "
        "in this SQLite file (never the image)",
    )
    s.add_argument(
        "--max-images", type=positive_int, default=32, help="images per request (413 beyond); default: %(default)s"
    )
    s.add_argument(
        "--max-request-mb", type=positive_int, default=64, help="MiB per request (413 beyond); default: %(default)s"
    )
    s.add_argument(
        "--max-decode-mb",
        type=positive_int,
        default=1024,
        help="MiB that requests may hold at once for their uploads and decoding, estimated from the "
        "images' headers before decoding (a request that alone needs more: 413; others wait); "
        "default: %(default)s",
    )
    s.add_argument(
        "--header-timeout",
        type=seconds,
        default=10.0,
        help="seconds a client may take to send a request's headers (408 beyond); default: %(default)g",
    )
    s.add_argument(
        "--body-timeout",
        type=seconds,
        default=60.0,
        help="seconds a client may take to send a request's body (408 beyond); default: %(default)g",
    )
    s.add_argument(
        "--batch-size",
        type=positive_int,
        default=16,
        help="most images the network scores at once, from all requests; default: %(default)s",
    )
    s.add_argument("--device", default="auto", help="as palm predict's; default: %(default)s")
    s.add_argument(
        "--engine",
        default="auto",
        choices=["auto", "paddle-inference", "eager"],
        help="as palm predict's; default: %(default)s",
    )
    s.set_defaults(func=cmd_serve)

    c = sub.add_parser(
        "compare",
        help="paired tests of experiments' validation predictions against a baseline",
        description="Compare revisions (experiment names, branches, commits or 'workspace') with a "
        "baseline on the same validation images, from their committed "
        "metrics/predictions.csv and params.yaml: DeLong for AUC, exact McNemar for "
        "accuracy, sensitivity, specificity, paired bootstrap for Brier and F1, Holm's "
        "correction; revisions that differ only by train.seed are grouped. A REV "
        "may also be a predictions .csv file (e.g. scripts/cross_validate.py's "
        "out-of-fold predictions).",
        epilog=COMPARE_EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    c.add_argument(
        "revs",
        nargs="*",
        metavar="REV",
        help="revisions (or predictions .csv files) to compare (default: every experiment that dvc exp show lists)",
    )
    c.add_argument(
        "--baseline", default="HEAD", help="the revision (or .csv file) compared against; default: %(default)s"
    )
    c.add_argument(
        "--metric",
        action="extend",
        nargs="+",
        metavar="M",
        choices=["auc", "accuracy", "sensitivity", "specificity", "brier", "f1"],
        help="metrics to compare: auc, accuracy, sensitivity, specificity, brier, f1; default: all",
    )
    c.add_argument("--json", metavar="PATH", help="also write the records and seed groups to this JSON file")
    c.add_argument("--html", metavar="PATH", help="also write a self-contained HTML page")
    c.add_argument(
        "--n-boot",
        type=n_boot,
        default=2000,
        help=f"bootstrap resamples for Brier and F1 (seed 0), 1 to {MAX_BOOTSTRAP:,}; default: %(default)s",
    )
    c.add_argument(
        "--fail-if-worse",
        action="store_true",
        help="exit 1 when a revision is significantly worse than the baseline on a --metric (after Holm's correction)",
    )
    c.set_defaults(func=cmd_compare)
    return ap


def _handle_signals() -> None:
    """SIGTERM and Ctrl-C end the command as an error does: temporary files removed, worker
    processes shut down, one line, exit 143 / 130."""
    signal.signal(signal.SIGTERM, _terminate)
    signal.signal(signal.SIGINT, signal.default_int_handler)


def main(argv=None) -> int:
    args = parser().parse_args(argv)  # bad usage: argparse prints one line and exits with 2
    previous = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    _handle_signals()
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Terminated:
        print("terminated", file=sys.stderr)
        return 143
    except Exception as exc:  # noqa: BLE001 - one line and the documented exit status
        code = report(exc)
        # predict: a DataError of the model folder is a usage error; compare: bad data is bad data
        return EXIT_CONFIG if isinstance(exc, DataError) and args.command == "predict" else code
    finally:
        signal.signal(signal.SIGTERM, previous[0])
        signal.signal(signal.SIGINT, previous[1])


if __name__ == "__main__":
    sys.exit(main())
