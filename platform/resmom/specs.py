"""Job specs: one validated pydantic model per experiment.

A spec is loaded from YAML, `--set key=value` overrides are applied to the
raw mapping, and the result is validated once. Derived values (per-rank
batch, variant name) are properties, never written back, so the logged spec
is the spec that ran.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from resmom.data.registry import DATASETS, dataset_info, is_known_dataset


class SpecError(ValueError):
    """An invalid spec file, override or field; the message names the culprit."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class AugmentSpec(_Strict):
    """Two-view augmentation recipe of BYOL (Grill et al., arXiv 2006.07733, Table 6).

    The defaults are BYOL's except `crop_scale`, which BYOL draws from
    (0.08, 1.0). Fields that contain a pair give the value of view 1 and
    view 2, because BYOL blurs and solarizes its two views with different
    probabilities.
    """

    crop_scale: tuple[float, float] = Field((0.4, 1.0), description="area range of the crop")
    flip_p: float = Field(0.5, ge=0, le=1)
    jitter_p: float = Field(0.8, ge=0, le=1)
    brightness: float = Field(0.4, ge=0)
    contrast: float = Field(0.4, ge=0)
    saturation: float = Field(0.2, ge=0)
    hue: float = Field(0.1, ge=0, le=0.5)
    grayscale_p: float = Field(0.2, ge=0, le=1)
    blur_p: tuple[float, float] = Field(
        (1.0, 0.1), description="gaussian blur probability per view"
    )
    blur_sigma: tuple[float, float] = Field(
        (0.1, 2.0), description="range of the blur's standard deviation, in pixels of the crop"
    )
    blur_kernel_fraction: float = Field(
        0.1,
        gt=0,
        le=1,
        description="blur kernel side as a fraction of the crop side, rounded to an odd "
        "number of at least 3 (SimCLR, arXiv 2002.05709, appendix A: 10% of the side)",
    )
    solarize_p: tuple[float, float] = Field(
        (0.0, 0.2), description="solarization probability per view"
    )
    solarize_threshold: float = Field(
        0.5, ge=0, le=1, description="pixels at or above this value (in [0, 1]) are inverted"
    )

    @model_validator(mode="after")
    def _check_ranges(self) -> AugmentSpec:
        low, high = self.crop_scale
        if not 0 < low <= high <= 1:
            raise ValueError(f"crop_scale must satisfy 0 < low <= high <= 1, got {self.crop_scale}")
        low, high = self.blur_sigma
        if not 0 < low <= high:
            raise ValueError(f"blur_sigma must satisfy 0 < low <= high, got {self.blur_sigma}")
        for name in ("blur_p", "solarize_p"):
            if not all(0 <= p <= 1 for p in getattr(self, name)):
                raise ValueError(f"{name} must hold two probabilities in [0, 1]")
        return self


class DataSpec(_Strict):
    """Dataset, crop size, storage options of the `.beton` files and the augmentation recipe.

    `resolution`, `write_mode` and `max_resolution` left out take the
    dataset's defaults (`resmom.data.registry`).
    """

    dataset: str = Field("digits", description=f"one of {', '.join(DATASETS)}, or imagefolder:PATH")
    resolution: int = Field(ge=8, le=512, description="side of the training crops in pixels")
    train_split: Literal["train", "unlabeled", "train+unlabeled"] = Field(
        "train",
        description="images SSL training reads; unlabeled and train+unlabeled exist for stl10 "
        "only. The kNN bank and probes always use the labeled train images",
    )
    write_mode: Literal["raw", "jpg"] = Field(description="image storage in the .beton")
    max_resolution: int | None = Field(
        ge=8, description="maximum stored image side; none keeps the source size"
    )
    jpeg_quality: int = Field(90, ge=1, le=100, description="JPEG quality of write_mode jpg")
    loader_threads: int = Field(1, ge=1, description="FFCV decoding threads per rank")
    augment: AugmentSpec = AugmentSpec()

    @model_validator(mode="before")
    @classmethod
    def _fill_dataset_defaults(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        name = data.get("dataset", "digits")
        # An unknown name takes digits' defaults so that the only error is the name.
        known = isinstance(name, str) and is_known_dataset(name)
        info = dataset_info(name if known else "digits")
        defaults = {
            "resolution": info.resolution,
            "write_mode": info.write_mode,
            "max_resolution": info.max_resolution,
        }
        return {**defaults, **data}

    @field_validator("dataset")
    @classmethod
    def _check_dataset(cls, name: str) -> str:
        if not is_known_dataset(name):
            raise ValueError(
                f"unknown dataset {name!r}; accepted: {', '.join(DATASETS)}, imagefolder:PATH"
            )
        return name

    @model_validator(mode="after")
    def _check_split(self) -> DataSpec:
        if self.train_split != "train" and self.dataset != "stl10":
            raise ValueError(
                f"train_split {self.train_split} needs unlabeled images, which only stl10 has"
            )
        return self


class ModelSpec(_Strict):
    backbone: Literal["resnet18", "resnet50", "vit_tiny", "vit_small"] = "resnet18"
    stem: Literal["cifar", "imagenet"] = Field(
        "cifar",
        description="ResNet stem: cifar (3x3, stride 1) or imagenet (7x7, stride 2, max-pool)",
    )
    width: int = Field(64, ge=4, description="ResNet channels of the first stage; 64 is standard")
    patch_size: int = Field(4, ge=1, description="ViT patch side in pixels")


# The defaults of each method's paper (or its public code), the one place
# they live. A spec field left out takes the value here; the resolved value is
# what gets logged.
#   BYOL: Grill et al., arXiv 2006.07733.
#   MoCo v2: Chen et al., arXiv 2003.04297 (queue 65536, temperature 0.2,
#     momentum 0.999, 2048-d hidden layer, 128-d output).
#   MoCo v3: Chen, Xie, He, arXiv 2104.02057, and facebookresearch/moco-v3
#     (temperature 1.0 for ResNets, momentum 0.99 on a cosine, 4096/256 MLPs).
METHOD_DEFAULTS: dict[str, dict[str, Any]] = {
    "byol": {
        "projector_hidden_dim": 4096,
        "projection_dim": 256,
        "predictor_hidden_dim": 4096,
        "momentum_base": 0.99,
        "momentum_schedule": "cosine",
        "temperature": 1.0,
        "queue_size": 0,
    },
    "mocov2": {
        "projector_hidden_dim": 2048,
        "projection_dim": 128,
        "predictor_hidden_dim": 0,
        "momentum_base": 0.999,
        "momentum_schedule": "constant",
        "temperature": 0.2,
        "queue_size": 65536,
    },
    "mocov3": {
        "projector_hidden_dim": 4096,
        "projection_dim": 256,
        "predictor_hidden_dim": 4096,
        "momentum_base": 0.99,
        "momentum_schedule": "cosine",
        "temperature": 1.0,
        "queue_size": 0,
    },
}


class MethodSpec(_Strict):
    """The SSL method; fields left out take the method's defaults (METHOD_DEFAULTS)."""

    name: Literal["byol", "mocov2", "mocov3"] = "byol"
    projector_hidden_dim: int = Field(ge=1)
    projection_dim: int = Field(ge=1)
    predictor_hidden_dim: int = Field(ge=0, description="0: no predictor (MoCo v2)")
    momentum_base: float = Field(ge=0, le=1, description="EMA coefficient at step 0")
    momentum_schedule: Literal["cosine", "constant"] = Field(
        description="cosine: from momentum_base to 1 over training; constant: momentum_base"
    )
    temperature: float = Field(gt=0, description="InfoNCE temperature (MoCo); unused by BYOL")
    queue_size: int = Field(ge=0, description="negative keys kept (MoCo v2); 0 for the others")

    @model_validator(mode="before")
    @classmethod
    def _fill_method_defaults(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        # An unknown name takes BYOL's defaults so that the only error is the name.
        defaults = METHOD_DEFAULTS.get(data.get("name", "byol"), METHOD_DEFAULTS["byol"])
        return {**defaults, **data}

    @model_validator(mode="after")
    def _check_heads(self) -> MethodSpec:
        if self.name == "mocov2":
            if self.queue_size == 0:
                raise ValueError("mocov2 needs method.queue_size > 0")
            if self.predictor_hidden_dim:
                raise ValueError("mocov2 has no predictor: set method.predictor_hidden_dim to 0")
        else:
            if self.queue_size:
                raise ValueError(f"{self.name} uses no queue: set method.queue_size to 0")
            if not self.predictor_hidden_dim:
                raise ValueError(f"{self.name} needs a predictor: method.predictor_hidden_dim > 0")
        return self


class ResidualMomentumSpec(_Strict):
    """Residual-momentum term: alpha * mean_v distance(student_v, stopgrad(teacher_v))."""

    alpha: float = Field(1.0, ge=0, description="weight of the intra-gap term; 0 is the baseline")
    alpha_schedule: Literal["constant", "warmup", "cosine"] = Field(
        "constant",
        description="warmup: linear from 0 over alpha_warmup_epochs; cosine: from alpha down to 0",
    )
    alpha_warmup_epochs: float = Field(10.0, ge=0)
    distance: Literal["cosine", "l2", "kd"] = Field(
        "cosine",
        description="cosine: 2 - 2 cos (the paper's); l2: squared distance of raw outputs; "
        "kd: softmax cross-entropy from teacher to student",
    )
    kd_temperature: float = Field(0.1, gt=0, description="softmax temperature of the kd distance")
    level: Literal["output", "backbone"] = Field(
        "output", description="output: the layer the SSL loss uses; backbone: pooled features"
    )


class OptimSpec(_Strict):
    optimizer: Literal["sgd", "lars", "adamw"] = "sgd"
    lr: float = Field(0.1, gt=0, description="base learning rate, before lr_scaling")
    lr_scaling: Literal["none", "linear"] = Field(
        "none", description="linear: lr * batch_size / 256 (Goyal et al., arXiv 1706.02677)"
    )
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD and LARS momentum")
    weight_decay: float = Field(1e-4, ge=0)
    lars_eta: float = Field(0.001, gt=0, description="LARS trust coefficient")
    batch_size: int = Field(128, ge=2, description="global batch over all ranks")
    epochs: int = Field(10, ge=1)
    warmup_epochs: float = Field(1.0, ge=0)
    grad_clip: float | None = Field(None, gt=0, description="max global gradient norm; none: off")
    precision: Literal["fp32", "bf16", "fp16"] = Field(
        "fp32", description="autocast dtype of the forward pass; fp16 adds a gradient scaler"
    )

    @property
    def scaled_lr(self) -> float:
        """The learning rate actually applied at the end of warm-up."""
        return self.lr * self.batch_size / 256 if self.lr_scaling == "linear" else self.lr


class ProbeSpec(_Strict):
    knn_k: int = Field(20, ge=1)
    knn_temperature: float = Field(0.1, gt=0)
    online_lr: float = Field(0.1, gt=0, description="SGD learning rate of the online linear head")


class RunSpec(_Strict):
    workers: int = Field(2, ge=1, description="DDP workers (Ray Train)")
    cpus_per_worker: float = Field(1.0, gt=0)
    use_gpu: bool = False
    gpus_per_worker: float = Field(1.0, gt=0, description="GPUs per worker when use_gpu is true")
    sync_bn: bool = Field(True, description="SyncBatchNorm across ranks when DDP runs on GPUs")
    checkpoint_every: int = Field(
        5, ge=1, description="epochs between checkpoints; one is also written at the end"
    )
    max_failures: int = Field(
        0,
        ge=0,
        description="times Ray Train restarts a failed worker group, each time from the "
        "last checkpoint",
    )
    experiment: str = Field("resmom", min_length=1, description="MLflow experiment name")
    tracking_uri: str | None = Field(
        None, description="MLflow tracking URI; default: MLFLOW_TRACKING_URI or the local store"
    )
    tracking_flush_timeout: float = Field(
        900.0,
        gt=0,
        description="seconds a run waits at its end for an unreachable MLflow server to take "
        "the queued metrics, before it saves them to a file beside the checkpoint",
    )


class JobSpec(_Strict):
    """One experiment: data, model, method, residual momentum, optimizer, probes, resources."""

    name: str = Field(min_length=1)
    seed: int = Field(0, ge=0)
    data: DataSpec = DataSpec()  # type: ignore[call-arg]  # defaults filled by its validator
    model: ModelSpec = ModelSpec()
    method: MethodSpec = MethodSpec()
    rm: ResidualMomentumSpec = ResidualMomentumSpec()
    optim: OptimSpec = OptimSpec()
    probe: ProbeSpec = ProbeSpec()
    run: RunSpec = RunSpec()

    @model_validator(mode="after")
    def _check_batch(self) -> JobSpec:
        if self.optim.batch_size % self.run.workers:
            raise ValueError(
                f"optim.batch_size ({self.optim.batch_size}) must be divisible by "
                f"run.workers ({self.run.workers})"
            )
        if self.model.backbone.startswith("vit") and self.data.resolution % self.model.patch_size:
            raise ValueError(
                f"data.resolution ({self.data.resolution}) must be a multiple of "
                f"model.patch_size ({self.model.patch_size})"
            )
        # Each step enqueues the teacher keys of both views of the global batch,
        # so a queue that is a whole number of such blocks never wraps mid-block.
        keys_per_step = 2 * self.optim.batch_size
        if self.method.queue_size % keys_per_step:
            raise ValueError(
                f"method.queue_size ({self.method.queue_size}) must be a multiple of "
                f"2 * optim.batch_size ({keys_per_step}), the keys enqueued per step"
            )
        return self

    @property
    def variant(self) -> str:
        """`baseline` when the residual term is off, else `rm`."""
        return "baseline" if self.rm.alpha == 0 else "rm"

    @property
    def batch_per_rank(self) -> int:
        return self.optim.batch_size // self.run.workers


def _format_location(loc: tuple[Any, ...]) -> str:
    return ".".join(str(part) for part in loc) or "(top level)"


def _accepted_keys(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    """Return the field names accepted at the parent of `loc`, following nested models."""
    current: Any = model
    for part in loc[:-1]:
        field = current.model_fields.get(part) if isinstance(part, str) else None
        if field is None or not isinstance(field.annotation, type):
            return []
        current = field.annotation
        if not issubclass(current, BaseModel):
            return []
    return sorted(current.model_fields)


def format_validation_error(error: ValidationError, model: type[BaseModel], source: str) -> str:
    """Render a pydantic error as one line per field: dotted path, problem, what is accepted."""
    lines = [f"invalid spec {source}:"]
    for item in error.errors():
        loc = tuple(item["loc"])
        message = item["msg"].removeprefix("Value error, ")
        if item["type"] == "extra_forbidden":
            accepted = _accepted_keys(model, loc)
            message = f"unknown key; accepted keys: {', '.join(accepted)}"
        lines.append(f"  {_format_location(loc)}: {message}" if loc else f"  {message}")
    return "\n".join(lines)


def set_path(raw: dict[str, Any], key: str, value: Any) -> None:
    """Set `dotted.key` in a nested mapping in place; a mapping value merges into one there.

    Merging lets a sweep vary several linked fields at once, for example
    `data: {dataset: stl10, resolution: 96}`, without dropping the siblings
    that the base job sets in the same section.

    Raises:
        SpecError: a part of the path exists but is not a mapping.
    """
    parts = key.split(".")
    node = raw
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise SpecError(f"cannot set {key!r}: {part!r} is not a mapping")
        node = child
    leaf = parts[-1]
    if isinstance(value, dict) and isinstance(node.get(leaf), dict):
        for sub_key, sub_value in value.items():
            set_path(node[leaf], str(sub_key), sub_value)
    else:
        node[leaf] = copy.deepcopy(value)


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """Return the cause of a YAML error in one line, without the excerpt of the input."""
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    # safe_load builds plain values only. It rejects the tags that build
    # Python objects (!!python/object and the like), which could run code.
    if isinstance(exc, yaml.constructor.ConstructorError) and "constructor for the tag" in problem:
        tag = problem.rpartition("the tag ")[2]
        return (
            f"tag {tag} is not accepted; a spec contains plain values only (mappings, lists, "
            "strings, numbers, booleans, null), never Python objects"
        )
    return problem


def _parse_value(assignment: str, text: str) -> Any:
    try:
        return yaml.safe_load(text) if text else None
    except yaml.YAMLError as exc:
        raise SpecError(f"invalid value in override {assignment!r}: {_yaml_problem(exc)}") from exc


def apply_override(raw: dict[str, Any], assignment: str) -> None:
    """Apply one `dotted.key=value` override in place; the value is parsed as YAML."""
    key, sep, text = assignment.partition("=")
    if not sep or not key:
        raise SpecError(f"invalid override {assignment!r}: expected key=value, e.g. rm.alpha=0.5")
    value = _parse_value(assignment, text)
    try:
        set_path(raw, key, value)
    except SpecError as exc:
        raise SpecError(f"invalid override {assignment!r}: {exc}") from None


def read_yaml_mapping(path: Path) -> dict[str, Any]:
    """Read a YAML file that must hold a mapping, with line and column on syntax errors."""
    if not path.is_file():
        raise SpecError(f"spec file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise SpecError(f"invalid YAML in {path}{where}: {_yaml_problem(exc)}") from exc
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise SpecError(
            f"invalid spec {path}: the top level must be a mapping, got {type(raw).__name__}"
        )
    return raw


def validate_job(raw: dict[str, Any], source: str = "<mapping>") -> JobSpec:
    try:
        return JobSpec.model_validate(raw)
    except ValidationError as exc:
        raise SpecError(format_validation_error(exc, JobSpec, source)) from exc


def load_job(path: Path, overrides: list[str] | None = None) -> JobSpec:
    """Load a job spec from YAML, apply `--set` overrides, validate.

    Raises:
        SpecError: the file is missing or malformed, an override is malformed,
            or a field is invalid; the message names each offending field.
    """
    raw = read_yaml_mapping(path)
    for assignment in overrides or []:
        apply_override(raw, assignment)
    source = str(path)
    if overrides:
        source += f" with --set {' '.join(overrides)}"
    return validate_job(raw, source)


# ---------------------------------------------------------------------------
# Sweep specs


class Dimension(_Strict):
    """One searched field: exactly one of `grid`, `choice`, `uniform`, `loguniform`.

    `grid` values are all crossed with each other; the other kinds are drawn
    `num_samples` times, reproducibly from `sample_seed`.
    """

    grid: list[Any] | None = Field(None, min_length=1)
    choice: list[Any] | None = Field(None, min_length=1)
    uniform: tuple[float, float] | None = None
    loguniform: tuple[float, float] | None = None

    @model_validator(mode="after")
    def _check_one(self) -> Dimension:
        kinds = ("grid", "choice", "uniform", "loguniform")
        given = [kind for kind in kinds if getattr(self, kind)]
        if len(given) != 1:
            raise ValueError(
                "give exactly one of grid, choice, uniform, loguniform"
                + (f"; got {', '.join(given)}" if given else "")
            )
        for kind in ("uniform", "loguniform"):
            bounds = getattr(self, kind)
            if bounds is not None:
                low, high = bounds
                if not low < high or (kind == "loguniform" and low <= 0):
                    floor = "0 < " if kind == "loguniform" else ""
                    raise ValueError(
                        f"{kind} needs [low, high] with {floor}low < high, got {list(bounds)}"
                    )
        return self

    @property
    def kind(self) -> str:
        return next(k for k in ("grid", "choice", "uniform", "loguniform") if getattr(self, k))


class SchedulerSpec(_Strict):
    """Early stopping of trials by Ray Tune; `none` runs every trial to the end."""

    name: Literal["none", "asha"] = "none"
    metric: str = Field("probe/knn_top1_student", description="metric key ASHA compares")
    mode: Literal["max", "min"] = "max"
    grace_period: int = Field(1, ge=1, description="epochs before a trial can be stopped")
    reduction_factor: float = Field(2.0, gt=1)


class TrialResources(_Strict):
    """Ray Train scaling of every trial; replaces the base job's `run.workers` and friends."""

    workers: int = Field(2, ge=1, description="DDP workers per trial")
    cpus_per_worker: float = Field(1.0, gt=0)
    gpus_per_worker: float = Field(0.0, ge=0, description="0: train on CPUs")


# Job fields that a sweep sets in every trial, from its own fields.
_SWEEP_OWNED = ("name", "run", "run.experiment", "run.tracking_uri")
_RESOURCE_FIELDS = ("run.workers", "run.cpus_per_worker", "run.use_gpu", "run.gpus_per_worker")


class SweepSpec(_Strict):
    """A base job, a search space over its fields, seeds, and how Ray Tune runs the trials."""

    name: str = Field(
        min_length=1,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$",
        description="sweep name: MLflow parent run, storage folder, `--resume NAME`",
    )
    base: dict[str, Any] = Field(
        description="the job every trial starts from: a job spec path (relative to the sweep "
        "file) or an inline job mapping"
    )
    fixed: dict[str, Any] = Field(
        default_factory=dict, description="dotted job field -> value set in every trial"
    )
    space: dict[str, Dimension] = Field(
        default_factory=dict, description="dotted job field -> values to search"
    )
    seeds: list[int] = Field([0], min_length=1, description="each configuration runs once per seed")
    num_samples: int = Field(1, ge=1, description="draws of the choice/uniform/loguniform fields")
    sample_seed: int = Field(0, ge=0, description="seed of those draws")
    scheduler: SchedulerSpec = SchedulerSpec()
    max_concurrent: int = Field(
        0, ge=0, description="trials at once; 0: as many as the cluster's CPUs and GPUs fit"
    )
    resources: TrialResources | None = Field(
        None, description="per-trial scaling; none: the base job's `run` section"
    )
    storage_path: str | None = Field(
        None, description="folder for Tune's state and the sweep record; default DATA_DIR/sweeps"
    )
    experiment: str = Field("resmom-sweeps", min_length=1, description="MLflow experiment")
    tracking_uri: str | None = Field(
        None, description="MLflow tracking URI; default: MLFLOW_TRACKING_URI or the local store"
    )

    @model_validator(mode="after")
    def _check_space(self) -> SweepSpec:
        for key in [*self.fixed, *self.space]:
            if key == "seed":
                raise ValueError("seed: list seeds under `seeds`, not in `fixed` or `space`")
            if key in _SWEEP_OWNED or (self.resources is not None and key in _RESOURCE_FIELDS):
                raise ValueError(
                    f"{key}: the sweep sets this field itself; use `resources`, `experiment` "
                    "and `tracking_uri` of the sweep spec"
                )
        if self.scheduler.name == "asha" and self.max_concurrent == 1:
            raise ValueError("scheduler asha needs max_concurrent > 1 to compare trials")
        return self


def load_sweep(path: Path, overrides: list[str] | None = None) -> SweepSpec:
    """Load a sweep spec, read its base job, apply `--set` overrides, validate.

    The base job is read before the overrides, so `--set base.optim.epochs=1`
    changes the base job of every trial. Trials themselves are validated
    when the sweep is expanded (`resmom.plan.expand`).

    Raises:
        SpecError: the file, its base job or a field is invalid.
    """
    raw = read_yaml_mapping(path)
    base = raw.get("base")
    if isinstance(base, str):
        base_path = (path.parent / base).resolve()
        if not base_path.is_file():
            raise SpecError(f"invalid sweep spec {path}: base job file not found: {base_path}")
        raw["base"] = read_yaml_mapping(base_path)
    for assignment in overrides or []:
        key, _, text = assignment.partition("=")
        section = key.partition(".")[0]
        if section in ("space", "fixed") and isinstance(raw.get(section), dict | None):
            # Their keys are dotted job paths themselves: `space.rm.alpha` names
            # the dimension "rm.alpha", not a nested mapping.
            entries = raw.get(section) or {}
            entries[key.removeprefix(f"{section}.")] = _parse_value(assignment, text)
            raw[section] = entries
        else:
            apply_override(raw, assignment)
    source = str(path)
    if overrides:
        source += f" with --set {' '.join(overrides)}"
    try:
        return SweepSpec.model_validate(raw)
    except ValidationError as exc:
        raise SpecError(format_validation_error(exc, SweepSpec, source)) from exc
