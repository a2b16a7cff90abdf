"""params.yaml's schema (palm.params): every key typed and ranged, errors naming key and value."""

import copy

import pytest
import yaml

from conftest import REPO
from palm.errors import ConfigError
from palm.params import MODEL_NAMES, training_config, validate

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
    assert cfg["model"] == PARAMS["model"] and cfg["epochs"] == PARAMS["train"]["epochs"]


@pytest.mark.parametrize("path,value,message", [
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
])
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
    assert lines == ["params.yaml: train.epochs = '2': must be a whole number (not a string)",
                     "params.yaml: train.lr = -1: input should be greater than 0"]


def test_missing_train_keys_are_named_params_yaml_is_the_one_source_of_defaults():
    p = copy.deepcopy(PARAMS)
    del p["train"]["epochs"]
    with pytest.raises(ConfigError, match="params.yaml: train.epochs is missing"):
        training_config(p)
