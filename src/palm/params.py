"""The one validator of ``params.yaml``: a typed schema (pydantic) with each key's type and range.

params.yaml is the one source of default values: every key of ``train:`` must be there (only
``input_size`` and ``dropout`` may be omitted, meaning "the network's own"); ``models.<name>:``
overrides any of them for one network. Validation runs before any work (``palm.config.
load_params``, and again on the merged training configuration); a bad value is a
:class:`~palm.errors.ConfigError` with one line per problem naming the key and the value::

    params.yaml: train.epochs = '2': must be a whole number (not a string)
    params.yaml: models.alexnet.lr = -1: must be greater than 0

Whole numbers (epochs, sizes, seeds) must be written as such: ``"2"`` and ``2.5`` are refused,
not rounded. The ``synthetic:`` section belongs to :mod:`palm.data.synthesize`, which checks it.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Optional, Union

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    ValidationError,
)

from palm.errors import ConfigError

#: the networks of :data:`palm.nn.models.MODELS` (listed here so that validating params.yaml does not
#: import Paddle; tests/test_params.py checks that the two lists agree)
MODEL_NAMES = ("lenet", "alexnet", "vgg16", "googlenet", "resnet50", "resnet101", "resnet152", "senet18")
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
#: a probability, or a rule (youden, sensitivity>=X, specificity>=X) that palm.evaluation.metrics.parse_threshold reads
Threshold = Union[Annotated[float, Field(gt=0, lt=1, allow_inf_nan=False)], Annotated[str, Field(min_length=1)]]


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

    hflip: Optional[StrictBool] = None
    vflip: Optional[StrictBool] = None
    rotate_deg: Optional[Annotated[float, Field(ge=0, le=180, allow_inf_nan=False)]] = None
    brightness: Optional[Fraction] = None
    contrast: Optional[Fraction] = None
    scale: Optional[Fraction] = None


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
    augment: AugmentParams
    seed: NonNegInt
    device: Annotated[str, Field(pattern=r"^(auto|cpu|gpu(:\d+)?)$")]
    amp: Literal["auto", "off", "fp16", "bf16"]
    workers: NonNegInt
    nproc: Count
    to_static: StrictBool
    threshold: Threshold
    input_size: Optional[Side] = None
    dropout: Optional[Fraction] = None


class ModelOverrides(Section):
    """``models.<name>``: any training key, for that network only."""

    epochs: Optional[Annotated[StrictInt, Field(ge=1, le=100_000)]] = None
    batch_size: Optional[Count] = None
    optimizer: Optional[Literal["adam", "momentum"]] = None
    lr: Optional[Annotated[float, Field(gt=0, le=10, allow_inf_nan=False)]] = None
    momentum: Optional[Fraction] = None
    weight_decay: Optional[NonNeg] = None
    schedule: Optional[Literal["cosine", "constant"]] = None
    warmup_epochs: Optional[NonNeg] = None
    holdout: Optional[Annotated[float, Field(ge=0, le=0.5, allow_inf_nan=False)]] = None
    select: Optional[Literal["last", "best"]] = None
    select_by: Optional[Literal["loss", "accuracy", "auc"]] = None
    ema: Optional[Fraction] = None
    class_balance: Optional[StrictBool] = None
    augment: Optional[AugmentParams] = None
    seed: Optional[NonNegInt] = None
    device: Optional[Annotated[str, Field(pattern=r"^(auto|cpu|gpu(:\d+)?)$")]] = None
    amp: Optional[Literal["auto", "off", "fp16", "bf16"]] = None
    workers: Optional[NonNegInt] = None
    nproc: Optional[Count] = None
    to_static: Optional[StrictBool] = None
    threshold: Optional[Threshold] = None
    input_size: Optional[Side] = None
    dropout: Optional[Fraction] = None


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
    models: dict[ModelName, Optional[ModelOverrides]] = {}


class Params(TrainingParams):
    """All of params.yaml. Other top-level keys are allowed (another tool's), not checked."""

    model_config = ConfigDict(extra="allow", frozen=True)
    data: DataParams
    unzip: UnzipParams
    synthetic: dict[str, Any] = {}
    preprocess: PreprocessParams
    evaluate: EvaluateParams
    explain: ExplainParams


_MESSAGES = {
    "int_type": "must be a whole number", "int_parsing": "must be a whole number",
    "int_from_float": "must be a whole number", "bool_type": "must be true or false",
    "float_parsing": "must be a number", "float_type": "must be a number", "finite_number": "must be finite",
    "missing": "is missing", "extra_forbidden": "is not a known key", "literal_error": None,
    "string_pattern_mismatch": "must be auto, cpu, gpu or gpu:N", "model_type": "must be a mapping",
    "dict_type": "must be a mapping",
}


def short(value, limit: int = 60) -> str:
    """``repr(value)``, cut to ``limit`` characters: a message quotes a bad value, never a huge one."""
    return short_text(repr(value), limit)


def short_text(text: str, limit: int = 60) -> str:
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text):,} characters)"


def _line(err: dict, source: str) -> str:
    key = ".".join(str(p) for p in err["loc"])
    kind = err["type"]
    msg = _MESSAGES.get(kind) or err["msg"][0].lower() + err["msg"][1:]
    if kind in ("int_type", "bool_type") and isinstance(err.get("input"), str):
        msg += " (not a string)"
    if kind == "missing":
        return f"{source}: {key} {msg}"
    return f"{source}: {key} = {short(err.get('input'))}: {msg}"


def check(model: type[BaseModel], params: Any, source: str) -> BaseModel:
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


def training_config(params: dict, source: str = "params.yaml") -> dict:
    """The training configuration of ``params['model']``: ``train:`` overridden by ``models.<model>:``
    (``augment`` key by key), checked; plus ``model`` and ``image_size``."""
    p = check(TrainingParams, params, source)
    cfg = p.train.model_dump(exclude={"augment"})
    cfg["augment"] = p.train.augment.model_dump(exclude_none=True)
    override = p.models.get(p.model)
    if override is not None:
        for key, value in override.model_dump(exclude_none=True, exclude={"augment"}).items():
            cfg[key] = value
        if override.augment is not None:
            cfg["augment"].update(override.augment.model_dump(exclude_none=True))
    cfg["model"] = p.model
    cfg["image_size"] = p.image_size
    return cfg
