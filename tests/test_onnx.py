"""The ONNX model (palm.serve.onnxrt): written by the export stage with paddle2onnx, within ``FP32_TOL``
of eager Paddle on photographs for every registered network, and run by ``palm predict
--engine onnxruntime`` without Paddle."""

import json
import subprocess
import sys
import zipfile

import numpy as np
import pytest

from conftest import ENV, PALM_MINI, requires_palm_mini
from palm.cli import main as palm_main
from palm.core.errors import DataError, RunError
from palm.data.image import load_image, to_chw_float
from palm.nn.models import model_names
from palm.serve import onnxrt
from palm.serve.export import export
from palm.serve.inference import load_engine
from test_inference import FP32_TOL, SIZE, save_model, synthetic_photos

_EXPORTS = {}
#: networks paddle2onnx 2.1.0 cannot convert at SIZE px, and why: vgg16's adaptive average pooling to 7 x 7
#: after a 2 x 2 feature map becomes an ONNX AveragePool of stride 0 (it converts at 224 px, where the map is 7 x 7)
UNSUPPORTED = {"vgg16": "AveragePool"}
CONVERTED = [n for n in model_names() if n not in UNSUPPORTED]


def exported(tmp_path_factory, name):
    """``(models/, models_export/)`` of a randomly initialised ``name`` (one export per network)."""
    if name not in _EXPORTS:
        root = tmp_path_factory.mktemp(name)
        models = save_model(root / "models", name)
        _EXPORTS[name] = models, export(models, root / "models_export", device="cpu")
    return _EXPORTS[name]


def assert_onnx_parity(models, export_dir, files):
    x = to_chw_float(np.stack([load_image(f, SIZE) for f in files]))
    onnx, info = onnxrt.onnx_engine(export_dir)
    eager, _ = load_engine(models, device="cpu", engine="eager")
    p_onnx, p_eager = onnx(x), eager(x)
    assert onnx.name.startswith("onnxruntime")
    assert info["model"] == json.loads((models / "model.json").read_text())["model"]
    assert p_onnx.shape == (len(files),) and 0.02 < p_eager.mean() < 0.98, p_eager  # not saturated
    np.testing.assert_allclose(p_onnx, p_eager, atol=FP32_TOL, rtol=0)
    np.testing.assert_allclose(onnx(x[:1]), p_eager[:1], atol=FP32_TOL, rtol=0)  # another batch size
    print(f"onnx parity {info['model']}: max |dp| {np.abs(p_onnx - p_eager).max():.2e} on {len(files)} photographs")


@pytest.mark.parametrize("name", model_names())
def test_export_writes_an_onnx_model_that_matches_eager_paddle_on_synthetic_photographs(
    tmp_path_factory, tmp_path, name
):
    models, export_dir = exported(tmp_path_factory, name)
    info = json.loads((export_dir / "model.json").read_text())["onnx"]
    if name in UNSUPPORTED:  # the Paddle export stands; no model.onnx, and model.json says why
        assert not (export_dir / "model.onnx").exists() and (export_dir / "inference.json").is_file()
        assert UNSUPPORTED[name] in info["error"] and "tmp" not in info["error"], info
        return
    assert info["file"] == "model.onnx" and info["converter"].startswith("paddle2onnx ") and info["opset"] >= 13
    assert 0 <= info["max_abs_difference"] <= onnxrt.PARITY_TOL  # the export's own check
    assert_onnx_parity(models, export_dir, synthetic_photos(tmp_path / "img", 5))


@requires_palm_mini
@pytest.mark.realdata
@pytest.mark.parametrize("name", CONVERTED)
def test_onnx_model_matches_eager_paddle_on_real_photographs(tmp_path_factory, tmp_path, name):
    with zipfile.ZipFile(PALM_MINI / "validation.zip") as zf:
        for n in sorted(n for n in zf.namelist() if n.lower().endswith(".jpg"))[:6]:
            (tmp_path / n.split("/")[-1]).write_bytes(zf.read(n))
    assert_onnx_parity(*exported(tmp_path_factory, name), sorted(tmp_path.glob("*.jpg")))


NO_PADDLE = """
import sys
sys.modules["paddle"] = None          # any `import paddle...` now fails, as in an install without it
sys.modules["paddle2onnx"] = None
from palm.cli import main
code = main(sys.argv[1:])
assert not any(m == "paddle" or m.startswith("paddle.") for m in sys.modules if sys.modules[m] is not None)
sys.exit(code)
"""


def test_predict_with_onnxruntime_needs_no_paddle(tmp_path_factory, tmp_path):
    models, export_dir = exported(tmp_path_factory, "senet18")
    files = synthetic_photos(tmp_path / "img", 3)
    cmd = [
        sys.executable,
        "-c",
        NO_PADDLE,
        "predict",
        *map(str, files),
        "--model",
        str(export_dir),
        "--engine",
        "onnxruntime",
        "--out",
        str(tmp_path / "p.csv"),
        "--quiet",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "(onnxruntime 1." in proc.stderr and "predicted 3 image(s)" in proc.stderr
    got = np.loadtxt(tmp_path / "p.csv", delimiter=",", skiprows=1, usecols=2)
    eager, _ = load_engine(models, device="cpu", engine="eager")
    want = eager(to_chw_float(np.stack([load_image(f, SIZE) for f in files])))
    np.testing.assert_allclose(got, want, atol=FP32_TOL + 1e-6)  # + the CSV's 6 decimals
    # the weights folder has no ONNX model: one line, exit 2
    proc = subprocess.run(
        [*cmd[:5], str(files[0]), "--model", str(models), "--engine", "onnxruntime"],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=300,
    )
    assert proc.returncode == 2 and "no model.onnx" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, (
        proc.stderr
    )


def test_a_failed_conversion_or_a_broken_onnx_file_is_one_line(tmp_path_factory, tmp_path, monkeypatch):
    import paddle2onnx

    _, export_dir = exported(tmp_path_factory, "senet18")

    def broken(*args, **kwargs):
        raise UnboundLocalError("cannot access local variable 'onnx_model_str'")  # paddle2onnx's own way to fail

    monkeypatch.setattr(paddle2onnx, "export", broken)
    with pytest.raises(RunError, match="paddle2onnx .* could not convert the model"):
        onnxrt.convert(export_dir, tmp_path / "model.onnx")
    (tmp_path / "model.onnx").write_bytes(b"not onnx")
    with pytest.raises(DataError, match="onnxruntime cannot load it"):
        onnxrt.session(tmp_path / "model.onnx")


def test_without_paddle2onnx_the_export_stands_without_onnx_and_says_so(tmp_path, monkeypatch, capsys):
    """Python 3.13, where paddle2onnx has no wheel: the Paddle export only, one warning."""
    models = save_model(tmp_path / "models", "lenet")
    monkeypatch.setitem(sys.modules, "paddle2onnx", None)
    out = export(models, tmp_path / "models_export", device="cpu")
    assert (out / "inference.json").is_file() and not (out / "model.onnx").exists()
    assert json.loads((out / "model.json").read_text())["onnx"] is None
    assert "paddle2onnx is not installed" in capsys.readouterr().err


# --- issue 40, class 6: an ONNX model's signature is checked against model.json when it is loaded -----------------


def fake_onnx(
    path,
    in_name="image",
    in_shape=("N", 3, SIZE, SIZE),
    in_type=None,
    out_shape=("N", 1),
    logits=1,
    batch_mean=False,
    extra_output=False,
):
    """An ONNX model of the given signature: the mean of each channel of the image, the first
    ``logits`` of them as its output (``batch_mean``: averaged over the batch too, a [1]-shaped
    answer whatever the batch)."""
    import onnx
    from onnx import TensorProto, helper

    in_type = in_type or TensorProto.FLOAT
    nodes = [
        helper.make_node("GlobalAveragePool", [in_name], ["pooled"]),
        helper.make_node("Flatten", ["pooled"], ["flat"], axis=1),
        helper.make_node("Slice", ["flat", "starts", "ends", "axes"], ["out"]),
    ]
    inits = [
        helper.make_tensor("starts", TensorProto.INT64, [1], [0]),
        helper.make_tensor("ends", TensorProto.INT64, [1], [logits]),
        helper.make_tensor("axes", TensorProto.INT64, [1], [1]),
    ]
    if in_type != TensorProto.FLOAT:
        nodes.insert(0, helper.make_node("Cast", [in_name], ["as_float"], to=TensorProto.FLOAT))
        nodes[1].input[0] = "as_float"
    if batch_mean:
        nodes.append(helper.make_node("ReduceMean", ["out"], ["logits"], axes=[0], keepdims=0))
    else:
        nodes.append(helper.make_node("Identity", ["out"], ["logits"]))
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, list(out_shape))]
    if extra_output:
        outputs.append(helper.make_tensor_value_info("flat", TensorProto.FLOAT, ["N", 3]))
    graph = helper.make_graph(
        nodes, "fake", [helper.make_tensor_value_info(in_name, in_type, list(in_shape))], outputs, inits
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


@pytest.mark.parametrize(
    "kwargs, says",
    [
        ({}, None),  # the export's own signature
        ({"out_shape": ("N",), "logits": 1}, None),  # [N, 1] declared as [N]: runs
        ({"out_shape": ("N", 2), "logits": 2}, "output of shape [N, 2]"),  # the example
        ({"out_shape": ("N", "M"), "logits": 2}, "output of shape ["),  # declared free: onnxruntime infers it
        ({"out_shape": (1,), "batch_mean": True}, "output of shape [1] for a batch of 2"),  # one answer per batch: run
        ({"in_shape": ("N", 4, SIZE, SIZE)}, f"input of shape [N, 4, {SIZE}, {SIZE}]"),
        ({"in_shape": ("N", 3, 32, 32)}, "input of shape [N, 3, 32, 32]"),
        ({"in_shape": ("N", 3, SIZE)}, f"input of shape [N, 3, {SIZE}]"),
        ({"in_shape": (1, 3, SIZE, SIZE)}, "a fixed batch size"),
        ({"in_name": "x"}, "input 'x'"),
        ({"in_type": "int64"}, "input of type tensor(int64)"),
        ({"extra_output": True}, "1 input(s) ('image') and 2 output(s)"),
    ],
)
def test_an_onnx_model_of_another_signature_is_refused_when_loaded(tmp_path_factory, tmp_path, capsys, kwargs, says):
    """Issue 40: an ONNX model with an output of shape [N, 2] gave rows each other's logits, exit 0;
    other shapes ended in an internal error. Now: exit 2, one line naming the file and what
    model.json wants."""
    from onnx import TensorProto

    _, export_dir = exported(tmp_path_factory, "senet18")
    folder = tmp_path / "export"
    folder.mkdir()
    info = json.loads((export_dir / "model.json").read_text())
    (folder / "model.json").write_text(json.dumps(info))
    if kwargs.get("in_type") == "int64":
        kwargs = {**kwargs, "in_type": TensorProto.INT64}
    fake_onnx(folder / "model.onnx", **kwargs)
    files = synthetic_photos(tmp_path / "img", 3)
    capsys.readouterr()
    code = palm_main(["predict", *map(str, files), "--model", str(folder), "--engine", "onnxruntime", "--quiet"])
    err = capsys.readouterr().err.strip()
    if says is None:
        assert code == 0, err  # the export's signature, and [N]: both run
        return
    assert code == 2 and len(err.splitlines()) == 1, err
    assert says in err and "model.onnx" in err and "model.json beside it wants one input 'image'" in err, err


def test_an_engine_never_reshapes_logits_of_another_shape():
    """The last guard, at every call of every engine: logits (N, 2) are refused, not read as 2N rows."""
    from palm.serve.engine import probabilities

    assert probabilities(np.zeros((3, 1)), 3).shape == (3,) and probabilities(np.zeros(3), 3).shape == (3,)
    for shape in ((3, 2), (6,), (1,), (3, 1, 1)):
        with pytest.raises(RunError, match=r"logits of shape .* for 3 image\(s\)"):
            probabilities(np.zeros(shape), 3)
