"""The ``labels`` stage: validated labels for both splits in one ``labels.csv``.

Training labels come from the file names (``P`` = pathologic myopia = 1; ``H`` high
myopia and ``N`` normal = 0). Validation labels come from the ground-truth xlsx
(columns ``imgName`` and ``Label``; ``ID``, ``Fovea_X`` and ``Fovea_Y`` are not used).

Output columns: ``split`` (train/valid), ``image`` (path relative to ``data/raw``),
``label`` (0/1), ``group`` (H/N/P for training images, empty for validation).
With ``data.source: folder``, the same columns come from your labels.csv (:mod:`palm.data.folder`).
"""

from __future__ import annotations

import re
import zipfile
from pathlib import Path

import pandas as pd

from palm.core.errors import DataError, listing
from palm.core.fsutil import atomic_file
from palm.data.folder import folder_labels
from palm.data.layout import GT_FILE, PALM_SUFFIXES, TRAIN_DIR, VALID_DIR, parse_label

REQUIRED_COLUMNS = ("imgName", "Label")
TRAIN_NAME = re.compile(r"^([HNP])\d+\.jpe?g$", re.IGNORECASE)
CLASS_OF_PREFIX = {"P": 1, "H": 0, "N": 0}


def training_labels(raw_dir: Path) -> pd.DataFrame:
    folder = raw_dir / TRAIN_DIR
    files = sorted(p.name for p in folder.iterdir() if p.is_file())
    bad = [f for f in files if not TRAIN_NAME.match(f)]
    if bad:
        raise DataError(
            f"{folder}: training file name(s) must be H, N or P followed by a number and .jpg "
            f"(H/N = non-PM, P = PM): {listing(bad)}"
        )
    if not files:
        raise DataError(f"{folder}: no training images")
    groups = [f[0].upper() for f in files]
    return pd.DataFrame(
        {
            "split": "train",
            "image": [f"{TRAIN_DIR}/{f}" for f in files],
            "label": [CLASS_OF_PREFIX[g] for g in groups],
            "group": groups,
        }
    )


def read_ground_truth(path: Path) -> pd.DataFrame:
    if path.is_file() and not zipfile.is_zipfile(path):  # an .xlsx file is a zip of XML files
        head = path.read_bytes()[:40]
        kind = "text (CSV?)" if head and all(32 <= b < 127 or b in (9, 10, 13) for b in head) else "another format"
        raise DataError(f"{path}: not an Excel .xlsx spreadsheet; its content is {kind}, starting {head[:20]!r}")
    try:
        df = pd.read_excel(path, dtype=object, engine="openpyxl")
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except (ValueError, OSError, zipfile.BadZipFile, KeyError) as exc:
        raise DataError(f"{path}: cannot read the spreadsheet ({exc})") from None
    df.columns = [str(c).strip() for c in df.columns]
    missing = [c for c in REQUIRED_COLUMNS if c not in df.columns]
    if missing:
        raise DataError(f"{path}: missing column(s) {', '.join(missing)} (found: {', '.join(df.columns) or 'none'})")
    return df


def validation_labels(raw_dir: Path) -> pd.DataFrame:
    gt_path = raw_dir / GT_FILE
    df = read_ground_truth(gt_path)
    excel_row = df.index + 2  # header is row 1 in the spreadsheet

    names = df["imgName"].map(lambda v: "" if pd.isna(v) else str(v).strip())
    empty = excel_row[names == ""]
    if len(empty):
        raise DataError(f"{gt_path}: empty imgName in row(s) {listing(empty)}")

    labels = pd.Series([parse_label(v) for v in df["Label"]], index=df.index, dtype=object)
    bad = [f"row {r} ({n}: {v!r})" for r, n, v, p in zip(excel_row, names, df["Label"], labels) if p is None]
    if bad:
        raise DataError(f"{gt_path}: Label must be 0 or 1; bad value in {listing(bad)}")

    dup = names[names.duplicated(keep=False)]
    if len(dup):
        rows = [f"{n} (rows {', '.join(str(r) for r in excel_row[names == n])})" for n in sorted(set(dup))]
        raise DataError(f"{gt_path}: image(s) listed more than once: {listing(rows)}")

    folder = raw_dir / VALID_DIR
    present = {p.name for p in folder.iterdir() if p.is_file()} if folder.is_dir() else set()
    not_found = [f"{n} (row {r})" for r, n in zip(excel_row, names) if n not in present]
    if not_found:
        raise DataError(f"{gt_path}: listed image(s) not found in {folder}: {listing(not_found)}")
    unlabelled = sorted(n for n in present - set(names) if n.lower().endswith(PALM_SUFFIXES))
    if unlabelled:
        raise DataError(f"{folder}: validation image(s) without a label in {GT_FILE}: {listing(unlabelled)}")

    order = names.argsort(kind="stable")
    return pd.DataFrame(
        {
            "split": "valid",
            "image": [f"{VALID_DIR}/{n}" for n in names.iloc[order]],
            "label": labels.iloc[order].astype(int).to_numpy(),
            "group": "",
        }
    )


def build_labels(raw_dir: str | Path) -> pd.DataFrame:
    raw_dir = Path(raw_dir)
    return pd.concat([training_labels(raw_dir), validation_labels(raw_dir)], ignore_index=True)


def main(params: dict) -> None:
    data = params["data"]
    if data["source"] == "folder":  # your own photographs: palm.data.folder
        df = folder_labels("data/raw", data["val_fraction"], data["split_seed"])
    else:
        df = build_labels("data/raw")
    out = Path("data/labels/labels.csv")
    with atomic_file(out, newline="") as f:
        df.to_csv(f, index=False)
    for split, part in df.groupby("split", sort=False):
        print(f"{split}: {len(part)} images, {int(part['label'].sum())} PM, {int((part['label'] == 0).sum())} non-PM")
    print(f"wrote {out}")
