"""Same result on every computer (issue 37, docs/reproducibility.md): the tiny pipeline, run
natively and as on an older CPU (every SIMD extension the libraries let an environment variable
switch off, switched off, and one core instead of all, running as many threads) writes the
same bytes at every stage, trained weights included;
``palm predict`` (Paddle Inference's oneDNN, pinned to its AVX2 kernels, which a CPU without
AVX2 cannot run) gives the same probabilities to the 6 digits it prints, within one unit of
the last.

The stages run as the pipeline runs them (``python stages/<stage>.py`` in a project folder,
without DVC), each in its own process, so that the switches are read when the libraries load.
The native data stages also run numpy's AVX2/AVX-512 loops (``NPY_DISABLE_CPU_FEATURES`` set
empty overrides palm's pin): the data must not depend on them even where the pin is bypassed.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from conftest import ENV, REPO

# Switch off what each library lets an environment variable switch off (an x86-64-v2 CPU of 2010,
# no AVX, no FMA, as far as the switches go): OpenCV's dispatched code and IPP's AVX2/AVX-512
# code, numpy's AVX2/AVX-512 loops, MKL's and oneDNN's AVX/AVX2/AVX-512 kernels, libjpeg-turbo's
# SIMD (Pillow's and OpenCV's), and the C library's AVX2/FMA/AVX-512 variants of exp, log, sin...
OLD_CPU = {
    "OPENCV_CPU_DISABLE": "SSE4.1,SSE4.2,AVX,FP16,AVX2,AVX512-SKX",
    "OPENCV_IPP": "sse42",
    "NPY_DISABLE_CPU_FEATURES": "X86_V3 X86_V4 AVX512_ICL AVX512_SPR",
    "MKL_ENABLE_INSTRUCTIONS": "SSE4_2",
    "ONEDNN_MAX_CPU_ISA": "SSE41",
    "JSIMD_FORCENONE": "1",
    "GLIBC_TUNABLES": "glibc.cpu.hwcaps=-AVX_Usable,-AVX2_Usable,-FMA_Usable,-AVX,-AVX2,-FMA,-FMA4,-F16C,"
    "-AVX512F,-AVX512DQ,-AVX512BW,-AVX512VL,-AVX512CD,-BMI1,-BMI2",
}
DATA_STAGES = ("synthesize", "unzip", "labels", "preprocess")
TINY = {"n_train_p": 6, "n_train_n": 5, "n_train_h": 1, "n_val_pm": 4, "n_val_non_pm": 4, "scale": 0.05}


def _project(dest: Path) -> Path:
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["synthetic"].update(TINY)
    params["image_size"] = 64
    params["train"].update(epochs=1, batch_size=4, warmup_epochs=0)
    params["models"][params["model"]].pop("epochs", None)
    params["evaluate"]["bootstrap"] = 50
    dest.mkdir(parents=True)
    (dest / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return dest


def _digests(root: Path, *parts: str) -> dict[str, str]:
    out = {}
    for part in parts:
        paths = [root / part] if (root / part).is_file() else sorted(p for p in (root / part).rglob("*") if p.is_file())
        for p in paths:
            out[str(p.relative_to(root))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def _run(cmd: list[str], cwd: Path, env: dict[str, str], one_core: bool) -> None:
    one = (lambda: os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})) if one_core else None
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env={**ENV, **env}, preexec_fn=one, check=False)
    assert proc.returncode == 0, (
        f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    )


def _pipeline(dest: Path, env: dict[str, str], data_env: dict[str, str], one_core: bool) -> dict:
    """Run the stages in ``dest`` (on one core: one thread, one worker); what each wrote."""
    proj = _project(dest)
    for stage in (*DATA_STAGES, "train", "evaluate"):
        _run(
            [sys.executable, str(REPO / "stages" / f"{stage}.py")],
            proj,
            {**env, **(data_env if stage in DATA_STAGES else {})},
            one_core,
        )
    images = sorted((proj / "data" / "raw").rglob("V*.jpg"))[:4]
    _run(
        [
            sys.executable,
            "-m",
            "palm.cli",
            "predict",
            "--quiet",
            "--grade-all",
            "--model",
            "models",
            "--out",
            "predict.csv",
            *(str(p.relative_to(proj)) for p in images),
        ],
        proj,
        env,
        one_core,
    )
    return {
        "synthesize": _digests(proj, "data/synthetic"),
        "unzip": _digests(proj, "data/raw"),
        "labels": _digests(proj, "data/labels"),
        "preprocess": _digests(proj, "data/shards"),
        "train": _digests(proj, "models/model.safetensors"),
        "evaluate": _digests(proj, "metrics/eval.json", "metrics/predictions.csv"),
        "predict": pd.read_csv(proj / "predict.csv"),
    }


@pytest.fixture(scope="module")
def two_cpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("cross_cpu")
    with ThreadPoolExecutor(2) as pool:
        native = pool.submit(_pipeline, root / "native", {}, {"NPY_DISABLE_CPU_FEATURES": ""}, False)
        # one core, but as many threads as the native run: Paddle's results depend on the thread
        # count (1 against 2 moved the last bits of 114 of SE-ResNet18's 134 tensors in 3 steps)
        threads = {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS") or str(len(os.sched_getaffinity(0)))}
        old = pool.submit(_pipeline, root / "old_cpu", {**OLD_CPU, **threads}, {}, True)
        return native.result(), old.result()


@pytest.mark.parametrize("stage", [*DATA_STAGES, "train", "evaluate"])
def test_each_stage_writes_the_same_bytes_as_on_an_older_cpu(two_cpus, stage):
    native, old = (run_[stage] for run_ in two_cpus)
    assert native, f"{stage} wrote nothing"
    differ = sorted(k for k in native.keys() | old.keys() if native.get(k) != old.get(k))
    assert not differ, f"{stage}: {len(differ)} of {len(native)} file(s) differ on the imitated older CPU: {differ[:5]}"


def test_predict_gives_the_same_probabilities_as_on_an_older_cpu(two_cpus):
    native, old = (run_["predict"] for run_ in two_cpus)
    assert len(native) == 4 and native["probability"].notna().all()
    pd.testing.assert_frame_equal(native.drop(columns="probability"), old.drop(columns="probability"))
    assert np.abs(native["probability"] - old["probability"]).max() <= 1e-6


RENDER = """
import hashlib, sys
from palm.data.image import load_image
from palm.data.synthetic import SIZES, _render
for i, (w, h) in enumerate(SIZES):   # full size: drawn at 768 px, resized up, as the default set
    jpeg = _render(("train", "P1.jpg", "PHN"[i], 1, (2026, i), 1.0, 90))[3]
    print(hashlib.sha256(jpeg).hexdigest(), hashlib.sha256(load_image(jpeg, 224).tobytes()).hexdigest())
"""


def test_full_size_photographs_are_the_same_bytes_on_an_older_cpu():
    """The tiny pipeline's photographs are drawn at their size and decoded whole; the default
    set's are drawn at 768 px and resized (other OpenCV functions), and decoded at 1/8 of their
    size (libjpeg's scaled IDCT) then shrunk to 224 px: those too, the JPEGs and the pixels."""

    def render(env):
        return subprocess.run(
            [sys.executable, "-c", RENDER], capture_output=True, text=True, check=True, env={**ENV, **env}
        ).stdout.split()

    native = render({"NPY_DISABLE_CPU_FEATURES": ""})
    assert len(native) == 4 and native == render(OLD_CPU)


PROBE = """
import json, os, palm, cv2, numpy
from numpy._core._multiarray_umath import __cpu_features__ as f, __cpu_dispatch__ as d
from palm.core.runtime import fixed_opencv
line = cv2.getCPUFeaturesLine()   # before palm's pin: what the switches left on ("?": off)
fixed_opencv()
print(json.dumps({"numpy": [k for k in d if f.get(k)], "cv2_line": line, "cpu": open("/proc/cpuinfo").read(),
                  "cv2_optimized": cv2.useOptimized(), "mkl_cbwr": os.environ.get("MKL_CBWR")}))
"""


def _probe(env: dict[str, str]) -> dict:
    import json

    proc = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, env={**ENV, **env}, check=True)
    return json.loads(proc.stdout.splitlines()[-1])


def test_the_switches_reach_the_libraries_and_palm_pins_them():
    """Without this, a misspelt switch would make the comparison above compare a CPU with itself."""
    old, bare = _probe(OLD_CPU), _probe({"NPY_DISABLE_CPU_FEATURES": ""})
    assert old["numpy"] == [] and "AVX2?" in old["cv2_line"] and "SSE4.1?" in old["cv2_line"]
    if " avx2 " in bare["cpu"] and " fma " in bare["cpu"]:  # an AVX2 CPU: the native run differs indeed
        assert "X86_V3" in bare["numpy"] and "*AVX2 " in bare["cv2_line"] + " "
    assert not old["cv2_optimized"] and not bare["cv2_optimized"]  # OpenCV's baseline code, no IPP
    assert _probe({})["numpy"] == [] and bare["mkl_cbwr"] == "COMPATIBLE,STRICT"
