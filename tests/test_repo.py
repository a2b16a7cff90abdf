"""The repository's promises to a newcomer: the README's set-up commands and CI agree."""

import re

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
    assert main_job.endswith("dvc repro") and "pip install -e ." in main_job
    assert tests.endswith("pytest") and '".[test]"' in tests
    ci = (REPO / ".ci" / "run").read_text()
    assert tests in ci.splitlines()


def test_every_stage_has_a_thin_entry_point_named_like_it():
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    for name, stage in stages.items():
        assert stage["cmd"] == f"python stages/{name}.py"
        assert (REPO / "stages" / f"{name}.py").is_file()
        assert f"stages/{name}.py" in stage["deps"]


def test_embedded_default_is_the_synthetic_set():
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    assert params["data"]["zips_dir"] == "data/synthetic"
    assert re.fullmatch(r"[a-z0-9]+", params["model"])


def test_every_library_the_code_imports_is_a_runtime_dependency():
    """`pip install -e .` (the README's main-job command) must bring all that src/ and
    stages/ import: a package only in the test extra would break `dvc repro`."""
    import ast
    import sys
    import tomllib

    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    names = {re.split(r"[=<>\[ ]", d)[0].lower() for d in deps}
    distribution = {"cv2": "opencv-python-headless", "yaml": "pyyaml", "sklearn": "scikit-learn", "PIL": "pillow",
                    "paddle": "paddlepaddle"}
    imported = set()
    for path in [*(REPO / "src").rglob("*.py"), *(REPO / "stages").glob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                imported |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                imported.add(node.module.split(".")[0])
    third_party = imported - set(sys.stdlib_module_names) - {"palm"}
    missing = {m for m in third_party if distribution.get(m, m).lower() not in names}
    assert third_party and not missing, f"imported but not in [project] dependencies: {sorted(missing)}"


def test_the_unzipped_photographs_are_never_committed():
    """data/raw is an uncached DVC output: unless git ignores it, `dvc exp run` commits the
    (real, possibly private) photographs into the experiment refs."""
    import subprocess

    for path in ("data/raw/PALM-Training400/P0001.jpg", "data/raw/PALM-Validation400/V0001.jpg",
                 "data/original/training.zip"):
        assert subprocess.run(["git", "check-ignore", "-q", path], cwd=REPO).returncode == 0, path
