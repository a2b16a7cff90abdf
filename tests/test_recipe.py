"""Training-recipe levers (issue 31): ``train.label_smoothing`` and ``train.mix`` (mixup, cutmix)
with ``train.mix_alpha``; palm.training.recipe, the schema, the run identity and a tiny training run."""

import copy
import json

import numpy as np
import paddle
import pytest
import yaml

from conftest import REPO, make_shards, train_section
from palm.core.errors import ConfigError
from palm.core.params import RECIPE_KEYS, training_config
from palm.evaluation.model_card import recipe_text
from palm.training.crossval import apply_overrides
from palm.training.recipe import BatchRecipe, cutmix, cutmix_box, mixup, smooth_targets

PARAMS = yaml.safe_load((REPO / "params.yaml").read_text(encoding="utf-8"))
TRAIN = [f"P{i:04d}.jpg" for i in range(8)] + [f"N{i:04d}.jpg" for i in range(6)] + ["H0001.jpg", "H0002.jpg"]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return make_shards(tmp_path_factory.mktemp("data"), TRAIN)


def batch(n=4, side=8, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.uniform(-1, 1, (n, 3, side, side)).astype(np.float32)
    y = np.array([[1.0], [0.0], [1.0], [0.0]][:n], dtype=np.float32)
    return x, y


# -- the operations ------------------------------------------------------------------------------
def test_label_smoothing_targets_are_exact():
    y = paddle.to_tensor([[0.0], [1.0], [0.25]])
    np.testing.assert_allclose(smooth_targets(y, 0.1).numpy(), [[0.05], [0.95], [0.25 * 0.9 + 0.05]], rtol=1e-6)
    np.testing.assert_allclose(smooth_targets(y, 0.4).numpy(), [[0.2], [0.8], [0.35]], rtol=1e-6)
    assert smooth_targets(y, 0.0) is y  # off: the very tensor


def test_mixup_is_the_lambda_weighted_sum_of_the_batch_and_its_permutation():
    x, y = batch()
    perm = np.array([2, 0, 3, 1])
    mx, my = mixup(paddle.to_tensor(x), paddle.to_tensor(y), 0.3, perm)
    np.testing.assert_allclose(mx.numpy(), 0.3 * x + 0.7 * x[perm], rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(my.numpy(), [[1.0], [0.7], [0.3], [0.0]], rtol=1e-6)  # y [1,0,1,0] with [1,1,0,0]


def test_cutmix_pastes_a_box_whose_area_is_the_label_weight_and_leaves_the_rest_untouched():
    x, y = batch(side=10)
    perm = np.array([1, 0, 3, 2])
    box = (2, 6, 3, 8)  # rows 2..5, columns 3..7: 20 of 100 pixels
    mx, my, lam = cutmix(paddle.to_tensor(x), paddle.to_tensor(y), box, perm)
    mx = mx.numpy()
    assert lam == pytest.approx(0.8)
    np.testing.assert_allclose(my.numpy(), 0.8 * y + 0.2 * y[perm], rtol=1e-6)
    inside = np.zeros((10, 10), bool)
    inside[2:6, 3:8] = True
    np.testing.assert_array_equal(mx[..., inside], x[perm][..., inside])  # the box: the other image's pixels
    np.testing.assert_array_equal(mx[..., ~inside], x[..., ~inside])  # elsewhere: byte for byte the same


def test_a_cutmix_box_clipped_at_the_border_sets_the_label_weight_by_its_clipped_area():
    rng = np.random.default_rng(3)
    clipped = 0
    for _ in range(200):
        lam = float(rng.beta(0.5, 0.5))
        top, bottom, left, right = cutmix_box(32, 24, lam, rng)
        assert 0 <= top <= bottom <= 32 and 0 <= left <= right <= 24
        full = int(32 * np.sqrt(1 - lam)) // 2 * 2 * (int(24 * np.sqrt(1 - lam)) // 2 * 2)
        clipped += (bottom - top) * (right - left) < full
    assert clipped > 20  # boxes do cross the border ...
    # ... and the whole recipe mixes the labels by the area actually pasted: image i is all i
    x = np.broadcast_to(np.arange(4, dtype=np.float32)[:, None, None, None], (4, 3, 32, 24)).copy()
    y = np.array([[1.0], [0.0], [0.0], [0.0]], dtype=np.float32)
    for epoch in range(20):
        recipe = BatchRecipe(mix="cutmix", alpha=1.0).for_epoch(0, epoch)
        mx, my = recipe(paddle.to_tensor(x), paddle.to_tensor(y))
        mx, my = mx.numpy(), my.numpy()
        for i in range(4):
            own = float((mx[i] == i).mean())  # the fraction of image i left (the rest is one other image)
            other = int(np.unique(mx[i][mx[i] != i])[0]) if own < 1 else i
            assert my[i, 0] == pytest.approx(own * y[i, 0] + (1 - own) * y[other, 0], abs=1e-6)


def test_the_recipe_draws_depend_on_seed_epoch_and_rank_and_off_passes_the_batch_through():
    x, y = (paddle.to_tensor(a) for a in batch())
    out = {}
    for key in [(0, 0, 0), (0, 0, 0), (1, 0, 0), (0, 1, 0), (0, 0, 1)]:
        mx, _ = BatchRecipe(mix="mixup", alpha=0.4).for_epoch(*key)(x, y)
        out.setdefault(key, []).append(mx.numpy())
    np.testing.assert_array_equal(*out[(0, 0, 0)])
    for key in [(1, 0, 0), (0, 1, 0), (0, 0, 1)]:
        assert not np.array_equal(out[key][0], out[(0, 0, 0)][0])
    ox, oy = BatchRecipe().for_epoch(0, 0)(x, y)
    assert ox is x and oy is y  # off: the very batch, no copy, no draw
    sx, sy = BatchRecipe(label_smoothing=0.2).for_epoch(0, 0)(x, y)
    assert sx is x and not np.array_equal(sy.numpy(), y.numpy())  # smoothing alone: the targets only


# -- parameters and identity ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    "item,message",
    [
        ("train.label_smoothing=0.7", "params.yaml: train.label_smoothing = 0.7: input should be less than 0.5"),
        (
            "train.label_smoothing=-0.1",
            "params.yaml: train.label_smoothing = -0.1: input should be greater than or equal to 0",
        ),
        ("train.mix=blend", "params.yaml: train.mix = 'blend': input should be 'off', 'mixup' or 'cutmix'"),
        ("train.mix_alpha=0", "params.yaml: train.mix_alpha = 0: input should be greater than 0"),
        ("models.senet18.mix=true", "params.yaml: models.senet18.mix = True: input should be 'off', 'mixup' or"),
    ],
)
def test_bad_recipe_values_are_one_line(item, message):
    p = {**copy.deepcopy(PARAMS), "model": "senet18"}
    with pytest.raises(ConfigError) as exc:
        training_config(apply_overrides(p, [item]))
    assert str(exc.value).startswith(message) and "\n" not in str(exc.value)


def test_the_recipe_is_in_the_record_only_when_on_so_the_default_run_keeps_its_identity(shards):
    from palm.training.train import run_identity

    base = training_config(PARAMS)
    assert (base.label_smoothing, base.mix, base.mix_alpha) == (0.0, "off", 0.2)  # committed: off
    rec = base.record()
    assert not set(RECIPE_KEYS) & set(rec)
    # the parameters absent (a params.yaml of before) or mix_alpha changed while mix is off: the same record
    old = copy.deepcopy(PARAMS)
    for key in RECIPE_KEYS:
        del old["train"][key]
    assert training_config(old).record() == rec
    alpha_only = training_config(apply_overrides(PARAMS, ["train.mix_alpha=0.7", "train.mix=off"]))
    assert alpha_only.mix == "off" and alpha_only.record() == rec
    assert run_identity(alpha_only, shards) == run_identity(base, shards)
    # on (here for the chosen network only, as scripts/cross_validate.py --set does it): in the record
    model = PARAMS["model"]
    on = training_config(
        apply_overrides(
            PARAMS, ["train.label_smoothing=0.1", f"models.{model}.mix=cutmix", f"models.{model}.mix_alpha=0.4"]
        )
    )
    rec_on = on.record()
    assert {k: rec_on[k] for k in RECIPE_KEYS} == {"label_smoothing": 0.1, "mix": "cutmix", "mix_alpha": 0.4}
    assert {k: v for k, v in rec_on.items() if k not in RECIPE_KEYS} == rec
    assert list(rec_on)[-2:] == ["model", "image_size"]
    assert run_identity(on, shards)["config"] != run_identity(base, shards)["config"]
    only_smoothing = training_config(apply_overrides(PARAMS, ["train.label_smoothing=0.05"])).record()
    assert only_smoothing == {**rec, "label_smoothing": 0.05} | {"model": rec["model"], "image_size": rec["image_size"]}
    assert recipe_text(rec) == "" and recipe_text(None) == ""
    assert recipe_text(rec_on) == "; trained with label smoothing 0.1, cutmix (alpha 0.4)"


# -- a tiny training run ----------------------------------------------------------------------------------
def train(tmp_path, shards, **recipe):
    from palm.training.train import Trainer

    p = {
        "model": "senet18",
        "image_size": 32,
        "train": train_section(
            **{
                "epochs": 2,
                "batch_size": 4,
                "holdout": 0.25,
                "lr": 0.003,
                "warmup_epochs": 0,
                "select": "last",
                "ema": 0.0,
                "to_static": False,
                "augment": {"hflip": True, "brightness": 0.1},
                **recipe,
            }
        ),
    }
    info = Trainer(p, shards).run(tmp_path / "models", tmp_path / "checkpoints", tmp_path / "live")
    history = json.loads((tmp_path / "checkpoints" / "checkpoint.json").read_text())["history"]
    return info, history, (tmp_path / "models" / "model.safetensors").read_bytes()


def test_each_lever_trains_reproducibly_and_is_recorded_in_model_json(tmp_path, shards):
    _, plain, w_plain = train(tmp_path / "plain", shards)
    losses = {}
    for name, recipe in {
        "smooth": {"label_smoothing": 0.2},
        "mixup": {"mix": "mixup", "mix_alpha": 0.4},
        "cutmix": {"mix": "cutmix", "mix_alpha": 1.0},
    }.items():
        info, history, weights = train(tmp_path / name, shards, **recipe)
        assert all(np.isfinite(r["train_loss"]) and np.isfinite(r["holdout_loss"]) for r in history)
        assert weights != w_plain and history[0]["train_loss"] != plain[0]["train_loss"]  # the lever acted
        saved = json.loads((tmp_path / name / "models" / "model.json").read_text())
        assert {k: saved["config"][k] for k in recipe} == recipe == {k: info["config"][k] for k in recipe}
        losses[name] = history
    # a smoothed target is never 0 or 1: the loss cannot go below that of predicting it exactly
    e = 0.2
    floor = -(e / 2 * np.log(e / 2) + (1 - e / 2) * np.log(1 - e / 2))
    assert all(r["train_loss"] > floor for r in losses["smooth"])
    # the same seed: byte-identical weights and the same history
    _, again, w_again = train(tmp_path / "cutmix-again", shards, mix="cutmix", mix_alpha=1.0)
    _, first, w_first = train(tmp_path / "cutmix-third", shards, mix="cutmix", mix_alpha=1.0)
    assert w_again == w_first
    strip = lambda h: [{k: v for k, v in r.items() if k != "epoch_seconds"} for r in h]  # noqa: E731
    assert strip(again) == strip(first) == strip(losses["cutmix"])
    saved = json.loads((tmp_path / "plain" / "models" / "model.json").read_text())
    assert not set(RECIPE_KEYS) & set(saved["config"])


def test_cross_validate_compares_recipes_with_set(shards, tmp_path):
    """``scripts/cross_validate.py --set train.mix=...`` goes through the same parameters: the folds
    train with the lever (other out-of-fold probabilities than without it); a bad value is one line, exit 2."""
    import subprocess
    import sys

    import pandas as pd

    params = tmp_path / "params.yaml"
    params.write_text(
        yaml.safe_dump(
            {
                **PARAMS,
                "model": "lenet",
                "image_size": 32,
                "train": train_section(epochs=1, batch_size=4, holdout=0, select="last", ema=0.0, to_static=False),
            }
        )
    )

    def cv(*items):
        out = tmp_path / f"cv{len(items)}.json"
        proc = subprocess.run(
            [
                sys.executable,
                str(REPO / "scripts" / "cross_validate.py"),
                "--shards",
                str(shards),
                "--params",
                str(params),
                "--folds",
                "2",
                "--out",
                str(out),
                "--set",
                *items,
            ],
            capture_output=True,
            text=True,
            cwd=tmp_path,
        )
        return proc, out

    proc, plain = cv("train.mix=off")
    assert proc.returncode == 0, proc.stderr
    proc, mixed = cv("train.mix=cutmix", "train.mix_alpha=1.0", "train.label_smoothing=0.1")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(mixed.read_text())["set"] == [
        "train.mix=cutmix",
        "train.mix_alpha=1.0",
        "train.label_smoothing=0.1",
    ]
    a, b = (pd.read_csv(p.with_suffix(".csv")).sort_values("image") for p in (plain, mixed))
    assert list(a["image"]) == list(b["image"]) and not np.allclose(a["probability"], b["probability"])
    proc, _ = cv("train.mix=blend")
    assert proc.returncode == 2
    assert (
        proc.stderr.strip()
        .splitlines()[-1]
        .endswith("params.yaml: train.mix = 'blend': input should be 'off', 'mixup' or 'cutmix'")
    )


def test_data_parallel_ranks_mix_their_own_part_of_the_batch(shards, tmp_path, monkeypatch):
    """``train.nproc`` 2 with cutmix: the stage trains and records the lever; each rank mixes its own
    part of the batch (draws of (seed, epoch, rank): the draws test above), so the weights are not
    those of one process mixing the whole batch (unmixed, they match to 1e-4: tests/test_parallel.py)."""
    import os
    import subprocess
    import sys

    from palm.nn.weights import load_state
    from palm.training.train import Trainer

    def project(folder, nproc):
        p = {**copy.deepcopy(PARAMS), "model": "lenet", "image_size": 32}
        p["train"].update(
            epochs=2,
            batch_size=4,
            holdout=0,
            lr=0.01,
            warmup_epochs=0,
            select="last",
            ema=0.0,
            to_static=False,
            device="cpu",
            nproc=nproc,
            mix="cutmix",
            mix_alpha=1.0,
        )
        (folder / "data").mkdir(parents=True)
        (folder / "data" / "shards").symlink_to(shards)
        (folder / "params.yaml").write_text(yaml.safe_dump(p))
        return p

    one = tmp_path / "one"
    p = project(one, 1)
    monkeypatch.chdir(one)
    Trainer(p, one / "data" / "shards").run(one / "models", one / "checkpoints", one / "live")
    two = tmp_path / "two"
    project(two, 2)
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}  # this checkout's palm in the spawned ranks too
    proc = subprocess.run(
        [sys.executable, str(REPO / "stages" / "train.py")],
        cwd=two,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "2 processes of 2 images per batch" in proc.stdout
    info = json.loads((two / "models" / "model.json").read_text())
    assert (info["config"]["mix"], info["config"]["nproc"]) == ("cutmix", 2)
    w1, w2 = (load_state(f / "models" / "model.safetensors") for f in (one, two))
    assert max(float(np.abs(w1[k] - w2[k]).max()) for k in w1) > 1e-3


def test_a_mixed_run_resumed_after_a_crash_is_the_uninterrupted_run(shards, tmp_path, monkeypatch):
    """The draws are of (seed, epoch, rank), not of a generator's history: a resumed run mixes alike."""
    from palm.nn import checkpoint

    _, whole, w_whole = train(tmp_path / "whole", shards, mix="mixup", mix_alpha=0.4, label_smoothing=0.1)
    real_save = checkpoint.save

    def save_then_crash(*args, **kwargs):
        real_save(*args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint, "save", save_then_crash)
    with pytest.raises(KeyboardInterrupt):
        train(tmp_path / "crashed", shards, mix="mixup", mix_alpha=0.4, label_smoothing=0.1)
    monkeypatch.setattr(checkpoint, "save", real_save)
    _, resumed, w_resumed = train(tmp_path / "crashed", shards, mix="mixup", mix_alpha=0.4, label_smoothing=0.1)
    strip = lambda h: [{k: v for k, v in r.items() if k != "epoch_seconds"} for r in h]  # noqa: E731
    assert len(resumed) == 2 and strip(resumed) == strip(whole) and w_resumed == w_whole
