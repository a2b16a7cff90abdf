"""Reading ``params.yaml`` and running a DVC stage's entry point."""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from palm.core.errors import ConfigError, report
from palm.core.fsutil import remove_stale_temporaries
from palm.core.params import short_text, validate

PARAMS_FILE = "params.yaml"


#: the largest params.yaml read (the project's is about 4 KB); a larger one is refused unread
MAX_PARAMS_BYTES = 1 << 20


class _NoAliases(yaml.SafeLoader):
    """PyYAML's safe loader without aliases (``*name``): an "alias bomb" of a few lines expands
    to billions of values when validated or printed."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.MarkedYAMLError(
                None,
                None,
                f"alias *{event.anchor} is not allowed in params.yaml (write the value out)",
                event.start_mark,
            )
        return super().compose_node(parent, index)


def load_params(path: str | Path = PARAMS_FILE) -> dict[str, Any]:
    """params.yaml as a dict, validated (:func:`palm.core.params.validate`): a :class:`ConfigError`
    lists every bad key with its value. Files above :data:`MAX_PARAMS_BYTES` and YAML aliases
    are refused before anything is built."""
    try:
        if os.path.exists(path) and not os.path.isfile(path):  # a FIFO would never end
            raise ConfigError(f"{path}: not a regular file")
        with open(path, "rb") as f:
            data = f.read(MAX_PARAMS_BYTES + 1)
        if len(data) > MAX_PARAMS_BYTES:
            raise ConfigError(
                f"{path}: larger than {MAX_PARAMS_BYTES // 1024} KB; a params.yaml is a few KB (is it the right file?)"
            )
        params = yaml.load(data.decode("utf-8"), Loader=_NoAliases) or {}
    except FileNotFoundError:
        raise ConfigError(f"{path}: not found") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({short_text(' '.join(str(exc).split()), 300)})") from None
    if not isinstance(params, dict):
        raise ConfigError(f"{path}: expected a mapping of parameters, got {type(params).__name__}")
    return validate(params, source=str(path))


class Terminated(BaseException):
    """SIGTERM, raised as an exception so that temporary files are removed on the way out."""


def _terminate(signum, frame):
    raise Terminated()


def run_stage(main: Callable[[dict[str, Any]], None]) -> None:
    """Run ``main(params)``: every error ends the process with one line and the documented
    exit status (:mod:`palm.core.errors`); SIGTERM and Ctrl-C clean up as an error does."""
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
