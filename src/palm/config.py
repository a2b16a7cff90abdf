"""Reading ``params.yaml`` and running a DVC stage's entry point."""

from __future__ import annotations

import signal
import sys
from pathlib import Path
from typing import Any, Callable

import yaml

from palm.errors import ConfigError, report
from palm.fsutil import remove_stale_temporaries
from palm.params import validate

PARAMS_FILE = "params.yaml"


def load_params(path: str | Path = PARAMS_FILE) -> dict[str, Any]:
    """params.yaml as a dict, validated (:func:`palm.params.validate`): a :class:`ConfigError`
    lists every bad key with its value."""
    try:
        with open(path, encoding="utf-8") as f:
            params = yaml.safe_load(f) or {}
    except FileNotFoundError:
        raise ConfigError(f"{path}: not found") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({' '.join(str(exc).split())})") from None
    if not isinstance(params, dict):
        raise ConfigError(f"{path}: expected a mapping of parameters, got {type(params).__name__}")
    return validate(params, source=str(path))


class Terminated(BaseException):
    """SIGTERM, raised as an exception so that temporary files are removed on the way out."""


def _terminate(signum, frame):
    raise Terminated()


def run_stage(main: Callable[[dict[str, Any]], None]) -> None:
    """Run ``main(params)``: every error ends the process with one line and the documented
    exit status (:mod:`palm.errors`); SIGTERM and Ctrl-C clean up as an error does."""
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        remove_stale_temporaries()
        main(load_params())
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except Terminated:
        print("terminated", file=sys.stderr)
        sys.exit(143)
    except Exception as exc:  # noqa: BLE001 - every error is one line and an exit status
        sys.exit(report(exc))
    finally:
        signal.signal(signal.SIGTERM, previous)
