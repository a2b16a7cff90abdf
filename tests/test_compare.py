"""scripts/compare_models.py: the results table (its runs are tested end to end)."""

import importlib.util
import json
import subprocess

import pytest

from conftest import REPO

spec = importlib.util.spec_from_file_location("compare_models", REPO / "scripts" / "compare_models.py")
compare_models = importlib.util.module_from_spec(spec)
spec.loader.exec_module(compare_models)


def row(model, seed, acc, auc, seconds):
    return {
        "model": model,
        "seed": seed,
        "input_size": 128,
        "epochs": 10,
        "selected_epoch": 9,
        "train_seconds": seconds,
        "n_valid": 99,
        "accuracy": acc,
        "auc": auc,
        "sensitivity": 0.9,
        "specificity": 0.95,
    }


def test_table_has_a_line_per_run_and_mean_and_spread_per_model(tmp_path, capsys):
    out = tmp_path / "compare.json"
    out.write_text(
        json.dumps(
            [row("senet18", 0, 0.95, 0.98, 300), row("senet18", 1, 0.91, 0.97, 360), row("alexnet", 0, 0.90, 0.96, 120)]
        )
    )
    assert compare_models.main(["--table-only", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "| senet18 | 128 | 10 | 1 | 0.910 | 0.970 | 0.900 | 0.950 | 6.0 min |" in text
    assert "| senet18 | 2 | 0.930 (0.910..0.950) | 0.975 (0.970..0.980) | 0.900 | 0.950 | 5.5 min |" in text
    assert "| alexnet | 1 | 0.900 (0.900..0.900) | 0.960 (0.960..0.960) | 0.900 | 0.950 | 2.0 min |" in text
    # runs and models in the order of compare_models.MODELS (alexnet before senet18), seeds ascending
    lines = [line for line in text.splitlines() if line.startswith(("| alexnet", "| senet18"))]
    assert [line.split(" | ")[0:4:3] for line in lines[:3]] == [
        ["| alexnet", "0"],
        ["| senet18", "0"],
        ["| senet18", "1"],
    ]
    assert lines[3].startswith("| alexnet | 1 |") and lines[4].startswith("| senet18 | 2 |")


def test_runs_with_intervals_show_them(tmp_path, capsys):
    r = row("senet18", 0, 0.929, 0.98, 300)
    r.update(
        accuracy_ci_low=0.879,
        accuracy_ci_high=0.97,
        auc_ci_low=0.95,
        auc_ci_high=0.995,
        sensitivity_ci_low=0.8,
        sensitivity_ci_high=0.98,
        specificity_ci_low=None,
        specificity_ci_high=None,
    )
    out = tmp_path / "compare.json"
    out.write_text(json.dumps([r]))
    assert compare_models.main(["--table-only", "--out", str(out)]) == 0
    assert (
        "| senet18 | 128 | 10 | 0 | 0.929 [0.879, 0.970] | 0.980 [0.950, 0.995] | 0.900 [0.800, 0.980] | "
        "0.950 | 5.0 min |"
    ) in capsys.readouterr().out


def test_the_table_is_written_between_the_readme_markers_and_nowhere_else(tmp_path):
    out = tmp_path / "compare.json"
    out.write_text(json.dumps([row("senet18", 0, 0.95, 0.98, 300)]))
    readme = tmp_path / "README.md"
    readme.write_text("# t\n\nbefore\n<!-- results table -->\nold table\n<!-- end of results table -->\nafter\n")
    assert compare_models.main(["--table-only", "--out", str(out), "--readme", str(readme)]) == 0
    doc = readme.read_text()
    assert "old table" not in doc and "| senet18 | 128 | 10 | 0 | 0.950 | 0.980 |" in doc
    assert doc.startswith("# t\n\nbefore\n<!-- results table -->\n") and doc.endswith(
        "<!-- end of results table -->\nafter\n"
    )
    readme.write_text("no markers\n")
    with pytest.raises(SystemExit, match="no '<!-- results table -->'"):
        compare_models.main(["--table-only", "--out", str(out), "--readme", str(readme)])


def test_runs_refuse_to_start_on_a_detached_head(tmp_path):
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run(git + ["init", "-q", str(tmp_path)], check=True)
    subprocess.run(git + ["commit", "-q", "--allow-empty", "-m", "one"], cwd=tmp_path, check=True)
    compare_models.require_branch(tmp_path)  # on a branch: no error
    subprocess.run(git + ["checkout", "-q", "--detach"], cwd=tmp_path, check=True)
    with pytest.raises(SystemExit, match="HEAD is detached"):
        compare_models.require_branch(tmp_path)


def test_results_readme_table_is_the_committed_runs():
    """results/README.md's table is exactly what the script writes from results/palm-mini.json."""
    doc = (REPO / "results" / "README.md").read_text(encoding="utf-8")
    rows = json.loads((REPO / "results" / "palm-mini.json").read_text())
    table = doc.split(compare_models.BEGIN + "\n", 1)[1].split("\n" + compare_models.END, 1)[0]
    assert table == compare_models.table(rows)


def test_the_comparison_covers_every_registered_network():
    from palm.nn.models import model_names

    assert compare_models.MODELS == model_names()


@pytest.mark.parametrize(
    "edit,message",
    [
        (dict(accuracy=1.7), "run 2: accuracy = 1.7, must be a number in [0, 1]"),
        (dict(auc=float("nan")), "run 2: auc = nan, must be a number in [0, 1]"),
        (dict(auc_ci_low=-0.1), "run 2: auc_ci_low = -0.1, must be a number in [0, 1]"),
        (dict(seed=-1), "run 2: seed = -1, must be a whole number in [0, ...]"),
        (dict(seed=True), "run 2: seed = True, must be a whole number in [0, ...]"),
        (dict(train_seconds="long"), "run 2: train_seconds = 'long', must be a number in [0, ...]"),
        (dict(model=None), "run 2: model = None, must be a network's name"),
    ],
)
def test_impossible_numbers_in_the_results_file_are_one_line_and_exit_1(tmp_path, capsys, edit, message):
    out = tmp_path / "compare.json"
    out.write_text(json.dumps([row("senet18", 0, 0.95, 0.98, 300), {**row("lenet", 0, 0.9, 0.9, 60), **edit}]))
    assert compare_models.main(["--table-only", "--out", str(out)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: {out}: {message}"]
    out.write_text("[{")
    assert compare_models.main(["--table-only", "--out", str(out)]) == 1
    assert "not a results file" in capsys.readouterr().err


def test_a_bad_seed_or_an_output_that_is_not_a_file_is_refused_before_any_run(tmp_path, capsys):
    import os

    with pytest.raises(SystemExit) as exc:
        compare_models.main(["--seeds", "-1"])
    assert exc.value.code == 2 and "must be a whole number >= 0, got '-1'" in capsys.readouterr().err
    os.mkfifo(tmp_path / "fifo")
    assert compare_models.main(["--out", str(tmp_path / "fifo")]) == 2  # no run started: no git, no dvc here
    assert "a FIFO, not a regular file" in capsys.readouterr().err
