"""Spec expansion, override precedence, run-key stability and malformed specs, through the
spec loader and the launcher's CLI entry point (in-process: these never reach a scheduler)."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from harness import launch
from harness.spec import load_and_expand
from tests.test_launch import MINI

REPO = Path(__file__).resolve().parents[1]


def spec_copy() -> dict[str, Any]:
    return json.loads(json.dumps(MINI))


def expand(tmp: Path, spec: dict[str, Any], *overrides: str, scale: str | None = None):
    path = tmp / "spec.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return load_and_expand(str(path), list(overrides), scale, str(tmp / "runs"))


def test_grid_zip_and_variants_expand_to_their_product(tmp_path: Path) -> None:
    spec = spec_copy()
    spec["stages"]["students"]["runs"]["grid"] = {"model.keep_ratio": [0.5, 0.7], "train.seed": [0, 1, 2]}
    spec["stages"]["students"]["runs"]["zip"] = {"optim.lr": [1e-3, 2e-3], "train.batch_size": [16, 32]}
    students = expand(tmp_path, spec).stage_runs("students")
    assert len(students) == 2 * 2 * 3 * 2  # variants x keep ratios x seeds x zipped pairs
    pairs = {(p.config.optim.lr, p.config.train.batch_size) for p in students}
    assert pairs == {(1e-3, 16), (2e-3, 32)}  # zipped, not crossed
    assert len({p.key for p in students}) == len(students)
    assert len({p.output_dir for p in students}) == len(students)


def test_override_precedence(tmp_path: Path) -> None:
    spec = spec_copy()
    spec["base"]["train"]["epochs"] = 1
    spec["scales"]["tiny"]["train"] = {"epochs": 2, "batch_size": 8}
    spec["stages"]["students"]["train.epochs"] = 3
    spec["stages"]["students"]["scales"] = {"tiny": {"train.epochs": 4}}
    spec["stages"]["students"]["runs"]["variants"][0]["set"]["train.epochs"] = 5
    spec["stages"]["students"]["runs"]["variants"][1]["scales"] = {"tiny": {"train.epochs": 6}}
    runs = {p.name: p.config for p in expand(tmp_path, spec).runs}
    assert runs["teacher"].train.epochs == 2 and runs["teacher"].train.batch_size == 8  # scale over base
    assert runs["dynamic"].train.epochs == 5  # variant over stage-at-scale over stage
    assert runs["static"].train.epochs == 6  # variant-at-scale over variant
    spec["stages"]["students"]["runs"]["variants"][0]["set"].pop("train.epochs")
    assert {p.name: p.config for p in expand(tmp_path, spec).runs}["dynamic"].train.epochs == 4
    # command-line overrides edit the spec itself, before any merging
    cli = {p.name: p.config for p in expand(tmp_path, spec, "scales.tiny.train.batch_size=4").runs}
    assert cli["teacher"].train.batch_size == 4 and cli["dynamic"].train.batch_size == 4


def test_run_keys_ignore_yaml_key_order_and_are_stable_across_processes(tmp_path: Path) -> None:
    spec = spec_copy()
    keys = [p.key for p in expand(tmp_path, spec).runs]

    def reverse(node: Any) -> Any:
        return {k: reverse(node[k]) for k in reversed(list(node))} if isinstance(node, dict) else node

    reordered = tmp_path / "reordered"
    reordered.mkdir()
    assert sorted(p.key for p in expand(reordered, reverse(spec)).runs) == sorted(
        p.key for p in expand(reordered, spec).runs
    )
    code = (
        "import sys; from harness.spec import load_and_expand; "
        "print(' '.join(p.key for p in load_and_expand(sys.argv[1], [], None, sys.argv[2]).runs))"
    )
    other = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "spec.yaml"), str(tmp_path / "runs")],
        cwd=REPO,
        capture_output=True,
        text=True,
        env={"PYTHONHASHSEED": "123", "PATH": ""},
    )
    assert other.returncode == 0, other.stderr
    assert other.stdout.split() == keys


def _malformed() -> list[tuple[str, Callable[[dict], None]]]:
    """Fifty listed ways to get a spec wrong; each must be one line per problem, exit 2."""
    cases: list[tuple[str, Callable[[dict], None]]] = []

    def set_path(path: str, value: Any) -> Callable[[dict], None]:
        def mutate(spec: dict) -> None:
            *parents, leaf = path.split("/")
            node = spec
            for part in parents:
                node = node[int(part)] if isinstance(node, list) else node.setdefault(part, {})
            node[leaf] = value

        return mutate

    def drop(key: str) -> Callable[[dict], None]:
        return lambda spec: spec.pop(key)

    bad_values = {
        "base/model/keep_ratio": [0, -1, 1.01, "half", None, [0.5]],
        "stages/teacher/model.variant": ["magic", 3],
        "base/model/name": ["vit_huge", ""],
        "base/model/pruning_loc": [[9], [-1], "3,6"],
        "base/model/drop_path": [1.5, "x"],
        "base/train/epochs": [-1, "many", 1.5],
        "base/train/batch_size": [0, "big"],
        "base/optim/lr": [0, -1e-3, "fast"],
        "base/data/name": ["cifar", 7],
        "base/aug/mixup": [-0.1],
        "base/gumbel/schedule": ["sometimes"],
        "base/gumbel/tau": [0, -1],
        "base/losses/kl": ["on?", {"weight": -1}],
        "base/losses/ratio": [{"weigth": 2.0}],
        "base/unknown_section": [{}],
        "base/model/keep_ratoi": [0.5],
        "scales/tiny/slurm/nodes": [0, "two"],
        "scales/tiny/slurm/timeout_min": [-5],
        "scales/tiny/slurm/gpu": [1],
        "stages/students/after": [["ghost"], "students"],
        "stages/students/init_from": ["ghost"],
        "stages/students/runs/grid": [{"model.keep_ratio": [0.5, 2.0]}, "none"],
        "stages/students/runs/variants/0/set": [{"model.variant": "nope"}],
        "stages/students/runs/variants/0/name": [None],
        "name": ["has space", 5],
        "default_scale": ["huge"],
    }
    for path, values in bad_values.items():
        for value in values:
            cases.append((f"{path}={value!r}", set_path(path, value)))
    cases += [("no scales", drop("scales")), ("no stages", drop("stages")), ("no name", drop("name"))]
    return cases


MALFORMED = _malformed()


def test_there_are_at_least_fifty_malformed_specs() -> None:
    assert len(MALFORMED) >= 50


@pytest.mark.parametrize("label, mutate", MALFORMED, ids=[label for label, _ in MALFORMED])
def test_malformed_spec_is_one_line_per_problem_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, label: str, mutate
) -> None:
    spec = spec_copy()
    mutate(spec)
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    monkeypatch.chdir(tmp_path)
    code = launch.main(
        [
            str(path),
            "--executor",
            "local",
            "--output-root",
            str(tmp_path / "runs"),
            "--tracking-uri",
            f"sqlite:///{tmp_path}/mlflow.db",
        ]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2, label
    assert err and all(line.startswith(f"{path}: ") for line in err), err
    assert not any("Traceback" in line for line in err)
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "runs").exists()


# ------------------------------------------- overrides do what the user meant (issue 23, point 3)
def test_a_scale_override_shortens_the_students_and_says_the_teacher_keeps_its_epochs(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """`scales.tiny.train.epochs=1` on table3: the teacher stage (an evaluation) sets its own epochs (0)."""
    monkeypatch.chdir(REPO)
    table3 = "experiments/table3.yaml"
    before = {p.name: p for p in load_and_expand(table3, [], "tiny").runs}
    after = {p.name: p for p in load_and_expand(table3, ["scales.tiny.train.epochs=1"], "tiny").runs}
    assert after["teacher"].config.train.epochs == 0 and after["teacher"].key == before["teacher"].key
    students = [p for p in after.values() if p.stage == "students"]
    assert len(students) == 7 and {p.config.train.epochs for p in students} == {1}
    assert launch.main([table3, "scales.tiny.train.epochs=1", "--dry-run"]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        f"{table3}: scales.tiny.train.epochs=1: applies to 7 of 8 runs; teacher/teacher keeps its own "
        "train.epochs (stages.teacher sets train.epochs = 0)"
    ]


def test_an_override_is_refused_only_where_it_reaches_no_run_and_advises_only_the_undoing_layers(
    tmp_path: Path,
) -> None:
    from harness.spec import SpecError

    spec = spec_copy()
    spec["stages"]["teacher"]["train.epochs"] = 0
    spec["stages"]["students"]["runs"]["variants"][1]["set"]["train.epochs"] = 2
    spec["stages"]["students"]["runs"]["variants"][1]["set"]["train.batch_size"] = 16
    path = tmp_path / "spec.yaml"
    # reaches the dynamic student only: applied there, one line for the runs that keep their own value
    expanded = expand(tmp_path, spec, "scales.tiny.train.epochs=3")
    assert {p.name: p.config.train.epochs for p in expanded.runs} == {"teacher": 0, "dynamic": 3, "static": 2}
    assert expanded.notes == [
        f"{path}: scales.tiny.train.epochs=3: applies to 1 of 3 runs; teacher/teacher keeps its own train.epochs "
        "(stages.teacher sets train.epochs = 0); students/static keeps its own train.epochs "
        "(stages.students.runs.variants[1].set sets train.epochs = 2)"
    ]
    # a stage override that every run of that stage undoes: refused, naming the layer, no wider advice
    spec["stages"]["students"]["runs"]["variants"][0]["set"]["train.epochs"] = 4
    with pytest.raises(SpecError) as err:
        expand(tmp_path, spec, "stages.students.train.epochs=5")
    assert err.value.lines == [
        f"{path}: stages.students.train.epochs: has no effect on any run: stages.students.runs.variants[0].set sets "
        "train.epochs = 4 after it (students/dynamic); stages.students.runs.variants[1].set sets train.epochs = 2 "
        "after it (students/static); edit stages.students.runs.variants[0].set.train.epochs in the spec or edit "
        "stages.students.runs.variants[1].set.train.epochs in the spec instead, got 5"
    ]
    assert "train.epochs=5" not in err.value.lines[0]  # never the run config key: it would retrain the teacher
    # a section override: one leaf reaching a run is enough; the leaves kept elsewhere are said
    expanded = expand(tmp_path, spec, "stages.students.train={epochs: 5, batch_size: 8}")
    assert {p.name: (p.config.train.epochs, p.config.train.batch_size) for p in expanded.runs} == {
        "teacher": (0, 32),
        "dynamic": (4, 8),
        "static": (2, 16),
    }
    assert len(expanded.notes) == 1 and "applies to 1 of 2 runs" in expanded.notes[0]
    assert expand(tmp_path, spec, "train.epochs=5").notes == []  # the run config key: every run, no note
