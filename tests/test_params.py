"""params.yaml's schema (palm.core.params): every key typed and ranged, errors naming key and value."""

import copy

import pytest
import yaml

from conftest import REPO
from palm.core.errors import ConfigError
from palm.core.params import MODEL_NAMES, training_config, validate

PARAMS = yaml.safe_load((REPO / "params.yaml").read_text())


def with_(path: str, value):
    p = copy.deepcopy(PARAMS)
    *parents, key = path.split(".")
    node = p
    for k in parents:
        node = node[k]
    node[key] = value
    return p


def test_the_repository_params_are_valid_and_the_model_list_is_the_networks():
    from palm.nn.models import model_names

    assert validate(PARAMS) is PARAMS
    assert list(MODEL_NAMES) == model_names()
    cfg = training_config(PARAMS)
    assert cfg.model == PARAMS["model"] and cfg.epochs == PARAMS["train"]["epochs"]


@pytest.mark.parametrize(
    "path,value,message",
    [
        ("model", "foo", "model = 'foo': input should be 'lenet'"),
        ("image_size", "abc", "image_size = 'abc': must be a whole number (not a string)"),
        ("image_size", 8, "image_size = 8: input should be greater than or equal to 16"),
        ("train.lr", "fast", "train.lr = 'fast': must be a number"),
        ("train.lr", float("nan"), "train.lr = nan: must be finite"),
        ("train.batch_size", 0, "train.batch_size = 0: input should be greater than or equal to 1"),
        ("train.class_balance", "yes", "train.class_balance = 'yes': must be true or false"),
        ("train.augment.rotate_deg", -5, "train.augment.rotate_deg = -5: input should be greater than"),
        ("train.augment.flip", True, "train.augment.flip = True: is not a known key"),
        ("preprocess.workers", -1, "preprocess.workers = -1"),
        ("unzip.max_ratio", 0.5, "unzip.max_ratio = 0.5"),
        ("evaluate.batch_size", 2.0, "evaluate.batch_size = 2.0: must be a whole number"),
        ("explain", None, "explain = None: must be a mapping"),
        ("data.source", "zips", "data.source = 'zips': input should be 'palm' or 'folder'"),
        ("data.input", "", "data.input = '': string should have at least 1 character"),
        ("data.val_fraction", 0.9, "data.val_fraction = 0.9: input should be less than or equal to 0.5"),
        ("data.val_fraction", 0, "data.val_fraction = 0: input should be greater than 0"),
        ("data.split_seed", -1, "data.split_seed = -1"),
        ("data.zips_dir", "data/original", "data.zips_dir = 'data/original': is not a known key"),
        # the threshold grammar is the schema's (palm.core.params.parse_threshold)
        (
            "train.threshold",
            "youdn",
            "train.threshold = 'youdn': expected a number in (0, 1), 'youden', 'sensitivity>=X'",
        ),
        ("train.threshold", "sensitivity>=1.5", "train.threshold = 'sensitivity>=1.5': expected a number in (0, 1)"),
        ("train.threshold", 1.0, "train.threshold = 1.0: a number must be in (0, 1), got 1.0"),
        ("train.threshold", True, "train.threshold = True: expected a number in (0, 1) or a rule, got True"),
        (
            "models.alexnet.threshold",
            "specificity>=0",
            "models.alexnet.threshold = 'specificity>=0': expected a number",
        ),
        # per-model overrides are typed as train: is (derived from TrainParams)
        (
            "models.alexnet.warmup_epochs",
            -1,
            "models.alexnet.warmup_epochs = -1: input should be greater than or equal",
        ),
        (
            "models.alexnet.select_by",
            "f1",
            "models.alexnet.select_by = 'f1': input should be 'loss', 'accuracy' or 'auc'",
        ),
        ("models.alexnet.nonsense", 1, "models.alexnet.nonsense = 1: is not a known key"),
        # synthetic: is the schema's too
        ("synthetic.n_val_pm", -1, "synthetic.n_val_pm = -1: input should be greater than or equal to 0"),
        ("synthetic.scale", 0, "synthetic.scale = 0: input should be greater than 0"),
        ("synthetic.jpeg_quality", 101, "synthetic.jpeg_quality = 101: input should be less than or equal to 100"),
        ("synthetic.n_train", 5, "synthetic.n_train = 5: is not a known key"),
    ],
)
def test_a_bad_value_is_one_line_naming_key_and_value(path, value, message):
    with pytest.raises(ConfigError) as exc:
        validate(with_(path, value))
    assert str(exc.value) == f"params.yaml: {message}" or str(exc.value).startswith(f"params.yaml: {message}")
    assert len(str(exc.value).splitlines()) == 1


def test_every_bad_key_is_listed_and_a_per_model_override_does_not_mask_train():
    p = with_("train.lr", -1)
    p["models"]["senet18"]["lr"] = 0.01  # the chosen model's own lr: train.lr is still checked
    p["train"]["epochs"] = "2"
    with pytest.raises(ConfigError) as exc:
        validate(p)
    lines = str(exc.value).splitlines()
    assert lines == [
        "params.yaml: train.epochs = '2': must be a whole number (not a string)",
        "params.yaml: train.lr = -1: input should be greater than 0",
    ]


def test_missing_train_keys_are_named_params_yaml_is_the_one_source_of_defaults():
    p = copy.deepcopy(PARAMS)
    del p["train"]["epochs"]
    with pytest.raises(ConfigError, match="params.yaml: train.epochs is missing"):
        training_config(p)


def test_per_model_overrides_take_every_training_key_typed_once():
    from palm.core.params import ModelOverrides, TrainParams

    assert set(ModelOverrides.model_fields) == set(TrainParams.model_fields)
    assert all(not f.is_required() for f in ModelOverrides.model_fields.values())
    p = copy.deepcopy(PARAMS)
    p["models"][p["model"]] = {"threshold": "youden", "select_by": "auc", "augment": {"hflip": False}}
    cfg = training_config(p)
    assert (cfg.threshold, cfg.select_by, cfg.augment.hflip) == ("youden", "auc", False)


def test_the_trainer_gets_a_typed_frozen_configuration_whose_record_keeps_the_old_json():
    """:class:`TrainingConfig` has every field of the schema (one list), resolved and typed; its
    ``record()`` is the dict the trainer used to get, key for key and in order (the run identity
    hashes it, model.json keeps it): a run of an earlier palm still resumes."""
    import pydantic

    from palm.core.params import RECIPE_KEYS, AugmentParams, TrainingConfig, TrainParams
    from palm.data.dataset import Augment

    assert list(TrainingConfig.model_fields) == [*TrainParams.model_fields, "model", "image_size"]
    assert list(AugmentParams.model_fields) == list(Augment.__dataclass_fields__)
    p = copy.deepcopy(PARAMS)
    p["model"], p["image_size"] = "lenet", 64
    p["train"].update(threshold="0.4", input_size=None, augment={"scale": 0.1, "hflip": True})
    p["models"]["lenet"] = {"augment": {"vflip": True, "hflip": False}, "lr": 0.002}
    cfg = training_config(p)
    assert (cfg.threshold, cfg.input_size, cfg.lr, cfg.augment.rotate_deg) == (0.4, 64, 0.002, None)
    with pytest.raises(pydantic.ValidationError, match="frozen"):
        cfg.lr = 1.0
    rec = cfg.record()
    # fundus and the recipe levers (label_smoothing, mix, mix_alpha): only when on (all off: the record,
    # and so the run identity, of before they existed; tests/test_recipe.py)
    assert list(rec) == [k for k in TrainParams.model_fields if k not in ("augment", "fundus", *RECIPE_KEYS)] + [
        "augment",
        "model",
        "image_size",
    ]
    # augment: train's keys in their order, then the override's new ones; only those given
    assert list(rec["augment"].items()) == [("hflip", False), ("scale", 0.1), ("vflip", True)]
    assert (rec["threshold"], rec["input_size"], rec["dropout"], rec["model"]) == (0.4, 64, None, "lenet")
    assert cfg.model_copy(update={"nproc": 2}).record() == {**rec, "nproc": 2}
    p["models"]["lenet"]["fundus"] = {"clahe": "green"}
    rec = training_config(p).record()
    assert list(rec)[-4:] == ["augment", "fundus", "model", "image_size"]
    assert rec["fundus"] == {"crop": False, "local_norm": 0.0, "clahe": "green"}


def test_synthetic_needs_images_in_both_sets_in_one_line():
    p = copy.deepcopy(PARAMS)
    p["synthetic"].update(n_val_pm=0, n_val_non_pm=0)
    with pytest.raises(ConfigError) as exc:
        validate(p)
    assert str(exc.value) == (
        "params.yaml: synthetic: n_val_pm + n_val_non_pm is 0: both the training and the validation set need an image"
    )
