"""A folder of your own photographs as the data source (``data.source: folder``).

The folder (``data.input``) holds the photographs (subfolders allowed) and, at its top,
``labels.csv`` with the columns::

    image   path of the photograph, relative to the folder (e.g. patient7/left.jpg)
    label   1 or PM = pathologic myopia; 0 or non-PM = not (case-insensitive)
    group   optional: e.g. a patient id; the images of a group stay on one side of the split
    split   optional: train, or valid (also val, validation; case-insensitive) = the evaluated set

Other columns are ignored. Without ``split``, :func:`palm.data.splits.train_valid_split` divides
the images (``data.val_fraction``, ``data.split_seed``) in the ``labels`` stage.

The ``unzip`` stage (:func:`copy_folder`) checks the table and copies the listed photographs
to ``data/raw/images/``, their subfolders joined into the name with ``__``
(``patient7/left.jpg`` -> ``images/patient7__left.jpg``: predictions and heatmaps are named by
file name, which must be unique), and the checked table to ``data/raw/labels.csv``. A path
that leaves the folder (absolute, ``..``, or a symbolic link pointing outside) is refused,
naming the row; so is a photograph larger than ``unzip.max_entry_mb``, and the copy stops when
the total passes ``unzip.max_total_mb``. Photographs in the folder that the table does not list
are named in a warning. Everything goes to a temporary folder that replaces ``data/raw`` only
when all succeeded. The ``labels`` stage (:func:`folder_labels`) then writes the same
``labels.csv`` as for PALM.
"""

from __future__ import annotations

import os
import posixpath
import stat
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from palm.core.errors import DataError, listing
from palm.core.fsutil import atomic_dir, copy_at_most
from palm.data.layout import IMAGE_SUFFIXES, MB, Limits, mb, parse_label
from palm.data.splits import train_valid_split

LABELS_CSV = "labels.csv"
IMAGES_DIR = "images"
REQUIRED = ("image", "label")
OPTIONAL = ("group", "split")
SPLIT_VALUES = {"train": "train", "valid": "valid", "val": "valid", "validation": "valid"}
SPLITS = ("train", "valid")


def _relative(value: str) -> str | None:
    """The photograph's path, normalised (``/`` separators), or None if it could leave the folder."""
    v = value.strip().replace("\\", "/")
    if any(ord(c) < 32 for c in v) or v.startswith("/") or (len(v) > 1 and v[1] == ":") or ".." in v.split("/"):
        return None
    return posixpath.normpath(v).lstrip("/")


def read_table(path: str | Path) -> pd.DataFrame:
    """``labels.csv`` checked: columns ``row`` (its line in the file), ``image`` (normalised), ``label``
    (0/1), and ``group`` / ``split`` (train/valid) when the file has them. Every problem is a
    one-line :class:`DataError` naming the file and the rows."""
    path = Path(path)
    try:
        df = pd.read_csv(
            path, dtype=str, keep_default_na=False, encoding="utf-8-sig", skipinitialspace=True, skip_blank_lines=False
        )  # so that a row's number is its line in the file
    except FileNotFoundError:
        raise DataError(
            f"{path}: file not found (a folder source needs labels.csv with columns image,label at its top)"
        ) from None
    except pd.errors.EmptyDataError:
        raise DataError(f"{path}: empty file (expected a header line image,label[,group][,split])") from None
    except (pd.errors.ParserError, UnicodeDecodeError, OSError) as exc:
        raise DataError(f"{path}: cannot read it as CSV ({' '.join(str(exc).split())})") from None
    df.columns = [str(c).strip().lower() for c in df.columns]
    twice = sorted({c for c in df.columns if list(df.columns).count(c) > 1})
    if twice:
        raise DataError(f"{path}: column(s) {', '.join(twice)} appear more than once")
    df.index = df.index + 2  # the header is line 1
    df = df[(df != "").any(axis=1)]  # blank lines
    missing = [c for c in REQUIRED if c not in df.columns]
    if missing:
        raise DataError(f"{path}: missing column(s) {', '.join(missing)} (found: {', '.join(df.columns) or 'none'})")
    if df.empty:
        raise DataError(f"{path}: no rows (no photographs listed)")
    out = pd.DataFrame({"row": df.index}, index=df.index)

    names = df["image"].str.strip()
    empty = out["row"][names == ""]
    if len(empty):
        raise DataError(f"{path}: empty image in row(s) {listing(empty)}")
    rel = [_relative(n) for n in names]
    bad = [f"row {r} ({n!r})" for r, n, p in zip(out["row"], names, rel) if p is None]
    if bad:
        raise DataError(
            f"{path}: image path(s) must stay inside the folder (no absolute path, no '..'): {listing(bad)}"
        )
    rel = pd.Series(rel, index=df.index, dtype=object)
    if (rel == LABELS_CSV).any():
        raise DataError(f"{path}: row {out['row'][rel == LABELS_CSV].iloc[0]} lists {LABELS_CSV} itself as an image")
    dup = rel[rel.duplicated(keep=False)]
    if len(dup):
        rows = [f"{n} (rows {', '.join(str(r) for r in out['row'][rel == n])})" for n in sorted(set(dup))]
        raise DataError(f"{path}: image(s) listed more than once: {listing(rows)}")
    out["image"] = rel.to_numpy()

    labels = [parse_label(v) for v in df["label"]]
    bad = [f"row {r} ({n}: {v!r})" for r, n, v, p in zip(out["row"], rel, df["label"], labels) if p is None]
    if bad:
        raise DataError(f"{path}: label must be 0 or 1 (or PM / non-PM); bad value in {listing(bad)}")
    out["label"] = np.array(labels, dtype=np.int64)

    if "group" in df.columns:
        out["group"] = df["group"].str.strip().to_numpy()
    if "split" in df.columns:
        splits = [SPLIT_VALUES.get(v.strip().lower()) for v in df["split"]]
        bad = [f"row {r} ({n}: {v!r})" for r, n, v, s in zip(out["row"], rel, df["split"], splits) if s is None]
        if bad:
            raise DataError(f"{path}: split must be train or valid (or val, validation); bad value in {listing(bad)}")
        out["split"] = splits
    return out


def check_splits(df: pd.DataFrame, source: str, how: str = "") -> None:
    """Each split has photographs of both classes (PM and non-PM), else a :class:`DataError`."""
    for split in SPLITS:
        part = df[df["split"] == split]
        if len(part) == 0:
            raise DataError(f"{source}: split {split} has no images{how}")
        n_pm = int(part["label"].sum())
        if n_pm in (0, len(part)):
            raise DataError(
                f"{source}: split {split} has only {'PM' if n_pm else 'non-PM'} images "
                f"({len(part)}){how}; it needs both classes"
            )


def flat_name(rel: str) -> str:
    """Where ``rel`` is copied in ``data/raw``: ``images/`` + its path with ``/`` -> ``__``."""
    return f"{IMAGES_DIR}/{rel.replace('/', '__')}"


def _unlisted(root: Path, listed: set[str]) -> list[str]:
    found = []
    for dirpath, dirnames, filenames in os.walk(root):  # symbolic links to folders are not followed
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            rel = Path(dirpath, name).relative_to(root).as_posix()
            if not name.startswith(".") and name.lower().endswith(IMAGE_SUFFIXES) and rel not in listed:
                found.append(rel)
    return found


def _copy(src: Path, dst: Path, limit: int, what: str) -> int:
    fd = os.open(src, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    with os.fdopen(fd, "rb") as f, open(dst, "xb") as out:  # "x": never replaces a file
        n = copy_at_most(f, out, limit)
    if n is None:
        raise DataError(f"{what} grew past the unzip limits while being copied; refusing it")
    return n


def copy_folder(folder: str | Path, out_dir: str | Path, limits: Limits | None = None) -> int:
    """Check ``folder/labels.csv`` and copy its photographs and the checked table into ``out_dir``
    (atomically); the number of photographs."""
    limits = limits or Limits()
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder}: no such folder (data.input, with data.source: folder)")
    csv = folder / LABELS_CSV
    table = read_table(csv)
    if "split" in table.columns:
        check_splits(table, str(csv))
    root = folder.resolve()
    sources, missing, total = [], [], 0
    for row, rel in zip(table["row"], table["image"]):
        what = f"{csv}: row {row} ({rel})"
        path = folder / rel
        real = path.resolve()
        if not real.is_relative_to(root):
            raise DataError(f"{what}: a symbolic link to {real}, outside {folder}; refusing it")
        try:
            st = real.stat()
        except FileNotFoundError:
            missing.append(f"{rel} (row {row})")
            continue
        except OSError as exc:
            raise DataError(f"{what}: cannot read it ({exc.strerror or exc})") from None
        if not stat.S_ISREG(st.st_mode):
            raise DataError(f"{what}: not a regular file; refusing it")
        if st.st_size > limits.max_entry_mb * MB:
            raise DataError(
                f"{what}: {mb(st.st_size)}, above unzip.max_entry_mb ({limits.max_entry_mb:g}); refusing it"
            )
        total += st.st_size
        if total > limits.max_total_mb * MB:
            raise DataError(
                f"{what}: the photographs up to this row pass unzip.max_total_mb ({limits.max_total_mb:g} MB); stopping"
            )
        sources.append(real)
    if missing:
        raise DataError(f"{csv}: listed image(s) not found in {folder}: {listing(missing)}")
    flat = table["image"].map(flat_name)
    clash = flat.str.casefold().duplicated(keep=False)
    if clash.any():
        rows = [f"{r} ({n})" for r, n in zip(table["row"][clash], table["image"][clash])]
        raise DataError(f"{csv}: rows {listing(rows)} would be copied to the same name; rename one")

    budget = int(limits.max_total_mb * MB)
    with atomic_dir(out_dir) as tmp:
        (tmp / IMAGES_DIR).mkdir()
        for row, rel, src, dst in zip(table["row"], table["image"], sources, flat):
            what = f"{csv}: row {row} ({rel})"
            try:
                budget -= _copy(src, tmp / dst, min(int(limits.max_entry_mb * MB), budget), what)
            except OSError as exc:
                raise DataError(f"{what}: cannot copy it ({exc.strerror or exc})") from None
        out = table.drop(columns="row").rename(columns={"image": "source"})
        out.insert(0, "image", flat.to_numpy())
        out.to_csv(tmp / LABELS_CSV, index=False)
    unlisted = _unlisted(folder, set(table["image"]))
    if unlisted:
        print(
            f"warning: {len(unlisted)} photograph(s) in {folder} are not in {LABELS_CSV} and not used: "
            + listing(unlisted),
            file=sys.stderr,
        )
    return len(table)


def folder_labels(raw_dir: str | Path, val_fraction: float = 0.2, split_seed: int = 0) -> pd.DataFrame:
    """The ``labels`` stage for a folder source: ``data/raw/labels.csv`` (written by :func:`copy_folder`)
    as the pipeline's labels (split, image, label, group), split here when it has no ``split``."""
    raw_dir = Path(raw_dir)
    csv = raw_dir / LABELS_CSV
    if not csv.is_file():
        raise DataError(
            f"{csv}: not found; data.source is folder but {raw_dir} was not copied from a folder "
            "(run the unzip stage: dvc repro)"
        )
    table = read_table(csv)
    missing = [f"{n} (row {r})" for r, n in zip(table["row"], table["image"]) if not (raw_dir / n).is_file()]
    if missing:
        raise DataError(f"{csv}: listed image(s) not found in {raw_dir}: {listing(missing)}")
    how = ""
    if "split" not in table.columns:
        table = table.sort_values("image", kind="stable").reset_index(drop=True)  # row order does not matter
        try:
            valid = train_valid_split(table["label"], val_fraction, split_seed, table.get("group"))
        except DataError as exc:
            raise DataError(f"{csv}: {exc}") from None
        table["split"] = np.where(valid, "valid", "train")
        how = (
            f" after splitting {len(table)} images with data.val_fraction {val_fraction:g}, "
            f"data.split_seed {split_seed}"
        )
    check_splits(table, str(csv), how)
    out = pd.DataFrame(
        {
            "split": table["split"],
            "image": table["image"],
            "label": table["label"].astype(int),
            "group": table["group"] if "group" in table.columns else "",
        }
    )
    order = np.lexsort((out["image"].to_numpy(), out["split"].map(SPLITS.index).to_numpy()))
    return out.iloc[order].reset_index(drop=True)
