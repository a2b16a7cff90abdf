"""The ``unzip`` stage: the three original PALM zips -> ``data/raw/``.

(With ``data.source: folder``, it copies a folder of your own photographs instead: :mod:`palm.data.folder`.)

Layout written (the original folder names are kept)::

    data/raw/PALM-Training400/{H,N,P}NNNN.jpg      from training.zip's nested PALM-Training400.zip
    data/raw/PALM-Validation400/VNNNN.jpg          from validation.zip
    data/raw/PALM-Validation-GT/PM_Label_and_Fovea_Location.xlsx   from valid_gt.zip

Every entry is checked before anything is written: absolute paths, ``..`` components and
symbolic links are refused (zip-slip), naming the entry; so are sizes beyond the limits
(:class:`palm.data.layout.Limits`, ``unzip:`` in params.yaml): the total uncompressed size, one entry's size,
and an entry's compression ratio (a zip bomb). The limits are checked from each zip's
directory before extracting, and enforced again on the bytes actually decompressed. The
nested training zip is streamed through an anonymous temporary file, never held in memory.

No file is ever overwritten: a path that a zip (or an earlier zip, or the same zip twice)
has already written, or a file where a folder is (or the reverse), is an error naming both
entries. Files outside the expected places (above) are extracted but listed in a warning.
Extraction goes to a temporary folder that replaces ``data/raw`` only when everything succeeded.
"""

from __future__ import annotations

import posixpath
import stat
import sys
import tempfile
import zipfile
import zlib
from pathlib import Path

from palm.core.errors import DataError
from palm.core.fsutil import atomic_dir, copy_at_most
from palm.data.folder import copy_folder
from palm.data.layout import (
    GT_DIR,
    GT_FILE,
    GT_ZIP,
    MB,
    NESTED_TRAIN_ZIP,
    TRAIN_DIR,
    TRAIN_ZIP,
    VALID_DIR,
    VALID_ZIP,
    Limits,
    limits_of,
    mb,
)


def _is_ignorable(name: str) -> bool:
    """macOS resource forks and Finder files some archivers add; never data."""
    parts = name.split("/")
    return parts[0] == "__MACOSX" or parts[-1] in (".DS_Store", "Thumbs.db")


def check_entry(info: zipfile.ZipInfo, archive: str) -> None:
    """Refuse an entry that could write outside the target folder (zip-slip) or is a link."""
    name = info.filename
    mode = info.external_attr >> 16
    if stat.S_ISLNK(mode):
        raise DataError(f"{archive}: entry {name!r} is a symbolic link; refusing to extract it")
    normalized = name.replace("\\", "/")
    if normalized.startswith("/") or (len(normalized) > 1 and normalized[1] == ":"):
        raise DataError(f"{archive}: entry {name!r} has an absolute path; refusing to extract it")
    if ".." in normalized.split("/"):
        raise DataError(f"{archive}: entry {name!r} contains '..'; refusing to extract it")


def check_sizes(infos: list[zipfile.ZipInfo], label: str, limits: Limits, budget: int) -> int:
    """Refuse, from the zip's directory, an entry or a total beyond the limits; the total's bytes."""
    total = 0
    for info in infos:
        if info.file_size > limits.max_entry_mb * MB:
            raise DataError(
                f"{label}: entry {info.filename!r} is {mb(info.file_size)} uncompressed, above "
                f"unzip.max_entry_mb ({limits.max_entry_mb:g}); refusing to extract it"
            )
        if info.file_size > limits.entry_budget(info):
            raise DataError(
                f"{label}: entry {info.filename!r} expands {info.file_size / max(info.compress_size, 1):.0f}"
                f"-fold ({mb(info.compress_size)} -> {mb(info.file_size)}), above unzip.max_ratio "
                f"({limits.max_ratio:g}): a zip bomb? refusing to extract it"
            )
        total += info.file_size
    if total > budget:
        raise DataError(
            f"{label}: {mb(total)} uncompressed would exceed unzip.max_total_mb "
            f"({limits.max_total_mb:g} MB for all zips); refusing to extract it"
        )
    return total


def open_zip(source, label: str) -> zipfile.ZipFile:
    try:
        return zipfile.ZipFile(source)
    except FileNotFoundError:
        raise DataError(f"{label}: file not found") from None
    except (zipfile.BadZipFile, OSError, EOFError, ValueError, NotImplementedError) as exc:
        raise DataError(f"{label}: not a valid zip file ({exc})") from None


def copy_bounded(zf: zipfile.ZipFile, info: zipfile.ZipInfo, dst, label: str, limit: int) -> int:
    """Stream ``info`` into ``dst``, stopping with an error past ``limit`` bytes (the directory may lie)."""
    try:
        with zf.open(info) as src:
            n = copy_at_most(src, dst, limit)
    except (zipfile.BadZipFile, OSError, EOFError, zlib.error, NotImplementedError, RuntimeError) as exc:
        raise DataError(f"{label}: cannot extract entry {info.filename!r} ({exc})") from None
    if n is None:
        raise DataError(
            f"{label}: entry {info.filename!r} decompresses to more than {mb(limit)}, "
            "beyond what its directory says or the unzip limits allow; refusing it"
        )
    return n


class Extraction:
    """Extracts several zips into one folder, refusing any overwrite and keeping to the limits."""

    def __init__(self, dest: Path, limits: Limits):
        self.dest, self.limits = dest, limits
        self.files: dict[str, str] = {}  # case-folded path -> "zip: entry" that wrote it
        self.dirs: dict[str, str] = {}  # case-folded folder -> "zip: entry" that made it
        self.written = 0
        self.unexpected: list[str] = []

    def _claim(self, rel: str, is_dir: bool, origin: str) -> None:
        key = rel.casefold()
        parts = key.split("/")
        for i in range(1, len(parts)):  # no parent folder of this path may be a file
            parent = "/".join(parts[:i])
            if parent in self.files:
                raise DataError(f"{origin} needs a folder {parent!r} where {self.files[parent]} is a file")
        if is_dir:
            if key in self.files:
                raise DataError(f"{origin} is a folder where {self.files[key]} is a file")
            self.dirs.setdefault(key, origin)
            return
        if key in self.files:
            raise DataError(f"{origin} would overwrite {self.files[key]}; refusing (duplicate entry)")
        if key in self.dirs:
            raise DataError(f"{origin} is a file where {self.dirs[key]} makes a folder")
        self.files[key] = origin
        for i in range(1, len(parts)):
            self.dirs.setdefault("/".join(parts[:i]), origin)

    def extract(self, zf: zipfile.ZipFile, label: str, expected, skip: frozenset = frozenset()) -> int:
        """Extract ``zf`` (checked first: names, sizes, overwrites); ``expected(rel)`` says what is
        in its place. Returns the number of files written."""
        infos = [i for i in zf.infolist() if not _is_ignorable(i.filename) and i.filename not in skip]
        for info in infos:
            check_entry(info, label)
        check_sizes(
            [i for i in infos if not i.is_dir()], label, self.limits, int(self.limits.max_total_mb * MB) - self.written
        )
        for info in infos:  # every overwrite is found before anything is written
            rel = posixpath.normpath(info.filename.replace("\\", "/")).strip("/")
            self._claim(rel, info.is_dir(), f"{label}: entry {info.filename!r}")
        n = 0
        for info in infos:
            rel = posixpath.normpath(info.filename.replace("\\", "/")).strip("/")
            if info.is_dir():
                (self.dest / rel).mkdir(parents=True, exist_ok=True)
                continue
            if not expected(rel):
                self.unexpected.append(f"{label}: {info.filename}")
            out = self.dest / rel
            out.parent.mkdir(parents=True, exist_ok=True)
            budget = min(self.limits.entry_budget(info), int(self.limits.max_total_mb * MB) - self.written)
            with open(out, "xb") as dst:  # "x": never replaces a file
                self.written += copy_bounded(zf, info, dst, label, budget)
            n += 1
        return n


def _in_folder(folder: str):
    return lambda rel: posixpath.dirname(rel) == folder


def unzip_all(zips_dir: str | Path, out_dir: str | Path, limits: Limits | None = None) -> dict[str, int]:
    """Extract the three PALM zips from ``zips_dir`` into ``out_dir`` atomically.

    Returns the number of files extracted per zip. Files found outside the expected places
    are extracted and listed in a warning on standard error.
    """
    limits = limits or Limits()
    zips_dir = Path(zips_dir)
    paths = {name: zips_dir / name for name in (TRAIN_ZIP, VALID_ZIP, GT_ZIP)}
    missing = [str(p) for p in paths.values() if not p.is_file()]
    if missing:
        raise DataError(
            "missing zip file(s): "
            + ", ".join(missing)
            + f" (expected training.zip, validation.zip and valid_gt.zip in {zips_dir})"
        )
    counts = {}
    with atomic_dir(out_dir) as tmp:
        ex = Extraction(tmp, limits)
        train_label = str(paths[TRAIN_ZIP])
        with open_zip(paths[TRAIN_ZIP], train_label) as outer:
            for info in outer.infolist():
                check_entry(info, train_label)
            if NESTED_TRAIN_ZIP not in outer.namelist():
                raise DataError(f"{train_label}: has no entry {NESTED_TRAIN_ZIP!r} (the nested training zip)")
            nested_info = outer.getinfo(NESTED_TRAIN_ZIP)
            check_sizes([nested_info], train_label, limits, int(limits.max_entry_mb * MB))
            nested_label = f"{train_label}:{NESTED_TRAIN_ZIP}"
            # an anonymous temporary file (gone with the process, even when killed), not memory
            with tempfile.TemporaryFile(dir=Path(out_dir).parent) as nested:
                copy_bounded(outer, nested_info, nested, train_label, limits.entry_budget(nested_info))
                nested.seek(0)
                with open_zip(nested, nested_label) as inner:
                    counts[TRAIN_ZIP] = ex.extract(inner, nested_label, _in_folder(TRAIN_DIR))
            # anything else next to the nested zip is extracted too (never the nested zip itself)
            counts[TRAIN_ZIP] += ex.extract(outer, train_label, lambda rel: False, skip=frozenset({NESTED_TRAIN_ZIP}))
        for name, folder in ((VALID_ZIP, VALID_DIR), (GT_ZIP, GT_DIR)):
            with open_zip(paths[name], str(paths[name])) as zf:
                counts[name] = ex.extract(
                    zf, str(paths[name]), _in_folder(folder) if name == VALID_ZIP else lambda rel: rel == GT_FILE
                )
        for folder, zip_name in ((TRAIN_DIR, TRAIN_ZIP), (VALID_DIR, VALID_ZIP)):
            if not (tmp / folder).is_dir():
                raise DataError(f"{paths[zip_name]}: no folder {folder}/ inside; is this the PALM download?")
        if not (tmp / GT_FILE).is_file():
            raise DataError(f"{paths[GT_ZIP]}: no entry {GT_FILE!r}")
    if ex.unexpected:
        shown = ex.unexpected[:10]
        print(
            f"warning: {len(ex.unexpected)} file(s) outside the PALM layout were extracted but are not used: "
            + "; ".join(shown)
            + (" ..." if len(ex.unexpected) > 10 else ""),
            file=sys.stderr,
        )
    return counts


def main(params: dict) -> None:
    data = params["data"]
    if data["source"] == "folder":  # your own photographs: palm.data.folder
        n = copy_folder(data["input"], "data/raw", limits_of(params))
        print(f"copied {n} photographs and their labels from {data['input']} into data/raw")
        return
    counts = unzip_all(data["input"], "data/raw", limits_of(params))
    print("extracted " + ", ".join(f"{n}: {c} files" for n, c in counts.items()) + " into data/raw")
