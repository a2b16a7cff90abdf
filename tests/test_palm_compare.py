"""palm compare: the paired tests (DeLong, McNemar, paired bootstrap, Holm), the revisions read
from git, the seed groups, the outputs and the gate; end to end on two tiny DVC experiments."""

import json
import math
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from scipy.stats import binomtest, norm

from conftest import REPO, make_project, run
from palm.cli import main
from palm.evaluation import compare as cmp
from palm.evaluation import stats
from palm.evaluation.compare import table

# ---------------------------------------------------------------- DeLong


def test_delong_matches_a_hand_computed_case_without_ties():
    # A: PM 0.9 0.6 0.4, non-PM 0.5 0.2 -> placements V10 = [1, 1, 1/2], V01 = [2/3, 1], AUC 5/6
    # B: PM 0.8 0.3 0.7, non-PM 0.25 0.1 -> every pair right, AUC 1, placements constant
    # var = var(V10_A)/3 + var(V01_A)/2 = (1/12)/3 + (1/18)/2 = 1/18; z = (1/6)/sqrt(1/18) = 1/sqrt(2)
    labels = [1, 1, 1, 0, 0]
    r = stats.delong(labels, [0.9, 0.6, 0.4, 0.5, 0.2], [0.8, 0.3, 0.7, 0.25, 0.1])
    assert r["auc_a"] == pytest.approx(5 / 6) and r["auc_b"] == pytest.approx(1.0)
    assert r["diff"] == pytest.approx(1 / 6) and r["var"] == pytest.approx(1 / 18)
    assert r["p_value"] == pytest.approx(2 * norm.sf(1 / math.sqrt(2)))  # 0.4795
    assert r["ci_high"] - r["diff"] == pytest.approx(1.959964 * math.sqrt(1 / 18), rel=1e-6)


def test_delong_matches_a_hand_computed_case_with_ties_and_correlated_placements():
    # A: PM 0.8 0.5, non-PM 0.5 0.1 (a tie counts 1/2): V10 = [1, 3/4], V01 = [3/4, 1], AUC 7/8
    # B: PM 0.9 0.4, non-PM 0.6 0.2: V10 = [1, 1/2], V01 = [1/2, 1], AUC 3/4
    # S10 = S01 = [[1/32, 1/16], [1/16, 1/8]]: var = 2 x (1/32 + 1/8 - 2/16) / 2 = 1/32
    labels = [1, 1, 0, 0]
    r = stats.delong(labels, [0.8, 0.5, 0.5, 0.1], [0.9, 0.4, 0.6, 0.2])
    assert r["auc_a"] == pytest.approx(7 / 8) and r["auc_b"] == pytest.approx(3 / 4)
    assert r["diff"] == pytest.approx(-1 / 8) and r["var"] == pytest.approx(1 / 32)
    assert r["p_value"] == pytest.approx(2 * norm.sf((1 / 8) / math.sqrt(1 / 32)))


def test_delong_of_identical_scores_is_no_difference_and_too_few_images_is_refused():
    r = stats.delong([1, 1, 0, 0], [0.9, 0.3, 0.4, 0.1], [0.9, 0.3, 0.4, 0.1])
    assert r["diff"] == 0 and r["p_value"] == 1.0 and r["ci_low"] == r["ci_high"] == 0
    with pytest.raises(stats.DataError, match="at least 2 PM and 2 non-PM"):
        stats.delong([1, 0, 0], [0.9, 0.3, 0.4], [0.8, 0.2, 0.1])


def simulated(n=400, seed=1, shift=0.2):
    """Two correlated networks' PM probabilities on the same n images (a shared per-image term)."""
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < 0.5).astype(int)
    common = rng.normal(size=n)
    a = 1 / (1 + np.exp(-(1.5 * y + common + 0.7 * rng.normal(size=n))))
    b = 1 / (1 + np.exp(-((1.5 + shift) * y + common + 0.7 * rng.normal(size=n))))
    return y, a, b


@pytest.mark.parametrize("seed", [1, 2])
def test_delong_variance_and_p_agree_with_a_large_paired_bootstrap(seed):
    """On 400 simulated correlated scores, DeLong's variance of the AUC difference is within 15%
    of that of 5000 paired stratified bootstrap resamples, and the p-values within 0.03."""
    y, a, b = simulated(seed=seed)
    r = stats.delong(y, a, b)
    boots = stats.paired_bootstrap(y, a, a >= 0.5, b, b >= 0.5, "auc", n_boot=5000, seed=seed)
    assert boots.mean() == pytest.approx(r["diff"], abs=0.004)
    assert boots.var(ddof=1) == pytest.approx(r["var"], rel=0.15)
    assert stats.bootstrap_summary(r["diff"], boots)["p_value"] == pytest.approx(r["p_value"], abs=0.03)


# ---------------------------------------------------------------- McNemar, bootstrap, Holm


def correct(both, only_a, only_b, neither):
    a = [1] * both + [1] * only_a + [0] * only_b + [0] * neither
    b = [1] * both + [0] * only_a + [1] * only_b + [0] * neither
    return np.array(a, bool), np.array(b, bool)


@pytest.mark.parametrize("cells", [(80, 3, 11, 6), (40, 7, 7, 2), (50, 0, 6, 1), (30, 2, 0, 0)])
def test_mcnemar_is_the_exact_binomial_test_of_the_discordant_pairs(cells):
    both, only_a, only_b, neither = cells
    r = stats.mcnemar(*correct(*cells))
    n = sum(cells)
    assert r["p_value"] == pytest.approx(binomtest(only_b, only_a + only_b, 0.5).pvalue)
    assert r["diff"] == pytest.approx((only_b - only_a) / n)
    assert r["a"] == pytest.approx((both + only_a) / n) and r["b"] == pytest.approx((both + only_b) / n)
    assert -1 <= r["ci_low"] <= r["diff"] <= r["ci_high"] <= 1


def test_mcnemar_without_discordant_pairs_is_p_one():
    r = stats.mcnemar(*correct(20, 0, 0, 5))
    assert r["p_value"] == 1.0 and r["diff"] == 0 and r["ci_low"] < 0 < r["ci_high"]


def test_newcombe_interval_is_close_to_the_paired_wald_interval_on_many_images():
    both, only_a, only_b, neither = 4000, 300, 600, 5100
    n = both + only_a + only_b + neither
    d = (only_b - only_a) / n
    se = math.sqrt((only_a + only_b) / n**2 - (only_b - only_a) ** 2 / n**3)
    low, high = stats.newcombe_paired_interval(both, only_a, only_b, neither)
    assert low == pytest.approx(d - 1.96 * se, abs=0.001) and high == pytest.approx(d + 1.96 * se, abs=0.001)


def test_paired_bootstrap_resamples_the_same_images_for_both_networks():
    y, a, b = simulated(n=120)
    same = stats.paired_bootstrap(y, a, a >= 0.5, a, a >= 0.5, "brier", n_boot=300)
    assert np.all(same == 0)  # the same network against itself: exactly 0 every time
    d = stats.paired_bootstrap(y, a, a >= 0.5, b, b >= 0.5, "brier", n_boot=300, seed=3)
    assert np.array_equal(d, stats.paired_bootstrap(y, a, a >= 0.5, b, b >= 0.5, "brier", n_boot=300, seed=3))
    observed = np.mean((b - y) ** 2) - np.mean((a - y) ** 2)
    s = stats.bootstrap_summary(observed, d)
    assert s["ci_low"] < observed < s["ci_high"] and 0 < s["p_value"] <= 1
    for boots in (d, d + 0.05, d - 0.05):  # the p-value and the interval agree about 0
        s = stats.bootstrap_summary(float(np.median(boots)), boots)
        assert (s["p_value"] < 0.05) == (s["ci_low"] > 0 or s["ci_high"] < 0)


def test_holm_step_down_by_hand():
    # sorted 0.01, 0.03, 0.04, 0.2 -> 4 x 0.01, 3 x 0.03, max(2 x 0.04, 0.09), max(0.2, 0.09)
    assert stats.holm([0.01, 0.04, 0.03, 0.2]) == pytest.approx([0.04, 0.09, 0.09, 0.2])
    assert stats.holm([0.5, 0.6]) == pytest.approx([1.0, 1.0])
    adj = stats.holm([0.02, float("nan")])
    assert adj[0] == pytest.approx(0.02) and math.isnan(adj[1])


def test_verdicts():
    assert stats.verdict("auc", 0.05, 0.001, 400, 0.02, 0.08) == "better"
    assert stats.verdict("brier", 0.05, 0.001, 400, 0.02, 0.08) == "worse"
    v = stats.verdict("accuracy", 0.01, 0.4, 400, -0.01, 0.03)
    # se = 0.04 / 3.92; n x (2.80 x se / 0.01)^2 = 400 x 8.15 = 3,300 (two significant digits)
    assert v == "no difference detectable with 400 images (~3,300 would resolve this size)"
    assert stats.verdict("auc", 0.0, 1.0, 99, 0.0, 0.0) == "no difference detectable with 99 images (identical)"
    assert (
        stats.verdict("sensitivity", 0.0, 1.0, 53, -0.05, 0.05)
        == "no difference detectable with 53 PM images (identical)"
    )


# ---------------------------------------------------------------- revisions from git


def predictions(images, labels, probs, threshold=0.5) -> str:
    probs = np.asarray(probs)
    return pd.DataFrame(
        {"image": images, "label": labels, "probability": probs.round(6), "predicted": (probs >= threshold).astype(int)}
    ).to_csv(index=False)


def commit(repo: Path, message: str, preds: str, model: str = "senet18", seed: int = 0, **train) -> str:
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["model"] = model
    params["train"].update(seed=seed, **train)
    (repo / "metrics").mkdir(exist_ok=True)
    (repo / "metrics" / "predictions.csv").write_text(preds)
    (repo / "params.yaml").write_text(yaml.safe_dump(params))
    run(["git", "add", "-A"], repo)
    run(["git", "commit", "-qm", message], repo)
    return run(["git", "rev-parse", "HEAD"], repo).stdout.strip()


@pytest.fixture
def repo(tmp_path, monkeypatch):
    run(["git", "init", "-q", "-b", "main"], tmp_path)
    run(["git", "config", "user.email", "t@t"], tmp_path)
    run(["git", "config", "user.name", "t"], tmp_path)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def sim_runs(n=200):
    rng = np.random.default_rng(0)
    y = (rng.random(n) < 0.5).astype(int)
    images = [f"V{i + 1:04d}.jpg" for i in range(n)]
    good = np.clip(0.5 + (y - 0.5) * 0.9 + rng.normal(0, 0.15, n), 0, 1)
    bad = np.clip(0.5 + (y - 0.5) * 0.3 + rng.normal(0, 0.25, n), 0, 1)
    return images, y, good, bad


def test_compare_reads_committed_revisions_gates_a_real_regression_and_writes_json_and_html(repo, capsys):
    images, y, good, bad = sim_runs()
    base = commit(repo, "good", predictions(images, y, good))
    run(["git", "branch", "good"], repo)
    # the revision lists its images in another order: aligned by name
    order = np.random.default_rng(1).permutation(len(images))
    commit(repo, "bad", predictions([images[i] for i in order], y[order], bad[order]), model="lenet")
    run(["git", "branch", "bad"], repo)
    code = main(["compare", "bad", "--baseline", "good", "--json", "c.json", "--html", "c.html", "--n-boot", "500"])
    out = capsys.readouterr()
    assert code == 0, out.err
    assert "| bad | lenet | 0 | auc |" in out.out and "worse" in out.out
    data = json.loads((repo / "c.json").read_text())
    recs = {r["metric"]: r for r in data["records"]}
    assert set(recs) == set(cmp.METRICS)
    for rec in recs.values():
        assert set(table.RECORD_KEYS) <= set(rec) and rec["a"] == "good" and rec["b"] == "bad"
        assert rec["ci_low"] <= rec["diff"] <= rec["ci_high"]
    assert recs["auc"]["verdict"] == "worse" and recs["auc"]["test"] == "DeLong"
    assert recs["brier"]["diff"] > 0 and recs["brier"]["verdict"] == "worse"  # lower is better
    assert recs["auc"]["diff"] == pytest.approx(stats.delong(y, good, bad)["diff"], abs=1e-5)
    assert data["revisions"][0]["commit"] == base
    page = (repo / "c.html").read_text()
    assert page.startswith("<!DOCTYPE html>") and page.count("data:image/png;base64,") >= 2
    assert "http" not in page.replace("https://", "")  # self-contained: nothing fetched
    assert "photographs are not in this workspace" in page  # no data/raw here: said so

    # the gate: worse on AUC after correction -> 1; the other way round nothing is worse -> 0
    assert main(["compare", "bad", "--baseline", "good", "--metric", "auc", "--fail-if-worse"]) == 1
    assert "worse than the baseline: bad (auc" in capsys.readouterr().err
    assert main(["compare", "good", "--baseline", "bad", "--metric", "auc", "--fail-if-worse"]) == 0


def test_noise_is_not_a_verdict_and_workspace_is_a_revision(repo, capsys):
    images, y, good, _ = sim_runs()
    commit(repo, "base", predictions(images, y, good))
    noisy = np.clip(good + np.random.default_rng(5).normal(0, 0.01, len(good)), 0, 1)
    (repo / "metrics" / "predictions.csv").write_text(predictions(images, y, noisy))
    assert main(["compare", "workspace", "--metric", "auc", "--metric", "accuracy", "--fail-if-worse"]) == 0
    out = capsys.readouterr().out
    assert "| workspace |" in out and "no difference detectable with 200 images" in out
    assert "better" not in out and "worse" not in out.replace("worse than", "")


def test_different_image_lists_are_refused_in_one_line_naming_them(repo, capsys):
    images, y, good, bad = sim_runs(20)
    commit(repo, "a", predictions(images, y, good))
    run(["git", "branch", "a"], repo)
    commit(repo, "b", predictions(images[:-2] + ["X1.jpg", "X2.jpg"], y, bad))
    assert main(["compare", "HEAD", "--baseline", "a"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "different images" in err and "only in a: V0019.jpg, V0020.jpg" in err and "X1.jpg, X2.jpg" in err
    # labels that disagree on the same images are refused as well
    commit(repo, "c", predictions(images, 1 - y, bad))
    assert main(["compare", "HEAD", "--baseline", "a"]) == 1
    assert "label the same images differently" in capsys.readouterr().err


def test_unknown_revision_or_missing_predictions_is_a_one_line_error(repo, capsys):
    images, y, good, _ = sim_runs(20)
    commit(repo, "a", predictions(images, y, good))
    assert main(["compare", "nosuchexp"]) == 2
    assert "nosuchexp: no such revision or experiment" in capsys.readouterr().err
    (repo / "note").write_text("x")
    run(["git", "rm", "-q", "metrics/predictions.csv"], repo)
    run(["git", "add", "-A"], repo)
    run(["git", "commit", "-qm", "no preds"], repo)
    assert main(["compare", "HEAD~1", "--baseline", "HEAD"]) == 1
    assert "metrics/predictions.csv is not committed" in capsys.readouterr().err


def test_cross_validation_prediction_files_are_compared_and_grouped_by_seed(tmp_path, monkeypatch, capsys):
    """Out-of-fold predictions (scripts/cross_validate.py: no predicted column, settings in the
    .json beside) are compared by path, outside any git repository; train.seed=N groups them."""
    monkeypatch.chdir(tmp_path)
    images, y, good, bad = sim_runs()
    rng = np.random.default_rng(3)
    files = []
    for model, probs in (("senet18", good), ("mobilenetv3_large", bad)):
        for seed in (0, 1):
            p = np.clip(probs + rng.normal(0, 0.03, len(probs)), 0, 1).round(6)
            name = tmp_path / f"cv-{model}-{seed}.csv"
            pd.DataFrame({"image": images, "group": "", "label": y, "fold": 0, "probability": p}).to_csv(
                name, index=False
            )
            name.with_suffix(".json").write_text(
                json.dumps({"model": model, "set": [f"model={model}", f"train.seed={seed}"]})
            )
            files.append(str(name))
    assert (
        main(
            [
                "compare",
                *files[1:],
                "--baseline",
                files[0],
                "--metric",
                "auc",
                "accuracy",
                "--json",
                str(tmp_path / "c.json"),
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "worse" in out and "cv-mobilenetv3_large-0.csv" in out
    assert ", 200 images (" in out and "validation images" not in out.split("\n")[0]
    result = json.loads((tmp_path / "c.json").read_text())
    # the two seeds of each model form one group; accuracy used probability >= 0.5
    assert sorted(len(g["revs"]) for g in result["groups"]) == [2, 2]
    acc = np.mean((pd.read_csv(files[0])["probability"] >= 0.5).astype(int) == y)
    base = cmp.read_run(files[0])
    assert base.commit is None and base.model == "senet18" and base.seed == "0"
    assert stats.metric_value("accuracy", base.labels, base.probs, base.pred) == pytest.approx(acc)


def test_seed_groups_are_summarised_and_compared_over_seeds_and_pooled(repo, capsys):
    images, y, good, bad = sim_runs()
    rng = np.random.default_rng(9)
    revs = []
    for model, probs in (("senet18", good), ("lenet", bad)):
        for seed in (0, 1, 2):
            p = np.clip(probs + rng.normal(0, 0.05, len(probs)), 0, 1)
            commit(repo, f"{model} {seed}", predictions(images, y, p), model=model, seed=seed)
            run(["git", "branch", f"{model}-{seed}"], repo)
            revs.append(f"{model}-{seed}")
    # a run with another learning rate is not a seed of lenet's group
    commit(repo, "lr", predictions(images, y, bad), model="lenet", seed=0, lr=0.1)
    run(["git", "branch", "lenet-lr"], repo)
    assert (
        main(
            [
                "compare",
                *revs[1:],
                "lenet-lr",
                "--baseline",
                revs[0],
                "--metric",
                "auc",
                "--json",
                "g.json",
                "--n-boot",
                "300",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    data = json.loads((repo / "g.json").read_text())
    names = {g["group"]: g for g in data["groups"]}
    assert set(names) == {"senet18", "lenet", "lenet#2"}
    assert names["senet18"]["seeds"] == [0, 1, 2] and names["lenet#2"]["seeds"] == [0]
    s = names["lenet"]["metrics"]["auc"]
    assert s["min"] <= s["mean"] <= s["max"] and s["std"] == pytest.approx(np.std(s["values"], ddof=1))
    kinds = [r["test"] for r in data["group_records"]]
    assert len(kinds) == 2 and kinds[0].startswith("t over 3 seeds") and kinds[1].startswith("pooled over 3 seeds")
    over = data["group_records"][0]
    assert over["a"] == "senet18" and over["b"] == "lenet" and over["verdict"] == "worse"
    assert over["diff"] == pytest.approx(s["mean"] - names["senet18"]["metrics"]["auc"]["mean"])
    assert over["ci_low"] <= over["diff"] <= over["ci_high"]
    assert "Seed groups" in out and "| lenet | 0, 1, 2 |" in out


# ---------------------------------------------------------------- end to end with dvc


@pytest.mark.e2e
def test_two_tiny_experiments_are_compared_from_dvc_exp_show(tmp_path):
    from test_dvc_workflow import fast_params

    proj = make_project(tmp_path / "proj")
    fast_params(proj, epochs=2)
    run(["git", "add", "-A"], proj)
    run(["git", "commit", "-qm", "tiny"], proj)
    for seed in (0, 1):
        run(["dvc", "exp", "run", "-S", "model=lenet", "-S", f"train.seed={seed}", "-n", f"lenet-s{seed}"], proj)
    palm = (
        [str(Path(os.environ.get("VIRTUAL_ENV", "")) / "bin" / "palm")]
        if os.environ.get("VIRTUAL_ENV")
        else ["python", "-m", "palm.cli"]
    )
    before = [run(["git", *args], proj).stdout for args in (["status", "--porcelain"], ["rev-parse", "HEAD"])]
    # no revision named: every experiment of dvc exp show, against the first one
    out = run([*palm, "compare", "--baseline", "lenet-s0", "--json", "c.json"], proj)
    data = json.loads((proj / "c.json").read_text())
    assert {r["b"] for r in data["records"]} == {"lenet-s1"} and data["baseline"] == "lenet-s0"
    assert [g["seeds"] for g in data["groups"]] == [[0, 1]]  # the two seeds of one configuration
    assert data["n"] == 22 and "| lenet-s1 | lenet | 1 | auc |" in out.stdout
    # the workspace holds the last experiment's results: identical to it
    out = run([*palm, "compare", "workspace", "--baseline", "lenet-s1", "--metric", "accuracy"], proj)
    assert "(identical)" in out.stdout
    (proj / "c.json").unlink()
    # nothing was checked out or changed: the same HEAD, the same workspace
    assert [run(["git", *args], proj).stdout for args in (["status", "--porcelain"], ["rev-parse", "HEAD"])] == before


# ---------------------------------------------------------------- hostile input (issue 40)


def one_line(err: str) -> str:
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def pred_file(path: Path, images, labels, probs, predicted=None) -> str:
    df = pd.DataFrame({"image": images, "label": labels, "probability": probs})
    df["predicted"] = (np.asarray(probs, float) >= 0.5).astype(int) if predicted is None else predicted
    df.to_csv(path, index=False)
    return str(path)


@pytest.mark.parametrize(
    "column,value,message",
    [
        ("probability", -0.5, "probability must be a number in [0, 1], got -0.5"),
        ("probability", 1.7, "probability must be a number in [0, 1], got 1.7"),
        ("probability", float("inf"), "probability must be a number in [0, 1], got inf"),
        ("probability", float("nan"), "probability must be a number in [0, 1], got nan"),
        ("probability", "high", "probability holds values that are not numbers"),
        ("label", 2, "label must be 0 or 1, got 2"),
        ("label", -1, "label must be 0 or 1, got -1"),
        ("label", 0.7, "label must be 0 or 1, got 0.7"),
        ("label", float("nan"), "label must be 0 or 1, got nan"),
        ("predicted", 2, "predicted must be 0 or 1, got 2"),
    ],
)
def test_impossible_numbers_are_refused_in_one_line_with_exit_1_and_nothing_written(
    tmp_path, monkeypatch, capsys, column, value, message
):
    monkeypatch.chdir(tmp_path)
    images, y, good, bad = sim_runs(30)
    base = pred_file(tmp_path / "base.csv", images, y, good)
    df = pd.read_csv(base)
    df[column] = df[column].astype(object)
    df.loc[4, column] = value
    df.to_csv(tmp_path / "odd.csv", index=False)
    if column == "label":  # the same labels in both, or the images' labels would differ first
        df.to_csv(tmp_path / "base.csv", index=False)
        pred_file(tmp_path / "other.csv", images, df["label"], bad)
        args = ["other.csv", "--baseline", "odd.csv"]
    else:
        args = ["odd.csv", "--baseline", "base.csv"]
    code = main(["compare", *args, "--json", "c.json", "--html", "c.html"])
    line = one_line(capsys.readouterr().err)
    assert code == 1 and line.startswith("error: odd.csv: ") and message in line and images[4] in line
    assert not (tmp_path / "c.json").exists() and not (tmp_path / "c.html").exists()
    with pytest.raises(stats.DataError, match="label must be 0 or 1"):  # the check itself, without files
        stats.check_predictions([0, 1, 2], [0.1, 0.2, 0.3], [0, 1, 1])


def test_prediction_files_without_settings_are_separate_runs_not_seeds_of_one_recipe(tmp_path, monkeypatch, capsys):
    """Two CSVs with nothing beside them say nothing of their recipe: not one group "seeds None,
    None" with a mean ± sd, but a group each, seed "?"."""
    monkeypatch.chdir(tmp_path)
    images, y, good, bad = sim_runs(40)
    files = [
        pred_file(Path(f"{name}.csv"), images, y, probs)
        for name, probs in (("base", good), ("x1", bad), ("x2", np.clip(bad + 0.05, 0, 1)))
    ]
    assert main(["compare", *files[1:], "--baseline", files[0], "--metric", "auc", "--json", "c.json"]) == 0
    out = capsys.readouterr().out
    assert "| x1.csv | ? | ? | auc |" in out and "None" not in out and "Seed groups" not in out
    data = json.loads((tmp_path / "c.json").read_text())
    assert [len(g["revs"]) for g in data["groups"]] == [1, 1, 1] and not data["group_records"]
    # two runs of the same recipe and seed (other folds, say) are not two seeds either
    same = [cmp.Run(f"r{i}", None, {"model": "m", "train": {"seed": 0}}, images, y, good, good >= 0.5) for i in (0, 1)]
    assert [len(g["runs"]) for g in cmp.runs.groups(same)] == [1, 1]


def test_n_boot_is_bounded_before_any_work(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exc:  # 1e8 resamples asked 14.9 GiB
        main(["compare", "x.csv", "--baseline", "y.csv", "--n-boot", "100000000"])
    err = capsys.readouterr().err  # argparse's usage, then the one error line
    assert exc.value.code == 2 and "--n-boot: must be at most 20,000" in err.strip().splitlines()[-1]
    with pytest.raises(cmp.ConfigError, match="--n-boot must be 1 to 20,000"):
        cmp.compare(["x.csv"], baseline="y.csv", n_boot=20_001)


def test_the_page_shows_thumbnails_of_the_projects_photographs_only(tmp_path, monkeypatch, capsys):
    """A predictions file may name any path: an image outside data/raw (absolute, or by ..) is
    listed by name and never read into the page."""
    import cv2

    monkeypatch.chdir(tmp_path)
    (tmp_path / "data" / "raw").mkdir(parents=True)
    (tmp_path / "private").mkdir()
    images, y, good, _ = sim_runs(30)
    secret, climb = tmp_path / "private" / "secret.png", "../private/other.png"
    for path in (secret, tmp_path / "private" / "other.png", *(tmp_path / "data" / "raw" / i for i in images[2:])):
        cv2.imwrite(str(path), np.full((20, 20, 3), 128, np.uint8))
    images = [str(secret), climb, *images[2:]]
    pred_file(tmp_path / "a.csv", images, y, good)
    pred_file(tmp_path / "b.csv", images, y, 1 - good)  # disagrees on every image
    assert main(["compare", "b.csv", "--baseline", "a.csv", "--metric", "auc", "--html", "c.html"]) == 0
    page = (tmp_path / "c.html").read_text()
    assert "secret.png (" not in page and "other.png (" not in page  # no thumbnail of them
    assert f"2 of them named outside <code>data/raw</code>, so not shown: {secret}, ../private/other.png" in page
    assert page.count('<figure><img src="data:image/png;base64,') == 2 + 22  # ROC, forest, 22 of 24 thumbnails


def test_json_and_html_are_written_both_or_neither(repo, capsys, monkeypatch):
    images, y, good, bad = sim_runs(30)
    commit(repo, "a", predictions(images, y, good))
    run(["git", "branch", "a"], repo)
    commit(repo, "b", predictions(images, y, bad))
    (repo / "afile").write_text("x")
    args = ["compare", "HEAD", "--baseline", "a", "--metric", "auc"]
    # the page cannot be written (its folder is a file): refused before any test, and no JSON
    assert main([*args, "--json", "c.json", "--html", "afile/c.html"]) == 2
    assert "afile/c.html: cannot write there" in one_line(capsys.readouterr().err)
    assert not (repo / "c.json").exists()
    # the page fails while it is made: the JSON is not left behind either; an older JSON stays as it was
    (repo / "c.json").write_text("older")
    monkeypatch.setattr("palm.evaluation.compare.page.roc_overlay", lambda runs: 1 / 0)
    assert main([*args, "--json", "c.json", "--html", "c.html"]) == 3
    assert (repo / "c.json").read_text() == "older" and not (repo / "c.html").exists()
    assert not [p.name for p in repo.iterdir() if ".tmp-" in p.name]
    capsys.readouterr()
    assert main([*args, "--json", "-"]) == 2
    assert "--json -: standard output carries the Markdown table" in one_line(capsys.readouterr().err)


def _device(path: Path) -> Path:
    """A character device node like /dev/null at ``path`` (as root), else /dev/null itself."""
    import stat

    try:
        os.mknod(path, stat.S_IFCHR | 0o666, os.makedev(1, 3))
        return path
    except PermissionError:
        return Path("/dev/null")


@pytest.mark.parametrize("flag", ["--json", "--html"])
@pytest.mark.parametrize("kind", ["a character device", "a FIFO", "a symbolic link"])
def test_outputs_never_replace_a_device_a_fifo_or_a_symbolic_link(repo, capsys, flag, kind):
    images, y, good, bad = sim_runs(30)
    commit(repo, "a", predictions(images, y, good))
    run(["git", "branch", "a"], repo)
    commit(repo, "b", predictions(images, y, bad))
    (repo / "kept.txt").write_text("kept")
    if kind == "a character device":
        path = _device(repo / "dev")
    elif kind == "a FIFO":
        os.mkfifo(path := repo / "fifo")
    else:
        os.symlink(repo / "kept.txt", path := repo / "link")
    before = os.lstat(path)
    assert main(["compare", "HEAD", "--baseline", "a", "--metric", "auc", flag, str(path)]) == 2
    assert one_line(capsys.readouterr().err) == (
        f"error: {path}: {kind}, not a regular file; refusing to replace it (name a new path or a regular file)"
    )
    after = os.lstat(path)
    assert (after.st_mode, after.st_ino) == (before.st_mode, before.st_ino)
    assert (repo / "kept.txt").read_text() == "kept"
