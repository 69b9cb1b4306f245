"""The project's import graph, read from the source with `ast`, has no cycle.

Every import counts: at module level and inside functions (a function-local import that closes
a cycle only hides it until someone moves it), `from pkg import name` pointing at the submodule
`pkg.name` when there is one, relative imports, and the packages an import executes on the way
(`import a.b.c` runs a/__init__.py and a/b/__init__.py). Only imports under `if TYPE_CHECKING:`
are left out: they never run.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("harness", "models", "analysis")


def module_files() -> dict[str, Path]:
    """Dotted module name -> source file, for every .py file of the project's packages."""
    modules = {}
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            parts = list(path.relative_to(REPO).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join(parts)] = path
    return modules


def _imports(tree: ast.AST) -> list[ast.Import | ast.ImportFrom]:
    """Every import statement in `tree`, at any depth, except those under `if TYPE_CHECKING:`."""
    found: list[ast.Import | ast.ImportFrom] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found.append(node)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def _with_packages(target: str, source: str, modules: dict[str, Path]) -> set[str]:
    """`target` and the packages above it that importing it executes (not those of `source` itself,
    which are already running when `source` runs)."""
    parts = target.split(".")
    source_parents = {".".join(source.split(".")[:i]) for i in range(1, source.count(".") + 1)}
    return {
        name
        for name in (".".join(parts[:i]) for i in range(1, len(parts) + 1))
        if name in modules and name not in source_parents and name != source
    }


def _known(name: str, modules: dict[str, Path]) -> str | None:
    """The longest prefix of `name` that is one of the project's modules."""
    parts = name.split(".")
    for i in range(len(parts), 0, -1):
        if ".".join(parts[:i]) in modules:
            return ".".join(parts[:i])
    return None


def import_graph() -> dict[str, set[str]]:
    """Module -> the project modules its imports execute."""
    modules = module_files()
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets: set[str] = set()
        for node in _imports(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                bases = [alias.name for alias in node.names]
            else:
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                    base = ".".join(anchor + ([base] if base else []))
                # `from pkg import sub` imports the submodule pkg.sub; `from mod import obj` just mod
                bases = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
            for base in bases:
                known = _known(base, modules)
                if known:
                    targets |= _with_packages(known, name, modules)
        graph[name] = targets
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as a path a -> b -> ... -> a, or None when the graph is acyclic."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            if nxt not in state:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def test_the_import_graph_of_harness_models_and_analysis_has_no_cycle():
    graph = import_graph()
    assert {"harness.errors", "harness.config", "models.dynamic_vit", "analysis.report"} <= set(graph)
    assert "harness.config" in graph["harness.spec"]  # the graph sees ordinary imports
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_the_error_path_and_the_file_helpers_import_only_the_standard_library():
    """harness.errors runs when any command fails (it must not pull in torch or MLflow to print
    one line); harness.files is imported by the light modules (runstate, the launcher's path)."""
    for name in ("harness.errors", "harness.files"):
        path = module_files()[name]
        imported = {
            alias.name if isinstance(node, ast.Import) else node.module or ""
            for node in _imports(ast.parse(path.read_text()))
            for alias in node.names
        }
        outside = {module for module in imported if module.split(".")[0] not in sys.stdlib_module_names}
        assert not outside, f"{name} imports {sorted(outside)}"


SLURM_COMMANDS = {"sbatch", "sinfo", "squeue", "scancel", "scontrol", "sacct", "srun"}


def test_only_harness_cluster_talks_to_slurm_and_signals_processes():
    """Every SLURM command (a string constant naming it, as a subprocess argument list has) and every
    `os.kill` of harness/ lives in harness/cluster.py, which imports only the standard library (the
    dry-run path and cancel's error path use it)."""
    spelled = {}
    for name, path in module_files().items():
        if not name.startswith("harness.") or name == "harness.cluster":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and node.value in SLURM_COMMANDS:
                spelled.setdefault(name, set()).add(node.value)
            elif isinstance(node, ast.Attribute) and node.attr == "kill" and getattr(node.value, "id", "") == "os":
                spelled.setdefault(name, set()).add("os.kill")
    assert not spelled, f"SLURM commands or os.kill outside harness.cluster: {spelled}"
    imported = {
        alias.name if isinstance(node, ast.Import) else node.module or ""
        for node in _imports(ast.parse(module_files()["harness.cluster"].read_text()))
        for alias in node.names
    }
    assert not {module for module in imported if module.split(".")[0] not in sys.stdlib_module_names}


def test_the_graph_sees_function_local_relative_and_submodule_imports(tmp_path, monkeypatch):
    """The reader itself: a cycle closed by a function-local import, a relative import or
    `from pkg import submodule` is found (the ways cycles were hidden here before)."""
    package = tmp_path / "harness"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "sub" / "__init__.py").write_text("")
    (package / "a.py").write_text("def f():\n    from harness.b import g\n")
    (package / "b.py").write_text("from .sub import c\n")
    (package / "sub" / "c.py").write_text("from harness import a\n")
    (package / "d.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import harness.e\n")
    (package / "e.py").write_text("import harness.d\n")
    monkeypatch.setattr(sys.modules[__name__], "REPO", tmp_path)
    graph = import_graph()
    assert graph["harness.b"] == {"harness.sub", "harness.sub.c"}
    assert graph["harness.d"] == set()  # TYPE_CHECKING imports never run
    cycle = find_cycle(graph)
    assert cycle is not None and {"harness.a", "harness.b", "harness.sub.c"} <= set(cycle)


def _docstrings(tree: ast.AST) -> set[int]:
    """The ids of the docstring constants of a module, its classes and functions (prose, not code)."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                found.add(id(first.value))
    return found


def lifecycle_spellings(source: str, states: set[str], tags: set[str], slurm: bool = False) -> set[str]:
    """The run states and lifecycle tag names a module's source spells in its string constants: a tag
    name as a whole string, a state anywhere as a word (a filter `attributes.status = 'RUNNING'`, a
    message `... KILLED`), f-strings' literal parts included, docstrings not. `slurm`: SLURM's own job
    states (PENDING, RUNNING, ...) are harness/cluster.py's vocabulary, not MLflow's."""
    import re

    word = re.compile(r"\b(" + "|".join(sorted(states)) + r")\b")
    tree = ast.parse(source)
    docstrings = _docstrings(tree)
    found = set()
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Constant) and isinstance(node.value, str)) or id(node) in docstrings:
            continue
        if node.value in tags:
            found.add(node.value)
        elif not slurm:
            found |= set(word.findall(node.value))
    return found


def test_only_harness_lifecycle_spells_a_run_state_or_a_lifecycle_tag():
    """Issue 22: the run lifecycle has one home. Every MLflow run status and every lifecycle tag
    name is harness/lifecycle.py's (`RunState`, `Tag`); the other modules of harness/, models/ and
    analysis/ use those constants, and nothing writes MLflow's private fields (`info._status`).
    harness.lifecycle imports only the standard library (harness.cancel and the launcher import it)."""
    from harness.lifecycle import RunState, Tag

    states, tags = {s.value for s in RunState}, {t.value for t in Tag}
    assert states == {"SCHEDULED", "RUNNING", "FINISHED", "FAILED", "KILLED"}
    assert {"superseded", "requeued", "replaced_by", "queued_as", "error"} <= tags
    spelled, private = {}, set()
    for name, path in module_files().items():
        source = path.read_text()
        if name != "harness.lifecycle":
            found = lifecycle_spellings(source, states, tags, slurm=name == "harness.cluster")
            if found:
                spelled[name] = sorted(found)
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.Attribute) and node.attr == "_status":
                private.add(name)
    assert not spelled, f"run states or lifecycle tags spelled outside harness.lifecycle: {spelled}"
    assert not private, f"MLflow's private run.info._status written in {sorted(private)}"
    imported = {
        alias.name if isinstance(node, ast.Import) else node.module or ""
        for node in _imports(ast.parse(module_files()["harness.lifecycle"].read_text()))
        for alias in node.names
    }
    assert not {module for module in imported if module.split(".")[0] not in sys.stdlib_module_names}


def test_the_lifecycle_reader_finds_states_and_tags_in_code_not_in_docstrings():
    """The reader itself, on the spellings the modules had before issue 22."""
    source = '''"""A docstring may say FINISHED and superseded."""
def f(client, run, why):
    """So may a function's: KILLED."""
    client.set_tag(run, "superseded", why)
    client.set_terminated(run, "KILLED")
    where = "attributes.status = 'SCHEDULED' or attributes.status = 'RUNNING'"
    print(f"MLflow run {run} FAILED")
    return {"FAIL": 0, "COMPLETE": 1}  # Optuna's states are not MLflow's
'''
    states, tags = {"SCHEDULED", "RUNNING", "FINISHED", "FAILED", "KILLED"}, {"superseded", "error"}
    assert lifecycle_spellings(source, states, tags) == {"superseded", "KILLED", "SCHEDULED", "RUNNING", "FAILED"}
    assert lifecycle_spellings(source, states, tags, slurm=True) == {"superseded"}
