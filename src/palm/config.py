"""Reading ``params.yaml`` and running a DVC stage's entry point."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Callable

import yaml

from palm.errors import DataError

PARAMS_FILE = "params.yaml"


def load_params(path: str | Path = PARAMS_FILE) -> dict[str, Any]:
    with open(path, encoding="utf-8") as f:
        params = yaml.safe_load(f) or {}
    if not isinstance(params, dict):
        raise DataError(f"{path}: expected a mapping of parameters, got {type(params).__name__}")
    return params


def run_stage(main: Callable[[dict[str, Any]], None]) -> None:
    """Run ``main(params)``; a :class:`DataError` ends the process with a one-line message."""
    try:
        main(load_params())
    except DataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
