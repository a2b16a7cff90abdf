import stat
import zipfile

import pytest

from conftest import make_palm_zips, write_zip
from palm.errors import DataError
from palm.unzip import unzip_all


def test_extracts_the_original_layout(tmp_path):
    zips = make_palm_zips(tmp_path / "zips")
    counts = unzip_all(zips, tmp_path / "raw")
    raw = tmp_path / "raw"
    assert sorted(p.name for p in (raw / "PALM-Training400").iterdir()) == [
        "H0001.jpg", "N0001.jpg", "P0001.jpg", "P0002.jpg"]
    assert sorted(p.name for p in (raw / "PALM-Validation400").iterdir()) == ["V0001.jpg", "V0002.jpg"]
    assert (raw / "PALM-Validation-GT" / "PM_Label_and_Fovea_Location.xlsx").is_file()
    assert not (raw / "PALM-Training400" / "PALM-Training400.zip").exists()
    assert counts == {"training.zip": 4, "validation.zip": 2, "valid_gt.zip": 1}


def test_missing_zip_is_named(tmp_path):
    zips = make_palm_zips(tmp_path / "zips")
    (zips / "validation.zip").unlink()
    with pytest.raises(DataError, match="validation.zip"):
        unzip_all(zips, tmp_path / "raw")
    assert not (tmp_path / "raw").exists()


def test_corrupt_zip_is_named_and_nothing_is_left(tmp_path):
    zips = make_palm_zips(tmp_path / "zips")
    data = (zips / "valid_gt.zip").read_bytes()
    (zips / "valid_gt.zip").write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match="valid_gt.zip.*not a valid zip"):
        unzip_all(zips, tmp_path / "raw")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["zips"]  # no raw/, no temporary folder


def test_bad_crc_is_reported(tmp_path):
    zips = make_palm_zips(tmp_path / "zips")
    path = zips / "validation.zip"
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as zf:
        info = zf.infolist()[0]
        start = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra)
    data[start + 10] ^= 0xFF  # flip a byte of the first entry's (stored or deflated) data
    path.write_bytes(bytes(data))
    with pytest.raises(DataError, match="validation.zip"):
        unzip_all(zips, tmp_path / "raw")


@pytest.mark.parametrize("entry", ["../evil.jpg", "/etc/evil.jpg", "PALM-Validation400/../../evil.jpg",
                                   "C:/evil.jpg"])
def test_zip_slip_entries_are_refused(tmp_path, entry):
    zips = make_palm_zips(tmp_path / "zips")
    write_zip(zips / "validation.zip", {"PALM-Validation400/V0001.jpg": b"x", entry: b"evil"})
    with pytest.raises(DataError, match="refusing") as exc:
        unzip_all(zips, tmp_path / "out" / "raw")
    assert entry in str(exc.value)
    assert not list((tmp_path / "out").glob("**/*evil*"))
    assert not (tmp_path / "evil.jpg").exists()
    assert not (tmp_path / "out" / "raw").exists()


def test_symlink_entry_is_refused(tmp_path):
    zips = make_palm_zips(tmp_path / "zips")
    with zipfile.ZipFile(zips / "validation.zip", "a") as zf:
        info = zipfile.ZipInfo("PALM-Validation400/link.jpg")
        info.external_attr = (stat.S_IFLNK | 0o777) << 16
        zf.writestr(info, "/etc/passwd")
    with pytest.raises(DataError, match="link.jpg.*symbolic link"):
        unzip_all(zips, tmp_path / "raw")


def test_zip_slip_inside_the_nested_zip_is_refused(tmp_path):
    import io

    zips = make_palm_zips(tmp_path / "zips")
    inner = io.BytesIO()
    with zipfile.ZipFile(inner, "w") as zf:
        zf.writestr("PALM-Training400/P0001.jpg", b"x")
        zf.writestr("../../evil.jpg", b"evil")
    write_zip(zips / "training.zip", {"PALM-Training400/PALM-Training400.zip": inner.getvalue()})
    with pytest.raises(DataError, match=r"PALM-Training400\.zip.*\.\./\.\./evil\.jpg"):
        unzip_all(zips, tmp_path / "raw")


def test_training_zip_without_the_nested_zip(tmp_path):
    zips = make_palm_zips(tmp_path / "zips")
    write_zip(zips / "training.zip", {"PALM-Training400/P0001.jpg": b"x"})
    with pytest.raises(DataError, match="nested"):
        unzip_all(zips, tmp_path / "raw")


def test_a_failed_run_keeps_the_previous_output(tmp_path):
    zips = make_palm_zips(tmp_path / "zips")
    unzip_all(zips, tmp_path / "raw")
    before = sorted(p.relative_to(tmp_path) for p in (tmp_path / "raw").rglob("*"))
    write_zip(zips / "validation.zip", {"../evil.jpg": b"evil"})
    with pytest.raises(DataError):
        unzip_all(zips, tmp_path / "raw")
    assert sorted(p.relative_to(tmp_path) for p in (tmp_path / "raw").rglob("*")) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["raw", "zips"]
