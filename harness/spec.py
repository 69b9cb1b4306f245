"""Experiment specs: a YAML family of runs, validated and expanded into RunPlans.

A spec names a paper table, a `base` run configuration, `scales` (at least `tiny` and `paper`)
and `stages` (e.g. `teacher`, then `students` that start from and distil from it). Each stage
expands `runs:` (named `variants`, a `grid` product and `zip`ped lists) into runs. Every run's
configuration is the merge, in order, of: base, the scale, the stage, the stage at this scale,
the variant, its grid/zip values. Each layer may use nested or dotted keys.

Plain data and pydantic only: loading and expanding a spec never imports torch.
"""

from __future__ import annotations

import functools
import itertools
import re
from collections.abc import Sequence, Set
from dataclasses import dataclass
from dataclasses import field as dataclass_field
from pathlib import Path
from typing import Any

from pydantic import Field, PrivateAttr, ValidationError, field_validator

from harness.config import (
    ConfigError,
    RunConfig,
    Strict,
    deep_merge,
    flatten,
    format_validation_error,
    parse_override,
    read_yaml,
    set_dotted,
    validation_problems,
)
from harness.errors import show
from harness.inputs import MAX_BATCH, check_run_inputs

STAGE_KEYS = {"after", "init_from", "distill_from", "runs", "slurm", "scales", "row", "only_scales"}
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")  # names are folder names: never a path, never '..'
NAME_RULE = "must be 1-100 letters, digits, '_', '-', '.', starting with a letter or digit (it names a folder)"
CLI = "(command line)"  # the layer of `key=value` overrides of run config keys, applied after every other


def _check_name(name: object) -> object:
    if not isinstance(name, str) or not NAME.match(name):
        raise ValueError(NAME_RULE)
    return name


class SlurmResources(Strict):
    """Resources of one stage's jobs; unset values fall back to the scale's, then these defaults."""

    partition: str | None = None
    nodes: int = Field(1, gt=0)
    gpus_per_node: int = Field(0, ge=0)
    tasks_per_node: int = Field(1, gt=0)
    cpus_per_task: int = Field(2, gt=0)
    mem_gb: float | None = Field(None, gt=0)
    timeout_min: int = Field(60, gt=0)
    array_parallelism: int = Field(64, gt=0)
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    additional: dict[str, Any] = Field(default_factory=dict)  # extra sbatch parameters

    def describe(self) -> str:
        gpus = f"{self.nodes}x{self.gpus_per_node} GPU" if self.gpus_per_node else f"{self.nodes} node CPU"
        return f"{gpus}, {self.cpus_per_task} cpu/task, {self.timeout_min} min"


class Variant(Strict):
    name: str
    row: str | None = None  # the paper table's row id; defaults to the name
    set: dict[str, Any] = Field(default_factory=dict)  # config overrides (dotted or nested keys)
    scales: dict[str, dict[str, Any]] = Field(default_factory=dict)  # overrides at one scale only

    @field_validator("name")
    @classmethod
    def _safe_name(cls, name: str) -> str:
        return _check_name(name)  # type: ignore[return-value]


class Runs(Strict):
    variants: list[Variant] = Field(default_factory=list)
    grid: dict[str, list[Any]] = Field(default_factory=dict)
    zip: dict[str, list[Any]] = Field(default_factory=dict)


class Stage(Strict):
    after: list[str] = Field(default_factory=list)
    init_from: str | None = None  # a stage name: its run's weights start this stage's runs
    distill_from: str | None = None  # a stage name: its run is the teacher
    runs: Runs = Runs()
    slurm: dict[str, Any] = Field(default_factory=dict)
    scales: dict[str, dict[str, Any]] = Field(default_factory=dict)
    row: str | None = None
    only_scales: list[str] = Field(default_factory=list)  # run this stage at these scales only (default: all)
    config: dict[str, Any] = Field(default_factory=dict)  # every other key: run configuration

    @field_validator("after", mode="before")
    @classmethod
    def _one_or_many(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value


class Scale(Strict):
    slurm: dict[str, Any] = Field(default_factory=dict)
    config: dict[str, Any] = Field(default_factory=dict)


class Spec(Strict):
    name: str
    description: str = ""
    table: str | None = None
    default_scale: str = "tiny"
    notebooks: list[str] = Field(default_factory=list)
    base: dict[str, Any] = Field(default_factory=dict)
    scales: dict[str, Scale]
    stages: dict[str, Stage]

    _edits: list[tuple[str, str, Any]] = PrivateAttr(default_factory=list)  # command-line spec edits
    _cli: dict[str, Any] = PrivateAttr(default_factory=dict)  # command-line run config overrides
    _cli_texts: dict[str, str] = PrivateAttr(default_factory=dict)  # their dotted key -> as typed

    @field_validator("name")
    @classmethod
    def _safe_name(cls, name: str) -> str:
        return _check_name(name)  # type: ignore[return-value]

    @field_validator("scales", "stages")
    @classmethod
    def _safe_keys(cls, value: dict[str, Any]) -> dict[str, Any]:
        bad = [key for key in value if not NAME.match(str(key))]
        if bad:
            raise ValueError(f"{show(bad[0])}: {NAME_RULE}, got {show(bad[0])}")
        return value


@dataclass(frozen=True)
class RunPlan:
    """One run to submit: where it sits in the spec and the exact configuration it trains."""

    stage: str
    name: str
    row: str
    variant: str
    config: RunConfig
    slurm: SlurmResources

    @property
    def key(self) -> str:
        return self.config.run_key()

    @property
    def output_dir(self) -> Path:
        return Path(self.config.output_dir)


@dataclass(frozen=True)
class Expanded:
    spec: Spec
    path: str
    scale: str
    stage_order: list[str]
    runs: list[RunPlan]
    notes: list[str] = dataclass_field(default_factory=list)  # one line per override that some runs' own layers undo

    def stage_runs(self, stage: str) -> list[RunPlan]:
        return [r for r in self.runs if r.stage == stage]


class SpecError(ConfigError):
    """Everything wrong with a spec, one line per problem, reported before anything runs."""


# --------------------------------------------------------------------------------- loading
def _split_stage(raw: Any) -> Any:
    """Stage keys that are not control keys are run configuration (readable specs)."""
    if not isinstance(raw, dict):
        return raw
    control = {k: v for k, v in raw.items() if k in STAGE_KEYS}
    control["config"] = {k: v for k, v in raw.items() if k not in STAGE_KEYS}
    return control


def _split_scale(raw: Any) -> Any:
    if not isinstance(raw, dict):
        return raw
    return {"slurm": raw.get("slurm", {}), "config": {k: v for k, v in raw.items() if k != "slurm"}}


def _nested(layer: dict[str, Any]) -> dict[str, Any]:
    """Dotted keys -> nested dicts, so `model.keep_ratio: 0.5` and `model: {keep_ratio: 0.5}` agree."""
    out: dict[str, Any] = {}
    for key, value in layer.items():
        if isinstance(value, dict) and "." not in key:
            value = _nested(value)
            existing = out.get(key)
            out[key] = _merge(existing, value) if isinstance(existing, dict) else value
        else:
            set_dotted(out, key, value)
    return out


_merge = deep_merge


def _split_overrides(
    path: str, overrides: Sequence[str]
) -> tuple[list[str], list[tuple[str, str, Any]], dict[str, str]]:
    """Command-line overrides: spec edits (`base.…`, `scales.…`, `stages.…`, `name=…`) and run config
    keys (`train.epochs=2`), which apply to every run after every spec layer."""
    edits, cli, texts = [], [], {}
    for text in overrides:
        key, value = parse_override(text)
        head = key.split(".")[0]
        if head in Spec.model_fields:
            edits.append((text, key, value))
        elif head in RunConfig.model_fields:
            cli.append(text)
            texts[key] = text
        else:
            raise SpecError(
                [
                    f"{path}: {key}: unknown override key: a spec key ({', '.join(Spec.model_fields)}) "
                    f"or a run config key ({', '.join(RunConfig.model_fields)}), got {show(text)}"
                ]
            )
    return [text for text, _, _ in edits], edits, texts


def _spec_field_line(path: str, line: str) -> str:
    """`path: stages.x.config.runs.variants.0.name: ...` -> `path: stages.x.runs.variants[0].name: ...`."""
    field, sep, problem = line[len(path) + 2 :].partition(": ")
    field = re.sub(r"\.(\d+)(?=\.|$)", r"[\1]", field.replace(".config.", "."))
    return f"{path}: {field}{sep}{problem}"


def load_spec(path: str, overrides: Sequence[str] = ()) -> Spec:
    """Read and validate the spec's structure (not yet its runs). Raises SpecError.

    Overrides of spec keys edit the spec before it is validated; overrides of run config keys
    are kept on the spec and applied by `expand` to every run, after every layer.
    """
    spec_texts, edits, cli_texts = _split_overrides(path, overrides)
    raw = read_yaml(path, spec_texts)
    if isinstance(raw.get("stages"), dict):
        raw["stages"] = {name: _split_stage(stage) for name, stage in raw["stages"].items()}
    if isinstance(raw.get("scales"), dict):
        raw["scales"] = {name: _split_scale(scale) for name, scale in raw["scales"].items()}
    try:
        spec = Spec.model_validate(raw)
    except ValidationError as err:
        lines = [_spec_field_line(path, line) for line in format_validation_error(err, path, Spec)]
        raise SpecError(lines) from None
    cli: dict[str, Any] = {}
    for text in cli_texts.values():
        set_dotted(cli, *parse_override(text))
    spec._edits, spec._cli, spec._cli_texts = edits, cli, cli_texts
    return spec


# ------------------------------------------------------------------------------- expansion
def _stage_order(spec: Spec, path: str) -> tuple[list[str], list[str]]:
    """Stages in dependency order, and the problems with their references."""
    errors: list[str] = []
    deps: dict[str, set[str]] = {}
    for name, stage in spec.stages.items():
        wanted = set(stage.after)
        for field, ref in (("init_from", stage.init_from), ("distill_from", stage.distill_from)):
            if ref is not None:
                wanted.add(ref)
                if ref not in spec.stages:
                    errors.append(f"{path}: stages.{name}.{field}: no stage named {ref!r}, got {ref!r}")
        for ref in stage.after:
            if ref not in spec.stages:
                known = ", ".join(spec.stages)
                errors.append(f"{path}: stages.{name}.after: no stage named {ref!r} (stages: {known}), got {ref!r}")
        if name in wanted:
            errors.append(f"{path}: stages.{name}.after: a stage cannot depend on itself, got {name!r}")
        deps[name] = {d for d in wanted if d in spec.stages and d != name}
    order: list[str] = []
    remaining = dict(deps)
    while remaining:
        ready = sorted(n for n, d in remaining.items() if d <= set(order))
        if not ready:
            cycle = ", ".join(sorted(remaining))
            errors.append(f"{path}: stages: dependency cycle among {cycle}, got {cycle}")
            break
        order.extend(ready)
        for n in ready:
            remaining.pop(n)
    return order, errors


def _combinations(
    runs: Runs, where: str, path: str, errors: list[str]
) -> list[tuple[str, dict[str, Any], list[tuple[str, dict]]]]:
    """(name suffix, values, provenance layers) for every grid x zip combination."""
    lengths = {len(v) for v in runs.zip.values()}
    if len(lengths) > 1:
        errors.append(f"{path}: {where}.zip: lists must have equal lengths, got {sorted(lengths)}")
        return []
    empty = [
        f"{kind}.{key}"
        for kind, lists in (("grid", runs.grid), ("zip", runs.zip))
        for key, values in lists.items()
        if not values
    ]
    if empty:  # the product would be no run at all: the stage would silently disappear
        errors.append(f"{path}: {where}.{empty[0]}: an empty list expands to no runs, got []")
        return []
    zipped = list(zip(*runs.zip.values(), strict=True)) if runs.zip else [()]  # equal lengths: checked above
    grid_values = list(itertools.product(*runs.grid.values())) if runs.grid else [()]
    combos = []
    for zip_row in zipped:
        for grid_row in grid_values:
            values = dict(zip(runs.grid, grid_row, strict=True)) | dict(zip(runs.zip, zip_row, strict=True))
            suffix = "-".join(f"{k.split('.')[-1]}{_name_part(v)}" for k, v in values.items())
            layers = [
                (f"{where}.grid.{k}" if k in runs.grid else f"{where}.zip.{k}", _nested({k: v}))
                for k, v in values.items()
            ]
            combos.append((suffix, values, layers))
    return combos


def _name_part(value: Any) -> str:
    """A grid/zip value as part of a run name (a folder name): path separators and the like become '_'."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", str(value))[:40]


def _sets(layer: dict[str, Any], field: str) -> bool:
    return any(key == field or key.startswith(field + ".") or field.startswith(key + ".") for key in flatten(layer))


def _locate(field: str, layers: list[tuple[str, dict]]) -> str:
    """The spec location that set `field` last (for an error message), else base."""
    for where, layer in reversed(layers):
        if _sets(layer, field):
            if where == CLI:
                return f"{field} {CLI}"
            key = next(
                k for k in flatten(layer) if k == field or k.startswith(field + ".") or field.startswith(k + ".")
            )
            return where if where.endswith("." + key) else f"{where}.{field}"
    return f"base.{field}"


_MISSING = object()


def _get_dotted(tree: dict[str, Any], dotted: str) -> Any:
    node: Any = tree
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return _MISSING
        node = node[part]
    return node


DERIVED = "(set by the launcher for every run)"


@dataclass
class Reach:
    """Where one spec-layer override of run configuration took effect, over the runs it targets."""

    text: str  # as typed
    key: str  # the dotted key it edits, e.g. scales.tiny.train.epochs
    targets: list[str]  # the runs whose layers include the edited one (stage/name)
    reached: list[str]  # those in which at least one of its values takes effect
    kept: dict[tuple[str, str, str], list[str]]  # (later layer, leaf, its value) -> runs where it undoes the override


def _undone(
    field: str, value: Any, later: list[tuple[str, dict]], merged: dict[str, Any]
) -> list[tuple[str, str, Any]]:
    """(later layer, leaf, the run's value) for each leaf of an override that a later layer undoes."""
    lost = []
    for leaf, want in flatten(_nested({field: value})).items():
        have = _get_dotted(merged, leaf)
        if have == want:
            continue
        setter = next((where for where, layer in reversed(later) if _sets(layer, leaf)), None)
        if setter is not None:
            lost.append((setter, leaf, have))
    return lost


def _derived_line(path: str, label: str, leaf: str, value: Any) -> str:
    return (
        f"{path}: {label}: cannot be overridden, the launcher sets {leaf} for every run (output_dir: "
        f"--output-root; tracking: the spec's name; train.init_from, teacher.run_dir: the stage's "
        f"init_from, distill_from), got {show(value)}"
    )


def _track_overrides(
    spec: Spec,
    path: str,
    layers: list[tuple[str, dict]],
    derived: dict[str, Any],
    merged: dict[str, Any],
    run: str,
    reach: dict[str, Reach],
    reported: set[str],
) -> list[str]:
    """Record where each command-line override reaches this run; refuse one the launcher's values undo.

    A spec-layer override that a later layer undoes in this run is not an error by itself: it is
    refused only when it reaches none of the runs it targets (`override_reach`).
    """
    problems: list[str] = []
    later_all = [*layers, (DERIVED, derived)]
    for text, key, value in spec._edits:
        owners = [i for i, (where, _) in enumerate(layers) if key.startswith(where + ".")]
        if not owners:
            continue
        owner = max(owners, key=lambda i: len(layers[i][0]))
        field = key[len(layers[owner][0]) + 1 :]
        if field.split(".")[0] not in RunConfig.model_fields:
            continue  # a control key (runs, slurm, after...): not a config value
        entry = reach.setdefault(text, Reach(text, key, [], [], {}))
        entry.targets.append(run)
        undone = _undone(field, value, later_all[owner + 1 :], merged)
        if len(undone) < len(flatten(_nested({field: value}))):
            entry.reached.append(run)
        for setter, leaf, have in undone:
            if setter == DERIVED:
                if text not in reported:
                    reported.add(text)
                    problems.append(_derived_line(path, key, leaf, value))
            else:
                entry.kept.setdefault((setter, leaf, show(have)), []).append(run)
    for field, text in spec._cli_texts.items():
        lost = _undone(field, parse_override(text)[1], [(DERIVED, derived)], merged)
        if lost and text not in reported:
            reported.add(text)
            problems.append(_derived_line(path, f"{field} {CLI}", lost[0][1], parse_override(text)[1]))
    return problems


def _runs_list(runs: list[str], limit: int = 4) -> str:
    shown = ", ".join(runs[:limit])
    return shown + (f" and {len(runs) - limit} more" if len(runs) > limit else "")


def _advice(setter: str, leaf: str) -> str:
    """How to change `leaf` in the layer that sets it: an override, or (a variant, a grid: list items and
    dotted keys that an override cannot address) an edit of the spec file."""
    where = setter if setter.endswith("." + leaf) else f"{setter}.{leaf}"
    return f"edit {where} in the spec" if ".runs." in setter else f"override {where}"


def override_reach(path: str, reach: dict[str, Reach]) -> tuple[list[str], list[str]]:
    """(errors, notes): an override that reaches none of its runs is refused, naming the layers that
    undo it; one that reaches some says, in one line, which runs keep their own value and why.

    The advice names only those layers (which hold a subset of the runs the override targets), never
    a wider override such as the run config key itself, which would change runs the user left alone.
    """
    errors, notes = [], []
    for entry in reach.values():
        if not entry.kept:
            continue
        value = parse_override(entry.text)[1]
        why = "; ".join(
            f"{setter} sets {leaf} = {have} after it"
            + ("" if len(runs) == len(entry.targets) else f" ({_runs_list(runs)})")
            for (setter, leaf, have), runs in entry.kept.items()
        )
        if not entry.reached:
            layers = " or ".join(dict.fromkeys(_advice(setter, leaf) for setter, leaf, _ in entry.kept))
            errors.append(f"{path}: {entry.key}: has no effect on any run: {why}; {layers} instead, got {show(value)}")
        else:
            groups = "; ".join(
                f"{_runs_list(runs)} {'keeps its' if len(runs) == 1 else 'keep their'} own "
                f"{leaf} ({setter} sets {leaf} = {have})"
                for (setter, leaf, have), runs in entry.kept.items()
            )
            notes.append(
                f"{path}: {entry.text}: applies to {len(entry.reached)} of {len(entry.targets)} runs; {groups}"
            )
    return errors, notes


MAX_RUNS = 1000  # runs one launch submits unless --max-runs raises it: a larger grid is most likely a typo


def count_runs(spec: Spec, stages: Sequence[str]) -> dict[str, int]:
    """How many runs each stage expands to (variants x grid product x zip length), without expanding it."""
    counts = {}
    for name in stages:
        runs = spec.stages[name].runs
        per_variant = len(next(iter(runs.zip.values()))) if runs.zip else 1
        for values in runs.grid.values():
            per_variant *= len(values)
        counts[name] = max(1, len(runs.variants)) * per_variant
    return counts


def expand(
    spec: Spec,
    path: str,
    scale: str | None = None,
    output_root: str = "runs",
    check_files: bool = True,
    max_runs: int | None = None,
) -> Expanded:
    """Every run of the spec at `scale`, validated. Raises SpecError listing every problem.

    `check_files`: also check that the files and folders the runs read exist and look usable
    (datasets, pretrained weights); a command that only reads MLflow (status) skips this.
    `max_runs`: refuse, before expanding anything, a spec of more runs (a 10,000-point grid).
    """
    scale = scale or spec.default_scale
    errors: list[str] = []
    if scale not in spec.scales:
        raise SpecError([f"{path}: scale: unknown scale, expected one of {', '.join(spec.scales)}, got {scale!r}"])
    order, order_errors = _stage_order(spec, path)
    errors += order_errors
    order = _at_scale(spec, order, scale)
    counts = count_runs(spec, order)
    if max_runs is not None and sum(counts.values()) > max_runs:
        largest = max(counts, key=counts.__getitem__)
        raise SpecError(
            [
                f"{path}: stages.{largest}.runs: the spec expands to {sum(counts.values())} runs at scale "
                f"{scale} ({counts[largest]} in stage {largest}), more than the limit of {max_runs}; pass "
                f"--max-runs {sum(counts.values())} to launch them all, got {sum(counts.values())}"
            ]
        )
    scale_spec = spec.scales[scale]
    plans: list[RunPlan] = []
    reported: set[str] = set()  # command-line overrides already refused
    reach: dict[str, Reach] = {}  # spec-layer overrides: the runs they target and those that keep their value
    invalid: set[str] = set()  # stages with a run refused above (their references are not counted)
    stage_keys: dict[str, str] = {}  # stage -> the run key of its (single) run, for stages that refer to it
    for stage_name in order:
        stage = spec.stages[stage_name]
        where = f"stages.{stage_name}"
        layers_base = [
            ("base", _nested(spec.base)),
            (f"scales.{scale}", _nested(scale_spec.config)),
            (where, _nested(stage.config)),
            (f"{where}.scales.{scale}", _nested(stage.scales.get(scale, {}))),
        ]
        try:
            slurm = SlurmResources.model_validate(_merge(scale_spec.slurm, stage.slurm))
        except ValidationError as err:
            errors += format_validation_error(err, path, SlurmResources, prefix=f"{where}.slurm.")
            slurm = SlurmResources()
        variants = stage.runs.variants or [Variant(name=stage_name, row=stage.row)]
        for index, variant in enumerate(variants):
            v_where = f"{where}.runs.variants[{index}].set" if stage.runs.variants else where
            combos = _combinations(stage.runs, f"{where}.runs", path, errors)
            if not combos:
                invalid.add(stage_name)
            for suffix, _, combo_layers in combos:
                name = "-".join(p for p in (variant.name, suffix) if p)
                layers = [*layers_base, (v_where, _nested(variant.set))]
                if scale in variant.scales:
                    layers.append((f"{where}.runs.variants[{index}].scales.{scale}", _nested(variant.scales[scale])))
                layers += combo_layers
                if spec._cli:
                    layers.append((CLI, spec._cli))
                if not NAME.match(name):
                    errors.append(
                        f"{path}: {where}.runs: the run name {show(name)} {NAME_RULE}; name the variant "
                        f"or shorten the grid, got {show(name)}"
                    )
                    invalid.add(stage_name)
                    continue
                merged: dict[str, Any] = {}
                for _, layer in layers:
                    merged = _merge(merged, layer)
                row = variant.row or stage.row or variant.name
                derived = _derived(spec, scale, stage_name, stage, name, row, output_root, merged, stage_keys)
                merged = _merge(merged, derived)
                refused = _track_overrides(spec, path, layers, derived, merged, f"{stage_name}/{name}", reach, reported)
                if refused:
                    errors += refused
                    invalid.add(stage_name)
                    continue
                try:
                    config = RunConfig.model_validate(merged)
                except ValidationError as err:
                    errors += [
                        f"{path}: {_locate(field, layers)}: {problem}"
                        for field, problem in validation_problems(err, RunConfig)
                    ]
                    invalid.add(stage_name)
                    continue
                errors += _check_batches(config, slurm, path, layers)
                if check_files:
                    errors += _check_data(config, path, layers)
                    produced = flatten({k: v for k, v in derived.items() if k in ("train", "teacher")})
                    errors += check_run_inputs(config, path, functools.partial(_locate, layers=layers), produced)
                if config.needs_teacher and not (config.teacher.checkpoint or config.teacher.run_dir):
                    errors.append(
                        f"{path}: {where}.distill_from: the kl/token losses need a teacher "
                        f"(distill_from: STAGE, or teacher.checkpoint, or losses.kl=0 losses.token=0), "
                        f"got none for run {name!r}"
                    )
                plans.append(RunPlan(stage_name, name, row, config.model.variant, config, slurm))
                stage_keys[stage_name] = config.run_key()
    errors += _check_references(spec, plans, path, order, invalid)
    unreached, notes = override_reach(path, reach)
    errors = unreached + errors
    names = [(p.stage, p.name) for p in plans]
    for dup in sorted({n for n in names if names.count(n) > 1}):
        errors.append(f"{path}: stages.{dup[0]}.runs: two runs are both named {dup[1]!r}")
    if errors:
        raise SpecError(list(dict.fromkeys(errors)))
    return Expanded(spec, path, scale, order, plans, notes)


def _at_scale(spec: Spec, order: list[str], scale: str) -> list[str]:
    """Stages that run at `scale`: those not limited to other scales, nor depending on such a stage."""
    kept: list[str] = []
    for name in order:
        stage = spec.stages[name]
        deps = set(stage.after) | {s for s in (stage.init_from, stage.distill_from) if s}
        if (not stage.only_scales or scale in stage.only_scales) and deps <= set(kept):
            kept.append(name)
    return kept


def stage_dir(spec: Spec, scale: str, stage: str, output_root: str) -> Path:
    return Path(output_root) / spec.name / scale / stage


def _derived(
    spec: Spec,
    scale: str,
    stage_name: str,
    stage: Stage,
    name: str,
    row: str,
    output_root: str,
    merged: dict[str, Any],
    stage_keys: dict[str, str] | None = None,
) -> dict[str, Any]:
    """What the spec fixes for every run: where it writes, how it is tagged, its stage inputs.

    A stage input is the other stage's run folder; its run key goes into the tags
    (`init_from_run_key`, `teacher_run_key`), which the run key counts instead of the folder's
    absolute path (RunConfig.run_key).
    """
    stage_keys = stage_keys or {}
    derived: dict[str, Any] = {
        "output_dir": str(stage_dir(spec, scale, stage_name, output_root) / name),
        "tracking": {
            "experiment": spec.name,
            "run_name": f"{stage_name}/{name}",
            "tags": {
                **merged.get("tracking", {}).get("tags", {}),
                "spec": spec.name,
                "table": spec.table or "",
                "row": row,
                "scale": scale,
                "stage": stage_name,
                "kind": "train",
            },
        },
    }
    for ref, field, tag in (
        (stage.init_from, "train.init_from", "init_from_run_key"),
        (stage.distill_from, "teacher.run_dir", "teacher_run_key"),
    ):
        if ref in spec.stages:
            set_dotted(derived, field, str(_single_run_dir(spec, scale, ref, output_root)))
            if ref in stage_keys:
                derived["tracking"]["tags"][tag] = stage_keys[ref]
    return derived


def _single_run_dir(spec: Spec, scale: str, stage_name: str, output_root: str) -> Path:
    stage = spec.stages[stage_name]
    name = stage.runs.variants[0].name if stage.runs.variants else stage_name
    return stage_dir(spec, scale, stage_name, output_root) / name


def _check_references(
    spec: Spec, plans: list[RunPlan], path: str, order: list[str], invalid: Set[str] = frozenset()
) -> list[str]:
    errors = []
    for name in order:
        stage = spec.stages[name]
        for field, ref in (("init_from", stage.init_from), ("distill_from", stage.distill_from)):
            if ref in spec.stages and ref not in invalid:
                count = sum(1 for p in plans if p.stage == ref)
                if count != 1:
                    errors.append(
                        f"{path}: stages.{name}.{field}: stage {ref!r} must have exactly one run, got {count}"
                    )
    return errors


def _check_data(config: RunConfig, path: str, layers: list[tuple[str, dict]]) -> list[str]:
    """A dataset folder that the chosen scale needs must exist before anything is submitted."""
    if config.data.name != "imagenet":
        return []
    root = config.data.root
    where = _locate("data.root", layers)
    if root is None:
        return [f"{path}: {where}: required for data.name imagenet, got None"]
    if not Path(root).expanduser().is_dir():
        return [f"{path}: {where}: no such folder, got {root!r}"]
    if config.data.classes is not None:  # a class subset: its list is valid and its folders exist
        from harness.class_lists import ClassListError, subset_labels

        try:
            subset_labels(config.data.classes, Path(root).expanduser())
        except ClassListError as err:
            field, _, problem = str(err).partition(": ")
            return [f"{path}: {_locate(field, layers)}: {problem}"]
    return []


def _check_batches(config: RunConfig, slurm: SlurmResources, path: str, layers: list[tuple[str, dict]]) -> list[str]:
    """An epoch must hold at least one optimiser step, else the job fails after the queue.

    Training drops an epoch's last partial batch, and its last incomplete update (harness/engine.py):
    each process sees its share of the training images (DDP over nodes x tasks_per_node).
    """
    data, train = config.data, config.train
    if train.batch_size > MAX_BATCH:
        return []  # refused on its own (harness/inputs.py): one line is enough
    sizes = {
        "cluttered_mnist": ("data.train_digits", data.train_digits),
        "synthetic": ("data.train_size", data.train_size),
    }
    if data.name not in sizes:
        return []  # an image folder's size is known only when it is read
    field, images = sizes[data.name]
    world = slurm.nodes * slurm.tasks_per_node
    per_process = (images // 256 * 256 if train.repeated_aug else images) // world
    if per_process // train.batch_size // train.accum_steps >= 1:
        return []
    needed = train.batch_size * train.accum_steps * world
    how = (
        f"train.batch_size {train.batch_size} ({_locate('train.batch_size', layers)}) x train.accum_steps "
        f"{train.accum_steps}" + (f" x {world} processes" if world > 1 else "")
    )
    rounded = " (train.repeated_aug keeps a multiple of 256)" if train.repeated_aug else ""
    return [
        f"{path}: {_locate(field, layers)}: too few training images for one optimiser step of {how}: "
        f"at least {needed} needed{rounded}, got {images}"
    ]


def differing_values(plans: list[RunPlan]) -> list[str]:
    """Dotted config keys whose values differ between runs (what a dry-run table shows)."""
    flats = [flatten(p.config.model_dump(exclude={"output_dir", "tracking"})) for p in plans]
    keys = sorted({k for f in flats for k in f})
    return [k for k in keys if len({repr(f.get(k)) for f in flats}) > 1]


def load_and_expand(
    path: str,
    overrides: Sequence[str] = (),
    scale: str | None = None,
    output_root: str = "runs",
    check_files: bool = True,
    max_runs: int | None = None,
) -> Expanded:
    return expand(load_spec(path, overrides), path, scale, output_root, check_files, max_runs)
