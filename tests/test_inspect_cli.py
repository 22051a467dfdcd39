"""``mergekit-ace inspect`` as a command: the run without matplotlib, mergekit's merge options,
and one-line errors for bad checkpoints."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers import TENSOR, broken_copy, nan_at, narrower
from tests.tiny_models import model_list, run_cli, write_config

EXPERTS = ["expert_math", "expert_code", "expert_chat"]


def config(paths, models, tmp_path, name="ace.yml", **extra) -> Path:
    return write_config(
        tmp_path / name,
        {
            "merge_method": "ace",
            "base_model": str(paths["base"]),
            "models": models,
            "dtype": "float32",
            **extra,
        },
    )


def test_without_matplotlib_the_table_is_written_with_a_hint(tiny_family, tmp_path):
    blocker = tmp_path / "block"
    blocker.mkdir()
    (blocker / "sitecustomize.py").write_text("import sys\nsys.modules['matplotlib'] = None\n")
    path = config(tiny_family, model_list(tiny_family, EXPERTS), tmp_path)
    result = run_cli(
        "mergekit-ace",
        ["inspect", path, "--out", tmp_path / "r", "-q", "--flop-rate", "1e9"],
        env={"PYTHONPATH": str(blocker)},
    )
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
    result = CliRunner().invoke(
        main,
        [
            "inspect",
            str(path),
            "--out",
            str(tmp_path / "r"),
            "--estimate-only",
            "--no-plots",
            "-q",
            "--flop-rate",
            "1e9",
            "--trust-remote-code",
            "--lora-merge-cache",
            str(cache),
            "--lazy-unpickle",
            "--random-seed",
            "3",
            "--out-shard-size",
            "1B",
        ],
    )
    assert result.exit_code == 0, result.output
    assert seen and seen[-1].trust_remote_code and seen[-1].lazy_unpickle
    assert seen[-1].lora_merge_cache == str(cache) and seen[-1].quiet
    assert seen[-1].device == "cpu" and seen[-1].random_seed == 3
    assert "--out-shard-size: no effect on inspect" in result.output


@pytest.mark.parametrize("case", ["nan", "shape", "zero_weights"])
def test_data_errors_are_one_clean_line(tiny_family, tmp_path, case):
    others = model_list(tiny_family, ["expert_math", "expert_chat"])
    if case == "zero_weights":
        models = [{**m, "parameters": {"weight": 0}} for m in others]
        named = ["every model's weight is 0"]
    else:
        bad = broken_copy(
            tiny_family, tmp_path, f"expert_{case}", nan_at if case == "nan" else narrower
        )
        models = others + [{"model": str(bad)}]
        named = [TENSOR, str(bad), "non-finite" if case == "nan" else "(64, 31)"]
    path = config(tiny_family, models, tmp_path)
    result = run_cli(
        "mergekit-ace",
        ["inspect", path, "--out", tmp_path / "r", "-q", "--flop-rate", "1e9", "--no-plots"],
        check=False,
    )
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
    path = config(
        tiny_family, model_list(tiny_family, EXPERTS[:2]) + [{"model": str(bad)}], tmp_path
    )
    with pytest.raises(InspectError, match=rf"{TENSOR}.*expert_narrow.*\(64, 31\).*\(64, 32\)"):
        inspect_config(str(path), estimate_only=True, quiet=True, flop_rate=1e9)
