"""Errors that a stage reports to the user as one clear message (no traceback)."""


class DataError(Exception):
    """Bad input data: a missing or corrupt file, a bad label, an unsafe zip entry...

    The message names the offending file, entry or rows.
    """
