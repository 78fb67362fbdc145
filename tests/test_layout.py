"""The house as ARCHITECTURE.md describes it: the rules that the imports show (no import cycles, the pipeline
and the formats never import the model or the trainer, and those two use only the pipeline's shared helpers),
and the map itself (every module named, every name a module).

Imports are read from the source (every `import`, at module level or inside a function), so a lazy import that
closes a cycle counts too; `from package import submodule` is an import of the submodule.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "m3w"
SHARED_PIPELINE_HELPERS = {"m3w.pipeline.io", "m3w.pipeline.tokenizer"}


def module_files() -> dict[str, Path]:
    files = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return files


def import_graph() -> dict[str, set[str]]:
    """m3w module → the m3w modules it imports."""
    files = module_files()

    def known(name: str) -> str:  # m3w.a.b.SomeName → m3w.a.b
        while name not in files:
            name = name.rpartition(".")[0]
        return name

    graph: dict[str, set[str]] = {}
    for module, path in files.items():
        imported = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                imported |= {known(a.name) for a in node.names if a.name.startswith("m3w")}
            elif (
                isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("m3w")
            ):
                imported |= {known(f"{node.module}.{a.name}") for a in node.names}
        graph[module] = imported - {module}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle (its modules in order, the first repeated at the end), or None."""
    state: dict[str, str] = {}  # "open" while on the current path, "done" once every path from it is explored
    path: list[str] = []

    def visit(module: str) -> list[str] | None:
        state[module] = "open"
        path.append(module)
        for target in sorted(graph[module]):
            if state.get(target) == "open":
                return path[path.index(target) :] + [target]
            if target not in state and (cycle := visit(target)):
                return cycle
        path.pop()
        state[module] = "done"
        return None

    for module in sorted(graph):
        if module not in state and (cycle := visit(module)):
            return cycle
    return None


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    return import_graph()


def test_the_graph_sees_every_import(graph):
    """The reader itself: lazy imports, `from package import submodule` and names from a module all count."""
    assert "m3w.pipeline.io" in graph["m3w.cli"]  # imported inside a function
    assert "m3w.pipeline.image_filters.signals" in graph["m3w.pipeline.image_filters.steps"]
    assert "m3w.pipeline.image_filters" not in graph["m3w.pipeline.image_filters.steps"]
    assert "m3w.model.loss" in graph["m3w.model.flamingo"]  # from m3w.model.loss import IGNORE_INDEX, ...
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_no_import_cycles(graph):
    cycle = find_cycle(graph)
    assert cycle is None, " → ".join(cycle)


def test_pipeline_and_formats_never_import_model_trainer_or_demo(graph):
    wrong = {
        (module, target)
        for module, targets in graph.items()
        if module.startswith(("m3w.pipeline", "m3w.schemas"))
        for target in targets
        if target.startswith(("m3w.model", "m3w.trainer", "m3w.demo"))
    }
    assert not wrong, sorted(wrong)


def test_model_and_trainer_use_only_the_shared_pipeline_helpers(graph):
    wrong = {
        (module, target)
        for module, targets in graph.items()
        if module.startswith(("m3w.model", "m3w.trainer"))
        for target in targets
        if target.startswith("m3w.pipeline") and target not in SHARED_PIPELINE_HELPERS
    }
    assert not wrong, sorted(wrong)


def test_formats_depend_on_no_stage(graph):
    """schemas/ is what the stages agree on: it may use the storage helpers (pipeline/io.py), never a stage."""
    wrong = {
        (module, target)
        for module, targets in graph.items()
        if module.startswith("m3w.schemas")
        for target in targets
        if target.startswith("m3w.pipeline") and target != "m3w.pipeline.io"
    }
    assert not wrong, sorted(wrong)


def code_names(text: str) -> set[str]:
    """The code paths a document names in backticks: `pipeline/extract.py`, `dedup/`, `m3w/configs/` (not the
    on-disk folders of a stage's output, which start with an underscore)."""
    return {
        name for name in re.findall(r"`([\w./]+)`", text) if name.endswith((".py", "/")) and name[0] != "_"
    }


def checkout_paths(*folders: str) -> set[str]:
    """Every file and folder under the given folders of the checkout, relative to it, a folder with a trailing
    slash."""
    return {
        path.relative_to(ROOT).as_posix() + ("/" if path.is_dir() else "")
        for folder in folders
        for path in (ROOT / folder).rglob("*")
        if "__pycache__" not in path.parts
    }


def names(name: str, path: str) -> bool:
    return path == name or path.endswith("/" + name)


def test_architecture_names_only_code_that_exists():
    top_level_files = {path.name for path in ROOT.iterdir() if path.is_file()}  # setup.py, Makefile, ...
    paths = checkout_paths("m3w", "tests", "bench", "tools") | top_level_files
    named = code_names((ROOT / "ARCHITECTURE.md").read_text())
    assert len(named) > 30
    assert not {n for n in named if not any(names(n, p) for p in paths)}


def test_architecture_names_every_module():
    """Each module and subpackage of pipeline/, schemas/, model/ and trainer/ has its place on the map."""
    named = code_names((ROOT / "ARCHITECTURE.md").read_text())
    modules = {
        path.relative_to(ROOT).as_posix() + ("/" if path.is_dir() else "")
        for package in ("pipeline", "schemas", "model", "trainer")
        for path in (PACKAGE / package).iterdir()
        if (path.suffix == ".py" and path.name != "__init__.py") or (path / "__init__.py").exists()
    }
    assert len(modules) > 40
    assert not {m for m in modules if not any(names(n, m) for n in named)}


def test_readme_layout_names_folders_that_exist():
    readme = (ROOT / "README.md").read_text()
    block = readme[readme.index("## Layout") :].split("```")[1]
    first_column = {line.split()[0] for line in block.splitlines() if line.startswith("m3w/")}
    assert {"m3w/cli.py", "m3w/schemas/", "m3w/pipeline/", "m3w/configs/"} <= first_column
    assert first_column <= checkout_paths("m3w")


def test_readme_cli_reference_names_every_command():
    from m3w.cli import COMMANDS

    readme = (ROOT / "README.md").read_text()
    table = readme[readme.index("## CLI reference") :].split("\n## ")[0]
    documented = set(re.findall(r"^\| `m3w (\w+)", table, flags=re.MULTILINE))
    assert documented == set(COMMANDS), (
        sorted(set(COMMANDS) - documented),
        sorted(documented - set(COMMANDS)),
    )
