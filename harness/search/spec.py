"""The `search:` section of a search spec, and the spec's loading: every problem before anything runs.

The base configuration is merged by harness.spec (as one implicit stage), so that base, scales,
dotted keys and their error messages behave exactly as in experiment specs; the space is then
checked against RunConfig itself, so that a key or bound a run would refuse is refused here.
Plain pydantic: no torch, no Optuna.
"""

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError, field_validator, model_validator

from harness.config import (
    ConfigError,
    RunConfig,
    Strict,
    flatten,
    format_validation_error,
    parse_override,
    read_yaml,
    set_dotted,
    validation_problems,
)
from harness.errors import show
from harness.spec import RunPlan, SlurmResources, Spec, _merge, _nested, _split_overrides, _split_scale, expand

STAGE = "trials"  # the one implicit stage whose config every trial starts from
FINAL_METRICS = ("val/acc1", "val/acc5", "val/loss", "gflops", "params_m", "throughput_img_s")
PER_EPOCH = ("val/acc1", "val/acc5", "val/loss")  # what a pruner can be fed
MINIMISED = ("val/loss", "gflops", "params_m")
NOT_SEARCHABLE = ("output_dir", "tracking")  # set by the search itself
PATH_FIELDS = ("model.pretrained", "teacher.checkpoint", "teacher.run_dir", "train.init_from")
DIMENSION_KEYS = {"type", "low", "high", "log", "step", "choices"}


Number = int | float


class Dimension(Strict):
    """One searched config key: a number range (linear, log or stepped) or a list of choices."""

    type: Literal["float", "int", "categorical"] | None = None  # default: from the values
    low: Number | None = None
    high: Number | None = None
    log: bool = False
    step: Number | None = None
    choices: list[bool | int | float | str | None] | None = None

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, value: Any) -> Any:
        return {"choices": value} if isinstance(value, list) else value  # `key: [a, b]` is a choice

    @model_validator(mode="after")
    def _consistent(self) -> "Dimension":
        if self.choices is not None or self.type == "categorical":
            if self.low is not None or self.high is not None or self.log or self.step is not None:
                raise ValueError(f"choices exclude low/high/log/step, got low={self.low}, high={self.high}")
            if not self.choices:
                raise ValueError(f"a choice needs a non-empty list of choices, got {self.choices}")
            self.type = "categorical"
            return self
        if self.low is None or self.high is None:
            raise ValueError(f"a range needs low and high (or give choices), got low={self.low}, high={self.high}")
        ints = all(isinstance(v, int) for v in (self.low, self.high, self.step or 1))
        if self.type == "int" and not ints:
            raise ValueError(f"type int needs integer low/high/step, got low={self.low}, high={self.high}")
        self.type = self.type or ("int" if ints else "float")
        if self.low > self.high:
            raise ValueError(f"low must not exceed high, got low={self.low}, high={self.high}")
        if self.log and self.low <= 0:
            raise ValueError(f"a log scale needs low > 0, got low={self.low}")
        if self.step is not None and (self.step <= 0 or self.log):
            raise ValueError(f"step must be positive and excludes log, got step={self.step}, log={self.log}")
        return self

    def endpoints(self) -> list[tuple[str, Any]]:
        """The extreme values a trial can get (each one is validated against RunConfig)."""
        if self.type == "categorical":
            return [(f"choices[{i}]", c) for i, c in enumerate(self.choices or [])]
        return [("low", self.low), ("high", self.high)]

    def contains(self, value: Any) -> bool:
        if self.type == "categorical":
            return value in (self.choices or [])
        assert self.low is not None and self.high is not None  # a range: _consistent requires both
        return isinstance(value, (int, float)) and not isinstance(value, bool) and self.low <= value <= self.high

    def describe(self) -> str:
        if self.type == "categorical":
            return "choice of " + ", ".join(str(c) for c in self.choices or [])
        scale = " log" if self.log else (f" step {self.step}" if self.step else "")
        return f"{self.type} [{self.low}, {self.high}]{scale}"


class Objective(Strict):
    metric: str = "val/acc1"
    direction: Literal["maximize", "minimize"] = "maximize"

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, value: Any) -> Any:
        if isinstance(value, str):  # `objectives: [val/acc1, gflops]`: the natural direction
            return {"metric": value, "direction": "minimize" if value in MINIMISED else "maximize"}
        return value

    @field_validator("metric")
    @classmethod
    def _known(cls, metric: str) -> str:
        if metric not in FINAL_METRICS:
            raise ValueError(f"unknown metric (one of {', '.join(FINAL_METRICS)})")
        return metric


class SamplerSpec(Strict):
    name: Literal["tpe", "nsga2", "random"] = "tpe"
    seed: int | None = None  # worker i samples with seed + i (workers must not draw the same points)
    n_startup_trials: int = Field(10, ge=0)  # tpe: random trials before the model is used
    population_size: int = Field(50, ge=2)  # nsga2


class PrunerSpec(Strict):
    name: Literal["none", "median", "hyperband"] = "median"
    n_startup_trials: int = Field(5, ge=0)  # median: finished trials before anything is pruned
    n_warmup_steps: int = Field(0, ge=0)  # median: epochs never pruned
    min_resource: int = Field(1, ge=1)  # hyperband: epochs of the smallest bracket
    reduction_factor: int = Field(3, ge=2)  # hyperband


class StorageSpec(Strict):
    url: str = "auto"  # auto | sqlite:///FILE | postgresql://... | a journal file path
    heartbeat_interval: int = Field(30, gt=0)  # RDB storages: seconds between a trial's heartbeats
    grace_period: int | None = Field(None, gt=0)  # default (Optuna's): 2 x heartbeat_interval

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, value: Any) -> Any:
        return {"url": value} if isinstance(value, str) else value


class Method(Strict):
    """One method of a per-method search (`search.methods`): its fixed settings and its own space.

    A trial first draws the method (Optuna parameter `method`), then that method's dimensions
    (Optuna parameters `<method>:<key>`, so that each method keeps its own ranges), e.g.
    `evit: {set: {model.variant: evit}, space: {model.keep_ratio: {low: 0.4, high: 0.95}}}`.
    """

    set: dict[str, Any] = Field(default_factory=dict)  # RunConfig keys (dotted or nested) fixed for the method
    space: dict[str, Dimension] = Field(default_factory=dict)

    @field_validator("space", "set", mode="before")
    @classmethod
    def _dotted(cls, value: Any) -> Any:
        return _flatten_space(value) if isinstance(value, dict) else value


class SearchSection(Strict):
    """The `search:` section of a search spec (a scale may override any of it under `search:`)."""

    study: str | None = None  # default: <spec name>-<scale>
    space: dict[str, Dimension] = Field(default_factory=dict)  # searched for every trial
    methods: dict[str, Method] = Field(default_factory=dict)  # or per method: each trial draws one
    objectives: list[Objective] = Field(default_factory=lambda: [Objective()], min_length=1, max_length=3)
    sampler: SamplerSpec = SamplerSpec()
    pruner: PrunerSpec | None = None  # default: median for one objective, none for several
    trials: int = Field(20, gt=0)  # global budget: COMPLETE + PRUNED trials, over all workers
    max_failed: int | None = Field(None, gt=0)  # stop after this many FAIL trials (default: trials)
    workers: int = Field(1, gt=0)
    storage: StorageSpec = StorageSpec()
    enqueue: list[dict[str, Any]] = Field(default_factory=list)  # points tried first (e.g. the paper's)

    @field_validator("space", mode="before")
    @classmethod
    def _dotted(cls, space: Any) -> Any:
        return _flatten_space(space) if isinstance(space, dict) else space

    @model_validator(mode="after")
    def _coherent(self) -> "SearchSection":
        if not self.space and not self.methods:
            raise ValueError("space: at least one key to search (or methods to choose from), got {}")
        if self.pruner is None:
            self.pruner = PrunerSpec(name="median" if len(self.objectives) == 1 else "none")
        if len(self.objectives) > 1 and self.pruner.name != "none":
            raise ValueError(
                f"pruner: Optuna prunes single-objective studies only (use none), got {self.pruner.name!r}"
            )
        metric = self.objectives[0].metric
        if self.pruner.name != "none" and metric not in PER_EPOCH:
            raise ValueError(
                f"pruner: {metric} is measured once, at the end; prune on a per-epoch metric "
                f"({', '.join(PER_EPOCH)}) or use none, got {self.pruner.name!r}"
            )
        for index, point in enumerate(self.enqueue):
            method: Any = point.get("method")
            if self.methods and method not in self.methods:
                raise ValueError(f"enqueue: [{index}] method must be one of {', '.join(self.methods)}, got {method!r}")
            space = {**self.space, **(self.methods[method].space if self.methods else {})}
            for key, value in point.items():
                if key == "method" and self.methods:
                    continue
                if key not in space:
                    raise ValueError(f"enqueue: [{index}] {key} is not a key of the space, got {key!r}")
                if not space[key].contains(value):
                    raise ValueError(f"enqueue: [{index}] {key} lies outside {space[key].describe()}, got {value!r}")
        return self

    def optuna_point(self, point: dict[str, Any]) -> dict[str, Any]:
        """An `enqueue` point under the names the trials suggest (a method's keys as `<method>:<key>`)."""
        method = point.get("method")
        own = self.methods[method].space if method in self.methods else {}
        return {f"{method}:{key}" if key in own else key: value for key, value in point.items()}

    @property
    def failure_limit(self) -> int:
        return self.max_failed or self.trials


def _flatten_space(space: dict[str, Any]) -> dict[str, Any]:
    """`{model: {keep_ratio: {low: ..}}}` -> `{'model.keep_ratio': {low: ..}}`: nested and dotted agree."""
    return flatten(space, leaf=_is_value)


def _is_value(mapping: dict[str, Any]) -> bool:
    """A dimension (`{low: .., high: ..}`, `{choices: ..}`) or a mapping set as a value, not a section."""
    return bool(set(mapping) & DIMENSION_KEYS) or not all(isinstance(v, (dict, list)) for v in mapping.values())


@dataclass(frozen=True)
class SearchPlan:
    """A validated search spec at one scale: what every trial starts from and how to search."""

    path: str
    name: str  # the spec's name: the MLflow experiment
    scale: str
    table: str | None
    notebooks: list[str]
    section: SearchSection
    run: RunPlan  # the base configuration (base + scale) and the workers' SLURM resources
    study_dir: Path  # <output_root>/<spec>/<scale>/<study>/: storage file, trial folders, job logs

    @property
    def study(self) -> str:
        return self.section.study or f"{self.name}-{self.scale}"

    @property
    def slurm(self) -> SlurmResources:
        return self.run.slurm


def load_search(
    path: str,
    overrides: Sequence[str] = (),
    scale: str | None = None,
    output_root: str = "runs",
    workers: int | None = None,
    trials: int | None = None,
    storage: str | None = None,
) -> SearchPlan:
    """Read, merge and validate a search spec; raises ConfigError with every problem, one per line.

    The base configuration is merged by harness.spec (one implicit stage), so that base, scales,
    dotted keys and their error messages behave exactly as in experiment specs.
    """
    search_texts = [text for text in overrides if parse_override(text)[0].split(".")[0] == "search"]
    spec_texts, edits, cli_texts = _split_overrides(path, [t for t in overrides if t not in search_texts])
    raw = read_yaml(path, spec_texts)
    errors: list[str] = []
    search_raw = raw.pop("search", None)
    if "stages" in raw:
        errors.append(
            f"{path}: stages: a search spec has no stages (its trials are one; give teacher.checkpoint "
            f"or model.pretrained as config), got {list(raw.pop('stages') or [])}"
        )
    per_scale: dict[str, Any] = {}
    if isinstance(raw.get("scales"), dict):
        for name, layer in raw["scales"].items():
            if isinstance(layer, dict) and "search" in layer:
                per_scale[name] = layer.pop("search")
        raw["scales"] = {name: _split_scale(layer) for name, layer in raw["scales"].items()}
    raw["stages"] = {STAGE: {"row": "search"}}
    expanded = None
    try:
        spec = Spec.model_validate(raw)
        # as load_spec does: run config overrides apply after every layer, a shadowed spec edit is refused
        cli: dict[str, Any] = {}
        for text in cli_texts.values():
            set_dotted(cli, *parse_override(text))
        spec._edits, spec._cli, spec._cli_texts = edits, cli, cli_texts
        expanded = expand(spec, path, scale, output_root)
    except ValidationError as err:
        errors += [line.replace(".config.", ".") for line in format_validation_error(err, path, Spec)]
    except ConfigError as err:
        errors += err.lines
    scale = expanded.scale if expanded else scale or str(raw.get("default_scale", "tiny"))
    command_line: dict[str, Any] = {}  # `search.…` overrides: a layer after the scale's `search:`
    for text in search_texts:
        key, value = parse_override(text)
        if key == "search":
            errors.append(f"{path}: search: override a key of the section (search.trials=8), got {show(text)}")
            continue
        set_dotted(command_line, key[len("search.") :], value)
    section = _load_section(path, search_raw, per_scale.get(scale), workers, trials, storage, errors, command_line)
    if expanded is not None and section is not None:
        base = expanded.runs[0]
        errors += _check_space(path, section, base.config)
        errors += _check_methods(path, section, base.config)
        errors += _check_resources(path, scale, base.slurm)
        errors += _check_files(path, base.config, _nested(spec.scales[scale].config), scale)
    if errors:
        raise ConfigError(list(dict.fromkeys(errors)))
    assert expanded is not None and section is not None
    study = section.study or f"{expanded.spec.name}-{scale}"
    study_dir = Path(output_root) / expanded.spec.name / scale / study
    return SearchPlan(
        path,
        expanded.spec.name,
        scale,
        expanded.spec.table,
        expanded.spec.notebooks,
        section,
        expanded.runs[0],
        study_dir,
    )


def _load_section(
    path: str,
    raw: Any,
    scale_layer: Any,
    workers: int | None,
    trials: int | None,
    storage: str | None,
    errors: list[str],
    command_line: dict[str, Any] | None = None,
) -> SearchSection | None:
    """The spec's `search:`, then the scale's, then `search.…` overrides, then the flags: the last one wins."""
    if not isinstance(raw, dict):
        errors.append(f"{path}: search: required, a mapping with at least `space`, got {raw!r}")
        return None
    merged = copy.deepcopy(raw)
    if isinstance(merged.get("space"), dict):
        merged["space"] = _flatten_space(merged["space"])
    for layer in (scale_layer, command_line):
        if not isinstance(layer, dict) or not layer:
            continue
        layer = copy.deepcopy(layer)
        if isinstance(layer.get("space"), dict) and isinstance(merged.get("space"), dict):
            layer["space"] = _flatten_space(layer["space"])
        for section in (merged, layer):  # `storage: URL` and `storage.url=...` merge as mappings
            if isinstance(section.get("storage"), str):
                section["storage"] = {"url": section["storage"]}
        merged = _merge(merged, layer)
    for key, value in (("workers", workers), ("trials", trials)):
        if value is not None:
            merged[key] = value
    if storage is not None:
        merged["storage"] = (
            _merge(merged["storage"], {"url": storage}) if isinstance(merged.get("storage"), dict) else storage
        )
    try:
        return SearchSection.model_validate(merged)
    except ValidationError as err:
        errors += format_validation_error(err, path, SearchSection, prefix="search.")
        return None


def _check_space(path: str, section: SearchSection, base: RunConfig) -> list[str]:
    """Each key must be a RunConfig field and each extreme value valid there: one line per bad key.

    First each key alone (so a typo is reported once, under its own name), then each extreme
    with the other keys set too (a choice may need another key: a schedule needs tau1).
    """
    data = base.model_dump()
    errors: dict[str, str] = {}
    for key, dim in section.space.items():
        if key.split(".")[0] in NOT_SEARCHABLE:
            errors[key] = f"set by the search itself, not searchable, got {key!r}"
            continue
        for _, value in dim.endpoints():
            related = [problem for field, problem in _problems(data, {key: value}) if _relates(field, key)]
            if related:
                errors[key] = related[0]
                break
    if not errors:
        typical = {key: dim.endpoints()[0][1] for key, dim in section.space.items()}
        for key, dim in section.space.items():
            for which, value in dim.endpoints():
                problems = _problems(data, {**typical, key: value})
                if problems:
                    field, problem = problems[0]
                    errors[key] = (
                        f"{which} {value!r} makes the run invalid: {field + ': ' if field else ''}"
                        f"{problem.split(', got {')[0]}"
                    )
                    break
    return [f"{path}: search.space.{key}: {problem}" for key, problem in errors.items()]


def _check_methods(path: str, section: SearchSection, base: RunConfig) -> list[str]:
    """Each method's settings with its space (and the shared one) at their extremes must make valid runs."""
    data = base.model_dump()
    errors = []
    for name, method in section.methods.items():
        where = f"{path}: search.methods.{name}"
        fixed = [k for k in {**method.set, **method.space} if k.split(".")[0] in NOT_SEARCHABLE]
        if fixed:
            errors.append(f"{where}: {fixed[0]}: set by the search itself, not searchable, got {fixed[0]!r}")
            continue
        dims = {**section.space, **method.space}
        typical = {key: dim.endpoints()[0][1] for key, dim in dims.items()}
        problems = _problems(data, {**method.set, **typical})
        if problems:
            field, problem = problems[0]
            key = next((k for k in method.space if _relates(field, k)), None)
            errors.append(f"{where}.{'space.' + key if key else 'set.' + field}: {problem}")
            continue
        for key, dim in method.space.items():
            for which, value in dim.endpoints():
                problems = _problems(data, {**method.set, **typical, key: value})
                if problems:
                    field, problem = problems[0]
                    errors.append(
                        f"{where}.space.{key}: {which} {value!r} makes the run invalid: {field}: "
                        f"{problem.split(', got {')[0]}"
                    )
                    break
    return errors


def _problems(data: dict[str, Any], values: dict[str, Any]) -> list[tuple[str, str]]:
    trial = copy.deepcopy(data)
    for key, value in values.items():
        set_dotted(trial, key, value)
    try:
        RunConfig.model_validate(trial)
    except ValidationError as err:
        return validation_problems(err, RunConfig)
    return []


def _relates(field: str, key: str) -> bool:
    return field == key or field.startswith(key + ".") or key.startswith(field + ".")


def _check_resources(path: str, scale: str, res: SlurmResources) -> list[str]:
    errors = []
    for field in ("nodes", "tasks_per_node"):
        if getattr(res, field) != 1:
            errors.append(
                f"{path}: scales.{scale}.slurm.{field}: a search worker is one process (trials are "
                f"not DDP runs), got {getattr(res, field)}"
            )
    return errors


def _check_files(path: str, config: RunConfig, scale_layer: dict[str, Any], scale: str) -> list[str]:
    """Local weights the trials load must exist before anything is submitted."""
    errors = []
    at_scale = flatten(scale_layer)
    for field in PATH_FIELDS:
        section, key = field.split(".")
        value = getattr(getattr(config, section), key)
        if value and "://" not in value and not Path(value).expanduser().exists():
            where = f"scales.{scale}.{field}" if field in at_scale else f"base.{field}"
            errors.append(f"{path}: {where}: no such file or folder, got {value!r}")
    return errors
