"""The code's layout rules, read from the sources: the kernels stay pure torch, the package has
no import circle (imports inside functions included), no function body runs past 60 lines,
test modules share helpers through helper modules rather than through each other, and the
benchmarks neither import the tests nor edit ``sys.path``."""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Dict, Iterator, Set

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "mergekit_ace"
KERNELS = PACKAGE / "kernels"
MAX_BODY_LINES = 60


def module_name(path: Path, root: Path = ROOT) -> str:
    """The name a file is imported under; the start-up hook is installed as a top-level
    module beside the package."""
    if path.parent.name == "_autoload":
        return path.stem
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_names(path: Path, root: Path = ROOT, modules: Set[str] = frozenset()) -> Iterator[str]:
    """Every module an import statement of ``path`` names, wherever the statement is. For
    ``from a import b``: ``a.b`` where that is one of ``modules``, else ``a``."""
    package = module_name(path, root).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package[: len(package) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                name = f"{base}.{alias.name}"
                yield name if name in modules else base


def package_graph() -> Dict[str, Set[str]]:
    files = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {
        name: set(imported_names(path, modules=set(files))) & set(files) - {name}
        for name, path in files.items()
    }


def test_kernels_do_not_import_mergekit():
    files = sorted(KERNELS.rglob("*.py"))
    assert len(files) >= 20
    roots = {p: {n.split(".")[0] for n in imported_names(p)} for p in files}
    assert {p.name: r for p, r in roots.items() if "mergekit" in r} == {}
    assert any("torch" in r for r in roots.values())


def test_the_package_has_no_import_circle():
    graph = package_graph()
    assert {
        "mergekit_ace.registration",
        "mergekit_ace.kernels.ace.merge",
        "_mergekit_ace_autoload",
        "mergekit_ace.inspect.run",
        "mergekit_ace.shapes",
    } <= set(graph)
    done, path = set(), []

    def visit(module: str) -> None:
        assert module not in path, f"import circle: {' -> '.join(path + [module])}"
        if module in done:
            return
        path.append(module)
        for dependency in sorted(graph[module]):
            visit(dependency)
        path.pop()
        done.add(module)

    for module in sorted(graph):
        visit(module)


def test_circle_detection_sees_imports_inside_functions(tmp_path):
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "a.py").write_text("def f():\n    from pkg import b\n")
    (tmp_path / "pkg" / "b.py").write_text("from .a import f\n")
    modules = {"pkg", "pkg.a", "pkg.b"}
    assert set(imported_names(tmp_path / "pkg" / "a.py", tmp_path, modules)) == {"pkg.b"}
    assert set(imported_names(tmp_path / "pkg" / "b.py", tmp_path, modules)) == {"pkg.a"}


def body_lines(function: ast.AST) -> int:
    """Lines of a function's body, its docstring left out."""
    body = function.body
    if isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None), ast.Constant):
        body = body[1:] or body
    return body[-1].end_lineno - body[0].lineno + 1


def test_no_function_body_is_longer_than_60_lines():
    long = {}
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                if body_lines(node) > MAX_BODY_LINES:
                    long[f"{path.relative_to(ROOT)}:{node.name}"] = body_lines(node)
    assert long == {}


def test_test_modules_do_not_import_each_other():
    tests = sorted((ROOT / "tests").glob("*.py"))
    offenders = {
        p.name: sorted(n for n in imported_names(p) if n.startswith("tests.test_")) for p in tests
    }
    assert {name: found for name, found in offenders.items() if found} == {}


def test_benchmarks_do_not_import_tests_or_edit_the_path():
    for path in sorted((ROOT / "benchmarks").rglob("*.py")):
        roots = {n.split(".")[0] for n in imported_names(path)}
        assert "tests" not in roots, path
        assert "sys.path" not in path.read_text(), path
