"""The kernels stay pure torch: no module under mergekit_ace/kernels imports mergekit."""

import ast
from pathlib import Path

KERNELS = Path(__file__).resolve().parents[1] / "mergekit_ace" / "kernels"


def imported_roots(path: Path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            yield from (alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.module.split(".")[0]


def test_kernels_do_not_import_mergekit():
    files = sorted(KERNELS.glob("*.py"))
    assert len(files) >= 6
    offenders = {p.name: r for p in files for r in imported_roots(p) if r == "mergekit"}
    assert offenders == {}
    assert {"torch"} <= {r for p in files for r in imported_roots(p)}
