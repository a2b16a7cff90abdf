"""Train and score several models (and seeds) with the pipeline, then print a results table.

Each (model, seed) is one DVC experiment, ``dvc exp run -S model=M -S train.seed=S``, with
every other parameter from params.yaml (the per-model defaults under ``models:``). After
each run the row is read from the pipeline's own files: ``metrics/eval.json`` (validation
metrics, computed from the saved predictions), ``metrics/train/metrics.json`` (training
seconds, selected epoch) and ``models/model.json`` (input size). The rows are written to
``--out`` as JSON and printed as a Markdown table: one line per run, with the 95% interval
of each metric in brackets (``eval.json``'s ``ci_method``; rows recorded before the
intervals existed show the estimate only), and per model the mean and the spread (min..max)
over the seeds.

Run it from the repository's top folder, e.g. on the real data in data/original:

    python scripts/compare_models.py --input data/original --seeds 0 1
    python scripts/compare_models.py --table-only      # the table of an earlier --out file
    python scripts/compare_models.py --table-only --out results/palm-mini.json --readme results/README.md

Each run is a named experiment, ``<model>-seed<seed>`` (a rerun replaces the experiment of the
same name), so ``palm compare`` reads its committed predictions afterwards and tests the
differences on the paired images, per seed and per group of seeds, e.g.:

    palm compare --baseline senet18-seed0 --html metrics/compare.html

``--readme FILE`` (results/README.md) writes the table into FILE between the lines ``<!-- results table -->``
and ``<!-- end of results table -->``, so results/README.md shows exactly the rows of the file.

The rows of ``--out`` are checked as they are read: a metric outside [0, 1], NaN, a negative seed
or time, a missing key is one line naming the run and the key, exit 1 (bad usage: exit 2).
"""

from __future__ import annotations

import argparse
import json
import math
import re
import subprocess
import sys
from pathlib import Path

from palm.core.errors import DataError, PalmError, report
from palm.core.fsutil import atomic_file, check_target, check_writable
from palm.nn.modelinfo import input_size, read_info
from palm.nn.models import model_names

MODELS = model_names()  # every registered network, in the registry's order
COLUMNS = ("accuracy", "auc", "sensitivity", "specificity")


def check_row(r, where: str) -> dict:
    """One run of ``--out``, refused (:class:`DataError`) when a key is missing or a number is
    impossible: a metric or interval end outside [0, 1] (or NaN), a negative seed or time."""
    if not isinstance(r, dict):
        raise DataError(f"{where}: not a run (an object with model, seed and the metrics)")
    missing = {"model", "seed", "input_size", "epochs", "train_seconds", *COLUMNS} - set(r)
    if missing:
        raise DataError(f"{where}: no {', '.join(sorted(missing))}")

    def number(key, low, high=math.inf, whole=False, optional=False):
        v = r.get(key)
        if v is None and optional:
            return
        ok = isinstance(v, int) if whole else isinstance(v, (int, float))
        if isinstance(v, bool) or not ok or not (math.isfinite(v) and low <= v <= high):
            kind = "a whole number" if whole else "a number"
            raise DataError(f"{where}: {key} = {v!r}, must be {kind} in [{low}, {high}]".replace(", inf]", ", ...]"))

    if not isinstance(r["model"], str) or not r["model"]:
        raise DataError(f"{where}: model = {r['model']!r}, must be a network's name")
    number("seed", 0, whole=True)
    number("input_size", 1, whole=True)
    number("epochs", 1, whole=True)
    number("train_seconds", 0)
    for key in COLUMNS:
        number(key, 0, 1)
        for end in ("low", "high"):
            number(f"{key}_ci_{end}", 0, 1, optional=True)
    return r


def read_rows(out: Path) -> list[dict]:
    """The runs recorded in ``out`` (none when it does not exist), each checked."""
    if not out.is_file():
        return []
    try:
        rows = json.loads(out.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise DataError(f"{out}: not a results file ({exc})") from None
    if not isinstance(rows, list):
        raise DataError(f"{out}: not a list of runs")
    return [check_row(r, f"{out}: run {i + 1}") for i, r in enumerate(rows)]


def seed_number(text: str) -> int:
    """argparse type: a seed, a whole number >= 0."""
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"must be a whole number >= 0, got {text!r}")
    return int(text)


def require_branch(cwd: str | Path = ".") -> None:
    """Refuse to start on a detached HEAD: a ``dvc exp run`` that is killed can leave HEAD
    detached at the baseline, and commits made after that land on no branch."""
    if subprocess.run(["git", "symbolic-ref", "-q", "HEAD"], cwd=cwd, capture_output=True).returncode:
        raise SystemExit(
            "git HEAD is detached (an interrupted `dvc exp run`?): "
            "`git checkout <your branch>` first, then run the comparison"
        )


def exp_name(model: str, seed: int) -> str:
    """The experiment's name, which ``palm compare`` takes as a revision."""
    return f"{model}-seed{seed}"


def run_one(model: str, seed: int, data_input: str | None, extra: list[str]) -> dict:
    name = exp_name(model, seed)
    # a rerun replaces the experiment of this name (dvc exp run refuses a name that exists)
    subprocess.run(["dvc", "exp", "remove", name], capture_output=True)
    cmd = ["dvc", "exp", "run", "-n", name, "-S", f"model={model}", "-S", f"train.seed={seed}"]
    if data_input:
        cmd += ["-S", f"data.input={data_input}"]
    for item in extra:
        cmd += ["-S", item]
    print("$ " + " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)
    ev = json.loads(Path("metrics/eval.json").read_text())
    tr = json.loads(Path("metrics/train/metrics.json").read_text())
    info = read_info("models")
    return {
        "model": model,
        "seed": seed,
        "exp": name,
        "input_size": input_size(info),
        "epochs": info["epochs"],
        "selected_epoch": tr["selected_epoch"],
        "train_seconds": tr["train_seconds"],
        "n_valid": ev["n"],
        **{k: ev[k] for k in COLUMNS},
        **{f"{k}_ci_{end}": ev.get(f"{k}_ci_{end}") for k in COLUMNS for end in ("low", "high")},
    }


def cell(r: dict, key: str) -> str:
    """A run's metric, with its 95% interval when the row has one: ``0.929 [0.869, 0.970]``."""
    low, high = r.get(f"{key}_ci_low"), r.get(f"{key}_ci_high")
    return f"{r[key]:.3f}" + (f" [{low:.3f}, {high:.3f}]" if low is not None and high is not None else "")


def table(rows: list[dict]) -> str:
    order = {m: i for i, m in enumerate(MODELS)}  # runs in the order of MODELS, then seed
    rows = sorted(rows, key=lambda r: (order.get(r["model"], len(order)), r["model"], r["seed"]))
    out = [
        "| model | px | epochs | seed | accuracy | AUC | sensitivity | specificity | train time |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        out.append(
            f"| {r['model']} | {r['input_size']} | {r['epochs']} | {r['seed']} | {cell(r, 'accuracy')} | "
            f"{cell(r, 'auc')} | {cell(r, 'sensitivity')} | {cell(r, 'specificity')} | "
            f"{r['train_seconds'] / 60:.1f} min |"
        )
    out += [
        "",
        "| model | seeds | accuracy mean (min..max) | AUC mean (min..max) | sensitivity mean | "
        "specificity mean | train time mean |",
        "|---|---|---|---|---|---|---|",
    ]
    for model in dict.fromkeys(r["model"] for r in rows):
        rs = [r for r in rows if r["model"] == model]

        def spread(key, rs=rs):
            v = [r[key] for r in rs]
            return f"{sum(v) / len(v):.3f} ({min(v):.3f}..{max(v):.3f})"

        minutes = sum(r["train_seconds"] for r in rs) / len(rs) / 60
        mean = {k: sum(r[k] for r in rs) / len(rs) for k in ("sensitivity", "specificity")}
        out.append(
            f"| {model} | {len(rs)} | {spread('accuracy')} | {spread('auc')} | {mean['sensitivity']:.3f} | "
            f"{mean['specificity']:.3f} | {minutes:.1f} min |"
        )
    return "\n".join(out)


BEGIN, END = "<!-- results table -->", "<!-- end of results table -->"


def write_into(path: Path, text: str) -> None:
    """Replace what stands between the two marker lines of ``path`` with ``text``."""
    doc = path.read_text(encoding="utf-8")
    pattern = re.compile(re.escape(BEGIN) + r"\n.*?" + re.escape(END), re.S)
    if not pattern.search(doc):
        raise SystemExit(f"{path}: no '{BEGIN}' ... '{END}' lines to write the table between")
    with atomic_file(path, encoding="utf-8") as f:
        f.write(pattern.sub(lambda _: f"{BEGIN}\n{text}\n{END}", doc))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=MODELS)
    ap.add_argument("--seeds", nargs="+", type=seed_number, default=[0, 1])
    ap.add_argument("--input", "--zips-dir", dest="input", help="data.input for these runs (e.g. data/original)")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="more -S parameters for every run")
    ap.add_argument("--out", default="metrics/compare.json")
    ap.add_argument("--table-only", action="store_true", help="print the table of --out, run nothing")
    ap.add_argument("--readme", type=Path, help="also write the table into this file, between its marker lines")
    args = ap.parse_args(argv)
    out = Path(args.out)
    try:
        rows = read_rows(out)
        if not args.table_only:  # before the first run, not after it
            check_writable(out)
        if args.readme:
            check_target(args.readme)
    except PalmError as exc:
        return report(exc)
    if not args.table_only:
        require_branch()
        rows = [r for r in rows if not (r["model"] in args.models and r["seed"] in args.seeds)]
        for model in args.models:
            for seed in args.seeds:
                try:
                    rows.append(run_one(model, seed, args.input, args.set))
                except subprocess.CalledProcessError as exc:
                    print(f"{model} seed {seed} failed ({exc}); the table has the other runs", file=sys.stderr)
                    continue
                with atomic_file(out) as f:  # after every run: an interrupted comparison keeps its rows
                    json.dump(rows, f, indent=1)
    text = table(rows)
    print(text)
    if not args.table_only and rows:
        print(f"\npaired tests of these experiments: palm compare --baseline {rows[0].get('exp', 'HEAD')}")
    if args.readme:
        write_into(args.readme, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
