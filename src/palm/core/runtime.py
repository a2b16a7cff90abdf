"""Where a stage runs: its share of this machine's cores, and its device.

One run uses every core by default. Several runs at once (``dvc queue start -j N``) share the
machine when ``PALM_JOBS=N`` is exported before starting them: each process that runs a
network takes a free *slot* 0..N-1 (an exclusive lock file, held until it exits), is pinned
to its 1/N of the cores, and, on a machine with GPUs, takes GPU ``slot % number of GPUs``
when its device is ``auto`` or ``gpu``. ``OMP_NUM_THREADS``, when the user exports it,
still sets the thread count.

Nothing here imports Paddle at module level: ``palm/__init__.py`` imports this module before
anything loads Paddle, so that the user's ``OMP_NUM_THREADS`` is read before Paddle's start-up
overwrites it, and calls :func:`pin_code_paths` before numpy, MKL or oneDNN load.

Fixed code paths (docs/reproducibility.md): numpy, OpenCV, MKL and oneDNN choose their code by
the CPU they find (SSE4, AVX2, AVX-512, FMA; Intel or AMD), and the paths round differently.
:data:`FIXED_CODE_ENV` and :func:`fixed_opencv` make them take one path on every x86-64 CPU.
"""

from __future__ import annotations

import fcntl
import functools
import math
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from palm.core.errors import ConfigError

JOBS_ENV = "PALM_JOBS"
SLOT_DIR_ENV = "PALM_SLOT_DIR"  # where the slot locks live (default: the system's temp dir)
SLOT_ENV = "PALM_SLOT"  # "slot/jobs" a run hands the training processes it spawns
# The user's thread count, read before Paddle's import sets an unset one to "1" (when Paddle
# was imported first, a "1" may be Paddle's own and is not taken as the user's).
USER_THREADS = os.environ.get("OMP_NUM_THREADS")
if "paddle" in sys.modules and USER_THREADS == "1":
    USER_THREADS = None
_held_locks: list = []  # open lock files: the slot is ours while they are open

#: What makes the numerical libraries take the same code on every x86-64 CPU, read when each
#: library loads (so set by palm/__init__.py before any of them does; a value the user exported
#: wins). Measured on an AVX-512 CPU, with the libraries' own switches imitating others:
#: docs/reproducibility.md.
FIXED_CODE_ENV = {
    # MKL (Paddle's sgemm: convolutions, matmuls): conditional numerical reproducibility, one code
    # path whatever the SIMD level and, STRICT, whatever the thread count. oneMKL guarantees it on
    # Intel CPUs; on AMD every MKL_CBWR value gives that one path too (measured).
    "MKL_CBWR": "COMPATIBLE,STRICT",
    # oneDNN (Paddle Inference's CPU engine, palm predict): its AVX2 kernels on every CPU that has
    # AVX2 (x86-64-v3: Intel since 2013, AMD since 2015), AVX-512 ones included; measured: the same
    # logits as its AVX-512 kernels, at 0.8x their speed, where SSE4.1 (every x86-64-v2 CPU) ran at
    # 0.2x. A CPU without AVX2 moves a logit by up to 2e-6 of its size (docs/reproducibility.md).
    "ONEDNN_MAX_CPU_ISA": "AVX2",
    # numpy: its x86-64-v2 baseline loops only; its AVX2 and AVX-512 loops of exp, log, tanh, power,
    # sin, cos... round differently from each other and from the baseline (measured).
    "NPY_DISABLE_CPU_FEATURES": "X86_V3 X86_V4 AVX512_ICL AVX512_SPR",
}


def pin_code_paths() -> None:
    """Set :data:`FIXED_CODE_ENV` (before numpy, MKL, oneDNN load; a user's value wins) and fix
    OpenCV's code path when OpenCV is already loaded (else :func:`fixed_opencv` does it on import)."""
    for key, value in FIXED_CODE_ENV.items():
        os.environ.setdefault(key, value)
    if "cv2" in sys.modules:
        fixed_opencv()


def fixed_opencv():
    """OpenCV (``cv2``) on its baseline code (SSE3) and without Intel IPP, process-wide.

    OpenCV picks SSE4/AVX/AVX2/AVX-512 versions of its functions, and IPP's, by the CPU it finds;
    their results differ in the last bits (blurs and resizes in float, warps). With optimisations
    off, every x86-64 CPU runs the same code. Every palm module that uses OpenCV imports it
    through here."""
    import cv2

    if cv2.useOptimized():
        cv2.setUseOptimized(False)
    return cv2


@dataclass(frozen=True)
class Share:
    slot: int  # 0..jobs-1
    jobs: int  # how many runs share the machine (PALM_JOBS)
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
    mine = cpus[(slot * per) % len(cpus) :][:per]
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
    cpus = share.cpus[local_rank * per : (local_rank + 1) * per] if per else share.cpus
    return Share(share.slot, share.jobs, cpus)


def resolve_device(device: str = "auto", local_rank: int = 0, local_size: int = 1, share: Share | None = None) -> str:
    """The device ``device`` means for this process, without taking it (see :func:`select_device`)."""
    if device not in ("auto", "cpu", "gpu") and not (device.startswith("gpu:") and device[4:].isdigit()):
        raise ConfigError(f"device must be auto, cpu, gpu or gpu:N, got {device!r}")
    if local_size > 1 and ":" in device:
        raise ConfigError(
            f"device {device!r} names one GPU, but {local_size} training processes run on this "
            "machine (train.nproc): set train.device to gpu or auto, one GPU per process"
        )
    share = share or machine_share()
    n_gpus = gpu_count()
    if device == "auto":
        device = "gpu" if n_gpus else "cpu"
    if device.startswith("gpu"):
        if not n_gpus:
            raise ConfigError(
                f"device {device!r} asked for, but this Paddle has no usable GPU "
                "(install Paddle's CUDA build, or set train.device: cpu)"
            )
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
        print(
            f"{', '.join(who)}: {share.threads} thread(s) on cores {','.join(map(str, share.cpus))}, device {device}",
            file=sys.stderr,
        )
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
        raise ConfigError(
            f"{what} needs about {need / 2**30:.1f} GB of memory, more than the "
            f"{free / 2**30:.1f} GB available; {advice}"
        )


# -- exact elementary functions -------------------------------------------------------------
# numpy's exp, sin, cos, power (its AVX2 and AVX-512 loops) and the C library's (its FMA
# variants; OpenCV's and Python's math call them) are chosen by the CPU and differ in the last
# bit; a last bit moved can move a pixel by one level. These use IEEE additions and
# multiplications only, which round the same on every CPU (numpy never fuses two operations).

_LN2 = 0.6931471805599453
_EXP_TERMS = [1.0 / math.factorial(k) for k in range(14)]  # |r| <= ln2/2: error < 1e-17
_COS_TERMS = [(-1.0) ** k / math.factorial(2 * k) for k in range(17)]  # |r| <= pi: error < 1e-19
_SIN_TERMS = [(-1.0) ** k / math.factorial(2 * k + 1) for k in range(17)]


def exact_exp(x):
    """e**x in float64 (an array, or a 0-d one), the same bits on every CPU (below e**-700: e**-700)."""
    import numpy as np

    x = np.maximum(np.asarray(x, np.float64), -700.0)
    n = np.floor(x / _LN2 + 0.5)
    r = x - n * _LN2
    p = np.full_like(r, _EXP_TERMS[-1])
    for c in reversed(_EXP_TERMS[:-1]):
        p = p * r + c
    return np.ldexp(p, n.astype(np.int32))  # times 2**n: exact (no rounding above 2**-1022)


def exact_cos_sin(t):
    """(cos t, sin t) in float64 (arrays, or 0-d ones), the same bits on every CPU."""
    import numpy as np

    t = np.asarray(t, np.float64)
    r = t - np.floor(t / (2 * math.pi) + 0.5) * (2 * math.pi)  # in [-pi, pi]
    r2 = r * r
    c, s = np.full_like(r, _COS_TERMS[-1]), np.full_like(r, _SIN_TERMS[-1])
    for a, b in zip(reversed(_COS_TERMS[:-1]), reversed(_SIN_TERMS[:-1])):
        c, s = c * r2 + a, s * r2 + b
    return c, s * r
