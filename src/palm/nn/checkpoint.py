"""The training checkpoints in ``checkpoints/`` (git-ignored scratch, not a DVC output).

``checkpoint.json`` is the manifest, written last (atomically): it names the weights files of
its epoch (``state-NNNN.safetensors``: network, optimizer, schedule, weight average;
``best-NNNN.safetensors``: the selected network), which are complete before it is written. A
kill at any instant leaves the previous manifest with its files, or the new one with its
files; files that no manifest names are removed at the next save or resume. A checkpoint
belongs to one run, named by its ``identity`` (configuration, data, code and library versions,
each by its hash: :func:`palm.training.train.run_identity`); a run of another identity does not
resume it but discards it, manifest first, and says in one line why. The manifest
records the SHA-256 of each weights file it names (``sha256``: {file name: digest}); a file that
no longer matches (truncated, changed) makes the checkpoint damaged: training starts afresh
(:func:`load`) and its selected network is never promoted to a model (:func:`damaged`).
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
from pathlib import Path

from palm.core.errors import DataError
from palm.core.fsutil import atomic_file, sha256_file
from palm.core.provenance import describe_paths, differing
from palm.nn.weights import load_state, save_state

MANIFEST = "checkpoint.json"


def load(ckpt_dir: Path, identity: dict, tidy: bool = True):
    """``(manifest, state)`` of the run ``identity`` in ``ckpt_dir``, or None (none, unreadable,
    another run: one line says why). ``tidy``: remove the files the manifest does not name (a
    reader that is not the writer, such as a training process other than rank 0, does not)."""
    meta_path = ckpt_dir / MANIFEST
    if not meta_path.is_file():
        return None
    try:
        meta = json.loads(meta_path.read_text())
    except ValueError:
        print(f"{meta_path} is unreadable: training from scratch")
        return None
    if not isinstance(meta, dict):
        print(f"{meta_path} is not a checkpoint manifest: training from scratch")
        return None
    why = mismatch(meta.get("identity"), identity) if "state_file" in meta else "is incomplete"
    if why:
        print(f"checkpoint {why}: training from scratch")
        return None
    damage = damaged(ckpt_dir, meta)
    if damage:
        print(f"checkpoint damaged ({damage}): training from scratch")
        return None
    if tidy:
        remove_unlisted(ckpt_dir, meta)
    try:
        return meta, load_state(ckpt_dir / meta["state_file"])
    except DataError as exc:
        print(f"checkpoint damaged ({exc}): training from scratch")
        return None


#: the keys of the manifest that name a weights file, and the form of those names
FILE_KEYS = ("state_file", "best_file")
_FILE_NAME = re.compile(r"^(state|best)-\d{4,}\.safetensors$")


def damaged(ckpt_dir: Path, meta: dict, keys=FILE_KEYS) -> str | None:
    """Why the weights files that ``meta`` names (``keys``) are not the ones it was written with
    (a name that is not a checkpoint's, a missing file, another SHA-256), or None when they are."""
    digests = meta.get("sha256")
    for key in keys:
        name = meta.get(key)
        if name is None and key == "best_file":
            continue
        if not isinstance(name, str) or not _FILE_NAME.match(name):
            return f"{MANIFEST}: {key} = {str(name)[:60]!r} is not a checkpoint file's name"
        path = ckpt_dir / name
        if not path.is_file():
            return f"{path}: missing"
        if not isinstance(digests, dict) or name not in digests:
            return f"{MANIFEST}: no sha256 of {name}"
        if sha256_file(path) != digests[name]:
            return f"{path}: its SHA-256 is not the one {MANIFEST} recorded (truncated or changed)"
    return None


def mismatch(saved, identity: dict) -> str | None:
    """Why a checkpoint of identity ``saved`` is not the run ``identity`` (None: it is), e.g.
    ``is from other code (src/palm/training/train.py)``."""
    if not isinstance(saved, dict):
        return "records no code or library versions (written by an older palm)"
    reasons = []
    if saved.get("code") != identity["code"]:
        reasons.append(f"other code ({describe_paths(differing(saved.get('code') or {}, identity['code']))})")
    if saved.get("versions") != identity["versions"]:
        old, new = saved.get("versions") or {}, identity["versions"]
        reasons.append(
            "other libraries (" + ", ".join(f"{k} {old.get(k)} -> {new.get(k)}" for k in differing(old, new)) + ")"
        )
    if saved.get("config") != identity["config"]:
        reasons.append("other parameters")
    if saved.get("data") != identity["data"]:
        reasons.append("other data")
    known = ("code", "versions", "config", "data")
    reasons += [f"other {key}" for key in differing(saved, identity) if key not in known]  # parts added later
    return "is from " + ", ".join(reasons) if reasons else None


def discard(ckpt_dir: Path) -> None:
    """Remove the checkpoint in ``ckpt_dir``: its manifest first (one atomic unlink: a kill
    afterwards leaves files that no manifest names, never a manifest without its files)."""
    with contextlib.suppress(FileNotFoundError, NotADirectoryError):
        (ckpt_dir / MANIFEST).unlink()
    shutil.rmtree(ckpt_dir, ignore_errors=True)


def save(ckpt_dir: Path, state: dict, meta: dict, best_state=None) -> dict:
    """Write the epoch ``meta["epoch"]``: ``state``, the selected network's ``best_state`` when
    it changed (else the previous one stays named), then the manifest; returns the manifest."""
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    old = {}
    with contextlib.suppress(FileNotFoundError, ValueError):
        old = json.loads((ckpt_dir / MANIFEST).read_text())
    epoch = int(meta["epoch"])
    meta = {**meta, "state_file": f"state-{epoch:04d}.safetensors"}
    save_state(state, ckpt_dir / meta["state_file"])
    digests = {meta["state_file"]: sha256_file(ckpt_dir / meta["state_file"])}
    if best_state is not None:
        meta["best_file"] = f"best-{epoch:04d}.safetensors"
        save_state(best_state, ckpt_dir / meta["best_file"])
        digests[meta["best_file"]] = sha256_file(ckpt_dir / meta["best_file"])
    else:
        meta["best_file"] = old.get("best_file")
        if meta["best_file"] in old.get("sha256", {}):
            digests[meta["best_file"]] = old["sha256"][meta["best_file"]]
    meta["sha256"] = digests
    with atomic_file(ckpt_dir / MANIFEST) as f:
        f.write(json.dumps(meta, indent=1))
    remove_unlisted(ckpt_dir, meta)
    return meta


def remove_unlisted(ckpt_dir: Path, meta: dict) -> None:
    """Remove the weights files (and temporary files) of ``ckpt_dir`` that ``meta`` does not name."""
    keep = {meta.get("state_file"), meta.get("best_file"), MANIFEST}
    for p in ckpt_dir.iterdir():
        if p.name not in keep and (
            p.suffix == ".safetensors" or p.name.startswith(".") or p.name.endswith((".tmp", ".pdckpt", ".pdparams"))
        ):
            with contextlib.suppress(OSError):
                p.unlink()
