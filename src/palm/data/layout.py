"""The inputs' layouts, and what reading them may cost.

The original PALM download (``data.source: palm``)::

    training.zip    -> PALM-Training400/PALM-Training400.zip (a zip in the zip) -> PALM-Training400/{H,N,P}NNNN.jpg
    validation.zip  -> PALM-Validation400/VNNNN.jpg
    valid_gt.zip    -> PALM-Validation-GT/PM_Label_and_Fovea_Location.xlsx

:mod:`palm.data.unzip` extracts it with these names, :mod:`palm.data.labels` reads it, :mod:`palm.data.synthetic`
writes its synthetic twin. :class:`Limits` (``unzip:`` in params.yaml) bounds the disk an
archive or a folder of photographs (:mod:`palm.data.folder`) may fill.
"""

from __future__ import annotations

import zipfile
from dataclasses import dataclass

TRAIN_ZIP = "training.zip"
VALID_ZIP = "validation.zip"
GT_ZIP = "valid_gt.zip"
NESTED_TRAIN_ZIP = "PALM-Training400/PALM-Training400.zip"

TRAIN_DIR = "PALM-Training400"
VALID_DIR = "PALM-Validation400"
GT_DIR = "PALM-Validation-GT"
GT_FILE = f"{GT_DIR}/PM_Label_and_Fovea_Location.xlsx"

#: the suffixes of the photographs people hand us (palm predict, a folder source): any that
#: :func:`palm.data.image.load_image` decodes
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff")
PALM_SUFFIXES = (".jpg", ".jpeg")  # the PALM photographs'
#: a label's names (case-insensitive), besides the numbers 0 and 1
LABEL_NAMES = {"pm": 1, "non-pm": 0, "nonpm": 0, "non_pm": 0, "non pm": 0}

MB = 1 << 20


def parse_label(value) -> int | None:
    """A label cell (PALM's ground-truth spreadsheet, a folder's labels.csv) as 1 (PM) or 0:
    the numbers 0 and 1 (``1.0``, ``"1"`` too) or a name of :data:`LABEL_NAMES`; None for
    anything else (empty, NaN, true/false, 2, "yes"), for the caller's one-line error."""
    if isinstance(value, bool) or value is None:
        return None
    text = str(value).strip().lower()
    if text in LABEL_NAMES:
        return LABEL_NAMES[text]
    try:
        number = float(text)
    except ValueError:
        return None
    return int(number) if number in (0.0, 1.0) else None


def mb(n: float) -> str:
    """``n`` bytes in megabytes, for messages."""
    return f"{n / MB:.1f} MB"


@dataclass(frozen=True)
class Limits:
    """What reading an archive or a folder may cost (``unzip:`` in params.yaml overrides these).

    The real PALM download is about 1.3 GB in all, its largest entry the ~0.5 GB nested
    training zip, its JPEGs compressed about 1:1.
    """

    max_total_mb: float = 8192  # all extracted files together, uncompressed
    max_entry_mb: float = 4096  # one entry (the nested training zip included)
    max_ratio: float = 200  # uncompressed / compressed size of one entry ...
    ratio_floor_mb: float = 1  # ... once it is larger than this (tiny files compress freely)

    def entry_budget(self, info: zipfile.ZipInfo) -> int:
        """The most bytes ``info`` may decompress to."""
        by_ratio = max(self.max_ratio * info.compress_size, self.ratio_floor_mb * MB)
        return int(min(self.max_entry_mb * MB, by_ratio))


def limits_of(params: dict) -> Limits:
    """``unzip:`` of params.yaml (validated by :mod:`palm.core.params`) as :class:`Limits`."""
    return Limits(**(params.get("unzip") or {}))
