"""``mergekit-ace inspect`` as a command: the package's import graph, the run without
matplotlib, mergekit's merge options, and one-line errors for bad checkpoints."""

from __future__ import annotations

import ast
import shutil
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from tests.tiny_models import model_list, run_cli, write_config

PACKAGE = Path(__file__).resolve().parents[1] / "mergekit_ace" / "inspect"
EXPERTS = ["expert_math", "expert_code", "expert_chat"]
TENSOR = "model.layers.1.mlp.up_proj.weight"


def config(paths, models, tmp_path, name="ace.yml", **extra) -> Path:
    return write_config(tmp_path / name, {
        "merge_method": "ace", "base_model": str(paths["base"]), "models": models,
        "dtype": "float32", **extra,
    })


def package_imports() -> dict:
    """``{module: {package modules it imports}}``, function-level imports included."""
    graph = {}
    for path in sorted(PACKAGE.glob("*.py")):
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            for name in names:
                if name.startswith("mergekit_ace.inspect."):
                    found.add(name.split(".")[2])
        graph[path.stem] = found & {p.stem for p in PACKAGE.glob("*.py")}
    return graph


def test_inspect_package_has_no_import_cycle():
    graph = package_imports()
    assert {"report", "costs", "planning", "run", "writers", "summary", "plots"} <= set(graph)
    assert not (PACKAGE.parent / "inspect_plots.py").exists()
    done, visiting = set(), []

    def visit(module):
        assert module not in visiting, f"import cycle: {' -> '.join(visiting + [module])}"
        if module in done:
            return
        visiting.append(module)
        for dependency in graph[module] - {"__init__"}:
            visit(dependency)
        visiting.pop()
        done.add(module)

    for module in graph:
        visit(module)


def test_mergekit_internals_are_touched_in_one_module():
    internals = ("_plan(", "._tensors", "_model_out_config", "._METHODS", "gather_tensors",
                 "weight_info", "tensor_paths")
    users = {p.stem for p in PACKAGE.glob("*.py") for word in internals if word in p.read_text()}
    assert users <= {"planning"}


def test_without_matplotlib_the_table_is_written_with_a_hint(tiny_family, tmp_path):
    blocker = tmp_path / "block"
    blocker.mkdir()
    (blocker / "sitecustomize.py").write_text("import sys\nsys.modules['matplotlib'] = None\n")
    path = config(tiny_family, model_list(tiny_family, EXPERTS), tmp_path)
    result = run_cli("mergekit-ace", ["inspect", path, "--out", tmp_path / "r", "-q",
                                      "--flop-rate", "1e9"], env={"PYTHONPATH": str(blocker)})
    assert {p.name for p in (tmp_path / "r").iterdir()} == {"inspect.csv", "inspect.json"}
    assert 'pip install "mergekit-ace[plots]"' in result.stderr
    assert "heaviest tensor:" in result.stdout


def test_merge_options_reach_mergekit(tiny_family, tmp_path, monkeypatch):
    from click.testing import CliRunner
    from mergekit.io.tasks import LoaderCache

    from mergekit_ace.cli import main

    seen = []
    original = LoaderCache.setup

    def setup(self, options):
        seen.append(options)
        return original(self, options)

    monkeypatch.setattr(LoaderCache, "setup", setup)
    path = config(tiny_family, model_list(tiny_family, EXPERTS), tmp_path)
    cache = tmp_path / "lora-cache"
    result = CliRunner().invoke(main, [
        "inspect", str(path), "--out", str(tmp_path / "r"), "--estimate-only", "--no-plots",
        "-q", "--flop-rate", "1e9", "--trust-remote-code", "--lora-merge-cache", str(cache),
        "--lazy-unpickle", "--random-seed", "3", "--out-shard-size", "1B",
    ])
    assert result.exit_code == 0, result.output
    assert seen and seen[-1].trust_remote_code and seen[-1].lazy_unpickle
    assert seen[-1].lora_merge_cache == str(cache) and seen[-1].quiet
    assert seen[-1].device == "cpu" and seen[-1].random_seed == 3
    assert "--out-shard-size: no effect on inspect" in result.output


def broken_copy(paths, tmp_path, name, change) -> Path:
    """A copy of ``expert_code`` whose state dict ``change`` edits in place."""
    target = tmp_path / name
    shutil.copytree(paths["expert_code"], target)
    state = load_file(target / "model.safetensors")
    change(state)
    save_file(state, target / "model.safetensors", metadata={"format": "pt"})
    return target


def nan_at(state):
    state[TENSOR][3, 4] = float("nan")


def narrower(state):
    state[TENSOR] = state[TENSOR][:, :-1].contiguous()


@pytest.mark.parametrize("case", ["nan", "shape", "zero_weights"])
def test_data_errors_are_one_clean_line(tiny_family, tmp_path, case):
    others = model_list(tiny_family, ["expert_math", "expert_chat"])
    if case == "zero_weights":
        models = [{**m, "parameters": {"weight": 0}} for m in others]
        named = ["every model's weight is 0"]
    else:
        bad = broken_copy(tiny_family, tmp_path, f"expert_{case}", nan_at if case == "nan" else narrower)
        models = others + [{"model": str(bad)}]
        named = [TENSOR, str(bad), "non-finite" if case == "nan" else "(64, 31)"]
    path = config(tiny_family, models, tmp_path)
    result = run_cli("mergekit-ace", ["inspect", path, "--out", tmp_path / "r", "-q",
                                      "--flop-rate", "1e9", "--no-plots"], check=False)
    output = result.stdout + result.stderr
    assert result.returncode != 0 and "Traceback" not in output
    errors = [line for line in output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, output
    assert all(word in errors[0] for word in named), errors[0]
    assert not (tmp_path / "r").exists()


def test_shape_mismatch_is_found_from_headers_in_estimate_mode(tiny_family, tmp_path, monkeypatch):
    """Before any tensor is read: the estimate-only run refuses it too."""
    from mergekit.io.lazy_tensor_loader import LazyTensorLoader

    from mergekit_ace.inspect import InspectError, inspect_config

    monkeypatch.setattr(LazyTensorLoader, "get_tensor", lambda *a, **k: pytest.fail("data read"))
    bad = broken_copy(tiny_family, tmp_path, "expert_narrow", narrower)
    path = config(tiny_family, model_list(tiny_family, EXPERTS[:2]) + [{"model": str(bad)}], tmp_path)
    with pytest.raises(InspectError, match=rf"{TENSOR}.*expert_narrow.*\(64, 31\).*\(64, 32\)"):
        inspect_config(str(path), estimate_only=True, quiet=True, flop_rate=1e9)
