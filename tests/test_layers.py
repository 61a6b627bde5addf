"""The package's import layers (CONTRIBUTING.md): a module imports only from its own layer or the layers below,
the import graph has no cycles, no funcpeft module is imported inside a function (that hides cycles), and no
private name (`_x`) is imported from another module. Read from the source with `ast`: nothing is imported."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "funcpeft"

# module (dotted, relative to funcpeft; a package's modules by prefix) -> layer
LAYERS: dict[str, int] = {
    "_constants": 0,
    "_config": 0,
    "configs": 0,
    "_trees": 0,
    "optim": 0,
    "rng": 0,
    "methods": 1,
    "_targeting": 2,
    "_plan": 2,
    "_names": 2,
    "_replicate": 2,
    "_counting": 2,
    "_weights": 3,
    "routing": 3,
    "grad": 3,
    "_functional": 3,
    "_capture": 3,
    "_fsdp": 3,
    "_keys": 4,
    "_checks": 4,
    "io": 4,
    "_loading": 4,
    "_merge": 4,
    "_weighted": 4,
    "_generation": 4,
    "corda": 4,
    "loraga": 4,
    "_conversion": 4,
    "distributed": 4,
    "_model": 5,
    "_arrow": 5,
    "_xlora": 5,
    "eva": 5,
    "_ipca": 0,
    "_quant": 0,
    "_modules": 0,
    "_wavelets": 0,
    "_decode": 4,
    "__init__": 6,
    "testing": 6,
    "strategies": 6,
}


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__" and len(parts) > 1:
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


MODULES = _modules()


def _layer(module: str) -> int:
    head = module.split(".")[0]
    if head not in LAYERS:
        raise AssertionError(f"funcpeft.{module} has no layer: add it to LAYERS here and to CONTRIBUTING.md")
    return LAYERS[head]


def _resolve(module: str, node: ast.ImportFrom) -> list[str]:
    """The funcpeft modules an ImportFrom names (`from .x import y` may import submodule x.y)."""
    is_package = MODULES[module].name == "__init__.py"
    if node.level:
        base = module.split(".") if is_package else module.split(".")[:-1]
        base = base[: len(base) - (node.level - 1)] if node.level > 1 else base
        target = ".".join([*base, *(node.module.split(".") if node.module else [])])
    elif node.module and (node.module == "funcpeft" or node.module.startswith("funcpeft.")):
        target = node.module.removeprefix("funcpeft").lstrip(".")
    else:
        return []
    found = []
    for alias in node.names:
        sub = f"{target}.{alias.name}" if target else alias.name
        found.append(sub if sub in MODULES else target or "__init__")
    return found


def _imports(module: str) -> list[tuple[str, ast.ImportFrom, bool]]:
    """(imported funcpeft module, node, inside a function) for every funcpeft import of `module`."""
    tree = ast.parse(MODULES[module].read_text(encoding="utf-8"))
    out: list[tuple[str, ast.ImportFrom, bool]] = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            nested = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.ImportFrom):
                out.extend((t, child, in_function) for t in _resolve(module, child))
            elif isinstance(child, ast.Import):
                for alias in child.names:
                    if alias.name.startswith("funcpeft"):
                        raise AssertionError(f"funcpeft.{module}: use relative imports (`import {alias.name}`)")
            if isinstance(child, ast.If) and _is_type_checking(child):
                continue  # `if TYPE_CHECKING:` imports are for the type checker only
            visit(child, nested)

    visit(tree, False)
    return out


def _is_type_checking(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_respect_the_layers(module: str) -> None:
    mine = _layer(module)
    for target, node, in_function in _imports(module):
        if target == module or target.startswith(module + "."):
            continue  # a package importing its own submodules
        where = f"funcpeft/{MODULES[module].relative_to(PACKAGE)}:{node.lineno}"
        assert not in_function, f"{where}: imports funcpeft.{target} inside a function (hides an import cycle)"
        assert _layer(target) <= mine, (
            f"{where}: funcpeft.{module} (layer {mine}) imports funcpeft.{target} (layer {_layer(target)}): "
            "a module may import only from its own layer or below (CONTRIBUTING.md)"
        )
        same_package = module.split(".")[0] == target.split(".")[0]
        private = [a.name for a in node.names if a.name.startswith("_") and a.name not in MODULES and not same_package]
        assert not private, f"{where}: imports private names {private} from funcpeft.{target}"


def test_the_import_graph_has_no_cycles() -> None:
    graph = {m: {t for t, _, _ in _imports(m) if t != m and not t.startswith(m + ".")} for m in MODULES}
    state: dict[str, int] = {}

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for t in graph.get(m, ()):
            if state.get(t) == 1:
                raise AssertionError(f"import cycle: {' -> '.join([*path[path.index(t) :], t])}")
            if t not in state:
                visit(t, [*path, t])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])


def test_the_checker_sees_a_violation(tmp_path: Path) -> None:
    """The checks can fail: an upward import in a scratch copy is reported."""
    source = "from ._model import get_peft_model\n"
    node = ast.parse(source).body[0]
    assert isinstance(node, ast.ImportFrom)
    assert _resolve("_trees", node) == ["_model"] and _layer("_model") > _layer("_trees")
