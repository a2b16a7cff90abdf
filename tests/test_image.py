"""Decoding one photograph (palm.data.image): unusual formats converted correctly or refused with a
reason, decoding limits, and ``palm predict`` going on past any one bad image."""

import csv
import json

import cv2
import numpy as np
import paddle
import pytest
from PIL import Image

import palm.data.image
from palm.cli import main as palm_main
from palm.core.errors import DataError
from palm.data.image import load_image
from palm.nn.models import build_model
from palm.nn.weights import save_state

SIZE = 32


def gradient(h=64, w=48):
    y, x = np.mgrid[0:h, 0:w]
    return np.dstack([x * 255 // (w - 1), y * 255 // (h - 1), np.full((h, w), 90)]).astype(np.uint8)


def test_sixteen_bit_grayscale_is_scaled_not_clipped(tmp_path):
    gray8 = gradient()[..., 0]
    cv2.imwrite(str(tmp_path / "g16.png"), gray8.astype(np.uint16) * 257)
    cv2.imwrite(str(tmp_path / "g8.png"), gray8)
    a, b = load_image(tmp_path / "g16.png", SIZE), load_image(tmp_path / "g8.png", SIZE)
    assert a.shape == (SIZE, SIZE, 3) and np.abs(a.astype(int) - b.astype(int)).max() <= 1
    assert a.mean() < 200  # not clipped to white (it was 255 everywhere)


def test_palette_alpha_cmyk_and_gray_images_are_converted(tmp_path):
    rgb = gradient()
    ref = load_image(_png(tmp_path / "rgb.png", Image.fromarray(rgb)), SIZE)
    pal = load_image(_png(tmp_path / "p.png", Image.fromarray(rgb).quantize(256)), SIZE)
    assert np.abs(pal.astype(int) - ref.astype(int)).mean() < 8
    rgba = np.dstack([rgb, np.full(rgb.shape[:2], 255, np.uint8)])
    rgba[:32, :, 3] = 0  # top half transparent: put on black
    got = load_image(_png(tmp_path / "a.png", Image.fromarray(rgba, "RGBA")), SIZE)
    assert (
        got[: SIZE // 2 - 1].max() == 0 and np.abs(got[SIZE // 2 + 1 :].astype(int) - ref[SIZE // 2 + 1 :]).max() <= 1
    )
    Image.fromarray(rgb).convert("CMYK").save(tmp_path / "c.jpg", quality=95)
    assert np.abs(load_image(tmp_path / "c.jpg", SIZE).astype(int) - ref.astype(int)).mean() < 8
    gray = load_image(_png(tmp_path / "l.png", Image.fromarray(rgb[..., 0])), SIZE)
    assert (gray[..., 0] == gray[..., 1]).all() and (gray[..., 1] == gray[..., 2]).all()


def _png(path, im):
    im.save(path)
    return path


@pytest.mark.parametrize("mode,reason", [("F", "floating-point pixels"), ("I", "32-bit integer pixels")])
def test_pixels_that_cannot_be_converted_faithfully_are_refused(tmp_path, mode, reason):
    Image.new(mode, (20, 20)).save(tmp_path / "x.tif")
    with pytest.raises(DataError, match=f"x.tif: {reason}"):
        load_image(tmp_path / "x.tif", SIZE)


def test_too_many_pixels_is_refused_before_decoding(tmp_path, monkeypatch):
    cv2.imwrite(str(tmp_path / "big.png"), gradient(200, 300))
    monkeypatch.setattr(palm.data.image, "MAX_PIXELS", 300 * 199)
    with pytest.raises(DataError, match=r"big.png: 300x200 pixels is above the limit"):
        load_image(tmp_path / "big.png", SIZE)
    monkeypatch.setattr(palm.data.image, "MAX_PIXELS", 10**9)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # Pillow's own bomb check: also one line
    with pytest.raises(DataError, match=r"big.png: refusing to decode it"):
        load_image(tmp_path / "big.png", SIZE)


@pytest.fixture
def model_dir(tmp_path):
    folder = tmp_path / "models"
    folder.mkdir()
    paddle.seed(1)
    save_state(build_model("senet18", image_size=SIZE).state_dict(), folder / "model.safetensors")
    (folder / "model.json").write_text(json.dumps({"model": "senet18", "image_size": SIZE, "threshold": 0.5}))
    return folder


def test_predict_reports_each_bad_image_in_its_row_and_predicts_the_rest(tmp_path, model_dir, monkeypatch, capsys):
    img = tmp_path / "img"
    img.mkdir()
    cv2.imwrite(str(img / "a_good.jpg"), gradient())
    cv2.imwrite(str(img / "b_big.png"), gradient(200, 300))
    cv2.imwrite(str(img / "c_sixteen.png"), gradient()[..., 0].astype(np.uint16) * 257)
    Image.new("F", (20, 20)).save(img / "d_float.tif")
    (img / "e_broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
    monkeypatch.setattr(palm.data.image, "MAX_PIXELS", 50_000)
    out = tmp_path / "p.csv"
    code = palm_main(
        [
            "predict",
            str(img),
            "--model",
            str(model_dir),
            "--out",
            str(out),
            "--quiet",
            "--batch-size",
            "2",
            "--grade-all",
        ]
    )
    rows = {r["image"].split("/")[-1]: r for r in csv.DictReader(out.open())}
    assert code == 1 and len(rows) == 5
    assert rows["a_good.jpg"]["error"] == "" and rows["c_sixteen.png"]["error"] == ""
    assert "pixels is above the limit" in rows["b_big.png"]["error"]
    assert "floating-point" in rows["d_float.tif"]["error"] and rows["e_broken.jpg"]["error"]
    err = capsys.readouterr().err
    assert "Traceback" not in err and "predicted 2 image(s), 3 could not be read" in err


@pytest.mark.parametrize(
    "args,code,message",
    [
        (["--batch-size", "-1"], 2, "--batch-size: must be at least 1, got -1"),
        (["--batch-size", "x"], 2, "--batch-size: must be a whole number"),
        (["--out", "{file}/sub/p.csv"], 2, "--out {file}/sub/p.csv: cannot write there"),
        (["--model", "{file}"], 2, "{file}: not a folder; --model takes the folder of a trained model"),
    ],
)
def test_bad_usage_is_exit_2_with_one_line_before_any_work(tmp_path, model_dir, capsys, args, code, message):
    cv2.imwrite(str(tmp_path / "x.jpg"), gradient())
    a_file = tmp_path / "x.jpg"
    args = [a.replace("{file}", str(a_file)) for a in args]
    try:
        got = palm_main(["predict", str(tmp_path / "x.jpg"), "--model", str(model_dir), "--quiet", *args])
    except SystemExit as exc:  # argparse
        got = exc.code
    err = capsys.readouterr().err
    assert got == code and message.replace("{file}", str(a_file)) in err and "Traceback" not in err
    assert not list(tmp_path.glob("**/.*.tmp-*"))


# EXIF orientation (issue 28, case 1): the stored pixels of a photograph whose tag says how to
# show it upright, by the EXIF specification (written with numpy, not with the code under test)
STORED = {
    1: lambda a: a,
    2: lambda a: a[:, ::-1],  # mirrored left-right
    3: lambda a: a[::-1, ::-1],  # upside down
    4: lambda a: a[::-1, :],  # mirrored top-bottom
    5: lambda a: a.transpose(1, 0, 2),  # transposed
    6: lambda a: np.rot90(a, 1),  # turned a quarter anticlockwise: shown turned clockwise
    7: lambda a: a[::-1, ::-1].transpose(1, 0, 2),  # transversed
    8: lambda a: np.rot90(a, -1),  # turned a quarter clockwise
}


def _tagged(path, upright: np.ndarray, orientation: int, fmt: str):
    im = Image.fromarray(np.ascontiguousarray(STORED[orientation](upright)))
    exif = Image.Exif()
    exif[0x0112] = orientation
    im.save(path, format=fmt, exif=exif, **({"quality": 98} if fmt == "JPEG" else {}))
    return path


def _scene(h=96, w=72) -> np.ndarray:
    """An upright picture with no symmetry: a gradient and a bright block near the top left."""
    a = gradient(h, w)
    a[8:30, 6:20] = (250, 250, 250)
    return a


@pytest.mark.parametrize("fmt,tolerance", [("PNG", 0), ("JPEG", 6)])
@pytest.mark.parametrize("orientation", range(1, 9))
def test_every_exif_orientation_is_decoded_upright(tmp_path, orientation, fmt, tolerance):
    upright = _scene()
    ext = fmt.lower()
    ref = load_image(_tagged(tmp_path / f"up.{ext}", upright, 1, fmt), SIZE)
    tagged = _tagged(tmp_path / f"o{orientation}.{ext}", upright, orientation, fmt)
    got = load_image(tagged, SIZE)
    assert np.abs(got.astype(int) - ref.astype(int)).mean() <= max(tolerance, 0.5)
    rgb, size = palm.data.image.decode(tagged, SIZE)
    assert size == (72, 96) and rgb.shape[0] * 3 == rgb.shape[1] * 4  # upright: the size as displayed
    if orientation != 1:  # the tag matters: ignoring it gives another picture
        stored = load_image(
            _png(tmp_path / "untagged.png", Image.fromarray(np.ascontiguousarray(STORED[orientation](upright)))), SIZE
        )
        assert np.abs(stored.astype(int) - ref.astype(int)).mean() > 20


def test_predict_and_the_quality_check_see_the_photograph_upright(tmp_path):
    from palm.serve.decode import decode_one

    upright = _scene(300, 260)
    a = decode_one(_tagged(tmp_path / "up.jpg", upright, 1, "JPEG"), SIZE, None, check_quality=True)
    b = decode_one(_tagged(tmp_path / "six.jpg", upright, 6, "JPEG"), SIZE, None, check_quality=True)
    assert a.error is None and b.error is None and a.quality == b.quality
    assert np.abs(a.image.astype(int) - b.image.astype(int)).mean() < 6
