"""The fast inference path (palm.serve.inference) and decoding in worker processes (palm.serve.decode).

Parity: Paddle Inference (oneDNN, fp32) gives eager Paddle's probabilities within
``FP32_TOL`` for every registered network, on synthetic photographs and on palm-mini's.
"""

import json

import cv2
import numpy as np
import paddle
import pytest

from conftest import PALM_MINI, requires_palm_mini
from palm.core.errors import DataError
from palm.data.image import load_image, to_chw_float
from palm.data.synthetic import draw_fundus
from palm.nn.models import build_model, model_names
from palm.nn.weights import MODEL_WEIGHTS, save_state
from palm.serve import inference
from palm.serve.decode import decode_stream
from palm.serve.inference import configure, load_engine
from palm.serve.predict import Predictor

FP32_TOL = 1e-4  # |probability(Paddle Inference fp32) - probability(eager)|
SIZE = 64


def save_model(folder, name, size=SIZE):
    """A (randomly initialised) trained-model folder as the train stage writes it.

    The last layer is scaled so that logits are of order 1 (untrained ResNets give logits in
    the hundreds, whose probabilities, all 0 or 1, would agree whatever the engine)."""
    folder.mkdir(parents=True)
    paddle.seed(1)
    model = build_model(name, image_size=size)
    model.eval()
    last = [m for m in model.sublayers() if isinstance(m, paddle.nn.Linear)][-1]
    with paddle.no_grad():
        probe = paddle.uniform([4, 3, size, size], min=-1, max=1, seed=2)
        logits = model(probe).numpy()
        scale = 2.0 / max(1e-3, float(np.abs(logits).max()))
        last.weight.set_value(last.weight.numpy() * scale)
        last.bias.set_value(last.bias.numpy() * scale)
    save_state(model.state_dict(), folder / MODEL_WEIGHTS)
    (folder / "model.json").write_text(json.dumps({"model": name, "image_size": size, "threshold": 0.5}))
    return folder


def synthetic_photos(folder, n=4):
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        img, _ = draw_fundus(np.random.default_rng(i), "PHN"[i % 3], (320 + 16 * i, 300), "LR"[i % 2])
        cv2.imwrite(str(folder / f"S{i:04d}.jpg"), img)
    return sorted(folder.glob("*.jpg"))


def assert_parity(models_dir, files, size=SIZE):
    x = to_chw_float(np.stack([load_image(f, size) for f in files]))
    fast, _ = load_engine(models_dir, device="cpu", engine="paddle-inference")
    slow, _ = load_engine(models_dir, device="cpu", engine="eager")
    assert fast.name == "paddle-inference cpu onednn fp32" and slow.name == "eager cpu"
    p_fast, p_slow = fast(x), slow(x)
    assert p_fast.shape == p_slow.shape == (len(files),)
    assert 0.02 < p_slow.mean() < 0.98, p_slow  # not saturated: a difference would show
    np.testing.assert_allclose(p_fast, p_slow, atol=FP32_TOL, rtol=0)
    # a smaller last batch (another input shape for oneDNN) too
    np.testing.assert_allclose(fast(x[:3]), p_slow[:3], atol=FP32_TOL, rtol=0)
    print(
        f"parity {models_dir}: max |dp| {np.abs(p_fast - p_slow).max():.2e}, "
        f"p in [{p_slow.min():.4f}, {p_slow.max():.4f}]"
    )
    return p_fast, p_slow


@pytest.mark.parametrize("name", model_names())
def test_paddle_inference_matches_eager_on_synthetic_photographs(tmp_path, name):
    files = synthetic_photos(tmp_path / "img", 5)
    assert_parity(save_model(tmp_path / "models", name), files)


@requires_palm_mini
@pytest.mark.realdata
@pytest.mark.parametrize("name", model_names())
def test_paddle_inference_matches_eager_on_real_photographs(tmp_path, name):
    import zipfile

    with zipfile.ZipFile(PALM_MINI / "validation.zip") as zf:
        names = sorted(n for n in zf.namelist() if n.lower().endswith(".jpg"))[:6]
        for n in names:
            (tmp_path / n.split("/")[-1]).write_bytes(zf.read(n))
    assert_parity(save_model(tmp_path / "models", name), sorted(tmp_path.glob("*.jpg")))


def test_predict_runs_exports_and_weights_through_paddle_inference(tmp_path):
    from palm.serve.export import export

    models = save_model(tmp_path / "models", "senet18")
    export(models, tmp_path / "export")
    files = synthetic_photos(tmp_path / "img", 5)
    eager = Predictor.load(models, device="cpu", engine="eager")
    ref = np.array([r["probability"] for r in eager.predict(files, progress=False)])
    for folder in (models, tmp_path / "export"):
        fast = Predictor.load(folder, device="cpu")
        assert fast.engine == "paddle-inference cpu onednn fp32"
        # batches of 2 and two decoding processes: order and batching must not matter
        got = np.array([r["probability"] for r in fast.predict(files, batch_size=2, progress=False, workers=2)])
        np.testing.assert_allclose(got, ref, atol=FP32_TOL)


def test_auto_falls_back_to_eager_when_paddle_inference_fails(tmp_path, monkeypatch, capsys):
    models = save_model(tmp_path / "models", "lenet")

    def broken(*a, **k):
        raise RuntimeError("no oneDNN here")

    monkeypatch.setattr(inference, "paddle_inference", broken)
    engine, info = load_engine(models, device="cpu")
    assert engine.name == "eager cpu" and info["model"] == "lenet"
    assert "no oneDNN here" in capsys.readouterr().err
    assert engine(np.zeros((2, 3, SIZE, SIZE), np.float32)).shape == (2,)
    with pytest.raises(DataError, match="Paddle Inference failed"):
        load_engine(models, device="cpu", engine="paddle-inference")
    with pytest.raises(DataError, match="engine must be"):
        load_engine(models, device="cpu", engine="fast")
    with pytest.raises(DataError, match="no model.json"):
        load_engine(tmp_path / "nothing", device="cpu")


class FakeConfig:
    """Records what ``configure`` asks of a paddle.inference.Config (GPU paths on a CPU build)."""

    def __init__(self):
        self.calls = {}

    def __getattr__(self, name):
        return lambda *a, **k: self.calls.setdefault(name, (a, k))


def test_configure_cpu_gpu_and_tensorrt():
    cpu = FakeConfig()
    assert configure(cpu, "cpu", "fp32", threads=2) == "paddle-inference cpu onednn fp32"
    assert cpu.calls["set_cpu_math_library_num_threads"][0] == (2,) and "enable_onednn" in cpu.calls
    assert "enable_onednn_bfloat16" not in cpu.calls and "enable_use_gpu" not in cpu.calls
    bf16 = FakeConfig()
    assert configure(bf16, "cpu", "bf16", threads=1) == "paddle-inference cpu onednn bf16"
    assert "enable_onednn_bfloat16" in bf16.calls
    gpu = FakeConfig()
    assert configure(gpu, "gpu:1", "fp32", tensorrt=False) == "paddle-inference gpu:1 cuda fp32"
    assert gpu.calls["enable_use_gpu"][0][1] == 1 and "enable_onednn" not in gpu.calls
    assert "enable_tensorrt_engine" not in gpu.calls
    trt = FakeConfig()
    assert configure(trt, "gpu:0", "fp32", tensorrt=True, input_size=96) == "paddle-inference gpu:0 tensorrt fp32"
    assert trt.calls["enable_tensorrt_engine"][1]["max_batch_size"] == inference.TRT_MAX_BATCH
    min_shape, max_shape, _ = trt.calls["set_trt_dynamic_shape_info"][0]
    assert min_shape == {"image": [1, 3, 96, 96]} and max_shape["image"][0] == inference.TRT_MAX_BATCH
    with pytest.raises(DataError, match="CPU"):
        configure(FakeConfig(), "gpu:0", "bf16")
    with pytest.raises(DataError, match="precision"):
        configure(FakeConfig(), "cpu", "int8")


@pytest.mark.parametrize("workers", [0, 2])
def test_decode_stream_keeps_order_and_per_file_errors(tmp_path, workers):
    files = synthetic_photos(tmp_path, 5)
    (tmp_path / "broken.jpg").write_bytes(b"not a jpeg")
    order = [files[0], tmp_path / "broken.jpg", *files[1:], tmp_path / "missing.jpg"]
    out = list(decode_stream(order, 48, 32, workers=workers, ahead=3))
    assert [d.file for d in out] == order
    assert [d.error is None for d in out] == [True, False, True, True, True, True, False]
    assert "broken.jpg" in out[1].error and "not found" in out[-1].error
    np.testing.assert_array_equal(out[0].image, load_image(files[0], 48, 32))
    assert out[2].image.shape == (32, 32, 3) and out[2].image.dtype == np.uint8


def test_decode_stream_reads_at_most_ahead_files_before_they_are_consumed(tmp_path):
    files = synthetic_photos(tmp_path, 2) * 10
    taken = []

    def listing():
        for f in files:
            taken.append(f)
            yield f

    stream = decode_stream(listing(), 32, workers=1, ahead=4)
    next(stream)
    assert len(taken) == 4  # memory is bounded: not a list of every decoded image
    assert len(list(stream)) == len(files) - 1


def test_predict_cli_engine_choice_and_workers(tmp_path, capsys):
    import csv

    from palm.cli import main as palm_main

    models = save_model(tmp_path / "models", "senet18")
    synthetic_photos(tmp_path / "img", 3)
    (tmp_path / "img" / "broken.jpg").write_bytes(b"not a jpeg")
    rows = {}
    for engine, workers in (("eager", "0"), ("auto", "2")):
        out = tmp_path / f"{engine}.csv"
        code = palm_main(
            [
                "predict",
                str(tmp_path / "img"),
                "--model",
                str(models),
                "--out",
                str(out),
                "--quiet",
                "--engine",
                engine,
                "--workers",
                workers,
                "--batch-size",
                "2",
            ]
        )
        assert code == 1  # broken.jpg
        rows[engine] = list(csv.DictReader(out.open()))
    err = capsys.readouterr().err
    assert "(eager cpu)" in err
    assert "(paddle-inference " in err
    assert [r["image"] for r in rows["eager"]] == [r["image"] for r in rows["auto"]]
    assert [bool(r["error"]) for r in rows["auto"]] == [r["image"].endswith("broken.jpg") for r in rows["auto"]]
    good = [i for i, r in enumerate(rows["auto"]) if not r["error"]]
    assert len(good) == 3
    np.testing.assert_allclose(
        [float(rows["auto"][i]["probability"]) for i in good],
        [float(rows["eager"][i]["probability"]) for i in good],
        atol=FP32_TOL,
    )
    out = tmp_path / "never.csv"
    with pytest.raises(SystemExit):
        palm_main(["predict", str(tmp_path / "img"), "--model", str(models), "--out", str(out), "--workers", "-1"])
    assert not out.exists()


def test_evaluate_scores_the_validation_shards_through_paddle_inference(tmp_path, capsys):
    import contextlib

    from conftest import make_shards
    from palm.data.dataset import FundusDataset, load_split, make_loader
    from palm.evaluation.evaluate import predict_valid
    from palm.nn.artifact import load as load_trained
    from palm.nn.artifact import predict_probs

    shards = make_shards(
        tmp_path,
        train=("P0001.jpg", "N0001.jpg"),
        valid=(("V0001.jpg", 1), ("V0002.jpg", 0), ("V0003.jpg", 1)),
        image_size=32,
    )
    models = save_model(tmp_path / "models", "senet18", size=32)
    valid, probs, info = predict_valid(shards, models, batch_size=2, device="cpu")
    assert "warning" not in capsys.readouterr().err  # no fallback to eager
    model, _ = load_trained(models)
    expected = predict_probs(
        model, make_loader(FundusDataset(load_split(shards, "valid")), 2, shuffle=False), contextlib.nullcontext
    )
    assert valid.images == ["V0001.jpg", "V0002.jpg", "V0003.jpg"] and info["model"] == "senet18"
    np.testing.assert_allclose(probs, expected, atol=FP32_TOL)
