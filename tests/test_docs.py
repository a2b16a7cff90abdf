"""The documentation stays true: every command shown in the README and the site's pages (docs/*.md)
still exists, with its options, stages, parameters and files; the generated blocks expand; the
API reference covers every module; the README stays a five-minute read.

Commands are read from the pages' code blocks (indented or fenced) and checked against the code:
`palm ...` against palm.cli's argparse parser, `dvc ...` against DVC's own parser, `dvc repro
STAGE` and `dvc plots diff --targets` against dvc.yaml, every `-S key=value` (dvc) and
`--set key=value` (scripts) against params.yaml and its schema (palm.core.params, with the value),
`python scripts/X.py --flag` against that script's add_argument calls, and every path of the
repository's code (stages/, scripts/, benchmarks/, tests/, src/) must exist. Fast: nothing runs.
"""

from __future__ import annotations

import ast
import copy
import functools
import re
import shlex
import sys
from pathlib import Path

import pytest
import yaml

from conftest import REPO

sys.path.insert(0, str(REPO / "docs"))
import hooks  # noqa: E402  (docs/hooks.py: the site's generated blocks)

README_LIMIT = 8000
PAGES = sorted((REPO / "docs").glob("**/*.md"))
COMMANDS = ("palm", "dvc", "python", "pytest", "pip", "git", "curl", "mkdir", "cp", "mkdocs", "for")
SEPARATORS = {";", "&&", "||", "|", "&"}
PARAMS_SECTIONS = ("train", "models", "data", "unzip", "synthetic", "preprocess", "evaluate", "explain")


def code_lines(text: str) -> list[str]:
    """The lines of a Markdown text's code blocks (fenced, or indented by 4 after a blank line),
    except Mermaid and plain-text blocks."""
    lines, out = text.splitlines(), []
    fence, indented, prev_blank = None, False, True
    for line in lines:
        stripped = line.strip()
        if fence is not None:
            if stripped.startswith("```"):
                fence = None
            elif fence not in ("mermaid", "text"):
                out.append(line)
            continue
        if stripped.startswith("```"):
            fence = stripped[3:].strip()
            continue
        if line.startswith("    ") and (prev_blank or indented) and not line.startswith("     " * 2):
            indented = True
            out.append(line[4:])
        elif stripped:
            indented = False
        prev_blank = not stripped
    return out


def expand_loops(line: str) -> list[str]:
    """``for m in a b; do CMD $m; done; REST`` -> CMD a, CMD b, REST."""
    m = re.search(r"for (\w+) in ([^;]+); do (.*?); done", line)
    if not m:
        return [line]
    var, values, body = m.group(1), m.group(2).split(), m.group(3)
    bodies = [re.sub(rf"\${var}\b", v, body) for v in values]
    rest = line[: m.start()] + line[m.end() :]
    return [x for b in bodies for x in expand_loops(b)] + [x for x in expand_loops(rest) if x.strip(" ;")]


def commands(text: str) -> list[list[str]]:
    """Every command of the code blocks, as argument lists (comments dropped, ``&&``/``;``/``|`` split)."""
    found = []
    for line in code_lines(text):
        if not line.strip() or line.split()[0] not in COMMANDS:
            continue
        for part in expand_loops(line):
            lex = shlex.shlex(part, posix=True, punctuation_chars=";&|")
            lex.whitespace_split, lex.commenters = True, "#"
            words, current = list(lex), []
            for w in words + [";"]:
                if w in SEPARATORS:
                    if current:
                        found.append(current)
                    current = []
                else:
                    current.append(w)
    return found


def script_options(path: Path) -> set[str]:
    """The option strings of a script's ``add_argument`` calls (read, not run)."""
    opts = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "add_argument":
            opts |= {a.value for a in node.args if isinstance(a, ast.Constant) and str(a.value).startswith("-")}
    return opts | {"-h", "--help"}


def set_params(params: dict, assignment: str, where: str) -> list[str]:
    """Apply ``key=value`` (dvc's ``-S``, with ``+`` for a new key) to ``params``; problems found."""
    assignment = assignment.strip("'\"")
    new = assignment.startswith("+")
    key, _, value = assignment.lstrip("+").partition("=")
    node, parts = params, key.split(".")
    for part in parts[:-1]:
        if not isinstance(node.get(part), dict):
            if not new:
                return [f"{where}: -S {assignment}: {key} is not in params.yaml (a new key takes dvc's +)"]
            node[part] = {}
        node = node[part]
    if parts[-1] not in node and not new:
        return [f"{where}: -S {assignment}: {key} is not in params.yaml (a new key takes dvc's +)"]
    node[parts[-1]] = yaml.safe_load(value) if value and "$" not in value else node.get(parts[-1])
    return []


def check_params(params: dict, where: str) -> list[str]:
    from palm.core.errors import ConfigError
    from palm.core.params import training_config, validate

    try:
        training_config(validate(params, source=where), source=where)
    except ConfigError as exc:
        return [str(exc)]
    return []


@functools.cache
def dvc_parser():
    from dvc.cli.parser import get_main_parser

    return get_main_parser()


def parses(parser, args: list[str]) -> str | None:
    """None if ``parser`` accepts ``args``, else argparse's complaint."""
    import contextlib
    import io

    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            parser.parse_args(args)
    except SystemExit as exc:
        return None if exc.code == 0 else err.getvalue().strip().splitlines()[-1]
    except Exception as exc:  # noqa: BLE001 - DVC's parser raises its own error, after printing the reason
        lines = err.getvalue().strip().splitlines()
        return lines[-1] if lines else f"{type(exc).__name__}: {exc}"
    return None


def problems(text: str, where: str) -> list[str]:
    """What no longer exists among the commands of ``text``."""
    base = yaml.safe_load((REPO / "params.yaml").read_text())
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    plots = {p for s in stages.values() for key in ("plots", "outs", "metrics") for p in hooks._paths(s.get(key))}
    palm = hooks.parsers()[""]
    out = []
    for cmd in commands(text):
        shown = " ".join(cmd)
        for word in cmd:  # the repository's own code the command runs
            if re.match(r"^(stages|scripts|benchmarks|tests|src)/[\w./-]+$", word) and not (REPO / word).exists():
                out.append(f"{where}: `{shown}`: {word} does not exist")
        if cmd[0] == "palm":
            if (err := parses(palm, cmd[1:])) is not None:
                out.append(f"{where}: `{shown}`: {err}")
        elif cmd[0] == "dvc":
            if (err := parses(dvc_parser(), cmd[1:])) is not None:
                out.append(f"{where}: `{shown}`: {err}")
            if cmd[1:2] == ["repro"]:
                out += [
                    f"{where}: `{shown}`: no stage {w!r} in dvc.yaml"
                    for w in cmd[2:]
                    if not w.startswith("-") and w not in stages
                ]
            if cmd[1:3] == ["plots", "diff"] and "--targets" in cmd:
                target = cmd[cmd.index("--targets") + 1]
                if target not in plots:
                    out.append(f"{where}: `{shown}`: {target} is not a plot of dvc.yaml")
            sets = [cmd[i + 1] for i, w in enumerate(cmd[:-1]) if w in ("-S", "--set-param")]
            if sets:
                params = copy.deepcopy(base)
                for s in sets:
                    out += set_params(params, s, f"{where}: `{shown}`")
                out += check_params(params, f"{where}: `{shown}`")
        elif cmd[0] == "python" and len(cmd) > 1 and cmd[1].startswith("scripts/") and (REPO / cmd[1]).is_file():
            known = script_options(REPO / cmd[1])
            out += [
                f"{where}: `{shown}`: {cmd[1]} has no option {w}"
                for w in cmd[2:]
                if w.startswith("--") and w.split("=")[0] not in known
            ]
            if "--set" in cmd:
                params = copy.deepcopy(base)
                i = cmd.index("--set") + 1
                while i < len(cmd) and "=" in cmd[i] and not cmd[i].startswith("-"):
                    out += set_params(params, "+" + cmd[i], f"{where}: `{shown}`")
                    i += 1
                out += check_params(params, f"{where}: `{shown}`")
    return out


def param_key_problems(text: str, where: str) -> list[str]:
    """Inline ``train.xxx``-style mentions of params.yaml keys that the schema does not have."""
    from palm.core.params import MODEL_NAMES, Params

    schema = Params.model_json_schema()
    defs = schema["$defs"]

    def known(parts: list[str]) -> bool:
        node = schema
        for i, part in enumerate(parts):
            if node is None:
                return False
            props = node.get("properties", {})
            if node is schema and part == "models":
                if i + 1 < len(parts) and (parts[i + 1] in MODEL_NAMES or parts[i + 1] == "<name>"):
                    return known(["train", *parts[i + 2 :]]) if i + 2 < len(parts) else True
                return i + 1 == len(parts)
            if part not in props:
                return False
            prop = props[part]
            ref = prop.get("$ref") or next((p["$ref"] for p in prop.get("anyOf", []) if "$ref" in p), None)
            node = defs[ref.rsplit("/", 1)[1]] if ref else None
        return True

    out = []
    for code in re.findall(r"`([^`\n]+)`", text):
        key = code.strip().lstrip("+").split("=")[0].split(":")[0].strip()
        if re.fullmatch(r"({})\.[\w<>.]+".format("|".join(PARAMS_SECTIONS)), key) and not known(key.split(".")):
            out.append(f"{where}: `{code}`: {key} is not a key of params.yaml's schema")
    return out


def sources():
    return [REPO / "README.md", *PAGES]


@pytest.mark.parametrize("path", sources(), ids=lambda p: p.relative_to(REPO).as_posix())
def test_every_command_shown_still_exists(path):
    text = path.read_text(encoding="utf-8")
    found = problems(text, path.relative_to(REPO).as_posix())
    assert not found, "\n".join(found)


@pytest.mark.parametrize("path", sources(), ids=lambda p: p.relative_to(REPO).as_posix())
def test_every_params_key_named_exists(path):
    text = path.read_text(encoding="utf-8")
    found = param_key_problems(text, path.relative_to(REPO).as_posix())
    assert not found, "\n".join(found)


def test_the_guides_commands_are_found():
    """The parser of code blocks reads the guides' commands (a parser finding none would pass all)."""
    for name, least in (
        ("getting-started", 6),
        ("pipeline", 6),
        ("data", 6),
        ("comparing", 8),
        ("using-a-model", 8),
        ("scaling", 4),
        ("reliability", 1),
    ):
        cmds = commands((REPO / "docs" / f"{name}.md").read_text(encoding="utf-8"))
        assert len(cmds) >= least, (name, cmds)
    readme = [c[:2] for c in commands((REPO / "README.md").read_text(encoding="utf-8"))]
    assert {("palm", "predict"), ("palm", "serve"), ("palm", "compare")} <= {tuple(c) for c in readme}, readme


def test_the_checks_catch_a_command_or_key_that_no_longer_exists():
    page = """
Some text with `train.epochs`, `models.senet18.fundus.clahe` and `train.no_such_key`.

    palm predict photos/ --out p.csv --no-such-flag
    palm compare --metric auc && palm frobnicate
    dvc repro train && dvc repro no_such_stage
    dvc exp run -S train.epochs=0 -S model=lenet
    dvc exp run -S train.no_such=1
    for m in lenet nosuchnet; do dvc exp run --queue -S model=$m; done; dvc queue start
    dvc plots diff HEAD --targets metrics/nothing.json
    dvc exp shw
    python scripts/cross_validate.py --no-such --set train.mix=mixup
    python scripts/no_such_script.py
"""
    found = "\n".join(problems(page, "page"))
    for expected in (
        "--no-such-flag",
        "frobnicate",
        "no stage 'no_such_stage'",
        "train.epochs = 0",
        "train.no_such is not in params.yaml",
        "nosuchnet",
        "metrics/nothing.json is not a plot",
        "shw",
        "has no option --no-such",
        "scripts/no_such_script.py does not exist",
    ):
        assert expected in found, (expected, found)
    for fine in ("`palm compare --metric auc`", "`dvc repro train`", "`dvc exp run --queue -S model=lenet`"):
        assert fine not in found, (fine, found)
    assert not [line for line in found.splitlines() if "train.mix" in line and "has no option" not in line], found
    assert param_key_problems(page, "page") == [
        "page: `train.no_such_key`: train.no_such_key is not a key of params.yaml's schema"
    ]


def test_commands_are_read_from_indented_and_fenced_blocks_not_from_prose_or_notes():
    page = (
        "Run `palm nothing` in prose.\n\n    palm predict a.jpg\n\n```bash\npalm serve\n```\n\n"
        "```text\n$ palm --help\n```\n\n!!! note\n    palm is mentioned in a note\n"
    )
    assert commands(page) == [["palm", "predict", "a.jpg"], ["palm", "serve"]]
    assert expand_loops("for m in a b; do dvc exp run -S model=$m; done; dvc queue start") == [
        "dvc exp run -S model=a",
        "dvc exp run -S model=b",
        "; dvc queue start",
    ]


def test_every_generated_block_expands_and_the_tables_follow_the_code():
    from palm.core.params import Params

    for page in PAGES:
        text = page.read_text(encoding="utf-8")
        expanded = hooks.expand(text, page.name)
        assert "<!-- palm:" not in expanded, page
    comments = hooks.yaml_comments("a:\n  b: 1   # one\n         # two\n  c: 2\n# top\n")
    assert comments == {"a.b": "one two"}
    rows = {k: t for k, t, _, _ in hooks.params_rows()}
    assert rows["train.lr"] == "number > 0, ≤ 10" and rows["image_size"] == "whole number ≥ 16, ≤ 4096"
    assert set(Params.model_fields) <= {k.split(".")[0] for k in rows}
    assert set(hooks.stages()) == set(yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"])
    assert ("train", "evaluate") in hooks.edges() and ("evaluate", "train") not in hooks.edges()
    assert "--fail-if-worse" in hooks.help_text("compare")
    with pytest.raises(ValueError, match="unknown generated block"):
        hooks.expand("<!-- palm: nothing -->", "page")


def test_the_api_reference_covers_every_module():
    documented = set()
    for page in (REPO / "docs" / "reference").glob("*.md"):
        documented |= set(re.findall(r"^::: ([\w.]+)$", page.read_text(), re.MULTILINE))
    modules = set()
    for path in (REPO / "src" / "palm").rglob("*.py"):
        parts = path.relative_to(REPO / "src").with_suffix("").parts
        modules.add(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    modules -= {"palm", "palm.cli"}  # the package's one line; the cli is the help page (cli.md)
    assert not modules - documented, f"not in docs/reference/: {sorted(modules - documented)}"
    assert not documented - modules, f"documented but gone: {sorted(documented - modules)}"


def test_the_readme_is_short_and_links_into_the_site():
    text = (REPO / "README.md").read_text(encoding="utf-8")
    assert len(text) <= README_LIMIT, f"README.md has {len(text)} characters (at most {README_LIMIT})"
    links = re.findall(r"\]\(([\w./-]+)(?:#[^)]*)?\)", text)
    assert len([link for link in links if link.startswith("docs/")]) >= 8, links
    assert all((REPO / link).is_file() for link in links), links
    nav = yaml.safe_load((REPO / "mkdocs.yml").read_text())["nav"]

    def pages(node):
        if isinstance(node, dict):
            return [p for v in node.values() for p in pages(v)]
        if isinstance(node, list):
            return [p for v in node for p in pages(v)]
        return [node]

    in_nav = set(pages(nav))
    on_disk = {p.relative_to(REPO / "docs").as_posix() for p in PAGES}
    assert on_disk <= in_nav | {"reproducibility.md"}, f"pages outside the nav: {sorted(on_disk - in_nav)}"


def test_the_set_up_commands_are_the_same_in_the_readme_and_the_getting_started_page():
    from test_repo import setup_commands

    page = (REPO / "docs" / "getting-started.md").read_text(encoding="utf-8")
    assert all(f"\n    {c}\n" in page for c in setup_commands())


def test_the_readmes_results_table_is_the_committed_runs():
    """README.md's short table repeats rows of results/README.md's (written by scripts/compare_models.py)."""
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    results = (REPO / "results" / "README.md").read_text(encoding="utf-8")
    rows = re.findall(
        r"^\| (\w+) \| (\d+) \| ([\d.]+ \([\d.]+\)) \| ([\d.]+ \([\d.]+\)) \| ([\d.]+ min) \|$", readme, re.MULTILINE
    )
    assert len(rows) >= 5, rows
    for model, px, accuracy, auc, minutes in rows:
        assert re.search(rf"^\| {model} \| {px} \| ", results, re.MULTILINE), model
        assert re.search(
            rf"^\| {model} \| \d+ \| {re.escape(accuracy)} \| {re.escape(auc)} \| .* \| {minutes} \|$",
            results,
            re.MULTILINE,
        ), (model, accuracy, auc, minutes)


def test_sphinx_roles_of_docstrings_become_cross_references():
    """docs/griffe_roles.py: a role is a link that mkdocs build --strict must resolve."""
    from griffe_roles import convert

    assert (
        convert("a :class:`~palm.core.errors.ConfigError` and :func:`validate`")
        == "a [`ConfigError`][palm.core.errors.ConfigError] and [`validate`][validate]"
    )
    assert convert(":meth:`Trainer._resume` and :func:`open`") == "`Trainer._resume` and `open`"
    assert convert("Example::\n\n    code") == "Example:\n\n    code"
