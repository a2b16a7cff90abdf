"""The repository's promises to a newcomer: the README's set-up commands and CI agree."""

import re

import pytest
import yaml

from conftest import REPO


def setup_commands():
    text = (REPO / "README.md").read_text()
    section = text.split("## Set-up", 1)[1].split("\n## ", 1)[0]
    return [line.strip() for line in section.splitlines() if line.startswith("    ")]


def test_readme_has_exactly_two_setup_commands_and_ci_runs_the_test_one():
    commands = setup_commands()
    assert len(commands) == 2, commands
    main_job, tests = commands
    assert main_job.endswith("dvc repro") and 'pip install -e ".[cpu]"' in main_job
    assert tests.endswith("pytest") and '".[test]"' in tests
    ci = (REPO / ".ci" / "run").read_text()
    assert tests in ci.splitlines()


def test_ci_proves_the_baseline_with_the_readmes_first_command():
    """CI runs the README's first command on its fresh clone (.ci/baseline, called by .ci/run),
    then compares the metrics it wrote with the committed ones."""
    main_job = setup_commands()[0]
    baseline = (REPO / ".ci" / "baseline").read_text()
    assert main_job in baseline.splitlines()
    assert "same-as-committed metrics/eval.json metrics/predictions.csv" in baseline
    run = (REPO / ".ci" / "run").read_text().splitlines()
    assert run.index("bash .ci/baseline") < run.index(setup_commands()[1])  # one venv, the test extra added


def test_the_baseline_comparison_fails_on_any_changed_byte_and_passes_on_the_committed_files(tmp_path):
    import subprocess

    def git(*args):
        subprocess.run(["git", *args], cwd=tmp_path, check=True, capture_output=True)

    git("init", "-q")
    git("config", "user.email", "t@e")
    git("config", "user.name", "t")
    (tmp_path / "metrics").mkdir()
    (tmp_path / "metrics" / "eval.json").write_text('{"accuracy": 0.9475, "loss": 0.14786911198648484}\n')
    (tmp_path / "metrics" / "predictions.csv").write_text("image,label,probability,predicted\nV1.jpg,1,0.99,1\n")
    git("add", "-A")
    git("commit", "-qm", "baseline")

    def compare():
        return subprocess.run(
            ["bash", str(REPO / ".ci" / "same-as-committed"), "metrics/eval.json", "metrics/predictions.csv"],
            cwd=tmp_path,
            capture_output=True,
            text=True,
        )

    assert compare().returncode == 0
    (tmp_path / "metrics" / "eval.json").write_text('{"accuracy": 0.9475, "loss": 0.14786911198648485}\n')
    proc = compare()
    assert proc.returncode == 1 and "metrics/eval.json differs from the committed one" in proc.stderr
    assert "0.14786911198648485" in proc.stderr and "predictions.csv differs" not in proc.stderr
    assert "dvc repro && git add dvc.lock metrics && git commit" in proc.stderr
    git("checkout", "--", "metrics/eval.json")
    (tmp_path / "metrics" / "predictions.csv").unlink()
    proc = compare()
    assert proc.returncode == 1 and "metrics/predictions.csv was not written" in proc.stderr


def test_every_stage_has_a_thin_entry_point_named_like_it():
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    for name, stage in stages.items():
        assert stage["cmd"] == f"python stages/{name}.py"
        assert (REPO / "stages" / f"{name}.py").is_file()
        assert f"stages/{name}.py" in stage["deps"]


def test_embedded_default_is_the_synthetic_set():
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    assert params["data"]["source"] == "palm" and params["data"]["input"] == "data/synthetic"
    assert re.fullmatch(r"[a-z0-9]+", params["model"])


SERVICE = "src/palm/serve/service.py"  # `palm serve`: its web stack is the serve extra's


def test_every_library_the_code_imports_is_a_runtime_dependency():
    """`pip install -e ".[cpu]"` (the README's main-job command) must bring all that src/ and
    stages/ import: a package only in the test extra would break `dvc repro`; and ".[cpu,serve]"
    all that `palm serve` imports."""
    import ast
    import sys
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    deps = project["dependencies"] + project["optional-dependencies"]["cpu"]  # what `.[cpu]` installs
    names = {re.split(r"[=<>\[ ]", d)[0].lower() for d in deps}
    distribution = {
        "cv2": "opencv-python-headless",
        "yaml": "pyyaml",
        "sklearn": "scikit-learn",
        "PIL": "pillow",
        "paddle": "paddlepaddle",
        "swagger_ui_bundle": "swagger-ui-bundle-v2",
    }
    serve = {re.split(r"[=<>\[ ]", d)[0].lower() for d in project["optional-dependencies"]["serve"]}

    def third_party(paths) -> set[str]:
        imported = set()
        for path in paths:
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Import):
                    imported |= {a.name.split(".")[0] for a in node.names}
                elif isinstance(node, ast.ImportFrom) and node.level == 0:
                    imported.add(node.module.split(".")[0])
        return imported - set(sys.stdlib_module_names) - {"palm"}

    code = [p for p in [*(REPO / "src").rglob("*.py"), *(REPO / "stages").glob("*.py")] if p != REPO / SERVICE]
    found = third_party(code)
    missing = {m for m in found if distribution.get(m, m).lower() not in names}
    assert found and not missing, f"imported but not in [project] dependencies: {sorted(missing)}"
    found = third_party([REPO / SERVICE])
    missing = {m for m in found if distribution.get(m, m).lower() not in names | serve}
    assert {"fastapi", "uvicorn"} <= found and not missing, (
        f"{SERVICE} imports, not in the serve extra: {sorted(missing)}"
    )


def test_nothing_but_palm_serve_imports_the_serve_extra():
    """The pipeline's stages and `palm predict` run without the web stack installed."""
    closures = [
        import_closure(REPO / "stages" / f"{name}.py")
        for name in yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    ]
    assert all(SERVICE not in c for c in closures)


def test_the_unzipped_photographs_are_never_committed():
    """data/raw is an uncached DVC output: unless git ignores it, `dvc exp run` commits the
    (real, possibly private) photographs into the experiment refs."""
    import subprocess

    for path in (
        "data/raw/PALM-Training400/P0001.jpg",
        "data/raw/PALM-Validation400/V0001.jpg",
        "data/original/training.zip",
    ):
        assert subprocess.run(["git", "check-ignore", "-q", path], cwd=REPO).returncode == 0, path


def _palm_modules(path, root=REPO / "src") -> set[str]:
    """The ``palm`` modules a file imports (at module level or inside functions; relative
    imports resolved against the file's package)."""
    import ast

    # a module's package; a package's __init__: itself (an entry point outside src has none)
    package = path.relative_to(root).parent.parts if path.is_relative_to(root) else ()
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "palm"}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = ".".join(package[: len(package) - node.level + 1] + ((node.module,) if node.module else ()))
            else:
                base = node.module
            if base.split(".")[0] == "palm":
                found |= {base, *(f"{base}.{a.name}" for a in node.names)}
    return found


def _package_data(root) -> dict[str, list[str]]:
    """pyproject's ``[tool.setuptools.package-data]``: the non-Python files a package reads (templates)."""
    import tomllib

    return (
        tomllib.loads((root / "pyproject.toml").read_text())
        .get("tool", {})
        .get("setuptools", {})
        .get("package-data", {})
    )


def import_closure(entry, root=REPO) -> set[str]:
    """Every file of ``src/palm`` that running ``entry`` reads, transitively: the modules it imports
    (packages' ``__init__`` too, relative imports included) and the package data (templates) of
    the packages whose ``__init__`` it runs."""
    src = root / "src"
    data = _package_data(root)

    def file_of(module: str):
        base = src / module.replace(".", "/")
        return next((p for p in (base / "__init__.py", base.with_suffix(".py")) if p.is_file()), None)

    seen, todo = set(), [entry]
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        if path.suffix != ".py":
            continue
        if path.name == "__init__.py":
            package = path.parent
            for pattern in data.get(".".join(package.relative_to(src).parts), []):
                todo += [f for f in package.glob(pattern) if f.is_file()]
        for module in _palm_modules(path, src):
            parts = module.split(".")
            todo += [f for f in (file_of(".".join(parts[:i])) for i in range(1, len(parts) + 1)) if f]
    return {p.relative_to(root).as_posix() for p in seen}


def covered(path: str, deps: list[str]) -> bool:
    """Whether one of ``deps`` is ``path`` or a folder above it (DVC hashes a folder dep's every file)."""
    return any(path == d or path.startswith(d.rstrip("/") + "/") for d in deps)


def test_every_stage_depends_on_all_the_code_it_runs():
    """A change to any module (or template) a stage runs must make `dvc repro` rerun it: DVC can
    only see the files listed in deps, and a missing one serves stale results."""
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    for name, stage in stages.items():
        closure = import_closure(REPO / "stages" / f"{name}.py")
        assert "src/palm/__init__.py" in closure and len(closure) > 3, (name, closure)
        missing = {p for p in closure if not covered(p, stage["deps"])}
        assert not missing, f"dvc.yaml stage {name!r} misses deps {sorted(missing)}"


def test_the_code_identity_of_a_training_checkpoint_is_the_code_dvc_tracks(monkeypatch):
    """palm.core.provenance (the code in a checkpoint's identity) finds the same files as this test's
    own walk and as the train stage's deps: a checkpoint is resumed only by the code DVC saw."""
    from palm.core.provenance import source_hashes

    monkeypatch.chdir(REPO)
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    for name in ("train", "evaluate"):
        assert set(source_hashes(REPO / "stages" / f"{name}.py")) == import_closure(REPO / "stages" / f"{name}.py")
    assert all(covered(f, stages["train"]["deps"]) for f in source_hashes(REPO / "stages" / "train.py"))


def test_every_stage_reads_the_params_it_depends_on_and_train_only_its_networks_overrides():
    """Exact params: train depends on models.${model} (DVC's templating), not on every network's
    overrides; every network has an entry, so that `dvc exp run -S model=X` tracks X's."""
    from palm.core.params import MODEL_NAMES

    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    assert stages["train"]["params"] == ["model", "image_size", "train", "models.${model}"]
    for name in ("evaluate", "export", "explain"):  # they run a network on train.device
        assert "train.device" in stages[name]["params"], name
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    assert set(params["models"]) == set(MODEL_NAMES) and all(params["models"].values())


def needless(dep: str, closure: set[str], root=REPO) -> str | None:
    """Why a stage's code dep ``dep`` is needless given the files it runs (``closure``), or None: a
    file must be one it runs; a folder must be a family (a sub-package of palm, not palm itself) of
    which it runs a module besides the ``__init__``. DVC hashes a folder's every file, so a folder dep
    also reruns the stage when a module of that family changes that the stage does not import: the
    price of depending on the family rather than listing its modules one by one."""
    path = root / dep
    if not path.exists():
        return f"{dep} does not exist"
    if path.is_file():
        return None if dep in closure else f"{dep} is a dep but the stage does not run it"
    if not (path / "__init__.py").is_file() or path == root / "src" / "palm":
        return f"{dep} is a folder dep but not a family of palm"
    if not any(covered(f, [dep]) and f != f"{dep}/__init__.py" for f in closure):
        return f"{dep} is a dep but the stage runs none of its modules"
    return None


def test_code_deps_are_exact_but_short():
    """Each code dep is run (a file the stage runs, or the folder of a family it runs), none sits
    inside another, and dvc.yaml shows the DAG at a glance: under 80 dependency lines."""
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    for name, stage in stages.items():
        closure = import_closure(REPO / "stages" / f"{name}.py")
        code = [d for d in stage["deps"] if d.startswith(("src/", "stages/"))]
        for dep in code:
            assert not needless(dep, closure), f"{name}: {needless(dep, closure)}"
            assert not covered(dep, [d for d in code if d != dep]), f"{name}: {dep} is inside another dep"
    assert sum(len(stage["deps"]) for stage in stages.values()) < 80
    # train, the one long stage, runs palm.evaluation's metrics only: the report and compare do not retrain it
    assert "src/palm/evaluation/metrics.py" in stages["train"]["deps"]
    assert not covered("src/palm/evaluation/report/__init__.py", stages["train"]["deps"])
    # the report reads model.json through palm.nn.modelinfo, never the networks (Paddle)
    assert "src/palm/nn/models.py" not in import_closure(REPO / "stages" / "report.py")
    # Python's bytecode caches inside a folder dep would change its hash at every import
    assert {"__pycache__/", "*.pyc"} <= set((REPO / ".dvcignore").read_text().split())


def test_the_closure_follows_relative_imports_and_package_data(tmp_path):
    """The dependency test's own check: a relative import and a template are part of what runs."""
    pkg = tmp_path / "src" / "palm" / "fam"
    (pkg / "templates").mkdir(parents=True)
    (tmp_path / "src" / "palm" / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("from .a import x\n")
    (pkg / "a.py").write_text("from . import b\nfrom .b import y\n")
    (pkg / "b.py").write_text("y = 1\n")
    (pkg / "c.py").write_text("")
    (pkg / "templates" / "page.html.j2").write_text("{{ x }}")
    (tmp_path / "pyproject.toml").write_text('[tool.setuptools.package-data]\n"palm.fam" = ["templates/*.j2"]\n')
    entry = tmp_path / "stage.py"
    entry.write_text("from palm.fam.a import x\n")
    assert import_closure(entry, tmp_path) == {
        "stage.py",
        "src/palm/__init__.py",
        "src/palm/fam/__init__.py",
        "src/palm/fam/a.py",
        "src/palm/fam/b.py",
        "src/palm/fam/templates/page.html.j2",
    }
    assert covered("src/palm/fam/templates/page.html.j2", ["src/palm/fam"])
    assert not covered("src/palm/family.py", ["src/palm/fam"])
    # a folder dep is a family the stage runs a module of; a file dep, one it runs
    closure = import_closure(entry, tmp_path)
    assert needless("src/palm/fam", closure, tmp_path) is None
    assert needless("src/palm/fam/b.py", closure, tmp_path) is None
    assert "does not run it" in needless("src/palm/fam/c.py", closure, tmp_path)
    assert "not a family" in needless("src/palm", closure, tmp_path)
    assert "not a family" in needless("src/palm/fam/templates", closure, tmp_path)
    (tmp_path / "src" / "palm" / "other").mkdir()
    (tmp_path / "src" / "palm" / "other" / "__init__.py").write_text("")
    (tmp_path / "src" / "palm" / "other" / "d.py").write_text("")
    entry.write_text("import palm.other\nfrom palm.fam.a import x\n")
    closure = import_closure(entry, tmp_path)
    assert "src/palm/other/__init__.py" in closure  # run, but only the package's __init__
    assert "runs none of its modules" in needless("src/palm/other", closure, tmp_path)


def test_checkpoints_and_scratch_files_never_enter_git():
    """checkpoints/ holds the optimizer state (hundreds of MB): git and experiment commits ignore it."""
    import subprocess

    for path in ("checkpoints/last.pdckpt", "checkpoints/checkpoint.json"):
        assert subprocess.run(["git", "check-ignore", "-q", path], cwd=REPO).returncode == 0, path


PADDLE_BUILDS = {"paddlepaddle", "paddlepaddle-gpu"}


def _extra_requirements(extra: str) -> set[str]:
    """Distribution names that `pip install -e ".[extra]"` asks for directly (self-references expanded)."""
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    names, todo, seen = set(), [extra], set()
    for req in project["dependencies"]:
        names.add(re.split(r"[=<>\[ ;]", req)[0].lower())
    while todo:
        e = todo.pop()
        seen.add(e)
        for req in project["optional-dependencies"][e]:
            name = re.split(r"[=<>\[ ;]", req)[0].lower()
            if name == project["name"]:
                todo += [x for x in re.findall(r"\[(.*)\]", req)[0].split(",") if x not in seen]
            else:
                names.add(name)
    return names


def test_each_install_extra_asks_for_exactly_one_paddle_build():
    for extra, build in (("cpu", "paddlepaddle"), ("test", "paddlepaddle"), ("gpu", "paddlepaddle-gpu")):
        assert _extra_requirements(extra) & PADDLE_BUILDS == {build}, extra


@pytest.mark.parametrize("extra", ["cpu", "test"])
def test_pip_resolves_one_paddle_build_for_the_cpu_extras(extra):
    """pip's own resolver, dry run: the CPU install commands of the README get one Paddle.
    (The gpu extra resolves from Paddle's own package index, which this machine cannot reach;
    its direct requirements are checked above.)"""
    import json
    import subprocess
    import sys

    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--dry-run",
            "--ignore-installed",
            "--quiet",
            "--report",
            "-",
            "-e",
            f".[{extra}]",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    installed = {i["metadata"]["name"].lower() for i in json.loads(proc.stdout)["install"]}
    assert installed & PADDLE_BUILDS == {"paddlepaddle"}
