"""The ``card`` stage: the model card of the run, as JSON and as text, written beside the weights.

``models_card/card.json`` (served by ``palm serve`` at ``/v1/model``) and ``models_card/card.md``
(the same for people) say what the model is for and not for, the data it was trained and
validated on (source, images per class and split), its validation metrics with their 95%
intervals, its threshold and where the threshold came from, what input it takes, the code
revision (git) and the ``dvc.lock`` of the run, and the SHA-256 of every file that decides an
answer (``model.json`` and the weights, in ``models/`` and ``models_export/``). ``palm predict``
and the service refuse a model folder with a file whose hash the card does not list
(:func:`palm.nn.card.open_model`).
"""

from __future__ import annotations

import hashlib
import json
import platform
import subprocess
from importlib import metadata
from pathlib import Path, PurePosixPath
from typing import Any

import pandas as pd
import yaml

from palm.core.errors import DataError
from palm.core.fsutil import atomic_dir, read_json, sha256_file
from palm.data.image import MAX_PIXELS
from palm.data.layout import IMAGE_SUFFIXES
from palm.evaluation.metrics import INTERVAL_KEYS
from palm.nn import modelinfo
from palm.nn.card import CARD_DIR, CARD_FILES, CARD_JSON, CARD_MD, SCHEMA, WEIGHT_FILES

NAME = "palm-pm-classifier"  # the model's name in dvc.yaml's artifacts: (the DVC model registry)

INTENDED_USE = (
    "A research screening aid: flags colour fundus photographs likely to show pathologic myopia (PM), "
    "for review by an eye-care professional."
)
NOT_FOR = [
    "diagnosis: it is not a medical device and has not been validated for clinical use; every positive or "
    "doubtful result needs an ophthalmologist",
    "photographs that are not colour fundus photographs, or that its quality check finds not gradable "
    "(too dark, overexposed, blurred, no circular fundus, too small): palm predict lists them without a diagnosis",
    "grading the severity of myopic maculopathy, or any other disease of the eye",
]
LIMITATIONS = [
    "single-source data: one collection (one population, one set of cameras); performance on other cameras, "
    "populations or image quality is unknown",
    "a small validation set: read the 95% intervals, not only the estimates",
    "the validation set's PM prevalence is far above a screening population's: the PPV a clinic would see is "
    "ppv_at_prevalence (at the assumed screening prevalence), not the raw precision",
]
SYNTHETIC_LIMIT = (
    "trained and validated on SYNTHETIC photographs drawn by a program (palm.data.synthetic): "
    "not medical data; these numbers say nothing about eyes"
)
METRIC_NAMES = INTERVAL_KEYS
OTHER_METRICS = (
    "ece",
    "loss",
    "sensitivity_at_specificity_90",
    "sensitivity_at_specificity_95",
    "specificity_at_sensitivity_90",
    "specificity_at_sensitivity_95",
)


def training_data(labels_csv: Path, params: dict) -> dict:
    """Where the photographs came from and how many there are per split and class."""
    data = params.get("data") or {}
    source, data_input = data.get("source", "palm"), str(data.get("input", "?"))
    synthetic = source == "palm" and "synthetic" in data_input
    if synthetic:
        what = "the synthetic PALM-like set drawn by palm.data.synthetic (not medical data)"
    elif source == "folder":
        what = f"the photographs and labels.csv of the folder {data_input}"
    else:
        what = (
            "the iChallenge-PM / PALM fundus photographs (PALM challenge, ISBI 2019; Baidu Research and the "
            f"Zhongshan Ophthalmic Center, Sun Yat-sen University), from {data_input}"
        )
    try:
        labels = pd.read_csv(labels_csv)
        counts = labels.groupby(["split", "label"]).size().unstack(fill_value=0)
    except FileNotFoundError:
        raise DataError(f"{labels_csv}: not found; run the earlier stages first (dvc repro)") from None
    except (KeyError, pd.errors.ParserError) as exc:
        raise DataError(f"{labels_csv}: not a labels file ({type(exc).__name__}: {exc})") from None
    per_split = {
        str(split): {"PM": int(row.get(1, 0)), "non_PM": int(row.get(0, 0)), "total": int(row.sum())}
        for split, row in counts.iterrows()
    }
    return {"source": source, "input": data_input, "synthetic": synthetic, "description": what, "counts": per_split}


def validation(metrics: dict) -> dict:
    """The validation metrics: each with its estimate and 95% interval where the evaluation gave one."""
    out = {}
    for key in METRIC_NAMES:
        if key in metrics:
            entry = {"estimate": metrics[key]}
            if f"{key}_ci_low" in metrics:
                entry["ci95"] = [metrics[f"{key}_ci_low"], metrics[f"{key}_ci_high"]]
            out[key] = entry
    return {
        "set": "valid",
        "n": metrics.get("n"),
        "n_pm": metrics.get("n_pm"),
        "prevalence_observed": metrics.get("prevalence_observed"),
        "screening_prevalence_assumed": metrics.get("prevalence"),
        "metrics": out,
        "other": {k: metrics[k] for k in OTHER_METRICS if k in metrics},
        "confusion": {k: metrics.get(k) for k in ("tp", "fp", "tn", "fn")},
        "ci_method": metrics.get("ci_method"),
    }


def _git(*args: str) -> str | None:
    try:
        proc = subprocess.run(["git", *args], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return proc.stdout.strip() if proc.returncode == 0 else None


def provenance(lock_file: Path = Path("dvc.lock")) -> dict:
    """The code revision and the ``dvc.lock`` of the run (as it stands when the card is written:
    every stage before this one already recorded)."""
    revision = _git("rev-parse", "HEAD")
    status = _git(
        "status",
        "--porcelain",
        "--untracked-files=no",
        "--",
        "src",
        "stages",
        "dvc.yaml",
        "params.yaml",
        "pyproject.toml",
    )
    lock: dict[str, Any] = {"file": str(lock_file), "sha256": None, "train": None}
    if lock_file.is_file():
        text = lock_file.read_bytes()
        lock["sha256"] = hashlib.sha256(text).hexdigest()
        try:
            stage = (yaml.safe_load(text) or {}).get("stages", {}).get("train") or {}
            lock["train"] = {
                "md5": hashlib.md5(json.dumps(stage, sort_keys=True).encode()).hexdigest(),
                "outs": {o["path"]: o.get("md5") for o in stage.get("outs", []) if "path" in o},
            }
        except (yaml.YAMLError, AttributeError, TypeError):
            pass
    versions = {"python": platform.python_version()}
    for dist in ("palm-pipeline", "paddlepaddle", "paddle2onnx", "onnxruntime", "dvc"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return {
        "git_revision": revision,
        "git_dirty": bool(status) if status is not None else None,
        "dvc_lock": lock,
        "versions": versions,
    }


def files(folders=(Path("models"), Path("models_export"))) -> list[dict]:
    """The SHA-256 and size of every file that decides an answer (:data:`palm.nn.card.CARD_FILES`:
    ``model.json`` and the weights) in ``folders``."""
    out: list[dict[str, Any]] = [
        {
            "path": (Path(d) / name).as_posix(),
            "sha256": sha256_file(Path(d) / name),
            "bytes": (Path(d) / name).stat().st_size,
        }
        for d in folders
        for name in CARD_FILES
        if (Path(d) / name).is_file()
    ]
    if not any(PurePosixPath(f["path"]).name in WEIGHT_FILES for f in out):
        raise DataError(
            f"no weights files ({', '.join(WEIGHT_FILES)}) in {', '.join(map(str, folders))}; "
            "train and export first (dvc repro)"
        )
    return out


def build_card(
    model_dir: Path,
    export_dir: Path,
    eval_json: Path,
    labels_csv: Path,
    params: dict,
    lock_file: Path = Path("dvc.lock"),
) -> dict:
    """The card as a dict (what ``card.json`` holds)."""
    info = modelinfo.read_info(model_dir)
    metrics = read_json(eval_json)
    data = training_data(labels_csv, params)
    size = modelinfo.input_size(info)
    limits = ([SYNTHETIC_LIMIT] if data["synthetic"] else []) + LIMITATIONS
    return {
        "schema": SCHEMA,
        "name": NAME,
        "description": "Pathologic myopia screening of colour fundus photographs (binary: PM / non-PM)",
        "intended_use": INTENDED_USE,
        "not_for": NOT_FOR,
        "limitations": limits,
        "model": {
            "network": info["model"],
            "image_size": int(info["image_size"]),
            "input_size": size,
            "selected_epoch": info.get("selected_epoch"),
            "epochs": info.get("epochs"),
            "training_config": info.get("config"),
        },
        "decision": {
            "threshold": modelinfo.threshold(info),
            "threshold_rule": str(info.get("threshold_rule", "")),
            "tta": modelinfo.tta(info),
            "rule": "PM if probability >= threshold, else non-PM; no diagnosis for a photograph "
            "whose quality check fails (unless asked: --grade-all)",
        },
        "input": {
            "what": "one colour fundus photograph per image, any size up to the pixel limit",
            "file_types": list(IMAGE_SUFFIXES),
            "max_pixels": MAX_PIXELS,
            "preprocessing": f"decoded to RGB by palm.data.image.load_image (the loader of training and "
            f"of palm predict), resized to {info['image_size']} x {info['image_size']} by area "
            "interpolation (aspect ratio not kept)"
            + enhancement(modelinfo.fundus(info))
            + (f", then to {size} x {size}" if size != int(info["image_size"]) else ""),
            **({"fundus": modelinfo.fundus(info).record()} if modelinfo.fundus(info) else {}),
            "tensor": {
                "name": "image",
                "shape": ["batch", 3, size, size],
                "dtype": "float32",
                "layout": "NCHW",
                "channels": "RGB",
                "scale": "pixel * 2 / 255 - 1 (in [-1, 1])",
            },
            "output": "the PM probability (sigmoid of the network's one logit"
            + (
                ""
                if modelinfo.tta(info) == "off"
                else f"; the mean over the {modelinfo.tta(info)} views of the photograph, test-time augmentation"
            )
            + ")",
        },
        "training_data": data,
        "validation": validation(metrics),
        "provenance": provenance(lock_file),
        "files": files((model_dir, export_dir)),
    }


def enhancement(spec) -> str:
    """The words of the preprocessing text for a model's fundus enhancement (none: nothing)."""
    steps = (
        (["cropped to the fundus disc"] if spec.crop else [])
        + (
            [
                f"locally colour-normalised (4 x (image - Gaussian blur of sigma {spec.local_norm:g} x side) + 128, "
                "grey outside the disc)"
            ]
            if spec.local_norm
            else []
        )
        + (
            [f"CLAHE on the {spec.clahe} channel" if spec.clahe == "green" else "CLAHE on luminance (L of CIELAB)"]
            if spec.clahe != "off"
            else []
        )
    )
    return f", then {', '.join(steps)} (palm.data.fundus.enhance, train.fundus)" if steps else ""


def recipe_text(config: dict | None) -> str:
    """The words for the training-recipe levers a model was trained with (train.label_smoothing,
    train.mix: in its training configuration only when on); none: nothing."""
    config = config or {}
    parts = ([f"label smoothing {config['label_smoothing']:g}"] if config.get("label_smoothing") else []) + (
        [f"{config['mix']} (alpha {config['mix_alpha']:g})"] if config.get("mix", "off") != "off" else []
    )
    return f"; trained with {', '.join(parts)}" if parts else ""


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.3f}"
    return "-" if value is None else str(value)


def card_markdown(card: dict) -> str:
    """The card as readable text (Markdown)."""
    m, d, v, p = card["model"], card["decision"], card["validation"], card["provenance"]
    lines = [
        f"# Model card: {card['name']} ({m['network']})",
        "",
        card["description"] + ".",
        "",
        "## Intended use",
        "",
        card["intended_use"],
        "",
        "Not for:",
        "",
    ]
    lines += [f"- {x}" for x in card["not_for"]] + ["", "## Limitations", ""]
    lines += [f"- {x}" for x in card["limitations"]]
    data = card["training_data"]
    lines += [
        "",
        "## Training data",
        "",
        f"Source: {data['description']} (data.source {data['source']}, data.input {data['input']}).",
        "",
        "| split | PM | non-PM | images |",
        "|---|---|---|---|",
    ]
    lines += [f"| {s} | {c['PM']} | {c['non_PM']} | {c['total']} |" for s, c in data["counts"].items()]
    lines += [
        "",
        "## Validation",
        "",
        f"{_fmt(v['n'])} images of the validation split, {_fmt(v['n_pm'])} with PM. Intervals: {v['ci_method']}.",
        "",
        "| metric | estimate | 95% interval |",
        "|---|---|---|",
    ]
    for key, e in v["metrics"].items():
        ci = e.get("ci95")
        interval = f"{_fmt(ci[0])} - {_fmt(ci[1])}" if ci and None not in ci else "n/a"
        lines.append(f"| {key} | {_fmt(e['estimate'])} | {interval} |")
    c = v["confusion"]
    lines += [
        "",
        f"Confusion (validation): {c['tp']} true positives, {c['fp']} false positives, {c['tn']} true "
        f"negatives, {c['fn']} false negatives.",
        "",
        "## Decision",
        "",
        f"Threshold {d['threshold']} (rule: {d['threshold_rule'] or 'fixed'}): {d['rule']}. "
        f"Test-time augmentation: {d.get('tta', 'off')}.",
        "",
        "## Input",
        "",
        f"{card['input']['what']}; files {', '.join(card['input']['file_types'])}, "
        f"at most {card['input']['max_pixels']:,} pixels.",
        "",
        card["input"]["preprocessing"] + ".",
        "",
        "Network input `{name}`: {dtype} {layout} {shape}, {channels}, {scale}; ".format(**card["input"]["tensor"])
        + f"output: {card['input']['output']}.",
        "",
        "## Provenance",
        "",
        f"- network: {m['network']}, input {m['input_size']} px, epoch "
        f"{_fmt(m['selected_epoch'])} of {_fmt(m['epochs'])}" + recipe_text(m.get("training_config")),
        f"- code revision: {p['git_revision']}" + (" (with uncommitted changes)" if p["git_dirty"] else ""),
        f"- dvc.lock sha256: {p['dvc_lock']['sha256']}",
        f"- versions: {', '.join(f'{k} {x}' for k, x in p['versions'].items())}",
        "",
        "## Files (SHA-256)",
        "",
        "palm predict and palm serve refuse a model folder with a file "
        "(model.json, the weights) whose hash is not listed here.",
        "",
        "| file | bytes | sha256 |",
        "|---|---|---|",
    ]
    lines += [f"| {w['path']} | {w['bytes']} | `{w['sha256']}` |" for w in card["files"]]
    return "\n".join(lines) + "\n"


def write_card(
    out_dir: Path = CARD_DIR,
    model_dir: Path = Path("models"),
    export_dir: Path = Path("models_export"),
    eval_json: Path = Path("metrics/eval.json"),
    labels_csv: Path = Path("data/labels/labels.csv"),
    params: dict | None = None,
    lock_file: Path = Path("dvc.lock"),
) -> Path:
    """``out_dir/card.json`` and ``out_dir/card.md``, appearing together or not at all."""
    card = build_card(
        Path(model_dir), Path(export_dir), Path(eval_json), Path(labels_csv), params or {}, Path(lock_file)
    )
    with atomic_dir(out_dir) as tmp:
        (tmp / CARD_JSON).write_text(json.dumps(card, indent=1), encoding="utf-8")
        (tmp / CARD_MD).write_text(card_markdown(card), encoding="utf-8")
    return Path(out_dir) / CARD_JSON


def main(params: dict) -> None:
    out = write_card(params=params)
    print(f"wrote the model card {out} and {out.with_name(CARD_MD)}")
