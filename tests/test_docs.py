"""The README and docs/ stay true to the tree: every relative link resolves (file and #anchor), every
`python -m MODULE` they name answers `--help` with exit 0, the README names every module, and the test
command CI runs (.ci/run) is the README's, character for character."""

from __future__ import annotations

import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
LINK = re.compile(r"\[[^\]\n]*\]\(([^)\s]+)\)")
MODULE = re.compile(r"python -m ([a-z_][\w.]*\w)")  # lower case: `python -m MODULE` is a placeholder
SCRIPT = re.compile(r"python ((?:benchmarks|scripts|analysis|harness)/[a-z_][\w/]*\.py)")


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    text = re.sub(r"^```.*?^```", "", page.read_text(), flags=re.S | re.M)  # no headings in code blocks
    return {slug(m) for m in re.findall(r"^#+ (.+)$", text, flags=re.M)}


def test_every_relative_link_of_the_readme_and_docs_resolves() -> None:
    broken = []
    for page in PAGES:
        for target in LINK.findall(page.read_text()):
            if re.match(r"[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
                continue
            path, _, anchor = target.partition("#")
            resolved = (page.parent / path).resolve() if path else page
            if not resolved.exists():
                broken.append(f"{page.relative_to(REPO)}: {target}: no such file")
            elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
                broken.append(f"{page.relative_to(REPO)}: {target}: no such heading")
    assert not broken, "\n".join(broken)


def test_every_python_m_command_of_the_readme_and_docs_answers_help() -> None:
    """`python -m MODULE` (and `python benchmarks/X.py`, the scripts the pages name) `--help`: exit 0."""
    texts = [page.read_text() for page in PAGES]
    modules = sorted({m for text in texts for m in MODULE.findall(text)})
    assert {"harness.launch", "harness.train", "harness.search", "analysis.report"} <= set(modules), modules
    commands = [["-m", m] for m in modules] + [[s] for s in sorted({s for text in texts for s in SCRIPT.findall(text)})]

    def help_of(command: list[str]) -> tuple[str, int, str]:
        done = subprocess.run(
            [sys.executable, *command, "--help"], cwd=REPO, capture_output=True, text=True, timeout=180
        )
        return " ".join(command), done.returncode, (done.stderr or done.stdout)[-400:]

    with ThreadPoolExecutor(max_workers=4) as pool:
        failed = [f"python {c} --help: exit {rc}: {out}" for c, rc, out in pool.map(help_of, commands) if rc != 0]
    assert not failed, "\n".join(failed)


def test_the_readme_names_every_module() -> None:
    """The "where is X" table: every module of harness/ (search/ included), models/, analysis/ (the
    notebooks' jupytext pairs are listed as notebooks), benchmarks/ and every script of scripts/."""
    readme = (REPO / "README.md").read_text()
    patterns = [
        "harness/*.py",
        "harness/search/*.py",
        "models/*.py",
        "analysis/*.py",
        "analysis/notebooks/*.py",
        "benchmarks/*.py",
        "scripts/*.sh",
    ]
    tracked = subprocess.run(["git", "ls-files", *patterns], cwd=REPO, capture_output=True, text=True)
    if tracked.returncode == 0 and tracked.stdout.strip():  # the committed tree, as CI checks it out
        files = [REPO / line for line in tracked.stdout.split()]
    else:  # not a git checkout
        files = sorted({f for pattern in patterns for f in REPO.glob(pattern)})
    missing = []
    for file in files:
        rel = file.relative_to(REPO).as_posix()
        if "jupytext" in file.read_text()[:300] or file.name in ("__init__.py", "__main__.py"):
            continue
        if f"`{rel}`" not in readme:
            missing.append(rel)
    assert not missing, f"README.md's where-is-X table does not name: {missing}"


def test_notebooks_live_in_analysis_notebooks_under_names_no_module_has() -> None:
    """A notebook (and its jupytext pair) never shares a name with a module of harness/, models/ or
    analysis/, so `analysis/notebooks/losses_notebook.py` is never mistaken for `harness/losses.py`."""
    notebooks = REPO / "analysis" / "notebooks"
    stems = {f.stem for f in notebooks.glob("*.ipynb")}
    assert stems, "no notebook in analysis/notebooks/"
    code = [f for d in ("harness", "models", "analysis") for f in (REPO / d).rglob("*.py")]
    modules = {f.stem: f.relative_to(REPO).as_posix() for f in code if notebooks not in f.parents}
    assert not {s: modules[s] for s in stems & modules.keys()}, "notebook names that are module names"
    found = [f for d in ("harness", "models", "analysis") for f in (REPO / d).rglob("*.ipynb")]
    elsewhere = [f for f in found if ".ipynb_checkpoints" not in f.parts]  # Jupyter's autosaves aside
    assert all(f.parent == notebooks for f in elsewhere), [f for f in elsewhere if f.parent != notebooks]


def test_the_readme_test_command_is_the_one_ci_runs() -> None:
    command = ".venv/bin/python -m pytest -q"
    assert f"```bash\n{command}\n```" in (REPO / "README.md").read_text()
    assert (REPO / ".ci" / "run").read_text().rstrip().endswith(command)
