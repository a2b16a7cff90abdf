"""A folder of your own photographs as the data source (palm.data.folder, palm.data.splits): the same
checks as the PALM path (test_unzip.py, test_labels.py), and the train/valid split."""

import os
import re

import numpy as np
import pytest

from conftest import jpeg_bytes
from palm.core.errors import DataError
from palm.data.folder import copy_folder, folder_labels
from palm.data.layout import Limits
from palm.data.preprocess import preprocess
from palm.data.splits import train_valid_split


def make_folder(root, rows, header="image,label", images=None, csv=None):
    """``root`` with ``labels.csv`` (``rows``: tuples joined by commas) and a tiny JPEG per listed
    image (or per name in ``images``)."""
    root.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(images if images is not None else [r[0] for r in rows]):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(jpeg_bytes(i))
    text = csv if csv is not None else header + "\n" + "".join(",".join(str(v) for v in r) + "\n" for r in rows)
    (root / "labels.csv").write_text(text)
    return root


SPLIT_ROWS = [("a/p1.jpg", 1, "train"), ("a/n1.jpg", 0, "train"), ("b/p2.jpg", 1, "valid"), ("n2.jpg", 0, "valid")]


def raw(tmp_path, rows=SPLIT_ROWS, header="image,label,split", **kwargs):
    copy_folder(make_folder(tmp_path / "clinic", rows, header, **kwargs), tmp_path / "raw")
    return tmp_path / "raw"


def test_copies_the_listed_images_and_writes_the_labels_with_the_given_split(tmp_path, capsys):
    out = raw(tmp_path)
    assert sorted(p.name for p in (out / "images").iterdir()) == ["a__n1.jpg", "a__p1.jpg", "b__p2.jpg", "n2.jpg"]
    assert (out / "images" / "b__p2.jpg").read_bytes() == (tmp_path / "clinic" / "b" / "p2.jpg").read_bytes()
    df = folder_labels(out)
    assert list(df.columns) == ["split", "image", "label", "group"]  # as for PALM
    assert df.values.tolist() == [
        ["train", "images/a__n1.jpg", 0, ""],
        ["train", "images/a__p1.jpg", 1, ""],
        ["valid", "images/b__p2.jpg", 1, ""],
        ["valid", "images/n2.jpg", 0, ""],
    ]
    assert "warning" not in capsys.readouterr().err


@pytest.mark.parametrize("label, value", [("PM", 1), ("non-PM", 0), ("pm", 1), ("Non_PM", 0), ("1.0", 1), ("0", 0)])
def test_labels_may_be_written_as_pm_and_non_pm(tmp_path, label, value):
    rows = [("p1.jpg", 1, "train"), ("n1.jpg", 0, "train"), ("x.jpg", label, "valid"), ("y.jpg", 1 - value, "valid")]
    df = folder_labels(raw(tmp_path, rows)).set_index("image")
    assert df.loc["images/x.jpg", "label"] == value


@pytest.mark.parametrize("split", ["val", "Validation", " VALID "])
def test_split_names(tmp_path, split):
    rows = [("p1.jpg", 1, "Train"), ("n1.jpg", 0, "train"), ("p2.jpg", 1, split), ("n2.jpg", 0, "valid")]
    assert folder_labels(raw(tmp_path, rows)).split.tolist() == ["train", "train", "valid", "valid"]


def check_refused(tmp_path, match, rows=SPLIT_ROWS, header="image,label,split", **kwargs):
    with pytest.raises(DataError, match=match) as exc:
        raw(tmp_path, rows, header, **kwargs)
    assert "\n" not in str(exc.value)
    assert not (tmp_path / "raw").exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    return str(exc.value)


def test_missing_csv(tmp_path):
    make_folder(tmp_path / "clinic", SPLIT_ROWS)
    (tmp_path / "clinic" / "labels.csv").unlink()
    with pytest.raises(DataError, match=r"clinic/labels.csv: file not found"):
        copy_folder(tmp_path / "clinic", tmp_path / "raw")


def test_missing_folder(tmp_path):
    with pytest.raises(DataError, match="nowhere: no such folder"):
        copy_folder(tmp_path / "nowhere", tmp_path / "raw")


def test_missing_column(tmp_path):
    check_refused(
        tmp_path,
        r"labels.csv: missing column\(s\) label \(found: image, split\)",
        [(r[0], r[2]) for r in SPLIT_ROWS],
        "image,split",
    )


def test_empty_csv(tmp_path):
    check_refused(tmp_path, "empty file", csv="", images=[])
    check_refused(tmp_path, "no rows", csv="image,label\n", images=[])


@pytest.mark.parametrize("bad", [2, -1, "yes", "", 0.5])
def test_label_must_be_0_or_1(tmp_path, bad):
    rows = SPLIT_ROWS[:2] + [("b/p2.jpg", bad, "valid")] + SPLIT_ROWS[3:]
    check_refused(tmp_path, r"label must be 0 or 1 \(or PM / non-PM\); bad value in row 4 \(b/p2.jpg", rows)


@pytest.mark.parametrize("bad", ["test", "", "holdout"])
def test_split_must_be_train_or_valid(tmp_path, bad):
    rows = SPLIT_ROWS[:3] + [("n2.jpg", 0, bad)]
    check_refused(tmp_path, r"split must be train or valid.*row 5 \(n2.jpg", rows)


def test_listed_image_missing(tmp_path):
    check_refused(tmp_path, r"not found in .*clinic: b/p2.jpg \(row 4\)", images=["a/p1.jpg", "a/n1.jpg", "n2.jpg"])


def test_rows_are_numbered_as_lines_of_the_file_and_blank_lines_are_skipped(tmp_path):
    csv = "image,label,split\n\na/p1.jpg,1,train\na/n1.jpg,0,train\n\nb/p2.jpg,maybe,valid\nn2.jpg,0,valid\n\n"
    check_refused(tmp_path, r"bad value in row 6 \(b/p2.jpg: 'maybe'\)", csv=csv, images=[r[0] for r in SPLIT_ROWS])
    csv = csv.replace("maybe", "1")
    assert len(folder_labels(raw(tmp_path / "ok", csv=csv, images=[r[0] for r in SPLIT_ROWS]))) == 4


def test_columns_are_case_insensitive_extra_ones_ignored_and_a_repeated_one_refused(tmp_path):
    csv = "Image, Label ,SPLIT,eye\n" + "".join(f"{a},{b},{c},left\n" for a, b, c in SPLIT_ROWS)
    assert len(folder_labels(raw(tmp_path / "ok", csv=csv, images=[r[0] for r in SPLIT_ROWS]))) == 4
    check_refused(
        tmp_path,
        "column.*label appear more than once",
        csv=csv.replace("eye", "LABEL"),
        images=[r[0] for r in SPLIT_ROWS],
    )


def test_duplicate_rows(tmp_path):
    rows = SPLIT_ROWS + [("./a/p1.jpg", 1, "valid")]
    check_refused(tmp_path, r"more than once: a/p1.jpg \(rows 2, 6\)", rows, images=[r[0] for r in SPLIT_ROWS])


def test_an_unlisted_photograph_is_a_warning(tmp_path, capsys):
    raw(tmp_path, images=[r[0] for r in SPLIT_ROWS] + ["b/extra.png"])
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "warning: 1 photograph(s)" in err and "b/extra.png" in err


@pytest.mark.parametrize(
    "path", ["../outside.jpg", "/etc/passwd", "a/../../outside.jpg", "C:/x.jpg", "a\\..\\..\\x.jpg"]
)
def test_paths_out_of_the_folder_are_refused(tmp_path, path):
    (tmp_path / "outside.jpg").write_bytes(jpeg_bytes(9))
    rows = SPLIT_ROWS[:3] + [(path, 0, "valid")]
    msg = check_refused(tmp_path, "must stay inside the folder", rows, images=[r[0] for r in SPLIT_ROWS[:3]])
    assert "row 5" in msg


def test_a_symbolic_link_out_of_the_folder_is_refused(tmp_path):
    (tmp_path / "secret.jpg").write_bytes(jpeg_bytes(9))
    folder = make_folder(tmp_path / "clinic", SPLIT_ROWS, "image,label,split", images=[r[0] for r in SPLIT_ROWS[:3]])
    os.symlink(tmp_path / "secret.jpg", folder / "n2.jpg")
    with pytest.raises(DataError, match=r"row 5 \(n2.jpg\): a symbolic link to .*secret.jpg, outside"):
        copy_folder(folder, tmp_path / "raw")
    assert not (tmp_path / "raw").exists()


def test_a_symbolic_link_inside_the_folder_is_copied(tmp_path):
    folder = make_folder(tmp_path / "clinic", SPLIT_ROWS, "image,label,split", images=[r[0] for r in SPLIT_ROWS[:3]])
    os.symlink("a/n1.jpg", folder / "n2.jpg")
    copy_folder(folder, tmp_path / "raw")
    assert (tmp_path / "raw" / "images" / "n2.jpg").read_bytes() == (folder / "a" / "n1.jpg").read_bytes()
    assert not (tmp_path / "raw" / "images" / "n2.jpg").is_symlink()


@pytest.mark.parametrize(
    "limits, match",
    [
        (Limits(max_entry_mb=0.0001), r"row 2 \(a/p1.jpg\): .* above unzip.max_entry_mb"),
        (Limits(max_total_mb=0.002), r"row \d .*pass unzip.max_total_mb"),
    ],
)
def test_size_limits(tmp_path, limits, match):
    folder = make_folder(tmp_path / "clinic", SPLIT_ROWS, "image,label,split")
    with pytest.raises(DataError, match=match):
        copy_folder(folder, tmp_path / "raw", limits)
    assert not (tmp_path / "raw").exists()


def test_the_same_flattened_name_is_refused(tmp_path):
    rows = SPLIT_ROWS + [("a__p1.jpg", 1, "valid")]
    check_refused(tmp_path, r"rows 2 \(a/p1.jpg\), 6 \(a__p1.jpg\) would be copied to the same name", rows)


def test_a_failed_copy_keeps_the_previous_output(tmp_path):
    out = raw(tmp_path)
    (tmp_path / "clinic" / "n2.jpg").unlink()
    with pytest.raises(DataError, match="n2.jpg"):
        copy_folder(tmp_path / "clinic", out)
    assert (out / "images" / "n2.jpg").is_file()


@pytest.mark.parametrize(
    "rows, match",
    [
        (SPLIT_ROWS[:2], "split valid has no images"),
        ([r[:2] + ("valid",) for r in SPLIT_ROWS], "split train has no images"),
        (SPLIT_ROWS[:3] + [("n2.jpg", 1, "valid")], r"split valid has only PM images \(2\)"),
        ([("a/p1.jpg", 0, "train")] + SPLIT_ROWS[1:], r"split train has only non-PM images \(2\)"),
    ],
)
def test_each_split_needs_images_of_both_classes(tmp_path, rows, match):
    check_refused(tmp_path, match, rows)


def test_an_undecodable_photograph_is_named_by_preprocess(tmp_path):
    out = raw(tmp_path, images=[r[0] for r in SPLIT_ROWS[:3]] + ["n2.jpg"])
    (out / "images" / "b__p2.jpg").write_bytes(b"not a jpeg")
    folder_labels(out).to_csv(tmp_path / "labels.csv", index=False)
    with pytest.raises(DataError, match=r"1 image\(s\) cannot be decoded: .*b__p2.jpg"):
        preprocess(tmp_path / "labels.csv", out, tmp_path / "shards", image_size=32, workers=1)
    assert not (tmp_path / "shards").exists()


# --- the split, when labels.csv has no split column


def unsplit(n_pm=30, n_non=70, groups=None):
    rows = [(f"p{i:03d}.jpg", 1) for i in range(n_pm)] + [(f"n{i:03d}.jpg", 0) for i in range(n_non)]
    if groups is not None:
        return [r + (groups(i),) for i, r in enumerate(rows)]
    return rows


def test_without_split_column_a_stratified_seeded_split(tmp_path):
    out = raw(tmp_path, unsplit(), "image,label")
    df = folder_labels(out, val_fraction=0.2, split_seed=0)
    valid = df[df.split == "valid"]
    assert len(valid) == 20 and valid.label.sum() == 6  # 20% of each class
    assert folder_labels(out, 0.2, 0).equals(df)  # deterministic
    assert not folder_labels(out, 0.2, 1).equals(df)  # the seed matters
    assert (df.group == "").all()


def test_the_split_does_not_depend_on_the_rows_order(tmp_path):
    rows = unsplit()
    a = folder_labels(raw(tmp_path / "a", rows, "image,label"))
    b = folder_labels(raw(tmp_path / "b", rows[::-1], "image,label"))
    assert a.equals(b)


def test_groups_never_straddle_the_split(tmp_path):
    rows = unsplit(groups=lambda i: f"patient{i // 3}")  # 3 images per patient, classes mixed in some
    out = raw(tmp_path, rows, "image,label,group")
    for seed in range(5):
        df = folder_labels(out, 0.2, seed)
        assert df.groupby("group").split.nunique().max() == 1
        valid = df[df.split == "valid"]
        assert 0.12 <= len(valid) / len(df) <= 0.3 and 0 < valid.label.sum() < len(valid)
    assert df.group.str.startswith("patient").all()


def test_train_valid_split_directly():
    y = np.array([1] * 40 + [0] * 60)
    valid = train_valid_split(y, 0.25, seed=3)
    assert valid.sum() == 25 and y[valid].sum() == 10
    assert (train_valid_split(y, 0.25, seed=3) == valid).all()
    groups = np.repeat(np.arange(25), 4).astype(str)
    g_valid = train_valid_split(y, 0.2, seed=0, groups=groups)
    assert all(len(set(g_valid[groups == g])) == 1 for g in set(groups))
    empty = train_valid_split(y, 0.2, seed=0, groups=[""] * 100)  # no group: each image its own
    assert 15 <= empty.sum() <= 25


def test_too_few_images_to_split_is_a_clear_error(tmp_path):
    out = raw(tmp_path, [("p1.jpg", 1), ("n1.jpg", 0), ("n2.jpg", 0)], "image,label")
    with pytest.raises(DataError, match="cannot split 3 images|split .* has"):
        folder_labels(out, 0.2, 0)
    out = raw(tmp_path / "g", unsplit(2, 2, groups=lambda i: "same"), "image,label,group")
    with pytest.raises(DataError, match=r"1 group\(s\) cannot be split 5 ways"):
        folder_labels(out, 0.2, 0)


# --- the stages, as dvc runs them


@pytest.mark.parametrize(
    "header, rows, stage, match",
    [
        ("image,label,split", SPLIT_ROWS[:3] + [("../n2.jpg", 0, "valid")], "unzip", r"row 5 \('../n2.jpg'\)"),
        (
            "image,label",
            [("a/p1.jpg", 1), ("a/n1.jpg", 0), ("b/p2.jpg", 0), ("n2.jpg", 0)],
            "labels",
            r"labels.csv: cannot split 4 images \(1 PM\) with data.val_fraction 0.2",
        ),
    ],
)
def test_a_stage_stops_with_one_error_line_naming_the_problem_and_exit_1(tmp_path, header, rows, stage, match):
    import shutil
    import subprocess
    import sys

    import yaml

    from conftest import ENV, REPO

    shutil.copytree(REPO / "stages", tmp_path / "stages")
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["data"].update(source="folder", input="clinic")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    make_folder(tmp_path / "clinic", rows, header, images=[r[0] for r in SPLIT_ROWS])
    if stage == "labels":  # the split is made (and found impossible) by the labels stage
        copy_folder(tmp_path / "clinic", tmp_path / "data" / "raw")
    proc = subprocess.run([sys.executable, f"stages/{stage}.py"], cwd=tmp_path, env=ENV, capture_output=True, text=True)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 1 and len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert re.search(match, errors[0]), errors[0]
    assert not (tmp_path / "data" / "labels").exists()
    assert (tmp_path / "data" / "raw").exists() == (stage == "labels")
