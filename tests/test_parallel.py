"""Data-parallel training (``train.nproc``): two CPU processes through paddle.distributed.spawn
(gloo) against one process, a killed two-process run resumed, and only rank 0 writing.

The two-process runs are the train stage itself (``python stages/train.py`` in a scratch
project), with a ``sitecustomize`` on PYTHONPATH that records every file a rank opens for
writing, creates, renames or removes, and can kill rank 0 (SIGKILL) as it starts a given file.
"""

import contextlib
import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest
import yaml

from conftest import REPO, make_shards
from palm.nn.weights import load_state

TRAIN = [f"P{i:04d}.jpg" for i in range(8)] + [f"N{i:04d}.jpg" for i in range(6)] + ["H0001.jpg", "H0002.jpg"]
# LeNet has neither batch norm nor dropout: one process and two see the same arithmetic
TINY = {
    "epochs": 3,
    "batch_size": 4,
    "holdout": 0.25,
    "lr": 0.01,
    "warmup_epochs": 0,
    "select": "last",
    "ema": 0.0,
    "to_static": False,
    "augment": {"hflip": True, "rotate_deg": 10, "brightness": 0.1},
    "device": "cpu",
}
TOLERANCE = 1e-4  # max abs difference of weights and metrics, one process against two

SITECUSTOMIZE = """
import os, signal, sys
_log = os.open(os.environ["PALM_TEST_WRITES"], os.O_WRONLY | os.O_APPEND | os.O_CREAT)
_root = os.path.realpath(os.getcwd())
_kill_at = os.environ.get("PALM_TEST_KILL_AT")
_WRITE = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND

def _hook(event, args):
    rank = os.environ.get("PADDLE_TRAINER_ID")
    if rank is None or not args or not isinstance(args[0], (str, bytes, os.PathLike)):
        return
    if event == "open":
        mode, flags = args[1], args[2]
        if not ((isinstance(mode, str) and any(c in mode for c in "wax+")) or (flags or 0) & _WRITE):
            return
    elif event not in ("tempfile.mkstemp", "os.mkdir", "os.remove", "os.rename", "os.rmdir", "shutil.rmtree",
                       "shutil.copyfile"):
        return
    path = os.path.realpath(os.fsdecode(args[0]))
    if not path.startswith(_root + os.sep):
        return
    os.write(_log, f"{rank} {event} {os.path.relpath(path, _root)}\\n".encode())
    if _kill_at and rank == "0" and _kill_at in path:
        os.kill(os.getpid(), signal.SIGKILL)

sys.addaudithook(_hook)
"""


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return make_shards(tmp_path_factory.mktemp("data"), TRAIN)


def project(folder, shards, **train):
    """A scratch project: params.yaml (LeNet at 32 px, ``TINY`` and ``train``), data/shards."""
    with open(REPO / "params.yaml", encoding="utf-8") as f:
        params = yaml.safe_load(f)
    params.update(model="lenet", image_size=32)
    params["train"].update({**TINY, **train})
    (folder / "data").mkdir(parents=True)
    (folder / "data" / "shards").symlink_to(shards)
    (folder / "params.yaml").write_text(yaml.safe_dump(params))
    (folder / "hooks").mkdir()
    (folder / "hooks" / "sitecustomize.py").write_text(SITECUSTOMIZE)
    return params


def stage(folder, kill_at=None):
    """``python stages/train.py`` in ``folder``; returns (process, seconds, the ranks' writes)."""
    writes = folder.parent / f"{folder.name}-writes.txt"
    writes.unlink(missing_ok=True)
    env = {**os.environ, "PYTHONPATH": str(folder / "hooks"), "PALM_TEST_WRITES": str(writes)}
    env.pop("PALM_TEST_KILL_AT", None)
    if kill_at:
        env["PALM_TEST_KILL_AT"] = kill_at
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, str(REPO / "stages" / "train.py")],
        cwd=folder,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    seconds = time.perf_counter() - t0
    lines = writes.read_text().splitlines() if writes.exists() else []
    return proc, seconds, [line.split(" ", 2) for line in lines]


def history(folder):
    return json.loads((folder / "checkpoints" / "checkpoint.json").read_text())["history"]


def strip_times(h):
    return [{k: v for k, v in r.items() if k != "epoch_seconds"} for r in h]


def max_difference(h1, h2):
    return max(abs(a[k] - b[k]) for a, b in zip(h1, h2, strict=True) for k in a if k != "epoch_seconds")


def test_two_processes_train_as_one_and_resume_after_a_kill(tmp_path, shards, monkeypatch):
    from palm.training.train import Trainer

    # one process, the same global batch
    one = tmp_path / "one"
    params = project(one, shards, nproc=1)
    monkeypatch.chdir(one)
    t0 = time.perf_counter()
    Trainer(params, one / "data" / "shards").run(one / "models", one / "checkpoints", one / "live")
    t_one = time.perf_counter() - t0
    monkeypatch.chdir(tmp_path)

    # two processes, uninterrupted
    two = tmp_path / "two"
    project(two, shards, nproc=2)
    proc, t_two, writes = stage(two)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "2 processes of 2 images per batch" in proc.stdout

    # the same weights and metrics
    w1 = load_state(one / "models" / "model.safetensors")
    w2 = load_state(two / "models" / "model.safetensors")
    assert set(w1) == set(w2)
    weight_diff = max(float(np.abs(w1[k] - w2[k]).max()) for k in w1)
    metric_diff = max_difference(history(one), history(two))
    print(
        f"\none process {t_one:.1f}s, two processes {t_two:.1f}s (stage, start-up included); "
        f"max |weight difference| {weight_diff:.2e}, max |metric difference| {metric_diff:.2e}"
    )
    assert weight_diff < TOLERANCE and metric_diff < TOLERANCE
    assert len(history(two)) == 3

    # only rank 0 wrote, and it wrote what a run writes
    assert {w[0] for w in writes} == {"0"}, [w for w in writes if w[0] != "0"]
    tops = {w[2].split(os.sep)[0] for w in writes}  # models/ is written as .models.tmp-*, then renamed
    assert {"checkpoints", "metrics"} <= tops and all(
        t in ("checkpoints", "metrics") or t.startswith(".models.tmp-") for t in tops
    ), tops
    assert not (two / "log").exists()

    # killed (SIGKILL of rank 0 as it starts writing epoch 2's checkpoint), then run again
    killed = tmp_path / "killed"
    project(killed, shards, nproc=2)
    proc, _, _ = stage(killed, kill_at=".state-0002.safetensors")
    assert proc.returncode != 0
    assert json.loads((killed / "checkpoints" / "checkpoint.json").read_text())["epoch"] == 1
    assert not (killed / "models").exists()
    proc, _, writes = stage(killed)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "resuming from the checkpoint of epoch 1" in proc.stdout
    assert {w[0] for w in writes} == {"0"}
    assert strip_times(history(killed)) == strip_times(history(two))
    lines = (killed / "metrics" / "train" / "plots" / "metrics" / "train_loss.tsv").read_text().splitlines()
    assert len(lines) == 1 + 3


def test_each_rank_takes_its_part_of_the_global_batches_of_one_process(shards):
    """The batches of N ranks, put side by side, are the batches of one process, epoch by epoch."""
    from palm.data.dataset import FundusDataset, load_split, make_loader

    ds = FundusDataset(load_split(shards, "train"), seed=3)
    for drop_last, batch in ((True, 6), (False, 16), (True, 4)):
        one = make_loader(ds, batch, shuffle=True, seed=3, drop_last=drop_last).batch_sampler
        ranks = [
            make_loader(ds, batch, shuffle=True, seed=3, drop_last=drop_last, rank=r, nranks=2).batch_sampler
            for r in range(2)
        ]
        for epoch in range(3):
            ds.set_epoch(epoch)
            parts = [list(r) for r in ranks]
            assert [a + b for a, b in zip(*parts, strict=True)] == list(one)
            assert all(len(r) == len(one) for r in ranks)
            assert all(len(a) == len(b) for a, b in zip(*parts))


def test_the_global_batch_must_divide_among_the_processes_and_their_count_is_part_of_the_run(shards):
    from conftest import train_section
    from palm.core.errors import ConfigError
    from palm.training.train import effective_config, fingerprint

    p = {"model": "lenet", "image_size": 32, "train": train_section(batch_size=6, nproc=4)}
    with pytest.raises(ConfigError, match="train.batch_size = 6: the global batch must divide evenly among 4"):
        effective_config(p)
    three = effective_config({**p, "train": {**p["train"], "nproc": 3}})
    assert three.nproc == 3
    # another process count is another run: its checkpoint is not resumed
    assert fingerprint(three, shards) != fingerprint(three.model_copy(update={"nproc": 2}), shards)
    with pytest.raises(ConfigError, match="train.nproc = 0"):
        effective_config({**p, "train": {**p["train"], "nproc": 0}})


def test_under_paddles_launcher_the_process_is_a_rank_of_its_job(monkeypatch):
    """``python -m paddle.distributed.launch --nnodes 2 --nproc_per_node 2``: rank 3 of 4, the
    second process of its machine; the launcher's count replaces train.nproc (and the fingerprint)."""
    from conftest import train_section
    from palm.core.errors import ConfigError
    from palm.training import parallel
    from palm.training.train import effective_config

    assert parallel.current() == parallel.Rank(0, 1, 0, 1) and not parallel.launched()
    for key, value in {
        "PADDLE_TRAINERS_NUM": "4",
        "PADDLE_TRAINER_ID": "3",
        "PADDLE_LOCAL_RANK": "1",
        "PADDLE_LOCAL_SIZE": "2",
    }.items():
        monkeypatch.setenv(key, value)
    rank = parallel.current()
    assert rank == parallel.Rank(3, 4, 1, 2) and parallel.launched() and not rank.writer
    p = {"model": "lenet", "image_size": 32, "train": train_section(batch_size=8, nproc=1)}
    assert effective_config(p).nproc == 4
    with pytest.raises(ConfigError, match="among 4 processes"):
        effective_config({**p, "train": {**p["train"], "batch_size": 6}})


@pytest.mark.filterwarnings("ignore:AmpScaler can only be enabled")  # on the CPU build; a GPU uses it
@pytest.mark.parametrize(
    "amp,device,expected",
    [
        ("auto", "gpu:1", ("float16", True)),
        ("fp16", "cpu", ("float16", True)),
        ("bf16", "gpu:0", ("bfloat16", False)),
        ("auto", "cpu", None),
        ("off", "gpu:0", None),
    ],
)
def test_mixed_precision_is_fp16_with_a_loss_scaler_on_gpus_and_off_on_the_cpu(monkeypatch, amp, device, expected):
    """``Trainer._amp``: the autocast each step runs under, and the loss scaler (fp16 only)."""
    import paddle

    from conftest import train_section
    from palm.training.train import Trainer, effective_config

    trainer = object.__new__(Trainer)
    trainer.cfg = effective_config({"model": "lenet", "image_size": 32, "train": train_section(amp=amp)})
    monkeypatch.setattr(paddle.amp, "auto_cast", lambda **kw: kw)  # what the context would be made of
    ctx, scaler, mode = trainer._amp(device)
    if expected is None:
        assert mode == "off" and scaler is None and ctx is contextlib.nullcontext
        return
    dtype, scaled = expected
    assert ctx() == {"level": "O1", "dtype": dtype} and mode == {"float16": "fp16", "bfloat16": "bf16"}[dtype]
    assert isinstance(scaler, paddle.amp.GradScaler) if scaled else scaler is None
