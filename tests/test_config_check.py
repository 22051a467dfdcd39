"""Parameters that a merge method would ignore are reported: by every run of this package's
methods through the stock CLIs and ``run_merge`` (a warning before any checkpoint is read), and
by ``mergekit-ace check`` for any config, mergekit's own methods included."""

import logging
import shutil
import struct

import pytest
import torch
from mergekit.config import MergeConfiguration

from mergekit_ace.checks import check_parameters
from tests.helpers import assert_credits
from tests.tiny_models import (
    EXPERT_SCALES,
    load_state,
    mergekit_yaml,
    model_list,
    run_cli,
    write_config,
)

EXPERTS = list(EXPERT_SCALES)
TYPOS = {"k_fraction": 0.5, "epsilon": [{"filter": "mlp", "value": 1.0e-3}, {"value": 1.0e-4}]}
TIES_RECIPE = {"density": 0.5, "normalize": True, "int8_mask": True}
EXPECTED_ACE = [
    "`k_fraction` (global parameters) is not a parameter of `ace` and has no effect; "
    "did you mean `k_frac`?",
    "`epsilon` (global parameters, filter `mlp`) is not a parameter of `ace` and has no effect "
    "(it is a parameter of ram, ramplus_tl, della, della_linear). `ace` has no `epsilon`; its "
    "`eps` is not the same thing: Tikhonov strength",
    "`density` (global parameters) is not a parameter of `ace` and has no effect (it is a "
    "parameter of task_arithmetic, ties",
    "`normalize` (global parameters) is not a parameter of `ace`",
    "`int8_mask` (global parameters) is not a parameter of `ace`",
    "is not a parameter of `ace` and has no effect; did you mean `weight`?",  # wieght
    "has no effect under a model: `ace` reads it once for all models",  # k_frac under a model
]


def dirty_ace(paths):
    return {
        "merge_method": "ace",
        "base_model": str(paths["base"]),
        "dtype": "float32",
        "parameters": {**TYPOS, **TIES_RECIPE},
        "models": model_list(paths, EXPERTS[:2], {EXPERTS[0]: {"wieght": 5, "k_frac": 0.2}}),
    }


def test_mergekit_yaml_warns_about_each_ignored_parameter(tiny_family, tmp_path):
    cfg = write_config(tmp_path / "dirty.yml", dirty_ace(tiny_family))
    result = mergekit_yaml(cfg, tmp_path / "out")
    for expected in EXPECTED_ACE:
        assert expected in result.stderr, expected
    assert f"(model `{tiny_family[EXPERTS[0]]}`)" in result.stderr
    # the output is still the default merge: the warning reports, it does not change the merge
    clean = write_config(
        tmp_path / "clean.yml",
        {
            "merge_method": "ace",
            "base_model": str(tiny_family["base"]),
            "dtype": "float32",
            "models": model_list(tiny_family, EXPERTS[:2]),
        },
    )
    clean_result = mergekit_yaml(clean, tmp_path / "clean_out")
    assert "has no effect" not in clean_result.stderr
    dirty_state, clean_state = load_state(tmp_path / "out"), load_state(tmp_path / "clean_out")
    assert all(torch.equal(dirty_state[k], clean_state[k]) for k in clean_state)


def test_tsv_weight_under_a_model_is_reported(tiny_family, tmp_path):
    cfg = write_config(
        tmp_path / "tsv.yml",
        {
            "merge_method": "tsv",
            "base_model": str(tiny_family["base"]),
            "dtype": "float32",
            "models": model_list(tiny_family, EXPERTS[:2], {EXPERTS[1]: {"weight": 0.3}}),
        },
    )
    result = mergekit_yaml(cfg, tmp_path / "out")
    assert (
        f"`weight` (model `{tiny_family[EXPERTS[1]]}`) is not a parameter of `tsv` and has "
        "no effect (it is a parameter of"
    ) in result.stderr
    assert "`tsv` takes: lambda, drop_noise, noise_floor." in result.stderr
    assert_credits((tmp_path / "out" / "README.md").read_text(), "tsv")


def test_warning_comes_before_any_checkpoint_is_read(tiny_family, tmp_path):
    # an expert whose safetensors file holds a valid header but no tensor data: mergekit
    # fails as soon as it opens it, and the warning must already be out
    broken = tmp_path / "broken_expert"
    shutil.copytree(tiny_family[EXPERTS[1]], broken)
    shard = broken / "model.safetensors"
    data = shard.read_bytes()
    header = struct.unpack("<Q", data[:8])[0]
    shard.write_bytes(data[: 8 + header] + b"\0" * 16)
    cfg = write_config(
        tmp_path / "typo.yml",
        {
            "merge_method": "ace",
            "base_model": str(tiny_family["base"]),
            "parameters": {"k_fraction": 0.5},
            "models": [{"model": str(tiny_family[EXPERTS[0]])}, {"model": str(broken)}],
        },
    )
    result = mergekit_yaml(cfg, tmp_path / "out", check=False)
    assert result.returncode != 0
    warning = result.stderr.find("`k_fraction` (global parameters)")
    failure = result.stderr.find("SafetensorError")
    assert 0 <= warning < failure, result.stderr[-3000:]


def test_run_merge_api_warns_before_reading(tiny_family, tmp_path, caplog, monkeypatch):
    from mergekit.io.lazy_tensor_loader import LazyTensorLoader
    from mergekit.merge import MergeOptions, run_merge

    events = []
    original = LazyTensorLoader.get_tensor

    def get_tensor(self, *args, **kwargs):
        events.append("load")
        return original(self, *args, **kwargs)

    class Recorder(logging.Handler):
        def emit(self, record):
            if "has no effect" in record.getMessage():
                events.append("warning")

    monkeypatch.setattr(LazyTensorLoader, "get_tensor", get_tensor)
    recorder = Recorder()
    logging.getLogger("mergekit_ace").addHandler(recorder)
    try:
        config = MergeConfiguration.model_validate(dirty_ace(tiny_family))
        run_merge(config, str(tmp_path / "out"), options=MergeOptions(quiet=True))
    finally:
        logging.getLogger("mergekit_ace").removeHandler(recorder)
    assert events[: len(EXPECTED_ACE)] == ["warning"] * len(EXPECTED_ACE)
    assert "load" in events and events.count("warning") == len(EXPECTED_ACE)


def test_locations_in_slices_and_modules():
    config = MergeConfiguration.model_validate(
        {
            "merge_method": "ace",
            "base_model": "base",
            "slices": [
                {
                    "sources": [
                        {"model": "a", "layer_range": [0, 2], "parameters": {"weigth": 1.0}},
                        {"model": "base", "layer_range": [0, 2]},
                    ],
                    "parameters": {"tau": 0.2, "gamma": [{"filter": "self_attn", "value": 0.1}]},
                }
            ],
        }
    )
    messages = sorted(f.message for f in check_parameters(config))
    assert len(messages) == 2
    assert messages[1].startswith(
        "`weigth` (slices[0], model `a`) is not a parameter of `ace` "
        "and has no effect; did you mean `weight`?"
    )
    assert messages[0].startswith(
        "`gamma` (slices[0] parameters, filter `self_attn`) is not a parameter of `ace`"
    )


def check(path):
    """``mergekit-ace check PATH`` in this process (the console script is exercised below)."""
    from click.testing import CliRunner

    from mergekit_ace.cli import main

    return CliRunner().invoke(main, ["check", str(path)])


@pytest.mark.parametrize(
    "config, expected",
    [
        (
            {
                "merge_method": "ace",
                "parameters": {"k_frac": 0.2, "eps": "auto"},
                "models": [{"model": "e1", "parameters": {"weight": 2}}, {"model": "e2"}],
            },
            [],
        ),
        (
            {
                "merge_method": "ties",
                "parameters": {"density": 0.5, "normalize": True},
                "models": [
                    {"model": "e1", "parameters": {"weight": 0.5, "density": 0.7}},
                    {"model": "e2", "parameters": {"weight": 0.5}},
                ],
            },
            [],
        ),
        (
            {
                "merge_method": "ties",
                "parameters": {"densty": 0.5, "weight": 1.0},
                "models": [{"model": "e1"}, {"model": "e2"}],
            },
            [
                "`densty` (global parameters) is not a parameter of `ties` and has no effect; "
                "did you mean `density`?"
            ],
        ),
        (
            {
                "merge_method": "slerp",
                "parameters": {"t": 0.5, "weight": 1.0},
                "models": [{"model": "base"}, {"model": "e2"}],
            },
            ["`weight` (global parameters) is not a parameter of `slerp`"],
        ),
        (
            {
                "merge_method": "ace",
                "paramters": {"k_frac": 0.5},
                "models": [{"model": "e1", "paramaters": {"weight": 2}}, {"model": "e2"}],
            },
            [
                "`paramters` (top level) is not a configuration key and is ignored; "
                "did you mean `parameters`?",
                "`paramaters` (models[0]) is not a configuration key and is ignored; "
                "did you mean `parameters`?",
            ],
        ),
        (
            {"merge_method": "acee", "models": [{"model": "e1"}]},
            [
                "error: merge_method `acee` is not known to mergekit, which stops before "
                "merging; did you mean `ace`?"
            ],
        ),
    ],
)
def test_check_command(tmp_path, config, expected):
    result = check(write_config(tmp_path / "config.yml", {"base_model": "base", **config}))
    invalid = any("error: " in line for line in expected)
    assert result.exit_code == (2 if invalid else 1 if expected else 0), result.output
    for line in expected:
        assert line in result.stdout, result.stdout
    assert len([line for line in result.stdout.splitlines() if "config.yml: " in line]) == max(
        len(expected), 1
    )


def test_check_command_reads_mergekit_multi_recipes(tmp_path):
    recipe = tmp_path / "recipe.yml"
    recipe.write_text(
        "name: stage\nmerge_method: ace\nbase_model: base\nparameters: {k_fraction: 0.5}\n"
        "models: [{model: e1}, {model: e2}]\n---\n"
        "merge_method: slerp\nbase_model: stage\nparameters: {t: 0.3}\n"
        "models: [{model: stage}, {model: chat}]\n"
    )
    result = run_cli("mergekit-ace", ["check", recipe], check=False)
    assert result.returncode == 1
    assert "[stage] `k_fraction` (global parameters) is not a parameter of `ace`" in result.stdout
    assert "slerp" not in result.stdout


def test_every_example_config_is_clean():
    from pathlib import Path

    examples = sorted((Path(__file__).resolve().parents[1] / "examples").glob("*.yml"))
    assert examples
    for example in examples:
        result = check(example)
        assert result.exit_code == 0, result.output
        assert result.output.rstrip().endswith("no findings."), result.output


def test_mergekit_multi_warns_for_the_ace_stage(tiny_family, tmp_path):
    recipe = tmp_path / "recipe.yml"
    recipe.write_text(
        f"name: stage\nmerge_method: ace\nbase_model: {tiny_family['base']}\n"
        "parameters: {k_fraction: 0.5}\n"
        f"models: [{{model: {tiny_family[EXPERTS[0]]}}}, {{model: {tiny_family[EXPERTS[1]]}}}]\n"
        "---\n"
        "merge_method: slerp\nbase_model: stage\nparameters: {t: 0.3}\n"
        f"models: [{{model: stage}}, {{model: {tiny_family[EXPERTS[2]]}}}]\n"
    )
    result = run_cli(
        "mergekit-multi", [recipe, "-I", tmp_path / "stages", "--out-path", tmp_path / "final"]
    )
    assert result.stderr.count("`k_fraction` (global parameters) is not a parameter of `ace`") == 1
    assert (tmp_path / "final" / "model.safetensors").exists()


def test_inspect_warns_too(tiny_family, tmp_path):
    cfg = write_config(
        tmp_path / "typo.yml",
        {
            "merge_method": "ace",
            "base_model": str(tiny_family["base"]),
            "parameters": {"k_fraction": 0.5},
            "models": model_list(tiny_family, EXPERTS[:2]),
        },
    )
    result = run_cli(
        "mergekit-ace",
        ["inspect", cfg, "--estimate-only", "--no-plots", "-q", "--out", tmp_path / "inspect"],
    )
    assert "`k_fraction` (global parameters) is not a parameter of `ace`" in result.stderr


def test_readme_shows_the_warning_as_printed():
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    (shown,) = [line for line in readme.splitlines() if line.startswith("WARNING:mergekit_ace:")]
    config = MergeConfiguration.model_validate(
        {
            "merge_method": "ace",
            "base_model": "base",
            "parameters": {"k_fraction": 0.5},
            "models": [{"model": "expert"}],
        }
    )
    (finding,) = check_parameters(config)
    assert shown == "WARNING:mergekit_ace:" + finding.message


def test_readme_parameter_table_lists_what_ace_declares():
    import re
    from pathlib import Path

    from mergekit_ace.methods import our_method

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    table = readme[readme.index("### Parameters") : readme.index("## Documentation")]
    listed = re.findall(r"^\| `(\w+)` \|", table, flags=re.M)
    assert listed and sorted(listed) == sorted(p.name for p in our_method("ace").spec.parameters)


def test_family_table_lists_what_each_method_declares():
    import re
    from pathlib import Path

    from mergekit_ace.methods import our_method

    family = (Path(__file__).resolve().parents[1] / "docs" / "family.md").read_text()
    rows = [
        row
        for row in re.findall(r"^\| `(\w+)` \|[^|]*\|[^|]*\| (.*) \|$", family, flags=re.M)
        if row[0] != "merge_method"
    ]  # the header
    assert [name for name, _ in rows] == ["actmat", "tsv", "iso_c", "iso_cts"]
    for name, listed in rows:
        assert sorted(re.findall(r"`(\w+)`", listed)) == sorted(
            p.name for p in our_method(name).spec.parameters
        ), name


# --- the experts' shapes, from the headers, right after planning --------------------------


def _narrow_expert_config(family, tmp_path, method):
    from tests.helpers import broken_copy, narrower

    bad = broken_copy(family, tmp_path, "expert_narrow", narrower)
    models = [{"model": str(family["expert_math"])}, {"model": str(bad)}]
    if method == "task_arithmetic":
        models = [{**m, "parameters": {"weight": 0.5}} for m in models]
    return {
        "merge_method": method,
        "base_model": str(family["base"]),
        "dtype": "float32",
        "models": models,
    }


def test_shape_mismatch_stops_the_merge_before_any_tensor_is_read(
    tiny_family, tmp_path, monkeypatch
):
    from mergekit.io.lazy_tensor_loader import LazyTensorLoader
    from mergekit.merge import MergeOptions, run_merge

    from mergekit_ace.kernels.inputs import MergeInputError
    from tests.helpers import TENSOR

    monkeypatch.setattr(
        LazyTensorLoader, "get_tensor", lambda *a, **k: pytest.fail("a tensor was read")
    )
    config = MergeConfiguration.model_validate(_narrow_expert_config(tiny_family, tmp_path, "ace"))
    with pytest.raises(MergeInputError, match=rf"{TENSOR}.*expert_narrow.*\(64, 31\).*\(64, 32\)"):
        run_merge(config, str(tmp_path / "out"), options=MergeOptions(quiet=True))
    assert not list((tmp_path / "out").glob("*.safetensors"))


@pytest.mark.parametrize("method", ["ace", "task_arithmetic"])
def test_mergekit_yaml_names_the_model_of_a_shape_mismatch(tiny_family, tmp_path, method):
    from tests.tiny_models import write_config

    cfg = write_config(tmp_path / "c.yml", _narrow_expert_config(tiny_family, tmp_path, method))
    result = mergekit_yaml(cfg, tmp_path / "out", "--no-copy-tokenizer", check=False)
    assert result.returncode != 0
    if method == "ace":
        assert "expert_narrow has shape (64, 31) but the base model has (64, 32)" in result.stderr
        assert "Tensor size mismatch" not in result.stderr
    else:  # mergekit's own methods keep mergekit's own check
        assert "Tensor size mismatch" in result.stderr


def test_mergekit_yaml_warns_about_misspelled_configuration_keys(tiny_family, tmp_path):
    from tests.tiny_models import write_config

    config = {
        "merge_method": "ace",
        "base_model": str(tiny_family["base"]),
        "dtype": "float32",
        "paramters": {"eps": 1.0e-3},
        "models": [
            {"model": str(tiny_family["expert_math"])},
            {"model": str(tiny_family["expert_code"]), "paramters": {"weight": 0.5}},
        ],
    }
    cfg = write_config(tmp_path / "typo.yml", config)
    result = mergekit_yaml(cfg, tmp_path / "out", "--no-copy-tokenizer")
    warnings = [line for line in result.stderr.splitlines() if "not a configuration key" in line]
    assert len(warnings) == 2, result.stderr
    assert "`paramters` (top level)" in warnings[0] and "did you mean `parameters`" in warnings[0]
    assert "models[1]" in warnings[1]
    # the same config under task_arithmetic: mergekit's own methods are left alone
    config.update(
        merge_method="task_arithmetic",
        models=[{"model": str(tiny_family["expert_math"]), "parameters": {"weight": 1}}],
    )
    cfg = write_config(tmp_path / "ta.yml", config)
    result = mergekit_yaml(cfg, tmp_path / "out-ta", "--no-copy-tokenizer")
    assert "not a configuration key" not in result.stderr
