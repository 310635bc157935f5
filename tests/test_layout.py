"""The package layout keeps data flowing one way: no import circles, shared code never imports a stage, a stage
never imports another stage, and `eagle/` never imports `stages/` (nor any third-party package but torch and
safetensors). Imports are read with `ast` from every file, including those inside functions."""
from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
STAGE_PACKAGES = ("stages.regenerate", "stages.dump", "stages.train", "stages.evaluate")
TOP_MODULES = ("stages.cli", "stages.run", "stages.config")  # entry points: may import anything below them
EAGLE_THIRD_PARTY = {"torch", "safetensors"}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def project_modules() -> dict[str, Path]:
    files = sorted((ROOT / "stages").rglob("*.py")) + sorted((ROOT / "eagle").rglob("*.py"))
    return {module_name(f): f for f in files}


def imported_modules(path: Path, name: str, known: set[str]) -> set[str]:
    """Project modules one file imports (a `from pkg import mod` counts as `pkg.mod` when that is a module)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known and "." in target:
                target = target.rpartition(".")[0]
            if target in known and target != name:
                found.add(target)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = project_modules()
    known = set(modules)
    return {name: imported_modules(path, name, known) for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def stage_of(module: str) -> str | None:
    return next((p for p in STAGE_PACKAGES if module == p or module.startswith(p + ".")), None)


def test_no_import_circle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import circle: " + " -> ".join(cycle)


def test_imports_point_down():
    bad = []
    for module, imports in import_graph().items():
        if module.startswith("eagle"):
            bad += [f"{module} imports {m} (eagle/ is the library below stages/)" for m in imports
                    if m.startswith("stages")]
            continue
        if module in TOP_MODULES:
            continue
        own = stage_of(module)
        for m in imports:
            if m in TOP_MODULES:
                bad.append(f"{module} imports the entry point {m}")
            elif stage_of(m) and stage_of(m) != own:
                kind = "shared module" if own is None else "stage"
                bad.append(f"{module} ({kind}) imports {m} from stage {stage_of(m)}")
    assert not bad, "\n".join(bad)


def test_eagle_imports_only_torch_and_safetensors():
    stdlib = set(sys.stdlib_module_names) | {"__future__"}
    bad = []
    for path in sorted((ROOT / "eagle").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module] if isinstance(node, ast.ImportFrom) and not node.level else [])
            for top in {n.split(".")[0] for n in names if n}:
                if top not in stdlib | EAGLE_THIRD_PARTY | {"eagle"}:
                    bad.append(f"{path.relative_to(ROOT)} imports {top}")
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("source, expected", [
    ("from stages.dump import writer\n", "stages.dump.writer"),
    ("from stages import shards\n", "stages.shards"),
    ("def f():\n    from stages.train.stage import train\n", "stages.train.stage"),
    ("import stages.data.sources as s\n", "stages.data.sources"),
])
def test_import_reader_sees_every_form(tmp_path, source, expected):
    """The checker itself: each import form, at module level or inside a function, is found."""
    path = tmp_path / "m.py"
    path.write_text(source)
    known = set(project_modules())
    assert imported_modules(path, "stages.probe", known) == {expected}


def test_cycle_finder_finds_a_planted_circle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
