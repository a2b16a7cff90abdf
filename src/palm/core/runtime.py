"""Where a stage runs: its share of this machine's cores, and its device.

One run uses every core by default. Several runs at once (``dvc queue start -j N``) share the
machine when ``PALM_JOBS=N`` is exported before starting them: each process that runs a
network takes a free *slot* 0..N-1 (an exclusive lock file, held until it exits), is pinned
to its 1/N of the cores, and, on a machine with GPUs, takes GPU ``slot % number of GPUs``
when its device is ``auto`` or ``gpu``. ``OMP_NUM_THREADS``, when the user exports it,
still sets the thread count.

Nothing here imports Paddle at module level: ``palm/__init__.py`` imports this module before
anything loads Paddle, so that the user's ``OMP_NUM_THREADS`` is read before Paddle's start-up
overwrites it.
"""

from __future__ import annotations

import fcntl
import functools
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from palm.core.errors import ConfigError

JOBS_ENV = "PALM_JOBS"
SLOT_DIR_ENV = "PALM_SLOT_DIR"           # where the slot locks live (default: the system's temp dir)
SLOT_ENV = "PALM_SLOT"                   # "slot/jobs" a run hands the training processes it spawns
# The user's thread count, read before Paddle's import sets an unset one to "1" (when Paddle
# was imported first, a "1" may be Paddle's own and is not taken as the user's).
USER_THREADS = os.environ.get("OMP_NUM_THREADS")
if "paddle" in sys.modules and USER_THREADS == "1":
    USER_THREADS = None
_held_locks: list = []                   # open lock files: the slot is ours while they are open


@dataclass(frozen=True)
class Share:
    slot: int            # 0..jobs-1
    jobs: int            # how many runs share the machine (PALM_JOBS)
    cpus: tuple[int, ...]  # the cores this process may use

    @property
    def threads(self) -> int:
        if USER_THREADS and USER_THREADS.isdigit() and int(USER_THREADS) > 0:
            return int(USER_THREADS)
        return len(self.cpus)


def _jobs() -> int:
    raw = os.environ.get(JOBS_ENV, "1").strip() or "1"
    if not raw.isdigit() or int(raw) < 1:
        raise ConfigError(f"{JOBS_ENV} must be a whole number >= 1 (runs sharing this machine), got {raw!r}")
    return int(raw)


def _take_slot(jobs: int) -> int:
    """The first free slot of ``jobs`` (its lock stays held until the process exits)."""
    folder = Path(os.environ.get(SLOT_DIR_ENV) or tempfile.gettempdir()) / "palm-slots"
    folder.mkdir(parents=True, exist_ok=True)
    for slot in range(jobs):
        f = open(folder / f"slot-{slot}.lock", "w")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.close()
            continue
        _held_locks.append(f)
        return slot
    print(f"warning: more than {JOBS_ENV}={jobs} runs at once; sharing slot {os.getpid() % jobs}", file=sys.stderr)
    return os.getpid() % jobs


@functools.cache
def machine_share() -> Share:
    """This process's share of the machine (taken once; see the module's doc)."""
    jobs = _jobs()
    cpus = tuple(sorted(os.sched_getaffinity(0)))
    inherited = os.environ.get(SLOT_ENV, "")
    if inherited.count("/") == 1:  # a rank spawned by a run: its slot, its cores (the affinity is inherited)
        slot, jobs = (int(v) for v in inherited.split("/"))
        return Share(slot, jobs, cpus)
    if jobs == 1:
        return Share(0, 1, cpus)
    slot = _take_slot(jobs)
    per = max(1, len(cpus) // jobs)
    mine = cpus[(slot * per) % len(cpus):][:per]
    os.sched_setaffinity(0, mine)
    return Share(slot, jobs, mine)


def configured_device(params: dict) -> str:
    """The device of every stage that runs a network: ``train.device`` of params.yaml."""
    return str((params.get("train") or {}).get("device", "auto"))


def gpu_count() -> int:
    """The GPUs this Paddle can use (0 on its CPU build)."""
    import paddle

    return paddle.device.cuda.device_count() if paddle.device.is_compiled_with_cuda() else 0


def rank_share(share: Share, local_rank: int, local_size: int) -> Share:
    """The part of a run's ``share`` that one of its ``local_size`` training processes on this
    machine gets: an equal part of the cores (all of them, shared, when there are fewer cores
    than processes); ``OMP_NUM_THREADS`` exported by the user is taken per process."""
    if local_size <= 1:
        return share
    per = len(share.cpus) // local_size
    cpus = share.cpus[local_rank * per:(local_rank + 1) * per] if per else share.cpus
    return Share(share.slot, share.jobs, cpus)


def resolve_device(device: str = "auto", local_rank: int = 0, local_size: int = 1, share: Share | None = None) -> str:
    """The device ``device`` means for this process, without taking it (see :func:`select_device`)."""
    if device not in ("auto", "cpu", "gpu") and not (device.startswith("gpu:") and device[4:].isdigit()):
        raise ConfigError(f"device must be auto, cpu, gpu or gpu:N, got {device!r}")
    if local_size > 1 and ":" in device:
        raise ConfigError(f"device {device!r} names one GPU, but {local_size} training processes run on this "
                          "machine (train.nproc): set train.device to gpu or auto, one GPU per process")
    share = share or machine_share()
    n_gpus = gpu_count()
    if device == "auto":
        device = "gpu" if n_gpus else "cpu"
    if device.startswith("gpu"):
        if not n_gpus:
            raise ConfigError(f"device {device!r} asked for, but this Paddle has no usable GPU "
                            "(install Paddle's CUDA build, or set train.device: cpu)")
        index = int(device[4:]) if ":" in device else (share.slot * local_size + local_rank) % n_gpus
        if index >= n_gpus:
            raise ConfigError(f"device {device!r} asked for, but this machine has {n_gpus} GPU(s)")
        device = f"gpu:{index}"
    return device


def select_device(device: str = "auto", local_rank: int = 0, local_size: int = 1) -> str:
    """``auto``: a GPU when Paddle has CUDA and a GPU is present, else the CPU.

    ``gpu`` and ``auto`` take this run's GPU (``slot % GPUs``); ``gpu:N`` takes GPU N. A run
    of several training processes on this machine (``local_size``) gives process
    ``local_rank`` GPU ``(slot x local_size + local_rank) % GPUs`` and its part of the cores
    (:func:`rank_share`). On the CPU, Paddle gets the process's cores as threads.
    """
    import paddle

    device = resolve_device(device, local_rank, local_size)
    share = rank_share(machine_share(), local_rank, local_size)
    if share.cpus != machine_share().cpus:
        os.sched_setaffinity(0, share.cpus)
    paddle.base.core.set_num_threads(share.threads)
    paddle.set_device(device)
    if share.jobs > 1 or local_size > 1:
        who = [f"{JOBS_ENV}={share.jobs}: slot {share.slot}"] if share.jobs > 1 else []
        who += [f"process {local_rank + 1} of {local_size} on this machine"] if local_size > 1 else []
        print(f"{', '.join(who)}: {share.threads} thread(s) on cores {','.join(map(str, share.cpus))}, "
              f"device {device}", file=sys.stderr)
    return device


def available_memory() -> int | None:
    """Bytes this process may still use: the system's available memory (``MemAvailable``),
    or less under a cgroup (v2) limit; None when it cannot be read."""
    found = []
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                found.append(int(line.split()[1]) * 1024)
    except (OSError, ValueError, IndexError):
        pass
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit != "max":
            used = int(Path("/sys/fs/cgroup/memory.current").read_text())
            found.append(max(0, int(limit) - used))
    except (OSError, ValueError):
        pass
    return min(found) if found else None


def check_memory(need: int, what: str, advice: str, share: float = 0.8) -> None:
    """A :class:`ConfigError` before any work when ``need`` bytes is more than ``share`` of
    :func:`available_memory` (``what`` needs them; ``advice`` says what to lower)."""
    free = available_memory()
    if free is not None and need > share * free:
        raise ConfigError(f"{what} needs about {need / 2**30:.1f} GB of memory, more than the "
                          f"{free / 2**30:.1f} GB available; {advice}")
