"""Imports among the project's modules: no cycles, and each at the top of its file.

A reader learns a file's dependencies from its first lines; an import inside a function (or a
`__main__` block) hides one, and a cycle between two modules means neither can be read without
the other (and one of them has to import the other late to load at all). Read statically with
`ast`, so a cycle through a branch the tests never run is found too.

    project modules   grpo/**, models/**, data/**, train.py, eval.py
    an edge A -> B    A imports B anywhere in its file (top, function, `if __name__ == "__main__":`)

Third-party imports inside a function are allowed only for an optional dependency (an extra of
pyproject.toml), and the line says so with a comment.
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("grpo", "models", "data")
SCRIPTS = ("train", "eval")

# Project imports that may stay inside a function: (file, imported module) -> why. Keep it short.
ALLOWED_LATE_PROJECT_IMPORTS: dict[tuple[str, str], str] = {}

# Optional dependencies (pyproject.toml's extras): imported where they are used, so the project runs
# without them. The top-level package name -> the extra that installs it.
OPTIONAL_DEPENDENCIES = {
    "matplotlib": "plot",
    "math_verify": "math",
    "wandb": "logging",
    "tensorboard": "logging",
    "torch.utils.tensorboard": "logging",  # torch's module imports the tensorboard package
}


def _project_files() -> dict[str, Path]:
    files = {}
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            parts = path.relative_to(REPO).with_suffix("").parts
            files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    for script in SCRIPTS:
        files[script] = REPO / f"{script}.py"
    return files


FILES = _project_files()


def _is_project(module: str) -> bool:
    return module.split(".")[0] in PACKAGES + SCRIPTS


def _imports(path: Path):
    """(module imported, line, at_top) for each import statement of a file.

    `from a.b import c` names the module a.b.c when that is a file of the project, else a.b.
    at_top: a statement of the module's own body (not in a function, class, `if` or `try`).
    """
    tree = ast.parse(path.read_text())
    top = set(map(id, tree.body))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node.lineno, id(node) in top
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            for alias in node.names:
                submodule = f"{node.module}.{alias.name}"
                yield (submodule if submodule in FILES else node.module), node.lineno, id(node) in top


def _graph() -> dict[str, set[str]]:
    return {
        name: {module for module, _, _ in _imports(path) if module in FILES and module != name}
        for name, path in FILES.items()
    }


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Each strongly connected component of more than one module (Tarjan), sorted."""
    index, low, stack, on_stack, components = {}, {}, [], set(), []

    def visit(node):
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph[node]):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return sorted(components)


def test_no_import_cycles_among_project_modules():
    graph = _graph()
    cycles = _cycles(graph)
    described = [
        " ; ".join(f"{a} -> {b}" for a in cycle for b in sorted(graph[a]) if b in cycle) for cycle in cycles
    ]
    assert not cycles, "import cycles (break each by moving the shared piece down a layer):\n" + "\n".join(described)


def test_the_cycle_finder_sees_a_cycle():
    # a -> b -> c -> a is one cycle; d -> a hangs off it and is not part of it
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert _cycles(graph) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_the_import_reader_tells_top_from_late(tmp_path):
    source = tmp_path / "example.py"
    source.write_text(
        "import os\nfrom grpo.runtime import checkpoint\n\n\ndef f():\n    from grpo.loss import grpo_loss\n\n\n"
        "if __name__ == '__main__':\n    import models.tiny\n"
    )
    assert list(_imports(source)) == [
        ("os", 1, True), ("grpo.runtime.checkpoint", 2, True), ("grpo.loss", 6, False), ("models.tiny", 10, False),
    ]  # fmt: skip


def test_project_imports_are_at_the_top_of_each_file():
    late, used = [], set()
    for path in FILES.values():
        for module, line, at_top in _imports(path):
            if at_top or not _is_project(module):
                continue
            key = (str(path.relative_to(REPO)), module)
            if key in ALLOWED_LATE_PROJECT_IMPORTS:
                used.add(key)
            else:
                late.append(f"{key[0]}:{line} imports {module} inside a function or block")
    late = sorted(set(late))  # `from a import b, c` is one statement
    assert not late, "move these imports to the top of the file (or allow one, with its reason):\n" + "\n".join(late)
    assert used == set(ALLOWED_LATE_PROJECT_IMPORTS), f"stale allow-list entries: {set(ALLOWED_LATE_PROJECT_IMPORTS) - used}"


def test_late_third_party_imports_are_optional_dependencies_and_say_so():
    wrong = []
    for path in FILES.values():
        lines = path.read_text().splitlines()
        for module, line, at_top in _imports(path):
            if at_top or _is_project(module):
                continue
            optional = next((name for name in OPTIONAL_DEPENDENCIES if module == name or module.startswith(name + ".")), None)
            where = f"{path.relative_to(REPO)}:{line} imports {module}"
            if optional is None:
                wrong.append(f"{where} inside a function: not an optional dependency, import it at the top")
            elif "optional" not in lines[line - 1]:
                wrong.append(f"{where}: say why it is late (`# optional: pip install .[{OPTIONAL_DEPENDENCIES[optional]}]`)")
    assert not wrong, "\n".join(wrong)
