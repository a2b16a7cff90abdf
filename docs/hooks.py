"""MkDocs hook: the pages' tables and help texts that are generated from the code at each build.

A page asks for one with a marker line, replaced by this hook before Markdown is rendered:

    <!-- palm: params -->          params.yaml key by key: type and bounds from palm.core.params'
                                   schema, the default and comment from params.yaml
    <!-- palm: models -->          params.yaml's per-network overrides (models:)
    <!-- palm: stages -->          dvc.yaml's stages: inputs, parameters, outputs
    <!-- palm: dag -->             the stages' graph (an inline SVG), from dvc.yaml's deps and outs
    <!-- palm: help -->            `palm --help`; `<!-- palm: help predict -->` a subcommand's

An unknown marker fails the build. tests/test_docs.py uses the same functions.
"""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT / "src") not in sys.path:  # the worktree's palm, also without an editable install
    sys.path.insert(0, str(ROOT / "src"))

MARKER = re.compile(r"^<!-- palm: (\w+)(?: ([\w-]+))? -->$", re.MULTILINE)
CODE = ("src/", "stages/")


def _load(name: str) -> dict:
    return yaml.safe_load((ROOT / name).read_text(encoding="utf-8"))


# ---------------------------------------------------------------------------- params.yaml


def yaml_comments(text: str) -> dict[str, str]:
    """``a.b.c`` -> the comment at the end of that key's line in params.yaml (block structure by indent)."""
    comments, stack, last = {}, [], None  # stack of (indent, key); last: (key, column of its '#')
    for line in text.splitlines():
        m = re.match(r"^( *)([A-Za-z_][\w+-]*):(.*)$", line)
        if not m:
            c = re.match(r"^( *)# ?(.*)$", line)  # a comment continued on the next line, aligned
            if c and last and len(c.group(1)) == last[1]:
                comments[last[0]] += " " + c.group(2).strip()
            else:
                last = None
            continue
        last = None
        indent, key, rest = len(m.group(1)), m.group(2), m.group(3)
        while stack and stack[-1][0] >= indent:
            stack.pop()
        stack.append((indent, key))
        if "#" in rest:
            key = ".".join(k for _, k in stack)
            comments[key] = rest.split("#", 1)[1].strip()
            last = (key, line.index("#"))
    return comments


def _fmt(x) -> str:
    return f"{x:g}" if isinstance(x, float) else f"{x:,}" if isinstance(x, int) and abs(x) >= 10_000 else str(x)


def describe(prop: dict, defs: dict) -> str:
    """A JSON-schema property (pydantic's) as a short phrase: type and bounds."""
    from palm.core.params import parse_threshold

    variants = [p for p in prop.get("anyOf", [prop]) if p.get("type") != "null"]
    if len(variants) > 1:
        if {v.get("type") for v in variants} == {"number", "string"}:  # the threshold's grammar
            return parse_threshold.__doc__.split(": ", 1)[1].rstrip(".").replace("``", "`")
        return " or ".join(describe(v, defs) for v in variants)
    p = variants[0]
    if "enum" in p:
        return "one of " + ", ".join(f"`{v}`" for v in p["enum"])
    kind = {"integer": "whole number", "number": "number", "boolean": "`true` or `false`", "string": "text"}.get(
        p.get("type"), p.get("type", "any")
    )
    lo = (
        f"≥ {_fmt(p['minimum'])}"
        if "minimum" in p
        else f"> {_fmt(p['exclusiveMinimum'])}"
        if "exclusiveMinimum" in p
        else None
    )
    hi = (
        f"≤ {_fmt(p['maximum'])}"
        if "maximum" in p
        else f"< {_fmt(p['exclusiveMaximum'])}"
        if "exclusiveMaximum" in p
        else None
    )
    bounds = ", ".join(b for b in (lo, hi) if b)
    if "pattern" in p:
        bounds = f"matching `{p['pattern']}`"
    if p.get("minLength"):
        bounds = "not empty"
    return f"{kind} {bounds}".strip()


def _rows(model_defs: dict, name: str, prefix: str, values: dict, comments: dict, out: list) -> None:
    schema = model_defs[name]
    for key, prop in schema["properties"].items():
        path = f"{prefix}{key}"
        ref = prop.get("$ref") or next((p["$ref"] for p in prop.get("anyOf", []) if "$ref" in p), None)
        value = (values or {}).get(key)
        if ref and not ref.endswith("/ModelOverrides"):
            if comments.get(path):
                out.append((path, "section", "", comments[path]))
            _rows(model_defs, ref.rsplit("/", 1)[1], path + ".", value or {}, comments, out)
            continue
        if key == "models":
            out.append((path, "per network: any key of `train:`", "see below", comments.get(path, "")))
            continue
        shown = (
            "(absent)"
            if key not in (values or {})
            else f"`{json.dumps(value)}`"
            if not isinstance(value, str)
            else f"`{value}`"
        )
        if key not in (values or {}) and "default" in prop and prop["default"] is not None:
            shown = f"(absent: `{prop['default']}`)"
        out.append((path, describe(prop, model_defs), shown, comments.get(path, "")))


def params_rows() -> list[tuple[str, str, str, str]]:
    """(key, type and bounds, value in params.yaml, its comment) for every key of the schema."""
    from palm.core.params import Params

    schema = Params.model_json_schema()
    defs = {**schema["$defs"], "Params": schema}
    text = (ROOT / "params.yaml").read_text(encoding="utf-8")
    out: list = []
    _rows(defs, "Params", "", yaml.safe_load(text), yaml_comments(text), out)
    return out


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def params_table() -> str:
    lines = [
        "| key | type and bounds (palm.core.params) | in params.yaml | what it does (params.yaml's comment) |",
        "|---|---|---|---|",
    ]
    lines += [f"| `{k}` | {_cell(t)} | {_cell(v)} | {_cell(c)} |" for k, t, v, c in params_rows()]
    return "\n".join(lines)


def models_table() -> str:
    models = _load("params.yaml")["models"]
    lines = ["| network (`model`) | overrides of `train:` in params.yaml |", "|---|---|"]
    for name, over in models.items():
        lines.append(f"| `{name}` | " + ", ".join(f"`{k}: {json.dumps(v)}`" for k, v in (over or {}).items()) + " |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------- dvc.yaml


def _resolve(text: str, params: dict) -> str:
    def value(m):
        node = params
        for part in m.group(1).split("."):
            node = node[part]
        return str(node)

    return re.sub(r"\$\{([\w.]+)\}", value, text)


def _paths(entries) -> list[str]:
    """dvc.yaml's deps/outs/metrics/plots list: the paths (an entry may be a dict path -> options)."""
    return [next(iter(e)) if isinstance(e, dict) else e for e in entries or []]


def stages() -> dict[str, dict]:
    """name -> {inputs, code, params, outputs}, from dvc.yaml (templating resolved from params.yaml)."""
    dvc, params = _load("dvc.yaml"), _load("params.yaml")
    out = {}
    for name, stage in dvc["stages"].items():
        deps = [_resolve(d, params) for d in _paths(stage.get("deps"))]
        outs = [o for key in ("outs", "metrics", "plots") for o in _paths(stage.get(key))]
        out[name] = {
            "inputs": [d for d in deps if not d.startswith(CODE)],
            "code": [d for d in deps if d.startswith(CODE)],
            "params": [_resolve(p, params) if isinstance(p, str) else next(iter(p)) for p in stage.get("params") or []],
            "outputs": outs,
        }
    return out


def _inside(a: str, b: str) -> bool:
    a, b = a.rstrip("/"), b.rstrip("/")
    return a == b or a.startswith(b + "/") or b.startswith(a + "/")


def edges() -> list[tuple[str, str]]:
    st = stages()
    return [
        (a, b)
        for b, sb in st.items()
        for a, sa in st.items()
        if a != b and any(_inside(d, o) for d in sb["inputs"] for o in sa["outputs"])
    ]


def stages_table() -> str:
    lines = ["| stage | reads | parameters | writes |", "|---|---|---|---|"]
    for name, s in stages().items():
        code = f"{len(s['code'])} code paths"
        lines.append(
            f"| `{name}` | "
            + "<br>".join([f"`{d}`" for d in s["inputs"]] + [code])
            + " | "
            + "<br>".join(f"`{p}`" for p in s["params"])
            + " | "
            + "<br>".join(f"`{o}`" for o in s["outputs"])
            + " |"
        )
    return "\n".join(lines)


def levels() -> dict[str, int]:
    """Each stage's depth: the longest chain of stages before it."""
    es, depth = edges(), {}

    def d(name):
        if name not in depth:
            depth[name] = max((d(a) + 1 for a, b in es if b == name), default=0)
        return depth[name]

    return {name: d(name) for name in stages()}


def dag() -> str:
    """The stages' graph as an inline SVG (no script, nothing fetched): one row per depth, an
    arrow per dependency; an arrow that skips rows runs down a lane of its own on the right."""
    from html import escape

    lv, es = levels(), edges()
    w, h, pitch, gap, margin = 120, 30, 58, 150, 20
    rows: dict[int, list[str]] = {}
    for name, n in lv.items():
        rows.setdefault(n, []).append(name)
    width = max(len(r) for r in rows.values()) * gap + 120
    cx = width / 2 - 60
    pos = {
        name: (cx + (i - (len(r) - 1) / 2) * gap, margin + n * pitch)
        for n, r in rows.items()
        for i, name in enumerate(r)
    }
    right = max(x for x, _ in pos.values()) + w / 2
    parts = []
    long = sorted((e for e in es if lv[e[1]] - lv[e[0]] > 1), key=lambda e: (lv[e[1]] - lv[e[0]], lv[e[0]]))
    for a, b in es:
        (x1, y1), (x2, y2) = pos[a], pos[b]
        top = y2 - h / 2 - 2
        if (a, b) not in long:
            parts.append(f'<path d="M{x1},{y1 + h / 2} C{x1},{y1 + h / 2 + 18} {x2},{top - 16} {x2},{top}"/>')
        else:  # out to its own lane on the right, down, and into the target's top
            lane = right + 16 + 9 * long.index((a, b))
            parts.append(
                f'<path d="M{x1 + w / 2},{y1} Q{lane},{y1} {lane},{y1 + 14} L{lane},{top - 20} '
                f'Q{lane},{top - 8} {x2 + w / 4},{top}"/>'
            )
    right += 16 + 9 * len(long)
    boxes = [
        f'<g><rect x="{x - w / 2}" y="{y - h / 2}" width="{w}" height="{h}" rx="6"/>'
        f'<text x="{x}" y="{y + 5}">{escape(name)}</text></g>'
        for name, (x, y) in pos.items()
    ]
    height = margin * 2 + max(lv.values()) * pitch + h
    return (
        f'<svg class="palm-dag" role="img" aria-label="the stages of dvc.yaml and their dependencies" '
        f'viewBox="0 0 {right + 10:.0f} {height}" style="max-width:{right + 10:.0f}px;width:100%">'
        '<defs><marker id="palm-arrow" viewBox="0 0 10 10" refX="9" refY="5" markerWidth="7" markerHeight="7" '
        'orient="auto-start-reverse"><path d="M0,0 L10,5 L0,10 z" fill="currentColor"/></marker></defs>'
        '<g fill="none" stroke="currentColor" stroke-opacity="0.55" stroke-width="1.4" '
        'marker-end="url(#palm-arrow)">' + "".join(parts) + "</g>"
        '<g font-family="monospace" font-size="14" text-anchor="middle">' + "".join(boxes) + "</g></svg>"
    )


# ---------------------------------------------------------------------------- palm --help


def parsers() -> dict[str, argparse.ArgumentParser]:  # noqa: F821
    """'' -> `palm`'s parser, and each subcommand's name -> its parser."""
    import argparse

    from palm.cli import parser

    top = parser()
    sub = next(a for a in top._actions if isinstance(a, argparse._SubParsersAction))
    return {"": top, **sub.choices}


def help_text(command: str = "") -> str:
    os.environ["COLUMNS"] = "100"  # argparse wraps at the terminal's width: fixed, as the page is
    try:
        text = parsers()[command].format_help()
    finally:
        del os.environ["COLUMNS"]
    return f"```text\n$ palm {command + ' ' if command else ''}--help\n{text.rstrip()}\n```"


GENERATORS = {"params": params_table, "models": models_table, "stages": stages_table, "dag": dag, "help": help_text}


def expand(markdown: str, where: str = "") -> str:
    def one(m):
        name, arg = m.group(1), m.group(2)
        if name not in GENERATORS:
            raise ValueError(f"{where}: unknown generated block {m.group(0)!r}")
        return GENERATORS[name](arg) if arg is not None else GENERATORS[name]()

    return MARKER.sub(one, markdown)


def on_page_markdown(markdown, page, config, files):  # MkDocs' hook
    return expand(markdown, page.file.src_uri)
