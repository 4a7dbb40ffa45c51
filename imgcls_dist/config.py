"""Typed experiment config: YAML (safe_load only, never executed) + `--set a.b=c` overrides.

Every section is a pydantic model with `extra="forbid"`, so a typo is an error naming the key rather
than a silently ignored setting. The resolved config is written next to every run's outputs and stored
in checkpoints as a plain dict (`ExperimentConfig.model_dump(mode="json")`).
"""

from __future__ import annotations

import reprlib
from pathlib import Path
from typing import Any, Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from imgcls_dist.errors import UserError
from imgcls_dist.preemption import DEFAULT_GRACE_S
from imgcls_dist.storage import Location, PathLike, location

CONFIG_FILE = "config.yaml"  # the resolved config beside every run's (and campaign's, trial's) outputs
SHIPPED_CONFIGS = Path(__file__).parent / "configs"  # the shipped configs and recipes: package data (pyproject.toml)

Transfer = Literal["full", "feature_extraction", "freeze_early", "freeze_most"]
Scheduler = Literal["none", "step", "cosine", "cosine_warm_restarts", "plateau"]
Preset = Literal["none", "light", "standard", "strong", "trivialaugment", "randaugment", "augmix"]


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


class DataConfig(Section):
    path: str = "data/digits"
    # None: the model's default size (32 for the built-in digits configs).
    image_size: Optional[int] = Field(None, ge=8, le=1024)
    in_channels: Literal[1, 3] = 3
    batch_size: int = Field(64, ge=1, description="per worker")
    loader_workers: int = Field(1, ge=0, description="DataLoader processes per worker (decode + augment)")
    # Rows each worker holds in its shuffle buffer (train/stream.py): more mixing, more memory (rows x bytes
    # per encoded image: 2048 x ~110 KB for ImageNet-size JPEGs = ~220 MB). 0: row-group order only.
    shuffle_buffer: int = Field(2048, ge=0)
    # Caps for quick runs and tests; None = use everything.
    max_train_samples: Optional[int] = Field(None, ge=1)
    max_val_samples: Optional[int] = Field(None, ge=1)
    # A stratified training subset (train/subset.py): K rows of every class, or a fraction of each class;
    # nested across sizes for one subset seed (None: train.seed). Validation and test are never subset.
    train_per_class: Optional[int] = Field(None, ge=1)
    train_fraction: Optional[float] = Field(None, gt=0.0, le=1.0)
    subset_seed: Optional[int] = None
    # oversample: every class trains as many samples an epoch as the largest one, by repeating rows of the
    # rarer classes (after the subset and caps above; each copy is its own sample, trained once an epoch and
    # augmented differently; the copies, drawn from the subset seed, stay fixed for the run). none: as stored.
    balance: Literal["none", "oversample"] = "none"

    @model_validator(mode="after")
    def _one_subset(self) -> "DataConfig":
        given = [k for k in ("train_per_class", "train_fraction", "max_train_samples")
                 if getattr(self, k) is not None]
        if len(given) > 1:
            raise ValueError(f"{' and '.join(given)} both choose the training rows: give one")
        return self


class AugmentConfig(Section):
    preset: Preset = "standard"
    # trivialaugment / randaugment / augmix (torchvision's policies): strength scales only the light preset's crop
    # and flip run before the policy; the policy's own magnitudes are the keys below.
    strength: float = Field(0.5, ge=0.0, le=1.0)
    # None: take it from dataset.json ("hflip": false for digits - a flipped 2 is not a 2).
    hflip: Optional[bool] = None
    mixup_alpha: float = Field(0.0, ge=0.0)
    cutmix_alpha: float = Field(0.0, ge=0.0)
    mix_prob: float = Field(1.0, ge=0.0, le=1.0)
    # Random erasing (Zhong et al. 2017) after any preset: with this probability a rectangle of an area share in
    # erasing_scale is filled with uniform noise. 0: off.
    erasing_p: float = Field(0.0, ge=0.0, le=1.0)
    erasing_scale: tuple[float, float] = (0.02, 0.33)
    # randaugment: ops applied to each image (N; 2 is the RandAugment paper's ImageNet value).
    randaugment_n: int = Field(2, ge=1)
    # randaugment: the one magnitude of all its ops (M), a bin of torchvision's 0..30 scale (9: the paper's ImageNet).
    randaugment_m: int = Field(9, ge=0, le=30)
    # augmix: its ops draw magnitude bins 0..severity-1 of 10: at 1 no shift, shear or rotation is left (3: the paper's).
    augmix_severity: int = Field(3, ge=1, le=10)

    @field_validator("erasing_scale")
    @classmethod
    def _scale_range(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not 0.0 < v[0] <= v[1] < 1.0:
            raise ValueError("needs 0 < low <= high < 1 (shares of the image area)")
        return v


class ModelConfig(Section):
    arch: str = "resnet18"
    # None (scratch) | torchvision weights name (DEFAULT, IMAGENET1K_V1, ...; timm/* archs: DEFAULT or a timm
    # pretrained tag) | path to a checkpoint (timm/* archs: also a timm/Hugging Face .safetensors/.pth/.bin file).
    weights: Optional[str] = None
    transfer: Transfer = "full"
    layer_decay: float = Field(1.0, gt=0.0, le=1.0, description="LR multiplier per stage from head to stem")


class TrainConfig(Section):
    epochs: int = Field(10, ge=1)
    optimizer: Literal["sgd", "adam", "adamw"] = "sgd"
    lr: float = Field(0.05, gt=0.0, le=10.0)
    momentum: float = Field(0.9, ge=0.0, lt=1.0)
    nesterov: bool = True
    weight_decay: float = Field(5e-4, ge=0.0)
    label_smoothing: float = Field(0.0, ge=0.0, lt=1.0)
    # balanced: each class's loss weighted by rows / (classes x its rows), counted over the training rows the run
    # uses (sklearn's "balanced" class_weight), so a rare class weighs as much as a common one.
    class_weights: Literal["none", "balanced"] = "none"
    scheduler: Scheduler = "cosine"
    warmup_epochs: int = Field(0, ge=0)
    warmup_start_factor: float = Field(0.1, gt=0.0, le=1.0)
    step_size: int = Field(5, ge=1, description="step: epochs between decays")
    gamma: float = Field(0.1, gt=0.0, le=1.0, description="step: decay factor")
    t0: int = Field(5, ge=1, description="cosine_warm_restarts: epochs of the first cycle")
    t_mult: int = Field(1, ge=1)
    plateau_patience: int = Field(2, ge=0)
    plateau_factor: float = Field(0.1, gt=0.0, lt=1.0)
    min_lr: float = Field(0.0, ge=0.0)
    grad_accum_steps: int = Field(1, ge=1)
    grad_clip: Optional[float] = Field(None, gt=0.0)
    # auto: bf16 on GPUs that support it, else fp16 on GPU; on a CPU bf16 where it computes bf16 natively
    # (AVX512-BF16, AMX-BF16), else "no" (fp32).
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = "auto"
    # [[epoch, size], ...]: from `epoch` (0-based) on, train at `size`; validation always at data.image_size.
    progressive_resizing: list[tuple[int, int]] = Field(default_factory=list)
    max_nonfinite_steps: int = Field(5, ge=1, description="consecutive non-finite losses before the run stops")
    # Also a checkpoint every N optimizer steps inside an epoch (0: at epoch end only); a run killed mid-epoch
    # resumes at the first sample it had not trained.
    checkpoint_every_steps: int = Field(0, ge=0)
    # torch.compile through accelerate's dynamo backend (inductor): faster GPU steps after a warm-up compile.
    compile: bool = False
    # At least this many optimizer steps: a small training set gets more epochs than train.epochs (the
    # schedule and warm-up stretch with them), so one recipe serves 100 and 100,000 images. None: train.epochs.
    min_steps: Optional[int] = Field(None, ge=1)
    # End the run once this many epochs in a row have not beaten the best val accuracy before them by more
    # than early_stop_min_delta (None: train every epoch). The best epoch's model is exported as always.
    early_stop_patience: Optional[int] = Field(None, ge=1)
    early_stop_min_delta: float = Field(0.0, ge=0.0, le=1.0)
    # Exponential moving average of the weights (train/ema.py), validated every epoch beside the raw weights; the
    # better of the two is what the epoch's checkpoint (and so model.pt) holds. None: off. ema_warmup: the decay
    # ramps up from 0 over the first steps (timm's warm-up), so a short run does not average in its random start.
    ema_decay: Optional[float] = Field(None, gt=0.0, lt=1.0)
    ema_warmup: bool = True
    # Before each validation, BatchNorm running statistics are re-estimated from this many un-augmented, shuffled
    # training batches (train/precise_bn.py): on small data, where an epoch is a few steps, the momentum-averaged
    # ones lag the weights. 0: off.
    precise_bn_batches: int = Field(0, ge=0)
    # Knowledge distillation (train/distill.py): an ensemble.json or model file whose probabilities on each
    # (augmented) training batch the student also learns from; loss = alpha x T^2 x KL(teacher_T, student_T)
    # + (1 - alpha) x cross-entropy on the labels, with T = distill_temperature. None: no teacher.
    teacher: Optional[str] = None
    distill_alpha: float = Field(0.5, ge=0.0, le=1.0)
    distill_temperature: float = Field(4.0, gt=0.0)
    # Progress line inside an epoch at most this often (rank 0), and per-step loss/LR in TensorBoard.
    progress_every_s: float = Field(30.0, gt=0)
    seed: int = 0

    @field_validator("progressive_resizing")
    @classmethod
    def _phases_sorted(cls, v: list[tuple[int, int]]) -> list[tuple[int, int]]:
        epochs = [e for e, _ in v]
        if epochs != sorted(set(epochs)) or any(e < 0 for e in epochs):
            raise ValueError("phases must have distinct, increasing, non-negative epochs")
        if any(s < 8 for _, s in v):
            raise ValueError("sizes must be >= 8")
        return v


class ScalingConfig(Section):
    num_workers: Optional[int] = Field(None, ge=1, description="None: as many as the cluster holds")
    # Elastic (Ray Train's num_workers=(min, max)): after a lost node, Train restarts the run with as many
    # workers as the cluster then holds, down to this, and grows back when nodes return; the epoch in progress
    # is re-cut over the new world (docs/design.md, "Training runs and checkpoints"). None: a fixed world.
    min_workers: Optional[int] = Field(None, ge=1)
    use_gpu: Optional[bool] = None  # None: when the cluster has GPUs
    cpus_per_worker: float = Field(1.0, gt=0.0)


class RunConfig(Section):
    name: str = "run"
    storage_path: str = "runs"
    max_failures: int = Field(0, ge=-1)
    keep_checkpoints: int = Field(2, ge=1, description="best k by validation accuracy")
    tensorboard: bool = True
    stop_grace_s: float = Field(DEFAULT_GRACE_S, gt=0, description="SIGTERM: checkpoint and exit within this")
    tracking: Literal["none", "mlflow"] = Field(
        "none", description="mlflow: params, metrics and artifacts also go to the MLflow server of MLFLOW_TRACKING_URI")

    @field_validator("name")
    @classmethod
    def _safe_name(cls, v: str) -> str:
        if not v or "/" in v or v.startswith("."):
            raise ValueError("must be a plain directory name")
        return v


class TuneConfig(Section):
    num_samples: int = Field(8, ge=1)
    search: Literal["random", "grid"] = "random"
    # name -> {"type": loguniform|uniform|choice|randint, ...}; keys are dotted config paths.
    space: dict[str, dict[str, Any]] = Field(default_factory=dict)
    grace_period: int = Field(1, ge=1)
    reduction_factor: int = Field(2, ge=2)
    max_concurrent: Optional[int] = Field(None, ge=1)
    top_k: int = Field(3, ge=1)
    seed: int = 0


class ConstraintsConfig(Section):
    """Deployment limits a study checks every arm against (None: no limit)."""

    max_latency_ms: Optional[float] = Field(None, gt=0.0, description="single-image CPU latency p50")
    max_model_mb: Optional[float] = Field(None, gt=0.0)
    min_test_acc: Optional[float] = Field(None, ge=0.0, le=1.0)


class StudyConfig(Section):
    """`imgcls-dist study`: every arm (x every sweep value) trained once per seed; format: docs/guide/study.md.
    Trials are sized and run at once like tune trials: scaling.* and tune.max_concurrent apply."""

    # arm name -> config overrides as dotted keys, e.g. {model.arch: resnet50, data.image_size: 64}
    arms: dict[str, dict[str, Any]] = Field(default_factory=dict)
    # Each seed is the trial's train.seed, which also draws its training subset (data.subset_seed unset).
    seeds: list[int] = Field(default_factory=lambda: [0, 1, 2])
    baseline: Optional[str] = None
    # At most one dotted key -> values, crossed with every arm (e.g. data.train_per_class: [10, 50]).
    sweep: dict[str, list[Any]] = Field(default_factory=dict)
    constraints: ConstraintsConfig = Field(default_factory=ConstraintsConfig)
    latency_repeats: int = Field(50, ge=5, description="timed single-image predictions per trial")


class ExperimentConfig(Section):
    data: DataConfig = Field(default_factory=DataConfig)
    augment: AugmentConfig = Field(default_factory=AugmentConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    scaling: ScalingConfig = Field(default_factory=ScalingConfig)
    run: RunConfig = Field(default_factory=RunConfig)
    tune: TuneConfig = Field(default_factory=TuneConfig)
    study: StudyConfig = Field(default_factory=StudyConfig)

    @model_validator(mode="after")
    def _warmup_fits(self) -> "ExperimentConfig":
        if self.train.warmup_epochs >= self.train.epochs and self.train.scheduler != "none":
            raise ValueError(
                f"train.warmup_epochs ({self.train.warmup_epochs}) must be < train.epochs ({self.train.epochs})"
            )
        return self

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


# libyaml's parser where PyYAML has it (its wheels do): a config parses ~10x faster, and nesting deeper than 1000
# levels is refused at once, where the pure-Python scanner spends about a second reaching the recursion limit.
_YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def _load_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_YAML_LOADER)  # a safe loader: no tag ever constructs a Python object


def _yaml_problem(e: yaml.YAMLError) -> str:
    # a ReaderError (a control character, say) has no .problem, and its text spans lines
    return getattr(e, "problem", None) or (str(e).splitlines() or [type(e).__name__])[0]


def _reason(e: BaseException) -> str:
    """The gist of a ValueError/RecursionError, without Python's advice after the colon."""
    return str(e).split(":")[0][:100]


# A value quoted back in an error: a long string, or a YAML alias bomb (a list that repeats itself by reference,
# 9^9 elements in a few lines), would otherwise make the message huge, or hang while it is formatted.
_SHORT = reprlib.Repr()
_SHORT.maxstring = _SHORT.maxother = 60
_SHORT.maxlevel, _SHORT.maxlist = 2, 4


def _format_validation_error(err: ValidationError, source: str) -> str:
    parts = []
    for e in err.errors():
        loc = ".".join(str(x) for x in e["loc"]) or "(top level)"
        msg = "unknown key" if e["type"] == "extra_forbidden" else e["msg"]
        got = e.get("input")
        got_s = "" if e["type"] == "extra_forbidden" or isinstance(got, dict) else f" (got {_SHORT.repr(got)})"
        parts.append(f"{loc}: {msg}{got_s}")
    return f"{source}: invalid config: " + "; ".join(parts)


def add_config_args(parser, required: bool = True, example: str = "train.lr=0.01", layered: bool = True) -> None:
    """--config and --set, the same on every subcommand that takes an experiment config. `layered`: --config may
    be repeated, each file merged over the ones before it (a recipe, then a study's arms)."""
    if layered:
        parser.add_argument("--config", required=required, action="append", metavar="CONFIG",
                            help="YAML experiment config (local, s3:// or gs://); repeatable: later files are "
                                 "merged over earlier ones, key by key")
    else:
        parser.add_argument("--config", required=required, help="YAML experiment config (local, s3:// or gs://)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help=f"override a config value, e.g. --set {example} (repeatable)")


def parse_override(item: str) -> tuple[list[str], Any]:
    """`a.b=c` -> (["a", "b"], c); the value is parsed as YAML (numbers, bools, lists), never evaluated."""
    if "=" not in item:
        raise UserError(f"--set {item!r}: expected KEY=VALUE, e.g. train.lr=0.01")
    key, raw = item.split("=", 1)
    keys = [k for k in key.strip().split(".")]
    if not all(keys):
        raise UserError(f"--set {item!r}: empty key segment")
    try:
        value = _load_yaml(raw) if raw.strip() else None
    except yaml.YAMLError as e:
        raise UserError(f"--set {item!r}: value is not valid YAML ({_yaml_problem(e)})") from None
    except (ValueError, RecursionError) as e:  # see read_yaml
        raise UserError(f"--set {item!r}: value is not valid YAML ({_reason(e)})") from None
    return keys, value


def apply_overrides(raw: dict[str, Any], overrides: list[str] | None) -> dict[str, Any]:
    for item in overrides or []:
        keys, value = parse_override(item)
        node = raw
        for k in keys[:-1]:
            child = node.get(k)
            if child is None:
                child = node[k] = {}
            if not isinstance(child, dict):
                raise UserError(f"--set {item!r}: {k} is not a section")
            node = child
        node[keys[-1]] = value
    return raw


def build_config(raw: dict[str, Any] | None, overrides: list[str] | None = None, source: str = "config") -> ExperimentConfig:
    raw = apply_overrides(dict(raw or {}), overrides)
    try:
        return ExperimentConfig.model_validate(raw)
    except ValidationError as e:
        raise UserError(_format_validation_error(e, source)) from None


def read_yaml(path: PathLike) -> dict[str, Any]:
    p = location(path)
    if not p.is_file():
        raise UserError(f"{path}: config file not found")
    try:
        raw = _load_yaml(p.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise UserError(f"{p}:{where} not valid YAML ({_yaml_problem(e)})") from None
    except UnicodeDecodeError:
        raise UserError(f"{p}: not valid YAML (not UTF-8 text)") from None
    except (ValueError, RecursionError) as e:  # PyYAML's int() past Python's digit limit; nesting past the stack
        raise UserError(f"{p}: not valid YAML ({_reason(e)})") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise UserError(f"{p}: top level must be a mapping of sections, got {type(raw).__name__}")
    return raw


def merge_raw(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """`over` merged into a copy of `base`: mappings key by key, at every depth; any other value replaces."""
    out = dict(base)
    for k, v in over.items():
        out[k] = merge_raw(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_config(path: PathLike | list[PathLike] | None, overrides: list[str] | None = None) -> ExperimentConfig:
    """One config file, or several merged in order (`merge_raw`), then the overrides."""
    paths = [] if not path else list(path) if isinstance(path, (list, tuple)) else [path]
    raw: dict[str, Any] = {}
    for p in paths:
        raw = merge_raw(raw, read_yaml(p))
    return build_config(raw, overrides, source=" + ".join(str(p) for p in paths) or "config")


def config_yaml(cfg: ExperimentConfig) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)


def write_config(cfg: ExperimentConfig, path: PathLike, header: str = "") -> Location:
    """The resolved config as YAML, on any filesystem (`header`: comment lines put first)."""
    return location(path).write_text(header + config_yaml(cfg))
