"""Data-parallel training on Paddle's own machinery (``train.nproc``).

- ``train.nproc: N`` > 1: :func:`spawn` starts N ranks on this machine with
  ``paddle.distributed.spawn`` (gloo on the CPU, NCCL on GPUs), runs the training function in
  each and turns a rank's failure into this process's error and exit status.
- Several machines: ``python -m paddle.distributed.launch --master IP:PORT --nnodes M
  --nproc_per_node N stages/train.py`` on each; every process is then already a rank
  (:func:`launched`) and trains as one.

Each rank sees its share of every global batch (:class:`palm.data.dataset.RankBatchSampler`); the
gradients are averaged by ``paddle.DataParallel``; only rank 0 writes anything.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import sys
import warnings
from dataclasses import dataclass

from palm.core.errors import ConfigError, PalmError, RunError, report
from palm.core.runtime import SLOT_ENV, machine_share


@dataclass(frozen=True)
class Rank:
    """Where this process stands in a distributed job (a lone process: rank 0 of 1)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    local_size: int = 1

    @property
    def writer(self) -> bool:
        """Only rank 0 writes checkpoints, metrics and ``models/``."""
        return self.rank == 0


def current() -> Rank:
    """This process's rank, from the variables that Paddle's launcher and ``spawn`` set."""
    env = os.environ
    size = int(env.get("PADDLE_TRAINERS_NUM", "1") or 1)
    if size <= 1:
        return Rank()
    rank = int(env.get("PADDLE_TRAINER_ID", "0") or 0)
    # spawn runs on one machine and sets no local rank: there, local = global
    return Rank(rank, size, int(env.get("PADDLE_LOCAL_RANK", rank)), int(env.get("PADDLE_LOCAL_SIZE", size)))


def launched() -> bool:
    """True in a rank that ``paddle.distributed.launch`` (or ``spawn``) started."""
    return current().size > 1


def check_batch(batch_size: int, nranks: int) -> int:
    """The per-rank batch: ``train.batch_size`` is the global batch, split evenly among the ranks."""
    if batch_size % nranks:
        raise ConfigError(
            f"train.batch_size = {batch_size}: the global batch must divide evenly among "
            f"{nranks} processes (train.nproc x machines)"
        )
    return batch_size // nranks


def init() -> None:
    """Join the job's process group (gloo on the CPU, NCCL on GPUs)."""
    import paddle.distributed as dist

    dist.init_parallel_env()


def all_reduce_sum(values: list[float]) -> list[float]:
    """``values`` summed over the ranks (float64, so that sums of losses stay exact enough)."""
    import paddle
    import paddle.distributed as dist

    t = paddle.to_tensor(values, dtype="float64")
    dist.all_reduce(t)
    return [float(v) for v in t.numpy()]


def same_everywhere(value: int, what: str) -> None:
    """Refuse to go on unless every rank has ``value`` (e.g. the epoch it resumes from)."""
    import paddle
    import paddle.distributed as dist

    hi = paddle.to_tensor([value], dtype="int64")
    lo = paddle.to_tensor([-value], dtype="int64")
    dist.all_reduce(hi, op=dist.ReduceOp.MAX)
    dist.all_reduce(lo, op=dist.ReduceOp.MAX)
    if int(hi.numpy()[0]) != -int(lo.numpy()[0]):
        raise RunError(
            f"the ranks disagree on {what} ({-int(lo.numpy()[0])} to {int(hi.numpy()[0])}); on several "
            "machines checkpoints/ must be one shared folder"
        )


def _die_with(parent: int) -> None:
    """End this process when ``parent`` ends, however it ends (SIGKILL included): no orphan rank
    goes on training and writing (Linux's parent-death signal)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:  # it ended before the line above
        os._exit(1)


def _rank_main(parent: int, fn, args):
    """A spawned rank: ``fn(*args)``; a palm error is printed as one line and becomes the rank's
    exit status, which :func:`spawn` passes on."""
    _die_with(parent)
    try:
        return fn(*args)
    except PalmError as exc:
        sys.stdout.flush()
        sys.exit(report(exc))


def spawn(fn, args: tuple, nprocs: int, gpu: bool):
    """``fn(*args)`` in ``nprocs`` ranks on this machine; returns rank 0's result.

    A rank that fails stops the others; its error (printed by the rank) is raised here with
    its exit status. The ranks end with this process, whatever ends it.
    """
    import paddle.distributed as dist

    share = machine_share()
    os.environ[SLOT_ENV] = f"{share.slot}/{share.jobs}"  # the ranks share this run's slot and cores
    with warnings.catch_warnings():  # "trained under CPUONLY mode by using GLOO": as asked
        warnings.filterwarnings("ignore", message="Your model will be trained under CPUONLY mode")
        ctx = dist.spawn(
            _rank_main, args=(os.getpid(), fn, args), nprocs=nprocs, join=False, backend="nccl" if gpu else "gloo"
        )
    try:
        while True:
            try:
                if ctx.join():
                    break
            except Exception as exc:  # noqa: BLE001 - a rank failed: Paddle has stopped the others
                codes = [p.exitcode for p in ctx.processes]
                bad = next((c for c in codes if c not in (0, None)), 1)
                text = str(exc).strip().splitlines()  # a traceback (not a palm error): its last line
                err = RunError(
                    f"a training process failed (exit status {bad}): "
                    + (text[-1] if len(text) > 1 else "its error is above")
                )
                err.exit_code = bad if bad > 0 else err.exit_code
                raise err from None
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.terminate()
            p.join()
    return ctx.return_queues[0].get() if not ctx.return_queues[0].empty() else None
