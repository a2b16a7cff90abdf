"""Hard stops and hostile input, through the stages' own entry points (``python stages/X.py``).

- Fault injection: each stage is killed (SIGKILL or SIGTERM, at a seeded random instant) and
  run again; its outputs must then equal those of an uninterrupted run, with no temporary
  file or folder left anywhere.
- Bad input: hostile zips, spreadsheets, images and parameters; each must end the stage with
  one ``error:`` line, the documented exit status (1 bad data, 2 bad configuration) and no
  traceback.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import yaml

from conftest import ENV, REPO, jpeg_bytes, make_palm_zips, write_zip, xlsx_bytes
from palm.core.fsutil import remove_stale_temporaries

TRAIN = [f"P{i:04d}.jpg" for i in range(6)] + [f"N{i:04d}.jpg" for i in range(4)] + ["H0001.jpg", "H0002.jpg"]
VALID = [(f"V{i:04d}.jpg", i % 2) for i in range(1, 5)]
STAGES = ("unzip", "labels", "preprocess", "train")
TEMPORARY = (".*.tmp-*", ".*.old-*", "*.tmp")


def project(dest: Path, **train) -> Path:
    """The stages and params.yaml in ``dest``, with tiny zips in data/original and a tiny training."""
    dest.mkdir(parents=True)
    shutil.copytree(REPO / "stages", dest / "stages")
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["data"]["input"] = "data/original"
    params["image_size"] = 32
    params["preprocess"]["workers"] = 1
    params["preprocess"]["shard_size"] = 5
    params["model"] = "senet18"
    params["models"]["senet18"] = {"input_size": 32, "to_static": False}
    params["train"].update(
        {"epochs": 3, "batch_size": 4, "warmup_epochs": 0, "holdout": 0.25, "select": "best", **train}
    )
    (dest / "params.yaml").write_text(yaml.safe_dump(params))
    make_palm_zips(dest / "data" / "original", train=TRAIN, valid=VALID)
    return dest


def stage(name: str, cwd: Path, **kwargs) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, f"stages/{name}.py"],
        cwd=cwd,
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kwargs,
    )


def run_stage(name: str, cwd: Path) -> subprocess.CompletedProcess:
    p = stage(name, cwd)
    out, err = p.communicate(timeout=300)
    return subprocess.CompletedProcess(p.args, p.returncode, out, err)


def outputs(root: Path) -> dict[str, str]:
    """Digest of every output file (training history without its timings, weights by content)."""
    digests = {}
    for folder in ("data/raw", "data/labels", "data/shards", "models", "checkpoints"):
        for f in sorted((root / folder).rglob("*")) if (root / folder).exists() else []:
            if not f.is_file():
                continue
            rel = f.relative_to(root).as_posix()
            data = f.read_bytes()
            if f.name in ("checkpoint.json", "model.json"):
                meta = json.loads(data)
                for rec in meta.get("history", []):
                    rec.pop("epoch_seconds", None)
                meta.pop("train_seconds", None)
                data = json.dumps(meta, sort_keys=True).encode()
            digests[rel] = hashlib.sha256(data).hexdigest()
    return digests


def strays(root: Path) -> list[str]:
    return sorted(
        str(p.relative_to(root)) for pattern in TEMPORARY for p in root.rglob(pattern) if ".git" not in p.parts
    )


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted run of the four stages, and how long each took."""
    root = project(tmp_path_factory.mktemp("faults") / "reference")
    seconds = {}
    for name in STAGES:
        t0 = time.perf_counter()
        proc = run_stage(name, root)
        seconds[name] = time.perf_counter() - t0
        assert proc.returncode == 0, proc.stderr[-3000:]
    return root, outputs(root), seconds


def test_a_stage_killed_at_any_instant_reruns_to_the_same_outputs_and_leaves_nothing(tmp_path, reference):
    ref_root, expected, seconds = reference
    rng = random.Random(20)
    root = project(tmp_path / "killed")
    shutil.rmtree(root / "data" / "original")  # the very same zips (an xlsx records when it was written)
    shutil.copytree(ref_root / "data" / "original", root / "data" / "original")
    log = []
    for name in STAGES:
        for _k, sig in enumerate((signal.SIGKILL, signal.SIGTERM)):
            # the training run is killed once it has started training (its first second is Python
            # and Paddle starting), the others anywhere in their run
            low = 0.5 * seconds[name] if name == "train" else 0.0
            delay = rng.uniform(low, 0.9 * seconds[name])
            proc = stage(name, root, start_new_session=True)
            time.sleep(delay)
            if proc.poll() is None:
                os.killpg(proc.pid, sig)
            _, err = proc.communicate(timeout=120)
            log.append((name, sig.name, round(delay, 2), proc.returncode))
            assert "Traceback" not in err, err[-2000:]
            if sig == signal.SIGTERM and proc.returncode == 143:  # cleaned up on its way out
                assert not strays(root), (name, strays(root))
        proc = run_stage(name, root)
        assert proc.returncode == 0, (log, proc.stderr[-3000:])
        assert not strays(root), (name, log, strays(root))
    got = outputs(root)
    assert got == expected, (log, {k for k in set(got) | set(expected) if got.get(k) != expected.get(k)})
    print(log)


def test_stale_temporaries_of_a_killed_process_are_removed_and_a_half_swap_is_undone(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / "data" / f".shards.tmp-{dead.pid}-abc" / "x").mkdir(parents=True)
    (tmp_path / "data" / "labels").mkdir()
    (tmp_path / "data" / "labels" / f".labels.csv.tmp-{dead.pid}-abc").write_text("half")
    (tmp_path / f".models.old-{dead.pid}").mkdir()  # killed between the two renames of a swap
    (tmp_path / f".models.old-{dead.pid}" / "model.json").write_text("{}")
    live = tmp_path / "data" / f".raw.tmp-{os.getppid()}-abc"  # a running process's: kept
    live.mkdir()
    removed = remove_stale_temporaries(root=tmp_path)
    assert len(removed) == 2 and (tmp_path / "models" / "model.json").is_file() and live.is_dir()
    assert not (tmp_path / "data" / f".shards.tmp-{dead.pid}-abc").exists()


# -- bad input ---------------------------------------------------------------------------


def _gt(valid=VALID):
    import pandas as pd

    return pd.DataFrame(
        {
            "ID": range(1, len(valid) + 1),
            "imgName": [n for n, _ in valid],
            "Label": [label for _, label in valid],
            "Fovea_X": 1.0,
            "Fovea_Y": 2.0,
        }
    )


def hostile_input(root: Path, case: str) -> str:
    """Make ``case`` in the project at ``root``; return the stage that must refuse it."""
    zips = root / "data" / "original"
    gt_name = "PALM-Validation-GT/PM_Label_and_Fovea_Location.xlsx"
    if case == "zip bomb":
        with zipfile.ZipFile(zips / "validation.zip", "w", zipfile.ZIP_DEFLATED) as zf:
            zf.writestr("PALM-Validation400/V0001.jpg", bytes(64 << 20))
    elif case == "nested zip bomb":
        inner = io.BytesIO()
        with zipfile.ZipFile(inner, "w", zipfile.ZIP_DEFLATED) as zf:
            zf.writestr("PALM-Training400/P0001.jpg", bytes(64 << 20))
        write_zip(zips / "training.zip", {"PALM-Training400/PALM-Training400.zip": inner.getvalue()})
    elif case == "zip slip":
        write_zip(zips / "validation.zip", {"PALM-Validation400/../../../evil.jpg": b"x"})
    elif case == "overwrite across zips":
        with zipfile.ZipFile(zips / "valid_gt.zip", "a") as zf:
            zf.writestr("PALM-Validation400/V0001.jpg", b"x")
    elif case == "file and folder of one name":
        with zipfile.ZipFile(zips / "validation.zip", "a") as zf:
            zf.writestr("PALM-Validation400/V0001.jpg/", b"")
    elif case == "not a zip":
        (zips / "training.zip").write_bytes(b"PK\x03\x04 this is not a zip")
    elif case == "corrupt deflate stream":
        path = zips / "validation.zip"
        with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
            zf.writestr("PALM-Validation400/V0001.jpg", jpeg_bytes(1) * 4)
        data = bytearray(path.read_bytes())
        data[40:48] = b"\xff" * 8
        path.write_bytes(bytes(data))
    elif case == "csv renamed xlsx":
        write_zip(zips / "valid_gt.zip", {gt_name: _gt().to_csv(index=False).encode()})
        return "labels"
    elif case == "spreadsheet without a Label column":
        write_zip(zips / "valid_gt.zip", {gt_name: xlsx_bytes(_gt().drop(columns="Label"))})
        return "labels"
    elif case == "bad label value":
        gt = _gt()
        gt["Label"] = gt["Label"].astype(object)
        gt.loc[1, "Label"] = "maybe"
        write_zip(zips / "valid_gt.zip", {gt_name: xlsx_bytes(gt)})
        return "labels"
    elif case == "truncated training image":
        inner = io.BytesIO()
        with zipfile.ZipFile(inner, "w") as zf:
            for i, name in enumerate(TRAIN):
                zf.writestr(f"PALM-Training400/{name}", jpeg_bytes(i)[:40] if i == 2 else jpeg_bytes(i))
        write_zip(zips / "training.zip", {"PALM-Training400/PALM-Training400.zip": inner.getvalue()})
        return "preprocess"
    else:
        raise ValueError(case)
    return "unzip"


HOSTILE = [
    "zip bomb",
    "nested zip bomb",
    "zip slip",
    "overwrite across zips",
    "file and folder of one name",
    "not a zip",
    "corrupt deflate stream",
    "csv renamed xlsx",
    "spreadsheet without a Label column",
    "bad label value",
    "truncated training image",
]


@pytest.fixture(scope="module")
def clean_project(tmp_path_factory):
    return project(tmp_path_factory.mktemp("bad") / "clean")


def one_error_line(proc) -> str:
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert len(lines) == 1, proc.stderr[-3000:]
    return lines[0]


@pytest.mark.parametrize("case", HOSTILE)
def test_hostile_data_is_one_error_line_with_exit_1_and_nothing_half_written(tmp_path, clean_project, case):
    root = tmp_path / "p"
    shutil.copytree(clean_project, root)
    target = hostile_input(root, case)
    for name in STAGES[: STAGES.index(target)]:
        assert run_stage(name, root).returncode == 0
    proc = run_stage(target, root)
    line = one_error_line(proc)
    assert proc.returncode == 1, (proc.returncode, line)
    assert not strays(root) and not (root.parent / "evil.jpg").exists()
    print(f"{case}: {proc.returncode} {line}")


@pytest.mark.parametrize(
    "key,value,message",
    [
        ("model", "foo", "model = 'foo'"),
        ("train.lr", "abc", "train.lr = 'abc': must be a number"),
        ("train.epochs", "2", "train.epochs = '2'"),
        ("train.epochs", 2.5, "train.epochs = 2.5"),
        ("train.epochs", 0, "train.epochs = 0"),
        ("train.batch_size", 0, "train.batch_size = 0"),
        ("train.device", "tpu", "train.device = 'tpu'"),
        ("train.holdout", 1.5, "train.holdout = 1.5"),
        ("train.select", "foo", "train.select = 'foo'"),
        ("image_size", "abc", "image_size = 'abc'"),
        ("unzip.max_ratio", -1, "unzip.max_ratio = -1"),
    ],
)
def test_a_bad_parameter_stops_every_stage_before_any_work_with_exit_2(tmp_path, key, value, message):
    root = project(tmp_path / "p")
    params = yaml.safe_load((root / "params.yaml").read_text())
    *parents, last = key.split(".")
    node = params
    for k in parents:
        node = node[k]
    node[last] = value
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    proc = run_stage("unzip", root)  # the first stage: nothing may run on a bad params.yaml
    line = one_error_line(proc)
    assert proc.returncode == 2 and message in line, (proc.returncode, line)
    assert not (root / "data" / "raw").exists()


def test_broken_params_yaml_is_exit_2(tmp_path):
    root = project(tmp_path / "p")
    (root / "params.yaml").write_text("train: [unclosed\n")
    proc = run_stage("labels", root)
    assert proc.returncode == 2 and "not valid YAML" in one_error_line(proc)


def test_an_internal_error_is_one_line_and_exit_3(tmp_path, monkeypatch, capsys):
    from palm import cli
    from palm.core import config
    from palm.core.errors import RunError
    from palm.serve import predict

    def boom(*args, **kwargs):
        raise ZeroDivisionError("division by zero\nsecond line")

    (tmp_path / "x.jpg").write_bytes(jpeg_bytes(0))
    monkeypatch.setattr(predict.Predictor, "load", boom)
    assert cli.main(["predict", str(tmp_path / "x.jpg"), "--quiet"]) == 3
    err = capsys.readouterr().err
    assert err.strip() == (
        "error: internal error: ZeroDivisionError: division by zero (PALM_DEBUG=1 shows the traceback)"
    )
    monkeypatch.chdir(REPO)  # the repository's params.yaml
    for exc, code in ((boom, 3), (RunError("training diverged: loss is nan"), 3)):

        def main(params, exc=exc):
            if callable(exc):
                exc()
            raise exc

        with pytest.raises(SystemExit) as stop:
            config.run_stage(main)
        assert stop.value.code == code
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in lines[0]


def test_atomic_files_get_the_permissions_of_a_plain_open(tmp_path):
    """eval.json and the other atomically written outputs are readable like any file the user writes."""
    import os
    import stat

    from palm.core.fsutil import atomic_file

    with atomic_file(tmp_path / "a.json") as f:
        f.write("{}")
    with open(tmp_path / "b.json", "w") as f:
        f.write("{}")
    mode = lambda p: stat.S_IMODE(os.stat(p).st_mode)  # noqa: E731
    assert mode(tmp_path / "a.json") == mode(tmp_path / "b.json")


def test_the_atomic_writer_syncs_to_disk_only_when_asked(tmp_path, monkeypatch):
    """One atomic writer (palm.core.fsutil.atomic_file) for every file; fsync=True (weights, checkpoints)
    flushes the data to the disk before the rename, the others skip that cost."""
    from palm.core import fsutil

    synced = []
    monkeypatch.setattr(fsutil.os, "fsync", lambda fd: synced.append(fd))
    with fsutil.atomic_file(tmp_path / "a.bin", "wb") as f:
        f.write(b"a")
    assert synced == [] and (tmp_path / "a.bin").read_bytes() == b"a"
    with fsutil.atomic_file(tmp_path / "b.bin", "wb", fsync=True) as f:
        f.write(b"b")
    assert len(synced) == 1 and (tmp_path / "b.bin").read_bytes() == b"b"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.bin", "b.bin"]  # no temporary left


# -- issue 28: no silent wrong answer -----------------------------------------------------------


@pytest.fixture
def tiny_model(tmp_path):
    import paddle

    from palm.nn.models import build_model
    from palm.nn.weights import save_state

    folder = tmp_path / "models"
    folder.mkdir()
    paddle.seed(1)
    save_state(build_model("lenet", image_size=32).state_dict(), folder / "model.safetensors")
    (folder / "model.json").write_text(json.dumps({"model": "lenet", "image_size": 32, "threshold": 0.5}))
    (tmp_path / "x.jpg").write_bytes(jpeg_bytes(0))
    return folder


@pytest.mark.parametrize(
    "key,text,message",
    [
        ("threshold", "7", "threshold = 7: input should be less than or equal to 1"),
        ("threshold", "1.0001", "threshold = 1.0001"),
        ("threshold", "-1", "threshold = -1: input should be greater than or equal to 0"),
        ("threshold", "NaN", "threshold = nan: must be finite"),
        ("threshold", "Infinity", "threshold = inf"),
        ("threshold", "-Infinity", "threshold = -inf"),
        ("input_size", "100000", "input_size = 100000: input should be less than or equal to 4096"),
        ("input_size", "8", "input_size = 8"),
        ("image_size", "100000", "image_size = 100000"),
        ("image_size", "32.5", "image_size = 32.5: must be a whole number"),
        ("image_size", "true", "image_size"),
        ("input_size", "64", "input_size = 64: must not be above image_size (32)"),
    ],
)
def test_a_bad_value_in_model_json_is_exit_2_naming_the_file_and_key(tiny_model, capsys, key, text, message):
    from palm.cli import main as palm_main

    info = (tiny_model / "model.json").read_text()
    info = (
        info[:-1] + f', "{key}": {text}}}'
        if key not in info
        else info.replace(f'"{key}": {json.loads(info)[key]}', f'"{key}": {text}')
    )
    (tiny_model / "model.json").write_text(info)
    out = tiny_model.parent / "p.csv"
    code = palm_main(
        ["predict", str(tiny_model.parent / "x.jpg"), "--model", str(tiny_model), "--out", str(out), "--quiet"]
    )
    err = capsys.readouterr().err
    assert code == 2 and f"model.json: {key}" in err and message in err, err
    assert len(err.strip().splitlines()) == 1 and not out.exists()


def test_a_good_model_json_still_predicts(tiny_model, capsys):
    from palm.cli import main as palm_main

    assert palm_main(["predict", str(tiny_model.parent / "x.jpg"), "--model", str(tiny_model), "--quiet"]) == 0


@pytest.fixture(scope="module")
def shards_dir(tmp_path_factory):
    from conftest import make_shards

    return make_shards(tmp_path_factory.mktemp("shards"), [f"P{i:04d}.jpg" for i in range(3)] + ["N0001.jpg"])


@pytest.mark.parametrize(
    "edit,message",
    [
        (lambda m: m["splits"]["train"]["shards"][0]["labels"].__setitem__(1, 7), "labels[1] = 7: must be 0"),
        (lambda m: m["splits"]["train"]["shards"][0]["labels"].__setitem__(0, -1), "labels[0] = -1"),
        (lambda m: m["splits"]["train"]["shards"][0]["labels"].__setitem__(0, 0.5), "labels[0] = 0.5"),
        (lambda m: m["splits"]["train"]["shards"][0]["labels"].__setitem__(0, True), "labels[0] = True"),
        (lambda m: m.__setitem__("image_size", 100000), "image_size = 100000"),
        (lambda m: m.__setitem__("image_size", "32"), "image_size = '32'"),
        (
            lambda m: m["splits"]["train"]["shards"][0].__setitem__("file", "../../etc/passwd"),
            "file = '../../etc/passwd'",
        ),
        (lambda m: m["splits"]["train"]["shards"][0]["images"].pop(), "images"),
        (lambda m: m["splits"]["train"]["shards"][0].__setitem__("labels", "x" * 10_000), "labels = 'xxx"),
    ],
)
def test_a_bad_value_in_the_shard_manifest_is_a_data_error_naming_the_file_and_key(tmp_path, shards_dir, edit, message):
    from palm.core.errors import DataError
    from palm.data.shards import open_split

    folder = tmp_path / "shards"
    shutil.copytree(shards_dir, folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    edit(manifest)
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError) as exc:
        open_split(folder, "train")
    text = str(exc.value)
    assert "manifest.json: " in text and message in text and len(text) < 300, text


def test_a_truncated_shard_is_refused_when_opened(tmp_path, shards_dir):
    from palm.core.errors import DataError
    from palm.data.shards import open_split

    folder = tmp_path / "shards"
    shutil.copytree(shards_dir, folder)
    shard = folder / json.loads((folder / "manifest.json").read_text())["splits"]["train"]["shards"][0]["file"]
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(DataError, match="truncated shard .* run the preprocess stage again"):
        open_split(folder, "train")


def test_a_damaged_checkpoint_is_reported_and_training_starts_afresh_never_promoted(tmp_path, capsys):
    from palm.nn import checkpoint

    ckpt = tmp_path / "ckpt"
    run = {"config": {"lr": 0.1}, "data": "d", "code": {"stages/train.py": "c"}, "versions": {"paddle": "v"}}
    state = {"model": {"w": np.arange(1000, dtype=np.float32)}}
    checkpoint.save(ckpt, state, {"identity": run, "epoch": 1, "history": []}, best_state=state["model"])
    meta = checkpoint.save(ckpt, state, {"identity": run, "epoch": 2, "history": []})
    assert meta["best_file"] == "best-0001.safetensors" and set(meta["sha256"]) == {
        "state-0002.safetensors",
        "best-0001.safetensors",
    }
    assert checkpoint.load(ckpt, run) is not None and checkpoint.damaged(ckpt, meta) is None
    for name, damage in (
        ("best-0001.safetensors", lambda b: b[: len(b) // 2]),
        ("state-0002.safetensors", lambda b: b[:-1] + b"\x00"),
        ("best-0001.safetensors", None),
    ):
        backup = (ckpt / name).read_bytes()
        if damage is None:
            (ckpt / name).unlink()
        else:
            (ckpt / name).write_bytes(damage(backup))
        assert checkpoint.damaged(ckpt, meta) and checkpoint.load(ckpt, run) is None
        assert "checkpoint damaged" in capsys.readouterr().out
        (ckpt / name).write_bytes(backup)
    for key, value in (("best_file", "../../models/model.safetensors"), ("state_file", "/etc/passwd")):
        bad = {**meta, key: value}
        (ckpt / "checkpoint.json").write_text(json.dumps(bad))
        assert checkpoint.load(ckpt, run) is None and "not a checkpoint file's name" in capsys.readouterr().out


def test_an_error_in_the_loader_thread_reaches_the_main_thread_at_once():
    import paddle

    from palm.core.errors import DataError
    from palm.data.dataset import make_loader

    class Failing(paddle.io.Dataset):
        def __init__(self, bad):
            self.bad = bad

        def __len__(self):
            return 12

        def __getitem__(self, i):
            if i == self.bad:
                raise DataError(f"shard.npy: truncated shard (image {i})")
            return np.zeros((3, 4, 4), np.float32), np.float32(0)

    for bad in (0, 5, 11):
        loader = make_loader(Failing(bad), 4, shuffle=False)
        t0 = time.perf_counter()
        for _ in range(2):  # and again, as the next epoch would
            with pytest.raises(DataError, match=f"truncated shard \\(image {bad}\\)"):
                for _ in loader:
                    pass
        assert time.perf_counter() - t0 < 10
    assert len(list(make_loader(Failing(-1), 4, shuffle=False))) == 3


def _children(pid: int) -> list[int]:
    kids = []
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            fields = dict(line.split(":\t", 1) for line in status.read_text().splitlines() if ":\t" in line)
        except OSError:
            continue
        if int(fields.get("PPid", "0").strip()) == pid:
            kids.append(int(status.parent.name))
    return kids


def _alive(pid: int) -> bool:
    try:
        return "zombie" not in (Path(f"/proc/{pid}/status").read_text().split("State:")[1].splitlines()[0])
    except (FileNotFoundError, IndexError):
        return False


@pytest.mark.parametrize("sig,code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_ends_palm_predict_at_once_with_no_crash_dump_temporary_file_or_worker(
    tmp_path, tiny_model, sig, code
):
    info = json.loads((tiny_model / "model.json").read_text())
    (tiny_model / "model.json").write_text(json.dumps({**info, "image_size": 256, "input_size": 32}))
    photo = tmp_path / "photo.jpg"
    photo.write_bytes(jpeg_bytes(1, size=(600, 600)))
    (tmp_path / "many").mkdir()
    for i in range(4000):
        (tmp_path / "many" / f"{i:05d}.jpg").symlink_to(photo)
    out = tmp_path / "out" / "p.csv"
    out.parent.mkdir()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "palm.cli",
            "predict",
            str(tmp_path / "many"),
            "--model",
            str(tiny_model),
            "--out",
            str(out),
            "--workers",
            "2",
            "--quiet",
            "--batch-size",
            "4",
        ],
        env=ENV,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    deadline = time.time() + 120
    while time.time() < deadline:  # until it is predicting: rows in its temporary CSV
        tmp = list(out.parent.glob(".p.csv.tmp-*"))
        if tmp and tmp[0].read_text().count("\n") > 5:
            break
        assert proc.poll() is None
        time.sleep(0.1)
    workers = _children(proc.pid)
    assert workers
    t0 = time.time()
    proc.send_signal(sig)  # to the process alone
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == code and time.time() - t0 < 20, err[-2000:]
    assert "Traceback" not in err and "FatalError" not in err and "C++" not in err, err[-2000:]
    assert err.strip().splitlines()[-1] in ("interrupted", "terminated")
    assert not list(out.parent.iterdir())  # no temporary CSV, no --out
    time.sleep(1)
    assert not [w for w in workers if _alive(w)]


def test_a_fifo_or_device_named_on_the_command_line_is_refused(tmp_path, tiny_model, capsys):
    from palm.cli import main as palm_main

    os.mkfifo(tmp_path / "pipe.jpg")
    for path, kind in ((tmp_path / "pipe.jpg", "a FIFO"), (Path("/dev/zero"), "not a regular file")):
        assert palm_main(["predict", str(path), "--model", str(tiny_model), "--quiet"]) == 2
        assert f"{path}: {kind}; refusing to read it" in capsys.readouterr().err


def test_preprocess_with_its_resume_folder_on_another_filesystem(tmp_path, shards_dir, monkeypatch):
    """A rename between folders of different filesystems fails with EXDEV ("Invalid
    cross-device link"): every such rename here does so, and preprocess still gives the same shards."""
    import errno

    from palm.core.fsutil import move
    from palm.data.preprocess import preprocess

    real = os.replace

    def one_filesystem_per_folder(src, dst):
        if Path(src).resolve().parent != Path(dst).resolve().parent:
            raise OSError(errno.EXDEV, "Invalid cross-device link")
        return real(src, dst)

    monkeypatch.setattr(os, "replace", one_filesystem_per_folder)
    work = shards_dir.parent
    out = tmp_path / "data" / "shards"
    preprocess(work / "labels.csv", work / "raw", out, image_size=32, workers=1, resume_dir=tmp_path / "ckpt" / "pre")
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in shards_dir.iterdir())
    for f in shards_dir.iterdir():
        assert (out / f.name).read_bytes() == f.read_bytes(), f.name
    assert not (tmp_path / "ckpt" / "pre").exists() and not strays(tmp_path)
    (tmp_path / "a").write_text("x")
    (tmp_path / "b").mkdir()
    move(tmp_path / "a", tmp_path / "b" / "a")
    assert (tmp_path / "b" / "a").read_text() == "x" and not (tmp_path / "a").exists()


@pytest.mark.parametrize(
    "text,message",
    [
        # an alias bomb under a checked key: nine aliases a level, nine levels
        (
            "a: &a [x, x, x, x, x, x, x, x, x]\n"
            + "".join(f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join(['*' + chr(97 + i)] * 9)}]\n" for i in range(8))
            + "model: *i\n",
            "alias *a is not allowed",
        ),
        ("base: &b {epochs: 3}\ntrain: *b\n", "alias *b is not allowed"),
        ("model: '" + "x" * 2_000_000 + "'\n", "larger than 1024 KB"),
        ("model: \xff\n", None),
    ],
)
def test_params_yaml_is_bounded_before_it_is_expanded(tmp_path, text, message):
    from palm.core.config import load_params
    from palm.core.errors import ConfigError

    path = tmp_path / "params.yaml"
    path.write_bytes(text.encode("latin-1" if "\xff" in text else "utf-8"))
    t0 = time.perf_counter()
    with pytest.raises(ConfigError) as exc:
        load_params(path)
    assert time.perf_counter() - t0 < 5 and len(str(exc.value)) < 500, str(exc.value)[:500]
    assert message is None or message in str(exc.value)


def test_a_long_bad_value_is_quoted_as_a_short_excerpt(tmp_path):
    from palm.core.config import load_params
    from palm.core.errors import ConfigError

    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["model"] = ["x" * 1000] * 500
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    with pytest.raises(ConfigError, match=r"model = \['xxx.*\.\.\. \(\d[\d,]+ characters\)") as exc:
        load_params(tmp_path / "params.yaml")
    # the 500,000-character value is a 60-character excerpt; the rest is the file's path (as long
    # as the test's temporary folder) and the list of the networks one may name
    message = str(exc.value).removeprefix(f"{tmp_path / 'params.yaml'}: ")
    assert len(message) < 300, message


@pytest.mark.parametrize("value,ok", [(20_000, True), (0, True), (20_001, False), (100_000_000, False)])
def test_bootstrap_resamples_are_bounded(tmp_path, value, ok):
    from palm.core.config import load_params
    from palm.core.errors import ConfigError

    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["evaluate"]["bootstrap"] = value
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    if ok:
        assert load_params(tmp_path / "params.yaml")["evaluate"]["bootstrap"] == value
    else:
        with pytest.raises(
            ConfigError, match=f"evaluate.bootstrap = {value}: input should be less than or equal to 20000"
        ):
            load_params(tmp_path / "params.yaml")


def test_a_full_disk_names_the_file_and_what_to_do(tmp_path, monkeypatch):
    import errno

    from palm.core.errors import RunError
    from palm.core.fsutil import atomic_dir, atomic_file
    from palm.data.shards import save_shard

    with pytest.raises(RunError, match=r"cannot write .*out\.json: No space left on device; free space on"):
        with atomic_file(tmp_path / "out.json") as f:
            f.write("{")
            raise OSError(errno.ENOSPC, "No space left on device")
    with pytest.raises(RunError, match=r"cannot write .*models: Disk quota exceeded"):
        with atomic_dir(tmp_path / "models"):
            raise OSError(errno.EDQUOT, "Disk quota exceeded")

    def short_write(f, arr):
        raise OSError("1806336 requested and 573312 written")

    monkeypatch.setattr(np, "save", short_write)
    with pytest.raises(RunError, match=r"cannot write .*train-000\.npy: the disk is full \(a short write\)"):
        save_shard(tmp_path / "train-000.npy", np.zeros((1, 4, 4, 3), np.uint8))
    with pytest.raises(FileNotFoundError):  # not the disk's: as it was
        with atomic_file(tmp_path / "x.txt"):
            open(tmp_path / "missing")
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_a_stage_that_runs_out_of_disk_is_one_line_naming_the_file_and_leaves_nothing(tmp_path, clean_project):
    import resource

    root = tmp_path / "p"
    shutil.copytree(clean_project, root)
    for name in ("unzip", "labels"):
        assert run_stage(name, root).returncode == 0

    def small_disk():  # files above 4 KB cannot be written: EFBIG, as a full disk's ENOSPC
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))

    p = subprocess.Popen(
        [sys.executable, "stages/preprocess.py"],
        cwd=root,
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=small_disk,
    )
    _, err = p.communicate(timeout=300)
    line = one_error_line(subprocess.CompletedProcess(p.args, p.returncode, "", err))
    assert p.returncode == 3 and "cannot write checkpoints/preprocess/train-000.npy: " in line, line
    assert ("File too large" in line or "the disk is full" in line) and "; free space on" in line, line
    assert "internal error" not in line and not (root / "data" / "shards").exists() and not strays(root)


def test_image_size_is_checked_against_the_available_memory_before_any_work(tmp_path, shards_dir, monkeypatch):
    from palm.core import runtime
    from palm.core.errors import ConfigError
    from palm.data.preprocess import preprocess
    from palm.nn.models import training_memory

    # LeNet's fully connected layer grows with the side: 4096 px is far beyond any machine here
    small, big = training_memory("lenet", 224, 16), training_memory("lenet", 4096, 16)
    assert small < 2 * 2**30 < 100 * 2**30 < big
    monkeypatch.setattr(runtime, "available_memory", lambda: 8 * 2**30)
    with pytest.raises(
        ConfigError,
        match=r"training lenet at 4096 px on batches of 16 needs about \d+\.\d GB of "
        r"memory, more than the 8\.0 GB available; lower image_size",
    ):
        runtime.check_memory(
            big,
            "training lenet at 4096 px on batches of 16",
            "lower image_size (or train.input_size for this model) or train.batch_size",
        )
    runtime.check_memory(small, "training", "")
    work = shards_dir.parent
    with pytest.raises(
        ConfigError,
        match=r"preprocess at image_size 4096 \(a shard of 256 images\) needs about "
        r"12\.0 GB.*lower preprocess.shard_size or image_size",
    ):
        preprocess(
            work / "labels.csv",
            work / "raw",
            tmp_path / "shards",
            image_size=4096,
            shard_size=256,
            workers=1,
            resume_dir=tmp_path / "pre",
        )
    assert not list(tmp_path.iterdir())


def test_weights_are_written_a_tensor_at_a_time_and_read_back_exactly(tmp_path):
    import gc

    import paddle
    from safetensors import safe_open

    from palm.nn.weights import load_state, save_state

    state = {
        "model": {"w": paddle.randn([3, 4]), "i": paddle.to_tensor(np.arange(5)), "b": paddle.to_tensor([True, False])},
        "opt": {"lr": 0.1, "m": [np.ones((2, 2), np.float16), np.zeros((0, 3), np.float32)], "s": "x", "n": None},
        "scalar": np.float32(2.0),
    }
    save_state(state, tmp_path / "a.safetensors")
    back = load_state(tmp_path / "a.safetensors")
    assert np.array_equal(back["model"]["w"], state["model"]["w"].numpy()) and back["model"]["i"].dtype == np.int64
    assert back["model"]["b"].tolist() == [True, False] and back["opt"]["m"][0].dtype == np.float16
    assert back["opt"]["m"][1].shape == (0, 3) and back["opt"] | {"m": None} == {**state["opt"], "m": None}
    assert back["scalar"] == 2.0
    with safe_open(str(tmp_path / "a.safetensors"), framework="numpy") as f:  # the library reads it
        assert sorted(f.keys()) == ["model/b", "model/i", "model/w", "opt/m/0", "opt/m/1"]
    # no reference cycle keeps a saved state's arrays alive until the next full garbage collection
    gc.collect()
    gc.disable()
    try:
        big = {"w": np.ones(1 << 20, np.float32)}
        save_state(big, tmp_path / "b.safetensors")
        assert gc.collect() == 0
    finally:
        gc.enable()


# -- issue 40: outputs replace nothing but regular files, and are written all or none ------------


def _node(kind: str, path: Path) -> Path:
    """A character device (as root: a node like /dev/null; else /dev/null itself), a FIFO or a
    symbolic link (to a file that must stay as it is) at ``path``."""
    import stat

    if kind == "a character device":
        try:
            os.mknod(path, stat.S_IFCHR | 0o666, os.makedev(1, 3))
        except PermissionError:
            return Path("/dev/null")
    elif kind == "a FIFO":
        os.mkfifo(path)
    else:
        (path.parent / "target.txt").write_text("kept")
        os.symlink(path.parent / "target.txt", path)
    return path


KINDS = ["a character device", "a FIFO", "a symbolic link"]


@pytest.mark.parametrize("kind", KINDS)
def test_the_atomic_writers_never_replace_anything_but_a_regular_file(tmp_path, kind):
    from palm.core.errors import ConfigError
    from palm.core.fsutil import atomic_dir, atomic_file, atomic_outputs

    path = _node(kind, tmp_path / "out")
    before = os.lstat(path)
    for write in (lambda: atomic_file(path), lambda: atomic_outputs().__enter__().open(path), lambda: atomic_dir(path)):
        with pytest.raises(ConfigError, match=f"{path}: {kind}, not a regular (file|folder); refusing to replace it"):
            with write():
                pass
    assert (os.lstat(path).st_mode, os.lstat(path).st_ino) == (before.st_mode, before.st_ino)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        p.name for p in tmp_path.iterdir() if ".tmp-" not in p.name
    )
    if kind == "a symbolic link":
        assert (tmp_path / "target.txt").read_text() == "kept"
    # a regular file and a missing path are written as ever
    for target in (tmp_path / "new.txt", tmp_path / "new.txt"):
        with atomic_file(target) as f:
            f.write("x")
        assert target.read_text() == "x"


@pytest.mark.parametrize("kind", KINDS)
def test_palm_predict_out_never_replaces_a_device_a_fifo_or_a_link_and_dash_is_standard_output(
    tmp_path, tiny_model, capsys, kind
):
    from palm.cli import main as palm_main

    path = _node(kind, tmp_path / "preds.csv")
    before = os.lstat(path)
    image = str(tiny_model.parent / "x.jpg")
    assert palm_main(["predict", image, "--model", str(tiny_model), "--quiet", "--out", str(path)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines == [
        f"error: {path}: {kind}, not a regular file; refusing to replace it (name a new path or a regular file)"
    ]
    assert (os.lstat(path).st_mode, os.lstat(path).st_ino) == (before.st_mode, before.st_ino)
    assert palm_main(["predict", image, "--model", str(tiny_model), "--quiet", "--out", "-"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("image,quality,probability,predicted") and "x.jpg" in out
    assert not (Path.cwd() / "-").exists()


def test_several_outputs_are_put_in_place_all_or_none(tmp_path, monkeypatch):
    """A rename that fails half-way through puts every previous output back."""
    from palm.core import fsutil

    (tmp_path / "a.txt").write_text("old a")
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "f").write_text("old f")
    real, calls = os.replace, []

    def replace(src, dst):
        calls.append(Path(dst).name)
        if Path(dst).name == "b.txt":
            raise OSError(5, "Input/output error", str(dst))
        return real(src, dst)

    monkeypatch.setattr(fsutil.os, "replace", replace)
    with pytest.raises(OSError):
        with fsutil.atomic_outputs() as out:
            with out.open(tmp_path / "a.txt") as f:
                f.write("new a")
            (out.dir(tmp_path / "d") / "f").write_text("new f")
            with out.open(tmp_path / "b.txt") as f:
                f.write("new b")
    assert "a.txt" in calls and "d" in calls  # a and d were in place when b failed
    assert (tmp_path / "a.txt").read_text() == "old a" and (tmp_path / "d" / "f").read_text() == "old f"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "d"]
    monkeypatch.setattr(fsutil.os, "replace", real)
    with fsutil.atomic_outputs() as out:
        with out.open(tmp_path / "a.txt") as f:
            f.write("new a")
        with out.open(tmp_path / "b.txt") as f:
            f.write("new b")
    assert [(tmp_path / n).read_text() for n in ("a.txt", "b.txt")] == ["new a", "new b"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "b.txt", "d"]


def test_evaluate_writes_its_three_outputs_all_or_none(tmp_path, monkeypatch):
    """predictions.csv, eval.json and the plots folder: a failure while the last is written
    leaves the previous three as they were (or none on a first run), never a mix."""
    import types

    from palm.evaluation import evaluate as ev

    monkeypatch.chdir(tmp_path)
    labels = (np.arange(30) % 3 == 0).astype(int)
    probs = np.clip(0.3 + 0.4 * labels + np.random.default_rng(0).normal(0, 0.2, 30), 0, 1).astype(np.float32)
    valid = types.SimpleNamespace(images=[f"V{i:04d}.jpg" for i in range(30)], labels=labels)
    monkeypatch.setattr(ev, "predict_valid", lambda *a, **k: (valid, probs, {"model": "lenet", "threshold": 0.5}))
    monkeypatch.setattr(ev, "threshold", lambda info: 0.5)

    def files():
        return {p.relative_to(tmp_path).as_posix(): p.read_bytes() for p in sorted(tmp_path.rglob("*")) if p.is_file()}

    real = ev.probability_histogram
    monkeypatch.setattr(ev, "probability_histogram", lambda *a: 1 / 0)  # the last thing evaluate writes
    with pytest.raises(ZeroDivisionError):
        ev.evaluate(n_boot=50, device="cpu")
    assert files() == {} and not list(tmp_path.rglob(".*"))  # first run: nothing at all
    monkeypatch.setattr(ev, "probability_histogram", real)
    ev.evaluate(n_boot=50, device="cpu")
    done = files()
    assert {
        "metrics/predictions.csv",
        "metrics/eval.json",
        "metrics/eval/plots/histogram.json",
        "metrics/eval/plots/sklearn/roc.json",
    } <= set(done)
    probs[:] = 1 - probs  # a run that would change every output
    monkeypatch.setattr(ev, "probability_histogram", lambda *a: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        ev.evaluate(n_boot=50, device="cpu")
    assert files() == done and not list(tmp_path.rglob(".*"))  # the previous three, as they were
