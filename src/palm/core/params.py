"""The one validator of ``params.yaml``: a typed schema (pydantic) with each key's type and range.

params.yaml is the one source of default values: every key of ``train:`` must be there (only
``input_size`` and ``dropout`` may be omitted, meaning "the network's own"; ``fundus``, ``label_smoothing``
and ``mix``, meaning off, with ``mix_alpha`` 0.2); ``models.<name>:`` overrides any of them for one
network. Validation runs before any work (``palm.core.config.load_params``, and again on the merged
training configuration); a bad value is a
:class:`~palm.core.errors.ConfigError` with one line per problem naming the key and the value::

    params.yaml: train.epochs = '2': must be a whole number (not a string)
    params.yaml: models.alexnet.lr = -1: must be greater than 0

Whole numbers (epochs, sizes, seeds) must be written as such: ``"2"`` and ``2.5`` are refused,
not rounded. ``models.<name>:`` takes any key of ``train:`` (:class:`ModelOverrides` is derived
from :class:`TrainParams`: a new training key is typed once). ``train.threshold`` follows the
grammar of :func:`parse_threshold` (a probability or a rule), checked here.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import TYPE_CHECKING, Annotated, Any, Literal, TypeVar

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PrivateAttr,
    StrictBool,
    StrictInt,
    ValidationError,
    create_model,
    model_validator,
)
from pydantic.fields import FieldInfo

from palm.core.errors import ConfigError

#: the networks of :data:`palm.nn.models.MODELS` (listed here so that validating params.yaml does not
#: import Paddle; tests/test_params.py checks that the two lists agree)
MODEL_NAMES = (
    "lenet",
    "alexnet",
    "vgg16",
    "googlenet",
    "resnet50",
    "resnet101",
    "resnet152",
    "senet18",
    "mobilenetv3_small",
    "mobilenetv3_large",
    "shufflenetv2",
)
ModelName = Literal[MODEL_NAMES]  # type: ignore[valid-type]

Count = Annotated[StrictInt, Field(ge=1)]
NonNegInt = Annotated[StrictInt, Field(ge=0)]
Real = Annotated[float, Field(allow_inf_nan=False)]
Positive = Annotated[float, Field(gt=0, allow_inf_nan=False)]
NonNeg = Annotated[float, Field(ge=0, allow_inf_nan=False)]
Fraction = Annotated[float, Field(ge=0, lt=1, allow_inf_nan=False)]  # 0 <= x < 1
#: the most bootstrap resamples (evaluate.bootstrap): memory is resamples x validation images x 8 bytes
#: per array; 10,000 already give intervals stable to the third decimal
MAX_BOOTSTRAP = 20_000
#: the sides an image may be decoded to or a network may take (image_size, input_size)
MIN_SIDE, MAX_SIDE = 16, 4096
Side = Annotated[StrictInt, Field(ge=MIN_SIDE, le=MAX_SIDE)]
#: PM if the probability is at least this, unless a model (model.json) or params.yaml says otherwise
DEFAULT_THRESHOLD = 0.5
#: test-time augmentation (palm.serve.tta): the views whose mean probability is the model's
TTA_MODES = ("off", "hflip", "flips", "flips+rot")
#: fundus enhancement (palm.data.fundus): where CLAHE applies
CLAHE_MODES = ("off", "luminance", "green")
#: ... and the largest local_norm (the blur's sigma as a fraction of the side; 0 = off)
MAX_LOCAL_NORM = 0.5
#: batch mixing in training (palm.training.recipe): none, mixup or cutmix
MIX_MODES = ("off", "mixup", "cutmix")
#: the training-recipe keys (palm.training.recipe) that enter :meth:`TrainingConfig.record` only when on
RECIPE_KEYS = ("label_smoothing", "mix", "mix_alpha")
_RULE = re.compile(r"^\s*(sensitivity|specificity)\s*>=\s*([0-9.]+)\s*$")


def parse_threshold(value) -> float | str:
    """A threshold setting: a number in (0, 1), ``youden``, ``sensitivity>=X`` or ``specificity>=X``."""
    if isinstance(value, bool):
        raise ConfigError(f"threshold: expected a number in (0, 1) or a rule, got {value!r}")
    if isinstance(value, (int, float)):
        if not 0 < float(value) < 1:
            raise ConfigError(f"threshold: a number must be in (0, 1), got {value}")
        return float(value)
    text = str(value).strip()
    try:
        return parse_threshold(float(text))
    except ValueError:
        pass
    if text == "youden":
        return text
    m = _RULE.match(text)
    if m and 0 < float(m.group(2)) <= 1:
        return f"{m.group(1)}>={float(m.group(2)):g}"
    raise ConfigError(
        f"threshold: expected a number in (0, 1), 'youden', 'sensitivity>=X' or 'specificity>=X' "
        f"(0 < X <= 1), got {value!r}"
    )


def _threshold_grammar(value):
    """The schema's check of a threshold setting, before any conversion (``true`` is not 1):
    :func:`parse_threshold`'s grammar; the value parsed (a float, or the rule written canonically)."""
    try:
        return parse_threshold(value)
    except ConfigError as exc:
        raise ValueError(str(exc).removeprefix("threshold: ")) from None


#: a probability, or a rule (youden, sensitivity>=X, specificity>=X): :func:`parse_threshold`
Threshold = Annotated[float | str, BeforeValidator(_threshold_grammar)]


def _off_word(value):
    """``off`` as YAML 1.1 (PyYAML, ``--set``) reads a bare ``off``: false (dvc's YAML 1.2: the text)."""
    return "off" if value is False else value


#: ``train.tta`` and ``model.json``'s ``tta``: one of :data:`TTA_MODES`
TTAMode = Annotated[Literal[TTA_MODES], BeforeValidator(_off_word)]  # type: ignore[valid-type]


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DataParams(Section):
    source: Literal["palm", "folder"]
    input: Annotated[str, Field(min_length=1)]
    val_fraction: Annotated[float, Field(gt=0, le=0.5, allow_inf_nan=False)]
    split_seed: NonNegInt


class UnzipParams(Section):
    max_total_mb: Positive
    max_entry_mb: Positive
    max_ratio: Annotated[float, Field(ge=1, allow_inf_nan=False)]
    ratio_floor_mb: NonNeg


class PreprocessParams(Section):
    shard_size: Count
    workers: NonNegInt


class AugmentParams(Section):
    """Fields of :class:`palm.data.dataset.Augment`; those not given keep its defaults (off)."""

    hflip: StrictBool | None = None
    vflip: StrictBool | None = None
    rotate_deg: Annotated[float, Field(ge=0, le=180, allow_inf_nan=False)] | None = None
    brightness: Fraction | None = None
    contrast: Fraction | None = None
    scale: Fraction | None = None


class FundusParams(Section):
    """Fields of :class:`palm.data.fundus.Fundus` (the steps of its ``enhance``); not given: off."""

    crop: StrictBool | None = None
    local_norm: Annotated[float, Field(ge=0, le=MAX_LOCAL_NORM, allow_inf_nan=False)] | None = None
    clahe: Annotated[Literal[CLAHE_MODES], BeforeValidator(_off_word)] | None = None  # type: ignore[valid-type]

    def __bool__(self) -> bool:
        """Whether any step is on (a step not given is off), as for ``palm.data.fundus.Fundus``."""
        return fundus_on(self.crop, self.local_norm, self.clahe)


def fundus_on(crop, local_norm, clahe) -> bool:
    """Whether fundus enhancement changes an image: any step on (None: off). The one rule, for
    :class:`FundusParams` (the run identity) and ``palm.data.fundus.Fundus`` (``enhance``)."""
    return bool(crop or local_norm or clahe not in (None, "off"))


class TrainParams(Section):
    epochs: Annotated[StrictInt, Field(ge=1, le=100_000)]
    batch_size: Count
    optimizer: Literal["adam", "momentum"]
    lr: Annotated[float, Field(gt=0, le=10, allow_inf_nan=False)]
    momentum: Fraction
    weight_decay: NonNeg
    schedule: Literal["cosine", "constant"]
    warmup_epochs: NonNeg
    holdout: Annotated[float, Field(ge=0, le=0.5, allow_inf_nan=False)]
    select: Literal["last", "best"]
    select_by: Literal["loss", "accuracy", "auc"]
    ema: Fraction
    class_balance: StrictBool
    # the recipe levers (palm.training.recipe); off by default, in the run identity only when on
    label_smoothing: Annotated[float, Field(ge=0, lt=0.5, allow_inf_nan=False)] = 0.0
    mix: Annotated[Literal[MIX_MODES], BeforeValidator(_off_word)] = "off"  # type: ignore[valid-type]
    mix_alpha: Positive = 0.2
    augment: AugmentParams
    fundus: FundusParams = FundusParams()
    seed: NonNegInt
    device: Annotated[str, Field(pattern=r"^(auto|cpu|gpu(:\d+)?)$")]
    amp: Literal["auto", "off", "fp16", "bf16"]
    workers: NonNegInt
    nproc: Count
    to_static: StrictBool
    threshold: Threshold
    tta: TTAMode  # not part of a run's identity: palm.serve.tta
    input_size: Side | None = None
    dropout: Fraction | None = None


def _optional(field: FieldInfo) -> Any:
    """A field's type, constraints included, that may also be absent (None)."""
    base: Any = Annotated[(field.annotation, *field.metadata)] if field.metadata else field.annotation
    return base | None


if TYPE_CHECKING:  # the type checker cannot follow create_model: the fields read here, as they are

    class ModelOverrides(Section):
        augment: AugmentParams | None
        fundus: FundusParams | None

else:
    #: ``models.<name>``: any key of ``train:``, typed as there (one list of fields), for that network only
    ModelOverrides = create_model(
        "ModelOverrides",
        __base__=Section,
        __doc__="``models.<name>``: any training key, for that network only.",
        **{name: (_optional(f), None) for name, f in TrainParams.model_fields.items()},
    )


class SyntheticParams(Section):
    """``synthetic:``, the arguments of :func:`palm.data.synthetic.generate` (those not given keep its defaults)."""

    seed: NonNegInt | None = None
    n_train_p: NonNegInt | None = None
    n_train_n: NonNegInt | None = None
    n_train_h: NonNegInt | None = None
    n_val_pm: NonNegInt | None = None
    n_val_non_pm: NonNegInt | None = None
    scale: Positive | None = None
    jpeg_quality: Annotated[StrictInt, Field(ge=1, le=100)] | None = None

    @model_validator(mode="after")
    def _both_sets(self):
        train = [self.n_train_p, self.n_train_n, self.n_train_h]
        valid = [self.n_val_pm, self.n_val_non_pm]
        for counts, which in ((train, "n_train_p + n_train_n + n_train_h"), (valid, "n_val_pm + n_val_non_pm")):
            if all(c is not None for c in counts) and sum(counts) == 0:
                raise ValueError(f"{which} is 0: both the training and the validation set need an image")
        return self


class EvaluateParams(Section):
    batch_size: Count
    prevalence: Annotated[float, Field(gt=0, lt=1, allow_inf_nan=False)]
    bootstrap: Annotated[StrictInt, Field(ge=0, le=MAX_BOOTSTRAP)]


class ExplainParams(Section):
    n_images: NonNegInt


class TrainingParams(BaseModel):
    """What the train stage reads (also what ``Trainer`` gets from scripts and tests)."""

    model_config = ConfigDict(extra="ignore", frozen=True)
    model: ModelName
    image_size: Side
    train: TrainParams
    models: dict[ModelName, ModelOverrides | None] = {}


class Params(TrainingParams):
    """All of params.yaml. Other top-level keys are allowed (another tool's), not checked."""

    model_config = ConfigDict(extra="allow", frozen=True)
    data: DataParams
    unzip: UnzipParams
    synthetic: SyntheticParams | None = None
    preprocess: PreprocessParams
    evaluate: EvaluateParams
    explain: ExplainParams


_MESSAGES = {
    "int_type": "must be a whole number",
    "int_parsing": "must be a whole number",
    "int_from_float": "must be a whole number",
    "bool_type": "must be true or false",
    "float_parsing": "must be a number",
    "float_type": "must be a number",
    "finite_number": "must be finite",
    "missing": "is missing",
    "extra_forbidden": "is not a known key",
    "literal_error": None,
    "string_pattern_mismatch": "must be auto, cpu, gpu or gpu:N",
    "model_type": "must be a mapping",
    "dict_type": "must be a mapping",
}


#: the member names pydantic puts in an error's location inside a union (train.threshold.float)
_UNION_TAGS = ("float", "str")


def short(value, limit: int = 60) -> str:
    """``repr(value)``, cut to ``limit`` characters: a message quotes a bad value, never a huge one."""
    return short_text(repr(value), limit)


def short_text(text: str, limit: int = 60) -> str:
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text):,} characters)"


def _line(err: Mapping[str, Any], source: str) -> str:
    key = ".".join(str(p) for p in err["loc"] if p not in _UNION_TAGS)
    kind = err["type"]
    if kind == "value_error":  # a validator's own message (the threshold grammar, synthetic's counts)
        msg = str(err["ctx"]["error"])
    else:
        msg = _MESSAGES.get(kind) or err["msg"][0].lower() + err["msg"][1:]
    if kind in ("int_type", "bool_type") and isinstance(err.get("input"), str):
        msg += " (not a string)"
    if kind == "missing":
        return f"{source}: {key} {msg}"
    if isinstance(err.get("input"), dict):  # a whole section's check: the message names the keys
        return f"{source}: {key}: {msg}"
    return f"{source}: {key} = {short(err.get('input'))}: {msg}"


M = TypeVar("M", bound=BaseModel)


def check(model: type[M], params: Any, source: str) -> M:
    if not isinstance(params, dict):
        raise ConfigError(f"{source}: expected a mapping of parameters, got {type(params).__name__}")
    try:
        return model.model_validate(params)
    except ValidationError as exc:
        raise ConfigError("\n".join(_line(e, source) for e in exc.errors(include_url=False))) from None


def validate(params: dict, source: str = "params.yaml") -> dict:
    """``params`` (all of params.yaml) checked against :class:`Params`; the same dict back."""
    check(Params, params, source)
    return params


class TrainingConfig(TrainParams):
    """What the trainer gets (:func:`training_config`): the fields of :class:`TrainParams` (one
    list of fields), overridden by ``models.<model>:``, plus ``model`` and ``image_size``; typed,
    frozen. Resolved: ``input_size`` is the side the network sees (never None, never above
    ``image_size``), ``threshold`` is a float or a canonical rule (:func:`parse_threshold`).
    A new training key is a field of :class:`TrainParams` (and its default in params.yaml): it
    is then here, in ``models.<name>:``, in :meth:`record` (the run identity, ``model.json``).

    :meth:`record` is its JSON form, byte for byte the dict the trainer used to get: the
    checkpoint's run identity hashes it, ``model.json`` and the checkpoint keep it."""

    model: ModelName
    image_size: Side
    #: the order of ``augment``'s keys in :meth:`record`: ``train.augment``'s, then the override's new ones
    _augment_order: tuple[str, ...] = PrivateAttr(default=())

    def record(self) -> dict:
        """The configuration as JSON-able data: :class:`TrainParams`' keys in their order (``augment``
        last, with only the keys given; then ``fundus``, all three steps, only when one is on; then
        ``label_smoothing`` when above 0 and ``mix`` with ``mix_alpha`` when mixing: a run without
        them keeps its identity), then ``model`` and ``image_size``."""
        cfg = self.model_dump(exclude={"augment", "fundus", "model", "image_size", *RECIPE_KEYS})
        augment = self.augment.model_dump(exclude_none=True)
        order = [k for k in self._augment_order if k in augment]
        cfg["augment"] = {k: augment[k] for k in [*order, *(k for k in augment if k not in order)]}
        if self.fundus:
            cfg["fundus"] = self.fundus.model_dump()
        if self.label_smoothing:
            cfg["label_smoothing"] = self.label_smoothing
        if self.mix != "off":
            cfg["mix"], cfg["mix_alpha"] = self.mix, self.mix_alpha
        cfg["model"] = self.model
        cfg["image_size"] = self.image_size
        return cfg


def training_config(params: dict, source: str = "params.yaml") -> TrainingConfig:
    """The training configuration of ``params['model']``: ``train:`` overridden by ``models.<model>:``
    (``augment`` and ``fundus`` key by key), checked; plus ``model`` and ``image_size``; ``input_size``
    resolved (it caps the side the network sees: smaller shards, ``image_size``, are used as they
    are); ``fundus`` resolved (every step given: off unless set)."""
    p = check(TrainingParams, params, source)
    cfg = p.train.model_dump(exclude={"augment", "fundus"})
    augment = p.train.augment.model_dump(exclude_none=True)
    fundus = {"crop": False, "local_norm": 0.0, "clahe": "off", **p.train.fundus.model_dump(exclude_none=True)}
    override = p.models.get(p.model)
    if override is not None:
        cfg.update(override.model_dump(exclude_none=True, exclude={"augment", "fundus"}))
        if override.augment is not None:
            augment.update(override.augment.model_dump(exclude_none=True))
        if override.fundus is not None:
            fundus.update(override.fundus.model_dump(exclude_none=True))
    cfg["input_size"] = min(cfg["input_size"] or p.image_size, p.image_size)
    config = TrainingConfig.model_validate(
        {**cfg, "augment": augment, "fundus": fundus, "model": p.model, "image_size": p.image_size}
    )
    config._augment_order = tuple(augment)
    return config
