import zipfile

import pandas as pd
import pytest

from conftest import make_palm_zips
from palm.core.errors import DataError
from palm.data.labels import build_labels
from palm.data.unzip import unzip_all


def raw_from(tmp_path, **kwargs):
    unzip_all(make_palm_zips(tmp_path / "zips", **kwargs), tmp_path / "raw")
    return tmp_path / "raw"


def gt(names, labels, **extra):
    return pd.DataFrame(
        {"ID": range(1, len(names) + 1), "imgName": names, "Label": labels, "Fovea_X": 0.0, "Fovea_Y": 0.0, **extra}
    )


def test_labels_for_both_splits(tmp_path):
    df = build_labels(raw_from(tmp_path))
    train = df[df.split == "train"].set_index("image")
    assert train.loc["PALM-Training400/P0001.jpg", "label"] == 1
    assert train.loc["PALM-Training400/N0001.jpg", "label"] == 0
    assert train.loc["PALM-Training400/H0001.jpg", "label"] == 0
    assert train.loc["PALM-Training400/H0001.jpg", "group"] == "H"
    valid = df[df.split == "valid"].set_index("image")
    assert valid["label"].to_dict() == {"PALM-Validation400/V0001.jpg": 1, "PALM-Validation400/V0002.jpg": 0}


def test_missing_column(tmp_path):
    table = gt(["V0001.jpg", "V0002.jpg"], [1, 0]).drop(columns="Label")
    with pytest.raises(DataError, match="missing column.*Label"):
        build_labels(raw_from(tmp_path, gt=table))


@pytest.mark.parametrize("bad", [2, -1, "yes", None, 0.5])
def test_label_must_be_0_or_1(tmp_path, bad):
    with pytest.raises(DataError, match=r"Label must be 0 or 1.*row 3 \(V0002.jpg"):
        build_labels(raw_from(tmp_path, gt=gt(["V0001.jpg", "V0002.jpg"], [1, bad])))


def test_labels_written_as_floats_are_accepted(tmp_path):
    df = build_labels(raw_from(tmp_path, gt=gt(["V0001.jpg", "V0002.jpg"], [1.0, 0.0])))
    assert df[df.split == "valid"]["label"].tolist() == [1, 0]


def test_listed_image_missing(tmp_path):
    table = gt(["V0001.jpg", "V0002.jpg", "V0003.jpg"], [1, 0, 1])
    with pytest.raises(DataError, match=r"not found.*V0003.jpg \(row 4\)"):
        build_labels(raw_from(tmp_path, gt=table))


def test_duplicate_row(tmp_path):
    table = gt(["V0001.jpg", "V0002.jpg", "V0001.jpg"], [1, 0, 1])
    with pytest.raises(DataError, match=r"more than once.*V0001.jpg \(rows 2, 4\)"):
        build_labels(raw_from(tmp_path, gt=table))


def test_validation_image_without_label(tmp_path):
    raw = raw_from(tmp_path, valid_images=["V0001.jpg", "V0002.jpg", "V0003.jpg"])
    with pytest.raises(DataError, match="without a label.*V0003.jpg"):
        build_labels(raw)


@pytest.mark.parametrize("name", ["X0001.jpg", "p_0001.jpg", "P0001.png", "notes.txt"])
def test_bad_training_file_name(tmp_path, name):
    with pytest.raises(DataError, match=f"H, N or P.*{name}"):
        build_labels(raw_from(tmp_path, train=("P0001.jpg" if name != "P0001.jpg" else "P0002.jpg", name)))


def test_empty_image_name(tmp_path):
    with pytest.raises(DataError, match=r"empty imgName in row\(s\) 3"):
        build_labels(raw_from(tmp_path, gt=gt(["V0001.jpg", None], [1, 0])))


def test_unreadable_spreadsheet(tmp_path):
    raw = raw_from(tmp_path)
    gt = raw / "PALM-Validation-GT" / "PM_Label_and_Fovea_Location.xlsx"
    gt.write_bytes(b"not a spreadsheet")
    with pytest.raises(DataError, match=r"not an Excel \.xlsx spreadsheet; its content is text \(CSV\?\)"):
        build_labels(raw)
    gt.write_bytes(b"\x89PNG\r\n\x1a\n....")
    with pytest.raises(DataError, match="not an Excel .xlsx spreadsheet; its content is another format"):
        build_labels(raw)
    with zipfile.ZipFile(gt, "w") as zf:  # a zip, but not a workbook
        zf.writestr("hello.txt", "x")
    with pytest.raises(DataError, match="cannot read the spreadsheet"):
        build_labels(raw)


def test_one_label_parser_reads_numbers_and_names_and_refuses_the_rest():
    """palm.data.layout.parse_label: PALM's spreadsheet cells and a folder's labels.csv alike."""
    from palm.data.layout import parse_label

    for value, label in (
        (1, 1),
        (0, 0),
        (1.0, 1),
        ("1", 1),
        (" 0 ", 0),
        ("1.0", 1),
        ("PM", 1),
        ("non-PM", 0),
        ("Non_PM", 0),
        ("nonpm", 0),
    ):
        assert parse_label(value) == label, value
    for value in (True, False, None, float("nan"), 2, 0.5, "", "yes", "PMX", float("inf")):
        assert parse_label(value) is None, value


def test_labels_and_unzip_do_not_import_the_image_decoder():
    import subprocess
    import sys

    code = "import sys, palm.data.labels, palm.data.unzip; print('cv2' in sys.modules or 'PIL' in sys.modules)"
    assert (
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
        == "False"
    )
