"""Errors that a stage or ``palm`` reports to the user as one clear line (no traceback), and
the exit status of each kind:

====  ====================================================================================
0     success
1     bad input data (:class:`DataError`): a corrupt zip, a bad label, an image that cannot be
      decoded; for ``palm predict``: some images could not be predicted (their rows say why)
2     bad usage or configuration (:class:`ConfigError`): a parameter of params.yaml out of its
      range or of the wrong type, a bad command-line option, an unusable ``--model`` folder
3     a runtime failure (:class:`RunError`, e.g. training diverged) or an internal error (a bug:
      any other exception, reported in one line; ``PALM_DEBUG=1`` shows the traceback)
130   interrupted (Ctrl-C); 143: terminated (SIGTERM). Temporary files are removed either way.
====  ====================================================================================
"""

EXIT_OK, EXIT_DATA, EXIT_CONFIG, EXIT_INTERNAL = 0, 1, 2, 3


class PalmError(Exception):
    """An error whose message is meant for the user; ``exit_code`` is the process's exit status."""

    exit_code = EXIT_INTERNAL


class DataError(PalmError):
    """Bad input data: a missing or corrupt file, a bad label, an unsafe zip entry...

    The message names the offending file, entry or rows.
    """

    exit_code = EXIT_DATA


class ConfigError(PalmError):
    """A bad parameter (params.yaml) or option: the message names the key and the value."""

    exit_code = EXIT_CONFIG


class RunError(PalmError):
    """The run itself failed (e.g. training diverged): the message says what to change."""

    exit_code = EXIT_INTERNAL


def listing(rows, limit: int = 10) -> str:
    """The first ``limit`` of ``rows`` for a message, and how many there are in all when more."""
    rows = list(rows)
    return ", ".join(str(r) for r in rows[:limit]) + (f" ... ({len(rows)} in all)" if len(rows) > limit else "")


def report(exc: BaseException) -> int:
    """Print ``exc`` to standard error as one line; return the exit status for it."""
    import os
    import sys
    import traceback

    if isinstance(exc, PalmError):
        msg, code = str(exc), exc.exit_code
    elif isinstance(exc, OSError) and exc.filename and exc.strerror:
        # the operating system refused a file: which one, and why (space, permissions, ...)
        name = exc.filename if exc.filename2 is None else f"{exc.filename} -> {exc.filename2}"
        msg, code = f"{name}: {exc.strerror}; check that file and its folder, then run again", EXIT_INTERNAL
    else:
        if os.environ.get("PALM_DEBUG"):
            traceback.print_exception(exc)
        first = (str(exc).strip().splitlines() or [""])[0]
        msg = f"internal error: {type(exc).__name__}: {first} (PALM_DEBUG=1 shows the traceback)"
        code = EXIT_INTERNAL
    for line in msg.strip().splitlines() or [""]:  # one line per problem (ConfigError lists each key)
        print("error: " + line.strip(), file=sys.stderr)
    return code
