"""What produced a result: the source files a stage runs, and the versions of the libraries
that decide its numbers. A cache (a training checkpoint, say) is reused only by a run whose
provenance is the same.

The source files are the stage's entry point (``stages/<stage>.py``) and its import closure
inside the ``palm`` package actually loaded, found by reading the imports of each file (at
module level or inside functions): the same set ``dvc.yaml`` lists as the stage's deps
(``tests/test_repo.py`` checks both).
"""

from __future__ import annotations

import ast
import hashlib
import importlib
from pathlib import Path

import palm

#: the folder that holds the ``palm`` package actually imported (``src/`` of a checkout)
PACKAGE_PARENT = Path(palm.__file__).resolve().parent.parent


def _palm_modules(path: Path) -> set[str]:
    """The ``palm`` modules (and names imported from them) a file imports."""
    found = set()
    for node in ast.walk(ast.parse(path.read_bytes(), filename=str(path))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "palm"}
        elif (
            isinstance(node, ast.ImportFrom)
            and node.level == 0
            and node.module is not None
            and node.module.split(".")[0] == "palm"
        ):
            found |= {node.module, *(f"{node.module}.{a.name}" for a in node.names)}
    return found


def _file_of(module: str) -> Path | None:
    base = PACKAGE_PARENT / module.replace(".", "/")
    return next((p for p in (base / "__init__.py", base.with_suffix(".py")) if p.is_file()), None)


def import_closure(entry: Path) -> list[Path]:
    """``entry`` and every file of the ``palm`` package that running it imports, transitively
    (the packages' ``__init__`` too), sorted."""
    seen, todo = set(), [Path(entry).resolve()]
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        for module in _palm_modules(path):
            parts = module.split(".")
            todo += [f for f in (_file_of(".".join(parts[:i])) for i in range(1, len(parts) + 1)) if f]
    return sorted(seen)


def _name(path: Path) -> str:
    """``path`` as it is keyed: relative to the working directory (``stages/train.py``,
    ``src/palm/...``) when inside it, else ``palm/...`` (an installed package)."""
    for root in (Path.cwd().resolve(), PACKAGE_PARENT):
        if path.is_relative_to(root):
            return path.relative_to(root).as_posix()
    return path.as_posix()


def source_hashes(entry: Path) -> dict[str, str]:
    """``{file: sha256}`` of ``entry`` (a stage's entry point, or a module) and its import closure."""
    return {_name(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in import_closure(entry)}


def library_versions(*modules: str) -> dict[str, str]:
    """``{module: version}`` of the libraries whose arithmetic decides a result (``paddle``, ``numpy``, ``cv2``...)."""
    return {name: importlib.import_module(name).__version__ for name in modules}


def producer(stage_entry: Path, module_file: str | Path, libraries: tuple[str, ...]) -> dict:
    """What produces a stage's result besides its inputs: ``{"code": {file: sha256}, "versions":
    {library: version}}``. The code is the stage's entry point (``stage_entry``, relative to the
    working directory, where DVC runs it) and its import closure; without that file (the library
    used on its own), the closure of ``module_file``."""
    entry = Path(stage_entry) if Path(stage_entry).is_file() else Path(module_file)
    return {"code": source_hashes(entry), "versions": library_versions(*libraries)}


def differing(old: dict, new: dict) -> list[str]:
    """The keys whose values differ between ``old`` and ``new`` (missing on either side included), sorted."""
    return sorted(k for k in {*old, *new} if old.get(k) != new.get(k))


def describe_paths(paths: list[str], limit: int = 3) -> str:
    """``a, b, c and 2 more``: a short list for a one-line message."""
    shown = ", ".join(paths[:limit])
    return shown + (f" and {len(paths) - limit} more" if len(paths) > limit else "")
