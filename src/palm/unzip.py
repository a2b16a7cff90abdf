"""The ``unzip`` stage: the three original PALM zips -> ``data/raw/``.

Layout written (the original folder names are kept)::

    data/raw/PALM-Training400/{H,N,P}NNNN.jpg      from training.zip's nested PALM-Training400.zip
    data/raw/PALM-Validation400/VNNNN.jpg          from validation.zip
    data/raw/PALM-Validation-GT/PM_Label_and_Fovea_Location.xlsx   from valid_gt.zip

Every entry is checked before anything is written: absolute paths, ``..`` components and
symbolic links are refused (zip-slip), naming the entry. Extraction goes to a temporary
folder that replaces ``data/raw`` only when everything succeeded.
"""

from __future__ import annotations

import io
import posixpath
import shutil
import stat
import zipfile
from pathlib import Path

from palm.errors import DataError
from palm.fsutil import atomic_dir

TRAIN_ZIP = "training.zip"
VALID_ZIP = "validation.zip"
GT_ZIP = "valid_gt.zip"
NESTED_TRAIN_ZIP = "PALM-Training400/PALM-Training400.zip"

TRAIN_DIR = "PALM-Training400"
VALID_DIR = "PALM-Validation400"
GT_DIR = "PALM-Validation-GT"
GT_FILE = f"{GT_DIR}/PM_Label_and_Fovea_Location.xlsx"


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


def open_zip(source: zipfile.ZipFile | Path | io.BytesIO, label: str) -> zipfile.ZipFile:
    try:
        zf = zipfile.ZipFile(source)
        bad = zf.testzip()
    except FileNotFoundError:
        raise DataError(f"{label}: file not found") from None
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as exc:
        raise DataError(f"{label}: not a valid zip file ({exc})") from None
    if bad is not None:
        raise DataError(f"{label}: corrupt zip (bad CRC in entry {bad!r})")
    return zf


def extract_zip(zf: zipfile.ZipFile, dest: Path, label: str, skip: set[str] = frozenset()) -> list[str]:
    """Safely extract every regular file of ``zf`` below ``dest``; return the names written."""
    infos = [i for i in zf.infolist() if not _is_ignorable(i.filename)]
    for info in infos:
        check_entry(info, label)
    written = []
    for info in infos:
        if info.is_dir() or info.filename in skip:
            continue
        rel = posixpath.normpath(info.filename.replace("\\", "/"))
        out = dest / rel
        out.parent.mkdir(parents=True, exist_ok=True)
        try:
            with zf.open(info) as src, open(out, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
        except (zipfile.BadZipFile, OSError, EOFError) as exc:
            raise DataError(f"{label}: cannot extract entry {info.filename!r} ({exc})") from None
        written.append(rel)
    return written


def unzip_all(zips_dir: str | Path, out_dir: str | Path) -> dict[str, int]:
    """Extract the three PALM zips from ``zips_dir`` into ``out_dir`` atomically.

    Returns the number of files extracted per zip.
    """
    zips_dir = Path(zips_dir)
    paths = {name: zips_dir / name for name in (TRAIN_ZIP, VALID_ZIP, GT_ZIP)}
    missing = [str(p) for p in paths.values() if not p.is_file()]
    if missing:
        raise DataError(
            "missing zip file(s): " + ", ".join(missing)
            + f" (expected training.zip, validation.zip and valid_gt.zip in {zips_dir})"
        )
    counts = {}
    with atomic_dir(out_dir) as tmp:
        train_label = str(paths[TRAIN_ZIP])
        with open_zip(paths[TRAIN_ZIP], train_label) as outer:
            for info in outer.infolist():
                check_entry(info, train_label)
            if NESTED_TRAIN_ZIP not in outer.namelist():
                raise DataError(f"{train_label}: has no entry {NESTED_TRAIN_ZIP!r} (the nested training zip)")
            nested_label = f"{train_label}:{NESTED_TRAIN_ZIP}"
            with open_zip(io.BytesIO(outer.read(NESTED_TRAIN_ZIP)), nested_label) as inner:
                counts[TRAIN_ZIP] = len(extract_zip(inner, tmp, nested_label))
            # anything else next to the nested zip is extracted too (never the nested zip itself)
            counts[TRAIN_ZIP] += len(extract_zip(outer, tmp, train_label, skip={NESTED_TRAIN_ZIP}))
        for name in (VALID_ZIP, GT_ZIP):
            with open_zip(paths[name], str(paths[name])) as zf:
                counts[name] = len(extract_zip(zf, tmp, str(paths[name])))
        for folder, zip_name in ((TRAIN_DIR, TRAIN_ZIP), (VALID_DIR, VALID_ZIP)):
            if not (tmp / folder).is_dir():
                raise DataError(f"{paths[zip_name]}: no folder {folder}/ inside; is this the PALM download?")
        if not (tmp / GT_FILE).is_file():
            raise DataError(f"{paths[GT_ZIP]}: no entry {GT_FILE!r}")
    return counts


def main(params: dict) -> None:
    zips_dir = params["data"]["zips_dir"]
    counts = unzip_all(zips_dir, "data/raw")
    print("extracted " + ", ".join(f"{n}: {c} files" for n, c in counts.items()) + " into data/raw")
