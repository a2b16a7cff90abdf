"""The training checkpoints in ``checkpoints/`` (git-ignored scratch, not a DVC output).

``checkpoint.json`` is the manifest, written last (atomically): it names the weights files of
its epoch (``state-NNNN.safetensors``: network, optimizer, schedule, weight average;
``best-NNNN.safetensors``: the selected network), which are complete before it is written. A
kill at any instant leaves the previous manifest with its files, or the new one with its
files; files that no manifest names are removed at the next save or resume. A checkpoint
belongs to one run, named by its ``fingerprint`` (configuration and data).
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

from palm.fsutil import atomic_file
from palm.nn.weights import load_state, save_state

MANIFEST = "checkpoint.json"


def load(ckpt_dir: Path, fingerprint: str, tidy: bool = True):
    """``(manifest, state)`` of the run ``fingerprint`` in ``ckpt_dir``, or None (none, unreadable, another run).
    ``tidy``: remove the files the manifest does not name (a reader that is not the writer, such
    as a training process other than rank 0, does not)."""
    meta_path = ckpt_dir / MANIFEST
    if not meta_path.is_file():
        return None
    try:
        meta = json.loads(meta_path.read_text())
    except ValueError:
        print(f"{meta_path} is unreadable: starting afresh")
        return None
    if meta.get("fingerprint") != fingerprint or "state_file" not in meta:
        print("checkpoint is from other parameters or data: starting afresh")
        return None
    if tidy:
        remove_unlisted(ckpt_dir, meta)
    return meta, load_state(ckpt_dir / meta["state_file"])


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
    if best_state is not None:
        meta["best_file"] = f"best-{epoch:04d}.safetensors"
        save_state(best_state, ckpt_dir / meta["best_file"])
    else:
        meta["best_file"] = old.get("best_file")
    with atomic_file(ckpt_dir / MANIFEST) as f:
        f.write(json.dumps(meta, indent=1))
    remove_unlisted(ckpt_dir, meta)
    return meta


def remove_unlisted(ckpt_dir: Path, meta: dict) -> None:
    """Remove the weights files (and temporary files) of ``ckpt_dir`` that ``meta`` does not name."""
    keep = {meta.get("state_file"), meta.get("best_file"), MANIFEST}
    for p in ckpt_dir.iterdir():
        if p.name not in keep and (p.suffix == ".safetensors" or p.name.startswith(".") or
                                   p.name.endswith((".tmp", ".pdckpt", ".pdparams"))):
            with contextlib.suppress(OSError):
                p.unlink()
