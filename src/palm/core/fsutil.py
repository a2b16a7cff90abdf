"""Atomic creation of output folders and files: a failed or interrupted run leaves nothing half-written.

Temporary names are ``.<target>.tmp-<pid>-<random>`` (and ``.<target>.old-<pid>`` while a folder is
swapped), beside the target. An exception, Ctrl-C or SIGTERM (see :func:`palm.core.config.run_stage`)
removes them on the way out; after a SIGKILL (or a power cut) :func:`remove_stale_temporaries`
removes those whose process is gone, at the start of the next stage.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from palm.core.errors import DataError, RunError


#: errors of a full disk: out of space, over quota, above the file size limit
_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def disk_error(exc: BaseException, target: str | Path) -> Exception | None:
    """A one-line :class:`~palm.core.errors.RunError` naming ``target`` for an error of a full disk
    (``exc`` an OSError with ENOSPC, EDQUOT or EFBIG, or numpy's "N requested and M written");
    None for any other error (which names its own file, or is not the disk's)."""
    if not isinstance(exc, OSError):
        return None
    short = exc.errno is None and "requested and" in str(exc) and "written" in str(exc)
    if exc.errno not in _FULL and not short:
        return None
    why = "the disk is full (a short write)" if short else (exc.strerror or str(exc))
    return RunError(f"cannot write {target}: {why}; free space on {Path(target).resolve().parent} "
                    "(df -h shows it), or move the project to a disk with room, then run the stage again")


@contextlib.contextmanager
def writing(target: str | Path) -> Iterator[None]:
    """Within the block, an error of a full disk becomes one line naming ``target`` (:func:`disk_error`)."""
    try:
        yield
    except OSError as exc:
        converted = disk_error(exc, target)
        if converted is None:
            raise
        raise converted from None


@contextlib.contextmanager
def atomic_dir(target: str | Path) -> Iterator[Path]:
    """Yield a fresh temporary folder beside ``target``; on success it replaces ``target``.

    On any exception (or interrupt) the temporary folder is removed and ``target``
    is left as it was.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-{os.getpid()}-", dir=target.parent))
    tmp.chmod(0o755)
    try:
        with writing(target):
            yield tmp
        if target.exists():
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def atomic_file(target: str | Path, mode: str = "w", *, fsync: bool = False, **kwargs) -> Iterator:
    """Open a temporary file beside ``target``; it replaces ``target`` only when the block succeeds.

    With ``fsync``, the data reach the disk before the rename (what must survive a power cut:
    weights, checkpoints); ``kwargs`` go to :func:`open`."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.tmp-{os.getpid()}-", dir=target.parent)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # as open() would create it (mkstemp makes it private to its owner)
    try:
        with writing(target), open(tmp, mode, **kwargs) as f:
            yield f
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def move(src: str | Path, dst: str | Path) -> Path:
    """Move the file ``src`` to ``dst``, also between filesystems (a ``checkpoints/`` on a shared
    or other disk): a rename when it can, else a copy beside ``dst`` renamed into place (``dst``
    is complete or absent) and then the removal of ``src``."""
    src, dst = Path(src), Path(dst)
    try:
        os.replace(src, dst)
        return dst
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
    with atomic_file(dst, "wb") as out, open(src, "rb") as f:
        shutil.copyfileobj(f, out, 1 << 20)
    shutil.copystat(src, dst)
    src.unlink()
    return dst


#: the folders that hold the pipeline's outputs (and so their temporary siblings)
OUTPUT_PARENTS = (".", "data", "data/labels", "metrics", "metrics/eval", "checkpoints")
_TEMPORARY = re.compile(r"^\..+\.(?:tmp|old)-(\d+)(?:-|$)")


def copy_at_most(src, dst, limit: int) -> int | None:
    """Copy the file object ``src`` to ``dst`` a megabyte at a time; the bytes copied, or None as
    soon as they would pass ``limit`` (``dst`` then holds a part, for the caller to discard)."""
    n = 0
    while chunk := src.read(1 << 20):
        n += len(chunk)
        if n > limit:
            return None
        dst.write(chunk)
    return n


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return pid != 0


def remove_stale_temporaries(parents=OUTPUT_PARENTS, root: str | Path = ".") -> list[Path]:
    """Remove the temporary files and folders of :func:`atomic_dir` / :func:`atomic_file` in
    ``parents`` (below ``root``) whose process no longer runs (killed); return what was removed."""
    removed = []
    for parent in parents:
        folder = Path(root) / parent
        if not folder.is_dir():
            continue
        for p in folder.iterdir():
            m = _TEMPORARY.match(p.name)
            if m and int(m.group(1)) != os.getpid() and not _alive(int(m.group(1))):
                original = folder / p.name[1:].rsplit(".old-", 1)[0] if ".old-" in p.name else None
                if original is not None and not original.exists():
                    os.replace(p, original)  # killed in the middle of the swap: the previous output is back
                    continue
                if p.is_dir() and not p.is_symlink():
                    shutil.rmtree(p, ignore_errors=True)
                else:
                    with contextlib.suppress(OSError):
                        p.unlink()
                removed.append(p)
    return removed


def read_json(path: Path) -> dict:
    """An earlier stage's JSON output (``metrics/eval.json``, ...): one-line errors naming the file
    when it is missing or not JSON."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"{path}: not found; run the earlier stages first (dvc repro)") from None
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: not valid JSON ({exc})") from None


def sha256_file(path: str | Path) -> str:
    """The SHA-256 of a file's bytes, in hex (read in 1 MiB blocks)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()
