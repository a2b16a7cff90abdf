"""Training loop: determinism, resume after a crash, fresh start when parameters change."""

import json

import numpy as np
import pytest

from conftest import make_shards, train_section
from palm.core.errors import ConfigError
from palm.nn import checkpoint
from palm.training.train import Trainer, effective_config

TRAIN = [f"P{i:04d}.jpg" for i in range(8)] + [f"N{i:04d}.jpg" for i in range(6)] + ["H0001.jpg", "H0002.jpg"]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return make_shards(tmp_path_factory.mktemp("data"), TRAIN)


def params(**train):
    """params.yaml's train: section for a tiny, quick run (the best epoch on a 25% holdout, no averaging)."""
    return {
        "model": "senet18",
        "image_size": 32,
        "train": train_section(
            **{
                "epochs": 3,
                "batch_size": 4,
                "holdout": 0.25,
                "lr": 0.003,
                "warmup_epochs": 0,
                "select": "best",
                "select_by": "accuracy",
                "ema": 0.0,
                "to_static": False,
                "augment": {"hflip": True, "rotate_deg": 10, "brightness": 0.1},
                **train,
            }
        ),
    }


def run(tmp_path, shards, p):
    out = tmp_path / "run"
    info = Trainer(p, shards).run(out / "models", out / "checkpoints", out / "live")
    history = json.loads((out / "checkpoints" / "checkpoint.json").read_text())["history"]
    return info, history, out


def strip_times(history):
    return [{k: v for k, v in r.items() if k != "epoch_seconds"} for r in history]


@pytest.mark.parametrize("to_static,ema", [(False, 0.0), (True, 0.0), (True, 0.9)])
def test_same_seed_same_metrics_and_resume_after_a_crash(tmp_path, shards, monkeypatch, to_static, ema):
    _, h1, out1 = run(tmp_path / "a", shards, params(to_static=to_static, ema=ema))
    _, h2, _ = run(tmp_path / "b", shards, params(to_static=to_static, ema=ema))
    assert strip_times(h1) == strip_times(h2)
    assert len(h1) == 3 and all(np.isfinite(r["train_loss"]) for r in h1)
    summary = json.loads((out1 / "live" / "metrics.json").read_text())
    assert summary["selected_epoch"] in (1, 2, 3)

    # crash right after the first checkpoint is written, then run again
    real_save = checkpoint.save
    calls = []

    def save_then_crash(*args, **kwargs):
        real_save(*args, **kwargs)
        calls.append(1)
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint, "save", save_then_crash)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "c", shards, params(to_static=to_static, ema=ema))
    monkeypatch.setattr(checkpoint, "save", real_save)
    ckpt = json.loads((tmp_path / "c" / "run" / "checkpoints" / "checkpoint.json").read_text())
    assert ckpt["epoch"] == 1
    _, h3, out3 = run(tmp_path / "c", shards, params(to_static=to_static, ema=ema))
    assert strip_times(h3) == strip_times(h1)  # resumed run = uninterrupted run
    # the dvclive curves are whole after the resume
    lines = (out3 / "live" / "plots" / "metrics" / "train_loss.tsv").read_text().splitlines()
    assert len(lines) == 1 + 3


def test_changed_parameters_start_afresh(tmp_path, shards, capsys):
    run(tmp_path, shards, params(epochs=1))
    _, h, _ = run(tmp_path, shards, params(epochs=2, lr=0.001))
    assert [r["epoch"] for r in h] == [1, 2]
    assert "checkpoint is from other parameters: training from scratch" in capsys.readouterr().out


def test_a_finished_run_of_other_code_is_not_resumed_and_its_checkpoint_is_replaced(
    tmp_path, shards, capsys, monkeypatch
):
    """The checkpoint of a finished run would otherwise stand in for any later code (issue 27)."""
    from palm.core import provenance

    p = params(epochs=2, select="last")
    _, h1, out = run(tmp_path, shards, p)
    old = json.loads((out / "checkpoints" / "checkpoint.json").read_text())
    capsys.readouterr()
    _, again, _ = run(tmp_path, shards, p)  # the same run: nothing left to train
    assert "resuming from the checkpoint of epoch 2 of 2" in capsys.readouterr().out
    assert strip_times(again) == strip_times(h1)

    real = provenance.source_hashes
    monkeypatch.setattr(provenance, "source_hashes", lambda entry: {**real(entry), "src/palm/nn/models.py": "edited"})
    _, h2, _ = run(tmp_path, shards, p)
    printed = capsys.readouterr().out
    assert "checkpoint is from other code (src/palm/nn/models.py): training from scratch" in printed
    assert "resuming" not in printed and [r["epoch"] for r in h2] == [1, 2]
    new = json.loads((out / "checkpoints" / "checkpoint.json").read_text())
    assert (
        new["identity"]["code"]["src/palm/nn/models.py"]
        == "edited"
        != old["identity"]["code"].get("src/palm/nn/models.py")
    )
    names = {f.name for f in (out / "checkpoints").iterdir()}
    assert names == {"checkpoint.json", new["state_file"], new["best_file"]}


def test_the_run_identity_changes_with_each_input_and_names_it(tmp_path, shards, monkeypatch):
    """Configuration, data (the shards' manifest), each source file of the code training runs
    (the stage's entry point and its imports in palm) and the Paddle and numpy versions."""
    import shutil

    import paddle

    from conftest import REPO
    from palm.core import provenance
    from palm.nn.checkpoint import mismatch
    from palm.training import train

    cfg = effective_config(params())
    # a project of its own: the stage's entry point and a copy of the library it imports
    proj = tmp_path / "proj"
    shutil.copytree(REPO / "stages", proj / "stages")
    shutil.copytree(REPO / "src" / "palm", proj / "src" / "palm", ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.chdir(proj)
    monkeypatch.setattr(provenance, "PACKAGE_PARENT", proj / "src")
    base = train.run_identity(cfg, shards)
    assert set(base) == {"config", "data", "code", "versions"}
    assert {
        "stages/train.py",
        "src/palm/training/train.py",
        "src/palm/nn/models.py",
        "src/palm/core/provenance.py",
    } <= set(base["code"])
    assert "stages/evaluate.py" not in base["code"] and "src/palm/evaluation/evaluate.py" not in base["code"]
    assert mismatch(base, train.run_identity(cfg, shards)) is None  # the same run
    assert train.run_identity(cfg.model_copy(update={"threshold": "youden"}), shards) == base  # chosen after training
    assert train.run_identity(cfg.model_copy(update={"tta": "flips"}), shards) == base  # applied after training

    def changed(identity) -> str:
        assert identity != base
        return mismatch(base, identity)

    assert changed(train.run_identity(cfg.model_copy(update={"lr": 0.002}), shards)) == "is from other parameters"

    other_data = tmp_path / "other_shards"
    shutil.copytree(shards, other_data)
    manifest = other_data / "manifest.json"
    manifest.write_text(manifest.read_text().replace("P0001", "P0009"))
    assert changed(train.run_identity(cfg, other_data)) == "is from other data"
    shutil.copy2(shards / "manifest.json", manifest)
    assert train.run_identity(cfg, other_data) == base
    pixels = np.load(other_data / "train-000.npy")  # the same manifest, one pixel changed (other decoding code)
    pixels[0, 0, 0, 0] ^= 1
    np.save(other_data / "train-000.npy", pixels)
    assert changed(train.run_identity(cfg, other_data)) == "is from other data"

    for edited in ("stages/train.py", "src/palm/training/train.py", "src/palm/nn/models.py", "src/palm/core/errors.py"):
        path = proj / edited
        original = path.read_bytes()
        path.write_bytes(original + b"\n# an edit\n")
        assert changed(train.run_identity(cfg, shards)) == f"is from other code ({edited})"
        path.write_bytes(original)
    # an import added to the code training runs brings its file into the identity
    (proj / "src/palm/training/train.py").write_text(
        (proj / "src/palm/training/train.py").read_text() + "\nfrom palm.evaluation import report  # noqa\n"
    )
    assert "src/palm/evaluation/report/__init__.py" in train.run_identity(cfg, shards)["code"]

    monkeypatch.setattr(paddle, "__version__", "0.0.1")
    monkeypatch.setattr(np, "__version__", "0.0.2")
    (proj / "src/palm/training/train.py").write_bytes((REPO / "src/palm/training/train.py").read_bytes())
    assert changed(train.run_identity(cfg, shards)) == (
        f"is from other libraries (numpy {base['versions']['numpy']} -> 0.0.2, "
        f"paddle {base['versions']['paddle']} -> 0.0.1)"
    )
    assert mismatch(None, base) == "records no code or library versions (written by an older palm)"
    assert mismatch(base, {**base, "weights_sha256": "x"}) == "is from other weights_sha256"  # a part added later


def test_per_model_overrides_and_unknown_keys():
    p = {
        "model": "alexnet",
        "image_size": 64,
        "train": train_section(lr=0.1, augment={"hflip": True}),
        "models": {"alexnet": {"lr": 0.01, "augment": {"vflip": True}}, "vgg16": {"lr": 5}},
    }
    cfg = effective_config(p)
    assert cfg.lr == 0.01 and cfg.record()["augment"] == {"hflip": True, "vflip": True} and cfg.model == "alexnet"
    assert (cfg.augment.hflip, cfg.augment.vflip, cfg.augment.scale) == (
        True,
        True,
        None,
    )  # typed: None = Augment's default
    with pytest.raises(ConfigError, match="train.lrate = 1: is not a known key"):
        effective_config({**p, "train": {**p["train"], "lrate": 1}})
    with pytest.raises(ConfigError, match=r"models\.vgg16\.lr = 50: input should be less than or equal to 10"):
        effective_config({**p, "models": {"vgg16": {"lr": 50}}})  # checked even when vgg16 is not chosen


def test_a_model_can_train_at_a_lower_input_size_and_predict_applies_it(tmp_path, shards):
    """``input_size`` (per model in params.yaml) resizes the shards for the network; predict
    on the original photographs gives what the network gives on those resized shards."""
    import contextlib

    from palm.data.dataset import FundusDataset, load_split, make_loader
    from palm.nn.artifact import load as load_trained
    from palm.nn.artifact import predict_probs
    from palm.serve.predict import Predictor

    info, _, out = run(tmp_path, shards, params(epochs=1, input_size=24))
    assert (info["image_size"], info["input_size"]) == (32, 24)
    model, saved = load_trained(out / "models")
    assert saved["input_size"] == 24
    train = load_split(shards, "train", size=24)
    assert train.pixels.shape[1:] == (24, 24, 3)
    expected = predict_probs(model, make_loader(FundusDataset(train), 8, shuffle=False), contextlib.nullcontext)
    files = [shards.parent / "raw" / "PALM-Training400" / name for name in train.images]
    # grade_all: the test photographs are tiny random pictures, not gradable fundus photographs
    got = [r["probability"] for r in Predictor.load(out / "models").predict(files, progress=False, grade_all=True)]
    np.testing.assert_allclose(got, expected, atol=1e-5)
    assert effective_config(params(input_size=48)).input_size == 32  # a cap: never above the shards
    with pytest.raises(ConfigError, match="train.input_size = 8: input should be greater than or equal to 16"):
        effective_config(params(input_size=8))


def test_static_graph_training_is_deterministic_and_saves_an_ordinary_model(tmp_path, shards):
    import contextlib

    from palm.data.dataset import FundusDataset, load_split, make_loader
    from palm.nn.artifact import load as load_trained
    from palm.nn.artifact import predict_probs

    p = params(epochs=2, to_static=True)
    _, h1, out = run(tmp_path / "a", shards, p)
    _, h2, _ = run(tmp_path / "b", shards, p)
    assert strip_times(h1) == strip_times(h2) and all(np.isfinite(r["train_loss"]) for r in h1)
    eager, _ = load_trained(out / "models")  # an ordinary (dynamic-graph) model, as evaluate loads it
    valid = load_split(shards, "valid")
    probs = predict_probs(eager, make_loader(FundusDataset(valid), 8, shuffle=False), contextlib.nullcontext)
    assert probs.shape == (2,) and np.all((probs > 0) & (probs < 1))


def test_static_graph_training_is_refused_for_networks_with_dropout(tmp_path, shards):
    """Measured: GoogLeNet under to_static gave two different runs from one seed."""
    with pytest.raises(ConfigError, match="googlenet has dropout"):
        run(tmp_path, shards, {**params(epochs=1, to_static=True), "model": "googlenet"})


def test_weight_average_is_what_the_holdout_scores_and_what_is_saved(tmp_path, shards):
    """``train.ema``: the saved weights are the moving average, not the last step's weights,
    and the holdout metrics are those of the average (they differ from the plain run's)."""
    from palm.nn.weights import load_state

    _, plain, out_plain = run(tmp_path / "plain", shards, params(epochs=2, select="last"))
    _, avg, out_avg = run(tmp_path / "avg", shards, params(epochs=2, select="last", ema=0.9))
    # the same training trajectory (the average does not feed back) ...
    assert [r["train_loss"] for r in avg] == [r["train_loss"] for r in plain]
    # ... but another network is scored and saved
    assert [r["holdout_loss"] for r in avg] != [r["holdout_loss"] for r in plain]
    w_plain = load_state(out_plain / "models" / "model.safetensors")
    w_avg = load_state(out_avg / "models" / "model.safetensors")
    manifest = json.loads((out_avg / "checkpoints" / "checkpoint.json").read_text())
    last = load_state(out_avg / "checkpoints" / manifest["state_file"])
    assert set(w_avg) == set(w_plain)
    name = "conv1.weight"
    np.testing.assert_array_equal(last["model"][name], w_plain[name])
    np.testing.assert_array_equal(last["ema"]["weights"][name], w_avg[name])
    assert not np.allclose(w_avg[name], w_plain[name])


@pytest.mark.parametrize(
    "bad,match",
    [
        ({"ema": 1.5}, "train.ema = 1.5: input should be less than 1"),
        ({"select_by": "f1"}, "train.select_by = 'f1': input should be"),
        ({"select": "foo"}, "train.select = 'foo': input should be 'last' or 'best'"),
        ({"holdout": 1.5}, "train.holdout = 1.5: input should be less than"),
        ({"epochs": 0}, "train.epochs = 0: input should be greater than"),
        ({"epochs": "2"}, "train.epochs = '2': must be a whole number"),
        ({"epochs": 2.5}, "train.epochs = 2.5: must be a whole number"),
        ({"lr": "abc"}, "train.lr = 'abc': must be a number"),
        ({"device": "tpu"}, "train.device = 'tpu': must be auto, cpu, gpu"),
    ],
)
def test_bad_training_parameters_are_refused_before_any_work(tmp_path, shards, bad, match):
    with pytest.raises(ConfigError, match=match):
        run(tmp_path, shards, params(**{"epochs": 1, **bad}))
    assert not (tmp_path / "run").exists()  # nothing written, not even an empty models/


def test_selection_by_holdout_loss_keeps_the_epoch_of_lowest_loss(tmp_path, shards):
    info, history, _ = run(tmp_path, shards, params(epochs=3, select_by="loss"))
    losses = [r["holdout_loss"] for r in history]
    assert info["selected_epoch"] == 1 + losses.index(min(losses))


def test_dropout_rate_is_a_parameter_of_the_networks_that_have_one(tmp_path, shards):
    """``dropout`` reaches AlexNet's classifier (another rate, another training run); it is
    refused for a network without a tunable rate and outside [0, 1)."""
    alex = {**params(epochs=1, select="last"), "model": "alexnet"}
    _, default, _ = run(tmp_path / "default", shards, alex)
    _, again, _ = run(tmp_path / "again", shards, {**alex, "models": {"alexnet": {"dropout": 0.5}}})
    _, none, _ = run(tmp_path / "none", shards, {**alex, "models": {"alexnet": {"dropout": 0.0}}})
    assert strip_times(again) == strip_times(default)  # 0.5 is AlexNet's own rate
    assert none[0]["train_loss"] != default[0]["train_loss"]
    with pytest.raises(ConfigError, match="dropout can be set for alexnet only, not senet18"):
        effective_config(params(dropout=0.3))
    with pytest.raises(ConfigError, match="models.alexnet.dropout = 1.0: input should be less than 1"):
        effective_config({**alex, "models": {"alexnet": {"dropout": 1.0}}})


def test_threshold_rule_is_chosen_on_the_holdout_and_stored(tmp_path, shards):
    import contextlib

    from palm.data.dataset import FundusDataset, load_split, make_loader
    from palm.data.splits import stratified_holdout
    from palm.evaluation.metrics import choose_threshold
    from palm.nn.artifact import load as load_trained
    from palm.nn.artifact import predict_probs

    p = params(epochs=1, threshold="youden", select="last")
    info, _, out = run(tmp_path, shards, p)
    assert info["threshold_rule"] == "youden"
    saved = json.loads((out / "models" / "model.json").read_text())
    assert saved["threshold"] == info["threshold"] and 0 < saved["threshold"] <= 1
    # the same rule on the saved network's holdout predictions gives the stored number
    full = load_split(shards, "train")
    hold = full.subset(stratified_holdout(full.labels, full.groups, 0.25, 0)[1])
    model, _ = load_trained(out / "models")
    probs = predict_probs(model, make_loader(FundusDataset(hold), 4, shuffle=False), contextlib.nullcontext)
    assert choose_threshold(hold.labels, probs, "youden") == pytest.approx(saved["threshold"], abs=1e-5)


@pytest.mark.parametrize(
    "bad,match",
    [
        ({"threshold": "youden", "holdout": 0}, "holdout must be above 0"),
        ({"threshold": "median"}, "threshold"),
        ({"threshold": 1.5}, "threshold"),
    ],
)
def test_bad_threshold_settings_are_refused(bad, match):
    with pytest.raises(ConfigError, match=match):
        effective_config(params(**bad))


@pytest.mark.parametrize(
    "train",
    [
        {"lr": 10.0, "optimizer": "momentum", "momentum": 0.9, "weight_decay": 0.0},  # the run
        {"lr": 8.0, "optimizer": "adam", "weight_decay": 0.0, "schedule": "constant"},
    ],
)
def test_a_diverging_run_stops_with_one_line_and_saves_no_model(tmp_path, shards, train):
    from palm.core.errors import RunError

    out = tmp_path / "run"
    with pytest.raises(RunError, match="training diverged.*no model saved; lower train.lr") as exc:
        Trainer(params(epochs=6, **train), shards).run(out / "models", out / "checkpoints", out / "live")
    assert "\n" not in str(exc.value)
    assert not (out / "models").exists() and not (out / "live").exists()


def test_divergence_check_compares_with_the_first_epoch_and_the_weights():
    import paddle

    from palm.core.errors import RunError
    from palm.training.train import check_divergence

    cfg = effective_config({"model": "lenet", "image_size": 32, "train": train_section(lr=1.0, optimizer="adam")})
    net = paddle.nn.Linear(2, 1)
    check_divergence(60.0, 0.7, net, 3, cfg)  # 86x the first epoch's: a bad epoch, not divergence
    with pytest.raises(RunError, match="loss 80 at epoch 4, above 70"):
        check_divergence(80.0, 0.7, net, 3, cfg)
    with pytest.raises(RunError, match="loss nan"):
        check_divergence(float("nan"), 0.7, net, 3, cfg)
    check_divergence(0.1, 0.001, net, 1, cfg)  # never below 100x ln 2
    for bad in (float("inf"), 2e6):
        net.weight.set_value(paddle.full([2, 1], bad))
        with pytest.raises(RunError, match="weight .* reached"):
            check_divergence(0.5, 0.7, net, 1, cfg)
