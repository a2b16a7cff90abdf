"""Atomic creation of output folders and files: a failed or interrupted run leaves nothing half-written.

Only a regular file (or a missing path) is ever replaced: an output named at a character
device, a FIFO, a socket or a symbolic link is refused (:func:`check_target`, one line, exit 2)
instead of being swapped for a regular file. :func:`atomic_outputs` writes several outputs all
or none.

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
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

from palm.core.errors import ConfigError, DataError, RunError

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
    return RunError(
        f"cannot write {target}: {why}; free space on {Path(target).resolve().parent} "
        "(df -h shows it), or move the project to a disk with room, then run the stage again"
    )


_KINDS = (
    (stat.S_ISLNK, "a symbolic link"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISFIFO, "a FIFO"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISDIR, "a folder"),
)


def kind_of(path: str | Path) -> str | None:
    """What ``path`` is when it is not a regular file (``"a FIFO"``, ``"a symbolic link"``...);
    None for a regular file or a missing path. Symbolic links are not followed."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return None
    except NotADirectoryError:
        return None  # a file in the path's way: the write itself will say so
    if stat.S_ISREG(mode):
        return None
    return next((name for test, name in _KINDS if test(mode)), "not a regular file")


def check_target(target: str | Path, folder: bool = False) -> None:
    """Refuse (:class:`ConfigError`, exit 2) to replace ``target`` unless it is missing or a regular
    file (``folder``: a real folder, not a symbolic link to one): writing an output must never
    swap a device, a FIFO or a symbolic link (and what it points to) for a regular file."""
    kind = kind_of(target)
    if folder and kind == "a folder":
        return
    if kind is not None:
        raise ConfigError(
            f"{target}: {kind}, not a regular {'folder' if folder else 'file'}; "
            "refusing to replace it (name a new path or a regular file)"
        )


def check_writable(target: str | Path) -> None:
    """Fail early (:class:`ConfigError`, exit 2) when ``target`` could not be written later: not a
    regular file, or in a folder that cannot be made or written. Leaves nothing behind."""
    target = Path(target)
    check_target(target)
    parent = target.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    why = None
    if not parent.is_dir():
        why = f"{parent} is not a folder"
    elif parent == target.parent:
        try:
            fd, probe = tempfile.mkstemp(prefix=f".{target.name}.tmp-{os.getpid()}-", dir=parent)
            os.close(fd)
            os.unlink(probe)
        except OSError as exc:
            why = exc.strerror or str(exc)
    elif not os.access(parent, os.W_OK | os.X_OK):
        why = f"{parent} is not writable"
    if why:
        raise ConfigError(f"{target}: cannot write there ({why})")


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
    is left as it was. A ``target`` that is a symbolic link, a device or a FIFO is refused.
    """
    target = Path(target)
    check_target(target, folder=True)
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


def _temporary_file(target: Path) -> Path:
    """An empty temporary file beside ``target``, with the permissions :func:`open` would give it."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.tmp-{os.getpid()}-", dir=target.parent)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # as open() would create it (mkstemp makes it private to its owner)
    return Path(tmp)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


class Outputs:
    """Several outputs staged beside their targets by :func:`atomic_outputs`, put in place together."""

    def __init__(self) -> None:
        self._staged: dict[Path, tuple[Path, bool]] = {}  # target -> (temporary, is a folder)

    @contextlib.contextmanager
    def open(self, target: str | Path, mode: str = "w", **kwargs) -> Iterator:
        """Write ``target``'s temporary (as :func:`atomic_file`); it replaces ``target`` with the others."""
        target = Path(target)
        check_target(target)
        tmp = self._staged[target][0] if target in self._staged else _temporary_file(target)
        self._staged[target] = (tmp, False)
        with writing(target), open(tmp, mode, **kwargs) as f:
            yield f

    def dir(self, target: str | Path) -> Path:
        """A fresh temporary folder that replaces the folder ``target`` with the others."""
        target = Path(target)
        check_target(target, folder=True)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-{os.getpid()}-", dir=target.parent))
        tmp.chmod(0o755)
        self._staged[target] = (tmp, True)
        return tmp

    def staged(self, target: str | Path) -> Path:
        """Where ``target``'s new content is until the outputs are put in place (to read it back)."""
        return self._staged[Path(target)][0]

    def _commit(self) -> None:
        for target, (_, folder) in self._staged.items():
            check_target(target, folder=folder)
        aside, placed = [], []
        try:
            for target in self._staged:
                if os.path.lexists(target):
                    old = target.with_name(f".{target.name}.old-{os.getpid()}")
                    os.replace(target, old)
                    aside.append((old, target))
            for target, (tmp, _) in self._staged.items():
                os.replace(tmp, target)
                placed.append(target)
        except BaseException:
            for target in placed:  # undo: the previous outputs back, every one of them
                _remove(target)
            for old, target in aside:
                os.replace(old, target)
            raise
        for old, _ in aside:
            _remove(old)

    def _discard(self) -> None:
        for tmp, _ in self._staged.values():
            _remove(tmp)


@contextlib.contextmanager
def atomic_outputs() -> Iterator[Outputs]:
    """Write several outputs all or none: each is staged beside its target (``outputs.open(target)``,
    ``outputs.dir(target)``) and, when the block succeeds, they all replace their targets together
    (the previous ones moved aside first and put back if any rename fails). On any exception the
    staged files are removed and every target is left as it was. A SIGKILL between the renames
    leaves ``.<name>.old-<pid>`` files that :func:`remove_stale_temporaries` puts back."""
    outputs = Outputs()
    try:
        yield outputs
        outputs._commit()
    except BaseException:
        outputs._discard()
        raise


@contextlib.contextmanager
def atomic_file(target: str | Path, mode: str = "w", *, fsync: bool = False, **kwargs) -> Iterator:
    """Open a temporary file beside ``target``; it replaces ``target`` only when the block succeeds.

    With ``fsync``, the data reach the disk before the rename (what must survive a power cut:
    weights, checkpoints); ``kwargs`` go to :func:`open`."""
    target = Path(target)
    check_target(target)
    tmp = _temporary_file(target)
    try:
        with writing(target), open(tmp, mode, **kwargs) as f:
            yield f
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        check_target(target)  # again: it may have been made a link or a FIFO meanwhile
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
