"""The packages form layers: a module imports fxtp modules of its own layer or lower ones, never higher,
and no two modules import each other, directly or through others (imports inside functions count).

Reads the source with `ast`, so it checks every module without importing any of them."""
from __future__ import annotations

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent

# lowest first: what a stage may import is everything above it in this list
LAYERS = [
    ("fxtp.node_meta", "fxtp.rank_ops", "fxtp.progress"),
    ("fxtp.kernels",),
    ("fxtp.sharding",),
    ("fxtp.capture",),
    ("fxtp.passes.node_match", "fxtp.passes.capture", "fxtp.passes.sharding"),
    ("fxtp.passes.codegen",),
    ("fxtp.passes.decode",),
    ("fxtp.decode",),
    ("fxtp.runtime",),
    ("fxtp.tiny_configs", "fxtp.tiny_tokenizer", "fxtp.stats", "fxtp.dump", "fxtp.testing", "fxtp.cli", "fxtp"),
]


def module_files() -> dict[str, pathlib.Path]:
    """Dotted module name -> source file, for fxtp/ and passes/ (installed as fxtp.passes)."""
    files = {}
    for folder, package in ((ROOT / "fxtp", "fxtp"), (ROOT / "passes", "fxtp.passes")):
        for path in folder.rglob("*.py"):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            files[".".join([package, *parts])] = path
    return files


def imported_modules(name: str, path: pathlib.Path, known: set[str]) -> set[str]:
    """The fxtp modules `name` imports anywhere in its source (`from fxtp.x import y` counts as fxtp.x.y
    when that is a module, else fxtp.x)."""
    found = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.split(".")[0] == "fxtp")
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            if base.split(".")[0] != "fxtp":
                continue
            for alias in node.names:
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base)
    return {m for m in found if m != name}


def layer_of(module: str) -> int:
    best = None
    for index, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and (best is None or len(prefix) > best[1]):
                best = (index, len(prefix))
    assert best is not None, f"{module} belongs to no layer: add it to LAYERS in tests/test_import_layers.py"
    return best[0]


FILES = module_files()
IMPORTS = {name: imported_modules(name, path, set(FILES)) for name, path in FILES.items()}


def test_every_module_is_found():
    assert {"fxtp", "fxtp.passes.sharding.plan", "fxtp.kernels.gemv", "fxtp.runtime.program"} <= set(FILES)
    assert IMPORTS["fxtp.runtime.program"] >= {"fxtp.passes.sharding.plan", "fxtp.capture.export"}


@pytest.mark.parametrize("module", sorted(FILES))
def test_imports_go_down_the_layers(module):
    upward = sorted(m for m in IMPORTS[module] if layer_of(m) > layer_of(module))
    assert not upward, f"{module} (layer {layer_of(module)}) imports higher layers: {upward}"


def find_cycle(edges: dict[str, set[str]]):
    """A cycle of the graph `edges` (module -> modules it imports) as a list of modules, or None."""
    state: dict[str, int] = {}  # 1: on the stack, 2: done
    stack: list[str] = []

    def visit(module):
        state[module] = 1
        stack.append(module)
        for dep in sorted(edges.get(module, ())):
            if state.get(dep) == 1:
                return stack[stack.index(dep):] + [dep]
            if dep not in state:
                cycle = visit(dep)
                if cycle:
                    return cycle
        stack.pop()
        state[module] = 2
        return None

    for module in sorted(edges):
        if module not in state:
            cycle = visit(module)
            if cycle:
                return cycle
    return None


def test_no_import_cycles():
    """A package's __init__ importing its own modules is no cycle of design, so edges from a package to
    its own children are left out."""
    edges = {m: {i for i in deps if i in FILES and not i.startswith(m + ".")} for m, deps in IMPORTS.items()}
    cycle = find_cycle(edges)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_checks_can_fail(tmp_path):
    """A planted upward import inside a function is seen, and so is a planted cycle."""
    planted = tmp_path / "plan.py"
    planted.write_text("def f():\n    from fxtp.runtime.program import compile\n")
    found = imported_modules("fxtp.passes.sharding.plan", planted, set(FILES))
    assert found == {"fxtp.runtime.program"}
    assert layer_of("fxtp.runtime.program") > layer_of("fxtp.passes.sharding.plan")
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
