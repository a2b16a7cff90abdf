"""palm.core.runtime: each run's share of the machine (PALM_JOBS) and its device."""

import os
import subprocess
import sys

import paddle
import pytest

from palm.core import runtime
from palm.core.errors import ConfigError
from palm.core.runtime import Share, select_device


@pytest.fixture
def fake_gpus(monkeypatch):
    """A CUDA build of Paddle with 4 GPUs, as far as select_device can tell."""
    chosen = []
    monkeypatch.setattr(runtime, "USER_THREADS", None)
    monkeypatch.setattr(paddle.device, "is_compiled_with_cuda", lambda: True)
    monkeypatch.setattr(paddle.device.cuda, "device_count", lambda: 4)
    monkeypatch.setattr(paddle, "set_device", chosen.append)
    monkeypatch.setattr(paddle.base.core, "set_num_threads", lambda n: chosen.append(f"threads={n}"))
    return chosen


def with_share(monkeypatch, share: Share) -> None:
    monkeypatch.setattr(runtime, "machine_share", lambda: share)


def test_each_queue_worker_takes_its_own_gpu_and_its_cores(monkeypatch, fake_gpus):
    with_share(monkeypatch, Share(slot=3, jobs=4, cpus=(6, 7)))
    assert select_device("auto") == "gpu:3"
    assert fake_gpus == ["threads=2", "gpu:3"]
    with_share(monkeypatch, Share(slot=5, jobs=6, cpus=(5,)))
    assert select_device("gpu") == "gpu:1"  # slot modulo the number of GPUs
    assert select_device("gpu:2") == "gpu:2"  # chosen by hand
    assert select_device("cpu") == "cpu"


def test_each_training_process_takes_its_own_gpu_and_its_part_of_the_cores(monkeypatch, fake_gpus):
    """train.nproc (or the launcher's --nproc_per_node) processes on one machine: process
    ``local_rank`` takes GPU ``local_rank % GPUs`` (after its run's PALM_JOBS slot) and its part
    of the run's cores as threads."""
    pinned = []
    monkeypatch.setattr(runtime.os, "sched_setaffinity", lambda pid, cpus: pinned.append(tuple(cpus)))
    with_share(monkeypatch, Share(slot=0, jobs=1, cpus=(0, 1, 2, 3)))
    assert [select_device("auto", r, 2) for r in range(2)] == ["gpu:0", "gpu:1"]
    assert fake_gpus == ["threads=2", "gpu:0", "threads=2", "gpu:1"] and pinned == [(0, 1), (2, 3)]
    assert [select_device("gpu", r, 8) for r in (3, 5)] == ["gpu:3", "gpu:1"]  # more processes than GPUs
    assert select_device("cpu", 1, 2) == "cpu" and pinned[-1] == (2, 3)
    with_share(monkeypatch, Share(slot=1, jobs=2, cpus=(2, 3)))  # the second of two queued runs
    assert [select_device("gpu", r, 2) for r in range(2)] == ["gpu:2", "gpu:3"]
    with pytest.raises(ConfigError, match="names one GPU, but 2 training processes"):
        select_device("gpu:1", 0, 2)


def test_spawned_training_processes_share_their_runs_slot(monkeypatch):
    """A rank spawned by a run under PALM_JOBS takes no slot of its own: it has its run's."""
    monkeypatch.setenv("PALM_JOBS", "4")
    monkeypatch.setenv(runtime.SLOT_ENV, "2/4")
    share = runtime.machine_share.__wrapped__()
    assert (share.slot, share.jobs, share.cpus) == (2, 4, tuple(sorted(os.sched_getaffinity(0))))
    assert runtime.rank_share(Share(0, 1, (0, 1, 2)), 1, 2).cpus == (1,)
    assert runtime.rank_share(Share(0, 1, (0,)), 1, 2).cpus == (0,)  # fewer cores than processes: shared


@pytest.mark.parametrize("device", ["tpu", "gpu:x", "gpu:9", "cuda"])
def test_unknown_or_missing_devices_are_one_clear_error(monkeypatch, fake_gpus, device):
    with_share(monkeypatch, Share(0, 1, (0,)))
    with pytest.raises(ConfigError, match="device"):
        select_device(device)


def test_without_a_gpu_asking_for_one_is_an_error_and_auto_is_the_cpu():
    assert select_device("auto") == "cpu"
    with pytest.raises(ConfigError, match="no usable GPU"):
        select_device("gpu")


def test_bad_palm_jobs_is_refused(monkeypatch):
    monkeypatch.setenv("PALM_JOBS", "two")
    with pytest.raises(ConfigError, match="PALM_JOBS"):
        runtime._jobs()


def test_two_processes_under_palm_jobs_2_take_two_slots_and_split_the_cores(tmp_path):
    code = (
        "import time; from palm.core.runtime import machine_share; s = machine_share(); "
        "print(s.slot, ','.join(map(str, s.cpus)), flush=True); time.sleep(3)"
    )
    env = {**os.environ, "PALM_JOBS": "2", "PALM_SLOT_DIR": str(tmp_path)}
    procs = [
        subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, text=True) for _ in range(2)
    ]
    outs = [p.communicate(timeout=60)[0].split() for p in procs]
    assert sorted(int(o[0]) for o in outs) == [0, 1]
    cores = [set(o[1].split(",")) for o in outs]
    n = len(os.sched_getaffinity(0))
    assert all(len(c) == max(1, n // 2) for c in cores)
    if n >= 2:
        assert not cores[0] & cores[1]


def test_stages_start_quietly():
    """Importing palm then Paddle, as every stage does, prints none of Paddle's start-up warnings."""
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            "import palm, paddle; from palm.core.runtime import select_device; "
            "select_device('cpu'); print(paddle.get_device())",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0 and proc.stdout.strip() == "cpu", proc.stderr
    assert "ccache" not in proc.stderr and "OMP_NUM_THREADS" not in proc.stderr, proc.stderr
