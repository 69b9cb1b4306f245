"""The typed run configuration: the one vocabulary shared by specs, the launcher and the engine.

Plain data only (pydantic, no torch import), so that spec validation and `--dry-run` stay fast.
Every model forbids unknown keys, so a typo is an error naming the field, never a silent default.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from harness.catalog import ALL_MODELS, SPATIAL_MODELS, SPATIAL_VARIANTS, Variant, pruning_depth
from harness.errors import ConfigError, show  # ConfigError re-exported: the loaders below raise it


class Section(BaseModel):
    """Base for every config section: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class Strict(BaseModel):
    """Base for the sections of experiment and search specs: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid")


class ModelConfig(Section):
    """Which network to build: a timm-registered name plus the DynamicViT arguments."""

    name: str = "dynamicvit_tiny_patch8_64"
    variant: Variant = "dynamic"
    keep_ratio: float = Field(0.7, gt=0.0, le=1.0)
    fuse_token: bool | None = None  # evit only: fuse the dropped tokens into one (None: EViT's default, fused)
    tome_r: int | list[int] | None = None  # tome only: tokens merged per block (one int, or one per block)
    pruning_loc: list[int] | None = None
    stage_ratios: list[float] | None = None
    pool_after_block: int | None = None
    drop_path: float = Field(0.0, ge=0.0, lt=1.0)
    pretrained: str | None = None  # checkpoint file or URL (DeiT or DynamicViT layout)

    @field_validator("name")
    @classmethod
    def _registered(cls, name: str) -> str:
        if name not in ALL_MODELS:
            import difflib

            close = difflib.get_close_matches(name, list(ALL_MODELS), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else f"; registered: {', '.join(ALL_MODELS)}"
            raise ValueError(f"unknown model{hint}")
        return name

    @model_validator(mode="after")
    def _fits_the_architecture(self) -> ModelConfig:
        """Pruning locations and pooling point must lie inside the model's depth (caught before any job)."""
        depth = pruning_depth(self.name)  # Swin / ConvNeXt: the sparsified third stage's blocks
        if self.name in SPATIAL_MODELS and self.variant not in SPATIAL_VARIANTS:
            raise ValueError(
                f"variant: {self.name} (dynamic spatial sparsification) supports "
                f"{', '.join(SPATIAL_VARIANTS)}, got {self.variant!r}"
            )
        if self.pruning_loc is not None and not all(0 <= loc < depth for loc in self.pruning_loc):
            raise ValueError(
                f"pruning_loc: each location must be a block index in [0, {depth - 1}], got {self.pruning_loc}"
            )
        if self.pool_after_block is not None and not 1 <= self.pool_after_block < depth:
            raise ValueError(f"pool_after_block: must be in [1, {depth - 1}], got {self.pool_after_block}")
        if self.stage_ratios is not None and not all(0 < r <= 1 for r in self.stage_ratios):
            raise ValueError(f"stage_ratios: each must be in (0, 1], got {self.stage_ratios}")
        self._peer_knobs(depth)
        return self

    def _peer_knobs(self, depth: int) -> None:
        """`fuse_token` belongs to evit and `tome_r` to tome (required there): a misplaced knob is an error."""
        if self.fuse_token is not None and self.variant != "evit":
            raise ValueError(
                f"fuse_token: applies to the evit variant only (variant is {self.variant}), got {self.fuse_token}"
            )
        if self.variant != "tome":
            if self.tome_r is not None:
                raise ValueError(
                    f"tome_r: applies to the tome variant only (variant is {self.variant}), got {self.tome_r}"
                )
            return
        r = self.tome_r
        if r is None:
            raise ValueError(
                "tome_r: the tome variant needs tokens merged per block (an int or a per-block list), got None"
            )
        if any(v < 0 for v in (r if isinstance(r, list) else [r])) or (isinstance(r, list) and len(r) > depth):
            raise ValueError(f"tome_r: must be >= 0, as one int or at most {depth} per-block values, got {r}")


class DataConfig(Section):
    """Where images come from. `img_size`/`num_classes` default to the dataset's own."""

    name: Literal["imagenet", "cluttered_mnist", "synthetic"] = "cluttered_mnist"
    root: str | None = None  # imagenet: folder with train/ and val/; others: cache folder
    # imagenet: read only these classes, labelled by their ImageNet-1k index (num_classes 1000), so
    # a pretrained 1000-class head and teacher apply: a shipped list (`imagenet100`) or a file of wnids
    classes: str | None = None
    img_size: int | None = Field(None, gt=0)
    num_classes: int | None = Field(None, gt=0)
    in_chans: int | None = Field(None, gt=0)
    num_workers: int = Field(0, ge=0)
    seed: int = 0  # data generation seed (cluttered_mnist, synthetic); not the training seed
    # cluttered_mnist
    canvas: int = Field(64, gt=0)
    clutter: int = Field(4, ge=0)
    train_digits: int = Field(4000, gt=0)
    val_digits: int = Field(1000, gt=0)
    val_placements: int = Field(2, gt=0)
    # synthetic
    train_size: int = Field(256, gt=0)
    val_size: int = Field(64, gt=0)

    @model_validator(mode="after")
    def _classes_need_imagenet(self) -> DataConfig:
        if self.classes is not None and self.name != "imagenet":
            raise ValueError(
                f"classes: a class subset applies to imagenet only (data.name is {self.name}), got {self.classes!r}"
            )
        return self


class AugConfig(Section):
    """Training augmentation (the official recipe at paper scale; mostly off at tiny scale)."""

    auto_augment: str | None = "rand-m9-mstd0.5-inc1"
    mixup: float = Field(0.8, ge=0.0)
    cutmix: float = Field(1.0, ge=0.0)
    label_smoothing: float = Field(0.1, ge=0.0, lt=1.0)
    random_erasing: float = Field(0.25, ge=0.0, le=1.0)


class OptimConfig(Section):
    """AdamW and the official learning-rate rules (harness/optim.py); the recipe fills every value.

    `sched`: `step` = HEAD's utils.cosine_scheduler (linear warm-up from `warmup_lr` inside the
    total, then cosine to `min_lr`, set every step); `epoch` = the 2021 adjust_learning_rate
    (cosine over all epochs, set once per epoch, no warm-up). `backbone_lr_rule`: `scale` = the
    schedule x `backbone_lr_scale` (HEAD); `min` = min(peak x `backbone_lr_scale`, schedule) (2021).
    Either way the backbone's lr is 0 for its first `backbone_freeze_epochs`.
    """

    lr: float = Field(1e-3, gt=0.0)
    min_lr: float = Field(1e-6, ge=0.0)
    weight_decay: float = Field(0.05, ge=0.0)
    warmup_epochs: int = Field(5, ge=0)
    warmup_lr: float = Field(0.0, ge=0.0)
    sched: Literal["step", "epoch"] = "step"
    backbone_lr_scale: float = Field(0.01, ge=0.0)
    backbone_lr_rule: Literal["scale", "min"] = "scale"
    backbone_freeze_epochs: int = Field(5, ge=0)
    predictor_decay: Literal["matrices", "all"] = "matrices"  # all: also the predictors' biases and norms
    lr_base_batch: int | None = Field(None, gt=0)  # lr x global batch / this; None: lr used as given
    clip_grad: float | None = Field(None, gt=0.0)
    freeze: list[str] = Field(default_factory=lambda: ["cls_token", "pos_embed"])  # never trained
    log_every: int = Field(20, gt=0)  # steps between train/loss_step points


class LossTerm(Section):
    """One loss term: its weight and an on/off switch (for the loss ablation)."""

    weight: float = Field(1.0, ge=0.0)
    enabled: bool = True

    @property
    def active(self) -> bool:
        return self.enabled and self.weight > 0


def _loss_term(value: Any) -> Any:
    """Accept the short form `kl: 0.5` as well as `kl: {weight: 0.5, enabled: false}`."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return {"weight": value}
    if isinstance(value, bool):
        return {"enabled": value}
    return value


class LossConfig(Section):
    """The official DynamicViT loss: CE + 2.0 ratio + 0.5 KL + 0.5 token distillation."""

    cls: LossTerm = LossTerm(weight=1.0)
    ratio: LossTerm = LossTerm(weight=2.0)
    kl: LossTerm = LossTerm(weight=0.5)
    token: LossTerm = LossTerm(weight=0.5)

    @field_validator("cls", "ratio", "kl", "token", mode="before")
    @classmethod
    def _short_form(cls, value: Any) -> Any:
        return _loss_term(value)


class GumbelConfig(Section):
    """Gumbel-softmax temperature: constant (official, tau=1) or annealed from tau0 to tau1."""

    tau: float = Field(1.0, gt=0.0)  # tau0
    tau1: float | None = Field(None, gt=0.0)
    schedule: Literal["constant", "linear", "cosine", "exponential"] = "constant"


class TeacherConfig(Section):
    """The frozen dense teacher: a checkpoint file/URL, or the output folder of another run."""

    checkpoint: str | None = None
    run_dir: str | None = None
    model: str | None = None  # defaults to the student's backbone


class TrainConfig(Section):
    epochs: int = Field(30, ge=0)  # 0: evaluate the (pretrained) weights only
    batch_size: int = Field(128, gt=0)  # per process
    eval_batch_size: int | None = Field(None, gt=0)
    eval_every: int = Field(1, ge=1)  # validate every N epochs (the last always); training is the same either way
    seed: int = 0
    precision: Literal["fp32", "fp16", "bf16"] = "fp32"  # on CUDA; fp16 adds a GradScaler; the CPU runs fp32
    ema: float | None = Field(None, gt=0.0, lt=1.0)  # EMA decay per step; None: no EMA model
    repeated_aug: bool = False  # the 2021 RASampler: every image 3 times per epoch, spread over the ranks
    channels_last: bool = False
    init_from: str | None = None  # checkpoint or run folder to start the weights from
    deterministic: bool = False  # masked top-k decisions instead of Gumbel samples
    accum_steps: int = Field(1, ge=1)  # micro-batches per optimiser update (HEAD --update_freq): global batch x this


class TrackingConfig(Section):
    uri: str | None = None  # None: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db
    experiment: str = "dvit-harness"
    experiment_id: str | None = None
    parent_run_id: str | None = None
    run_name: str | None = None
    run_id: str | None = None  # a run created by the launcher (status SCHEDULED) to log into
    tags: dict[str, str] = Field(default_factory=dict)
    log_checkpoint: bool = True  # also the final model as an MLflow model (runs:/<id>/model)
    visualize_images: int = Field(4, ge=0)
    # an MLflow (or database) outage longer than this checkpoints and fails the job (resumable);
    # shorter ones are waited out, metric points buffered (at most buffer_points) and sent later
    outage_limit_s: float = Field(600.0, gt=0)
    buffer_points: int = Field(100_000, ge=100)


RecipeName = Literal["dynamicvit-2021", "dynamicvit-tpami", "dynamicvit-tpami-spatial"]


def deep_merge(below: dict[str, Any], above: dict[str, Any]) -> dict[str, Any]:
    """`above` over `below`, nested dicts merged key by key (how spec layers and recipes stack)."""
    merged = dict(below)
    for key, value in above.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


class RunConfig(Section):
    """Everything one training run needs; its hash is the run key used for idempotence.

    `recipe` names an official training recipe (harness/recipes.py) whose values lie beneath
    everything given here: a value set explicitly wins, an unset one is the recipe's.
    """

    recipe: RecipeName = "dynamicvit-tpami"
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    aug: AugConfig = AugConfig()
    optim: OptimConfig = OptimConfig()
    losses: LossConfig = LossConfig()
    gumbel: GumbelConfig = GumbelConfig()
    teacher: TeacherConfig = TeacherConfig()
    train: TrainConfig = TrainConfig()
    tracking: TrackingConfig = TrackingConfig()
    output_dir: str = "runs/debug"

    @model_validator(mode="before")
    @classmethod
    def _recipe_beneath(cls, data: Any) -> Any:
        """Lay the recipe's preset under the given values (an unknown recipe is left to the field check)."""
        from harness.recipes import DEFAULT_RECIPE, RECIPES, preset

        if not isinstance(data, dict):
            return data
        name = data.get("recipe", DEFAULT_RECIPE)
        if not isinstance(name, str) or name not in RECIPES:
            return data
        return deep_merge(preset(name), data)

    @model_validator(mode="after")
    def _check_schedule(self) -> RunConfig:
        if self.gumbel.schedule != "constant" and self.gumbel.tau1 is None:
            raise ValueError("gumbel.tau1 is required when gumbel.schedule is not 'constant'")
        return self

    @property
    def needs_teacher(self) -> bool:
        """The KL or token loss is on for a pruned model: a dense teacher must be given."""
        return self.model.variant != "dense" and (self.losses.kl.active or self.losses.token.active)

    def run_key(self) -> str:
        """A stable hash of what determines the result (not where it is written or logged).

        Another run's folder named by the spec (tags `teacher_run_key`, `init_from_run_key`) counts
        by that run's key and its path relative to this run's folder, not by its absolute path: a
        moved checkout keeps every key, a retrained teacher changes its students' keys.
        """
        import os

        payload = self.model_dump(exclude={"tracking": True, "output_dir": True})
        for section, field, tag in (
            ("teacher", "run_dir", "teacher_run_key"),
            ("train", "init_from", "init_from_run_key"),
        ):
            if payload[section][field] is not None and self.tracking.tags.get(tag):
                relative = os.path.relpath(payload[section][field], self.output_dir)
                payload[section][field] = f"run {self.tracking.tags[tag]} at {relative}"
        blob = json.dumps(payload, sort_keys=True, default=str)
        return hashlib.sha1(blob.encode()).hexdigest()[:12]


def flatten(
    tree: dict[str, Any],
    prefix: str = "",
    leaf: Callable[[dict[str, Any]], bool] = lambda _: False,
) -> dict[str, Any]:
    """Nested dict -> {'a.b.c': value}, the form MLflow params and overrides use.

    `leaf(mapping)` says that a non-empty mapping is a value, not a section (a search dimension).
    """
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and value and not leaf(value):
            flat.update(flatten(value, dotted + ".", leaf))
        else:
            flat[dotted] = value
    return flat


def set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    """Set tree['a']['b'] = value for 'a.b', creating intermediate dicts."""
    *parents, leaf = dotted.split(".")
    node = tree
    for part in parents:
        child = node.get(part)
        if not isinstance(child, dict):
            child = {}
            node[part] = child
        node = child
    node[leaf] = value


# ------------------------------------------------------------------------ loading + errors
def _fields_at(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    """The valid field names of the section that `loc` (minus its last part) points into."""
    current: Any = model
    for part in loc[:-1]:
        fields = getattr(current, "model_fields", {})
        if part not in fields:
            return []
        current = fields[part].annotation
    return list(getattr(current, "model_fields", {}))


def validation_problems(err: Any, model: type[BaseModel]) -> list[tuple[str, str]]:
    """pydantic's ValidationError as (dotted field, 'problem, got X') pairs (X shown bounded)."""
    import difflib

    problems = []
    for item in err.errors():
        loc = tuple(item["loc"])
        message = item["msg"].removeprefix("Value error, ")
        value = item.get("input")
        head, _, rest = message.partition(": ")
        if item["type"] == "value_error" and rest and head in _fields_at(model, (*loc, "")):
            loc, message = (*loc, head), rest  # a section-level check naming one of its fields
            value = value.get(head) if isinstance(value, dict) else value
        if item["type"] == "extra_forbidden":
            valid = _fields_at(model, loc)
            close = difflib.get_close_matches(str(loc[-1]), valid, n=1)
            message = "unknown key" + (f" (did you mean {close[0]!r}?)" if close else "")
            if valid and not close:
                message += f"; valid keys: {', '.join(valid)}"
        got = "" if ", got " in message else f", got {show(value)}"
        problems.append((".".join(str(p) for p in loc), f"{message}{got}"))
    return problems


def format_validation_error(err: Any, source: str, model: type[BaseModel], prefix: str = "") -> list[str]:
    """One line per problem, naming the file and the dotted field."""
    return [
        f"{source}: {prefix + field if field else prefix.rstrip('.') or '(top level)'}: {problem}"
        for field, problem in validation_problems(err, model)
    ]


def _unique_key_loader() -> type:
    """A SafeLoader that refuses a key given twice in one mapping (PyYAML silently keeps the last).

    Keys brought in by a `<<: *alias` merge may still be overridden: only the mapping's own keys count.
    """
    import yaml

    class UniqueKeyLoader(yaml.SafeLoader):
        def construct_mapping(self, node: Any, deep: bool = False) -> Any:
            if isinstance(node, yaml.MappingNode):
                first: dict[Any, Any] = {}
                for key_node, _ in node.value:
                    if key_node.tag == "tag:yaml.org,2002:merge":
                        continue
                    key = self.construct_object(key_node, deep=True)
                    try:
                        earlier = first.setdefault(key, key_node.start_mark)
                    except TypeError:  # an unhashable key: the base class says so
                        continue
                    if earlier is not key_node.start_mark:
                        raise DuplicateKey(key, earlier, key_node.start_mark)
            return super().construct_mapping(node, deep)

    return UniqueKeyLoader


class DuplicateKey(Exception):
    """A mapping names one key twice: where both are (YAML marks)."""

    def __init__(self, key: Any, first: Any, again: Any) -> None:
        super().__init__(key)
        self.key, self.first, self.again = key, first, again

    def line(self, source: str) -> str:
        return (
            f"{source}: line {self.again.line + 1}: duplicate key {show(self.key)} in one mapping (first at "
            f"line {self.first.line + 1}; YAML would silently keep only the last), got {show(self.key)} twice"
        )


def yaml_load(text: str) -> Any:
    """`yaml.safe_load` that raises DuplicateKey for a key given twice in one mapping."""
    import yaml

    return yaml.load(text, Loader=_unique_key_loader())


def parse_override(text: str) -> tuple[str, Any]:
    """'a.b=value' -> ('a.b', YAML-parsed value), so numbers, lists and null work as expected."""
    import yaml

    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key or not all(part.strip() for part in key.split(".")):
        raise ConfigError([f"override {text!r}: expected key=value with a dotted key, e.g. train.epochs=2"])
    try:
        value = yaml_load(raw) if raw != "" else ""
    except DuplicateKey as err:
        raise ConfigError([f"override {text!r}: {key}: duplicate key {err.key!r} in the value, got it twice"]) from None
    except yaml.YAMLError:
        value = raw
    return key, value


MAX_SPEC_BYTES = 4 << 20  # a spec or run config is a few kB; more is the wrong file
MAX_VALUES = 100_000  # values in a loaded document once YAML aliases are expanded


def _count_values(data: Any, limit: int) -> int:
    """How many values `data` holds with aliases expanded, counting no further than `limit`."""
    count, stack = 0, [data]
    while stack and count <= limit:
        node = stack.pop()
        count += 1
        if isinstance(node, dict):
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    return count


def _read_text(path: str) -> str:
    """The file's text, or a ConfigError saying in one line why it is not a readable text file."""
    import os

    try:
        if os.path.isdir(path):
            raise ConfigError([f"{path}: is a folder, not a YAML file"])
        if os.path.exists(path) and not os.path.isfile(path):  # a FIFO or device would block or never end
            raise ConfigError([f"{path}: not a regular file"])
        size = os.path.getsize(path)
        if size > MAX_SPEC_BYTES:
            raise ConfigError(
                [f"{path}: too large for a YAML spec or config ({size} bytes), got a file over {MAX_SPEC_BYTES} bytes"]
            )
        with open(path, "rb") as handle:
            blob = handle.read()
    except FileNotFoundError:
        raise ConfigError([f"{path}: no such file"]) from None
    except PermissionError:
        raise ConfigError([f"{path}: not readable (permission denied)"]) from None
    except OSError as err:
        raise ConfigError([f"{path}: cannot be read ({err.strerror or err})"]) from None
    try:
        text = blob.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(
            [f"{path}: not UTF-8 text (a binary file?), got byte 0x{blob[err.start]:02x} at position {err.start}"]
        ) from None
    if "\x00" in text:
        raise ConfigError([f"{path}: not a text file (NUL byte at position {text.index(chr(0))})"])
    return text


def read_yaml(path: str, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """A YAML mapping from `path` with `key=value` overrides applied; syntax errors name the line.

    Every way a file can be wrong is one ConfigError line: missing, a folder, unreadable, binary,
    not UTF-8, too large, invalid YAML, not a mapping, or aliases that expand without bound.
    """
    import yaml

    text = _read_text(path)
    try:
        data = yaml_load(text)
    except DuplicateKey as err:
        raise ConfigError([err.line(path)]) from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "?"
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError([f"{path}: YAML syntax error at {where}: {problem}"]) from None
    except RecursionError:
        raise ConfigError([f"{path}: YAML nested too deeply"]) from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError([f"{path}: expected a mapping at the top level, got {type(data).__name__}"])
    if _count_values(data, MAX_VALUES) > MAX_VALUES:
        raise ConfigError(
            [
                f"{path}: YAML aliases expand to more than {MAX_VALUES} values (an alias bomb?), "
                f"got more than {MAX_VALUES}"
            ]
        )
    for text in overrides:
        key, value = parse_override(text)
        set_dotted(data, key, value)
    return data


def load_run_config(path: str, overrides: Sequence[str] = ()) -> RunConfig:
    """Read a run YAML, apply `key=value` overrides, validate. Raises ConfigError."""
    from pydantic import ValidationError

    data = read_yaml(path, overrides)
    try:
        return RunConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, path, RunConfig)) from None
