import stat
import zipfile

import pytest

from conftest import make_palm_zips, write_zip
from palm.core.errors import DataError
from palm.data.layout import Limits
from palm.data.unzip import unzip_all


def test_extracts_the_original_layout(tmp_path):
    zips = make_palm_zips(tmp_path / "zips")
    counts = unzip_all(zips, tmp_path / "raw")
    raw = tmp_path / "raw"
    assert sorted(p.name for p in (raw / "PALM-Training400").iterdir()) == [
        "H0001.jpg",
        "N0001.jpg",
        "P0001.jpg",
        "P0002.jpg",
    ]
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


@pytest.mark.parametrize("entry", ["../evil.jpg", "/etc/evil.jpg", "PALM-Validation400/../../evil.jpg", "C:/evil.jpg"])
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


# -- hostile zips: bombs, overwrites, odd layouts ------------------------------------------


def zeros_zip(path, name, mb, extra=None):
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for n, data in (extra or {}).items():
            zf.writestr(n, data)
        zf.writestr(name, bytes(mb << 20))
    return path


def test_a_zip_bomb_is_refused_from_the_directory_before_anything_is_written(tmp_path):
    zips = make_palm_zips(tmp_path / "zips")
    zeros_zip(zips / "validation.zip", "PALM-Validation400/V0003.jpg", 64)  # 64 MB of zeros, ~64 KB zipped
    assert (zips / "validation.zip").stat().st_size < 200_000
    with pytest.raises(DataError, match=r"validation\.zip: entry 'PALM-Validation400/V0003\.jpg' expands .*max_ratio"):
        unzip_all(zips, tmp_path / "raw")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["zips"]


@pytest.mark.parametrize(
    "limits,match", [(Limits(max_entry_mb=1), "max_entry_mb"), (Limits(max_total_mb=0.01), "max_total_mb")]
)
def test_size_limits_are_parameters(tmp_path, limits, match):
    zips = make_palm_zips(tmp_path / "zips")
    write_zip(zips / "validation.zip", {"PALM-Validation400/V0001.jpg": bytes(range(256)) * 8192})  # 2 MB
    with pytest.raises(DataError, match=match):
        unzip_all(zips, tmp_path / "raw", limits)
    assert not (tmp_path / "raw").exists()


def test_a_bomb_inside_the_nested_zip_is_streamed_and_refused(tmp_path):
    import io

    zips = make_palm_zips(tmp_path / "zips")
    inner = io.BytesIO()
    zeros_zip(inner, "PALM-Training400/P0009.jpg", 64, {"PALM-Training400/P0001.jpg": b"x"})
    write_zip(zips / "training.zip", {"PALM-Training400/PALM-Training400.zip": inner.getvalue()})
    with pytest.raises(DataError, match=r"PALM-Training400\.zip: entry 'PALM-Training400/P0009\.jpg' expands"):
        unzip_all(zips, tmp_path / "raw")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["zips"]  # the temporary nested zip is gone too


def test_a_directory_that_understates_an_entry_is_caught_while_streaming(tmp_path):
    """The central directory says 100 bytes; the data is 2 MB: the stream is cut, not trusted."""
    zips = make_palm_zips(tmp_path / "zips")
    path = zips / "validation.zip"
    write_zip(path, {"PALM-Validation400/V0001.jpg": bytes(2 << 20)})
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as zf:
        info = zf.infolist()[0]
        real = info.file_size
    lie = (100).to_bytes(4, "little")
    data = data.replace(real.to_bytes(4, "little"), lie)  # local header and central directory
    path.write_bytes(bytes(data))
    with pytest.raises(DataError, match="validation.zip"):
        unzip_all(zips, tmp_path / "raw")
    assert not (tmp_path / "raw").exists()


@pytest.mark.parametrize("case", ["across zips", "duplicate entry", "file and folder", "case only"])
def test_no_file_is_ever_overwritten(tmp_path, case):
    zips = make_palm_zips(tmp_path / "zips")
    gt = zipfile.ZipFile(zips / "valid_gt.zip").read("PALM-Validation-GT/PM_Label_and_Fovea_Location.xlsx")
    if case == "across zips":
        write_zip(
            zips / "valid_gt.zip",
            {
                "PALM-Validation-GT/PM_Label_and_Fovea_Location.xlsx": gt,
                "PALM-Validation400/V0001.jpg": b"not the image",
            },
        )
        match = r"valid_gt\.zip: entry 'PALM-Validation400/V0001\.jpg' would overwrite .*validation\.zip"
    elif case == "duplicate entry":
        with pytest.warns(UserWarning), zipfile.ZipFile(zips / "validation.zip", "a") as zf:
            zf.writestr("PALM-Validation400/V0001.jpg", b"second")
        match = r"validation\.zip: entry 'PALM-Validation400/V0001\.jpg' would overwrite .*V0001\.jpg"
    elif case == "file and folder":
        with zipfile.ZipFile(zips / "validation.zip", "a") as zf:
            zf.writestr("PALM-Validation400/V0001.jpg/x.jpg", b"x")
        match = "needs a folder .*V0001.jpg.* is a file"
    else:
        with zipfile.ZipFile(zips / "validation.zip", "a") as zf:
            zf.writestr("PALM-Validation400/v0001.JPG", b"x")
        match = "would overwrite"
    with pytest.raises(DataError, match=match):
        unzip_all(zips, tmp_path / "raw")
    assert not (tmp_path / "raw").exists()


def test_a_corrupt_deflate_stream_is_a_clear_error(tmp_path):
    zips = make_palm_zips(tmp_path / "zips")
    path = zips / "validation.zip"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("PALM-Validation400/V0001.jpg", bytes(range(256)) * 64)
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as zf:
        info = zf.infolist()[0]
        start = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra)
    data[start : start + 8] = b"\xff" * 8  # an invalid deflate block header
    path.write_bytes(bytes(data))
    with pytest.raises(DataError, match=r"validation\.zip: cannot extract entry 'PALM-Validation400/V0001\.jpg'"):
        unzip_all(zips, tmp_path / "raw")


def test_files_outside_the_layout_are_extracted_and_listed_in_a_warning(tmp_path, capsys):
    zips = make_palm_zips(tmp_path / "zips")
    with zipfile.ZipFile(zips / "validation.zip", "a") as zf:
        zf.writestr("PALM-Validation400/more/V0100.jpg", b"x")
        zf.writestr("notes.txt", b"x")
    unzip_all(zips, tmp_path / "raw")
    err = capsys.readouterr().err
    assert "warning: 2 file(s) outside the PALM layout" in err
    assert "PALM-Validation400/more/V0100.jpg" in err and "notes.txt" in err
    assert (tmp_path / "raw" / "PALM-Validation400" / "more" / "V0100.jpg").is_file()


def test_a_nested_zip_that_is_itself_a_bomb_is_refused_before_it_is_read(tmp_path):
    """The outer entry (the nested zip, stored inside) expands 256 MB of zeros: refused from the
    outer directory, never decompressed to memory or disk."""
    import io

    zips = make_palm_zips(tmp_path / "zips")
    inner = io.BytesIO()
    with zipfile.ZipFile(inner, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr("PALM-Training400/P0001.jpg", bytes(64 << 20))
    with zipfile.ZipFile(zips / "training.zip", "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("PALM-Training400/PALM-Training400.zip", inner.getvalue())
    with pytest.raises(DataError, match=r"training\.zip: entry 'PALM-Training400/PALM-Training400\.zip' expands"):
        unzip_all(zips, tmp_path / "raw")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["zips"]
