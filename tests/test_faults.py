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

import pytest
import yaml

from conftest import ENV, REPO, jpeg_bytes, make_palm_zips, write_zip, xlsx_bytes
from palm.fsutil import remove_stale_temporaries

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
    params["train"].update({"epochs": 3, "batch_size": 4, "warmup_epochs": 0, "holdout": 0.25, "select": "best",
                            **train})
    (dest / "params.yaml").write_text(yaml.safe_dump(params))
    make_palm_zips(dest / "data" / "original", train=TRAIN, valid=VALID)
    return dest


def stage(name: str, cwd: Path, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, f"stages/{name}.py"], cwd=cwd, env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kwargs)


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
    return sorted(str(p.relative_to(root)) for pattern in TEMPORARY for p in root.rglob(pattern)
                  if ".git" not in p.parts)


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
        for k, sig in enumerate((signal.SIGKILL, signal.SIGTERM)):
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

    return pd.DataFrame({"ID": range(1, len(valid) + 1), "imgName": [n for n, _ in valid],
                         "Label": [l for _, l in valid], "Fovea_X": 1.0, "Fovea_Y": 2.0})


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


HOSTILE = ["zip bomb", "nested zip bomb", "zip slip", "overwrite across zips", "file and folder of one name",
           "not a zip", "corrupt deflate stream", "csv renamed xlsx", "spreadsheet without a Label column",
           "bad label value", "truncated training image"]


@pytest.fixture(scope="module")
def clean_project(tmp_path_factory):
    return project(tmp_path_factory.mktemp("bad") / "clean")


def one_error_line(proc) -> str:
    lines = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert len(lines) == 1, proc.stderr[-3000:]
    return lines[0]


@pytest.mark.parametrize("case", HOSTILE)
def test_hostile_data_is_one_error_line_with_exit_1_and_nothing_half_written(tmp_path, clean_project, case):
    root = tmp_path / "p"
    shutil.copytree(clean_project, root)
    target = hostile_input(root, case)
    for name in STAGES[:STAGES.index(target)]:
        assert run_stage(name, root).returncode == 0
    proc = run_stage(target, root)
    line = one_error_line(proc)
    assert proc.returncode == 1, (proc.returncode, line)
    assert not strays(root) and not (root.parent / "evil.jpg").exists()
    print(f"{case}: {proc.returncode} {line}")


@pytest.mark.parametrize("key,value,message", [
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
])
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
    from palm import config
    from palm.serve import predict
    from palm.errors import RunError

    def boom(*args, **kwargs):
        raise ZeroDivisionError("division by zero\nsecond line")

    (tmp_path / "x.jpg").write_bytes(jpeg_bytes(0))
    monkeypatch.setattr(predict.Predictor, "load", boom)
    assert cli.main(["predict", str(tmp_path / "x.jpg"), "--quiet"]) == 3
    err = capsys.readouterr().err
    assert err.strip() == ("error: internal error: ZeroDivisionError: division by zero "
                           "(PALM_DEBUG=1 shows the traceback)")
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

    from palm.fsutil import atomic_file

    with atomic_file(tmp_path / "a.json") as f:
        f.write("{}")
    with open(tmp_path / "b.json", "w") as f:
        f.write("{}")
    mode = lambda p: stat.S_IMODE(os.stat(p).st_mode)  # noqa: E731
    assert mode(tmp_path / "a.json") == mode(tmp_path / "b.json")


def test_the_atomic_writer_syncs_to_disk_only_when_asked(tmp_path, monkeypatch):
    """One atomic writer (palm.fsutil.atomic_file) for every file; fsync=True (weights, checkpoints)
    flushes the data to the disk before the rename, the others skip that cost."""
    from palm import fsutil

    synced = []
    monkeypatch.setattr(fsutil.os, "fsync", lambda fd: synced.append(fd))
    with fsutil.atomic_file(tmp_path / "a.bin", "wb") as f:
        f.write(b"a")
    assert synced == [] and (tmp_path / "a.bin").read_bytes() == b"a"
    with fsutil.atomic_file(tmp_path / "b.bin", "wb", fsync=True) as f:
        f.write(b"b")
    assert len(synced) == 1 and (tmp_path / "b.bin").read_bytes() == b"b"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.bin", "b.bin"]   # no temporary left
