"""Each mistake that used to pass silently, or fail with a message that did not say what to
write, is reported by ``mergekit-ace check`` and by the merge itself (``mergekit-yaml``,
``mergekit-multi``, ``inspect``) before any checkpoint is read, naming where it was written
and what to write instead; ``check`` exits 0 clean, 1 findings, 2 invalid."""

import logging
import shutil
import struct
import tempfile

import pytest

from tests.tiny_models import EXPERT_SCALES, mergekit_yaml, run_cli, write_config

EXPERTS = list(EXPERT_SCALES)


def check_cli(path):
    return run_cli("mergekit-ace", ["check", path], check=False)


def unreadable_copy(family, tmp_path, name):
    """A copy of an expert whose safetensors file keeps its header and loses its data:
    mergekit fails at the first tensor it reads, so a message printed before that failure
    came before any checkpoint was read."""
    broken = tmp_path / name
    shutil.copytree(family[name], broken)
    shard = broken / "model.safetensors"
    data = shard.read_bytes()
    header = struct.unpack("<Q", data[:8])[0]
    shard.write_bytes(data[: 8 + header] + b"\0" * 16)
    return broken


def silent_mistakes(family, broken):
    """One ACE config holding every mistake mergekit accepts without a word."""
    return {
        "x-common": {"k_frac": 0.2},  # an anchor holder in the file written below
        "merge_method": "ace",
        "base_model": str(family["base"]),
        "dtype": "bfloat16",  # the checkpoints are float32
        "tokenizer": {
            "sorce": "base",
            "pad_to_multiple": 8,
            "tokens": {"<tool>": {"source": {"kind": "zero"}, "froce": True}},
        },
        "parameters": {
            "epsilon": 1.0e-3,
            "eps": [{"filter": "mpl", "value": 1.0e-3}, {"value": "auto"}],
            "k_frac": [{"value": 0.3}, {"filter": "mlp", "value": 0.1}],
            "tau": [{"fliter": "lm_head", "value": 0.0}, {"value": 0.3}],
        },
        "slices": [
            {
                "sources": [
                    {"model": str(family[EXPERTS[0]]), "layer_range": [0, 2]},
                    {"model": str(broken), "layer_range": [0, 2]},
                    {"model": str(family["base"]), "layer_range": [0, 2]},
                ],
                "residual_weight": 0.5,
            }
        ],
    }


EXPECTED_SILENT = [
    "`sorce` (tokenizer) is not a tokenizer key and is ignored; did you mean `source`? As "
    "written, mergekit uses `source: union`",
    "`pad_to_multiple` (tokenizer) is not a tokenizer key and is ignored; did you mean "
    "`pad_to_multiple_of`?",
    "`froce` (tokenizer.tokens['<tool>']) is not a tokenizer key and is ignored; did you mean "
    "`force`? As written, mergekit uses `force: false`.",
    "`fliter` (global parameters, `tau`, entry 1) is not a key of a filter entry and is "
    "ignored, so this entry applies to every tensor; did you mean `filter`?",
    "`k_frac` (global parameters): entry 2 (filter `mlp`) never applies: entry 1 has no filter "
    "and matches every tensor first",
    "`tau` (global parameters): entry 2 (no filter) never applies",
    "`residual_weight` (slices[0]) is accepted by mergekit's configuration but read by nothing",
    "`epsilon` (global parameters) is not a parameter of `ace` and has no effect (it is a "
    "parameter of ram, ramplus_tl, della, della_linear). `ace` has no `epsilon`; its `eps` is "
    "not the same thing: Tikhonov strength",
    "`eps` (global parameters): filter `mpl` matches no tensor of this merge, so its value is "
    "never used; did you mean `mlp`?",
    "`dtype: bfloat16` (top level) is coarser than the float32 the checkpoints are stored in",
    "Write `dtype: float32` (and `out_dtype: bfloat16` for a bfloat16 output).",
]


def _yaml_with_anchor(config):
    import yaml

    text = yaml.safe_dump(config, sort_keys=False)
    return text.replace("x-common:\n", "x-common: &common\n", 1)


def test_silent_mistakes_are_reported_by_check_and_by_mergekit_yaml(tiny_family, tmp_path):
    cfg = tmp_path / "silent.yml"
    cfg.write_text(_yaml_with_anchor(silent_mistakes(tiny_family, tiny_family[EXPERTS[1]])))
    checked = check_cli(cfg)
    assert checked.returncode == 1, checked.stdout + checked.stderr
    merged = mergekit_yaml(cfg, tmp_path / "out", "--no-copy-tokenizer")
    for expected in EXPECTED_SILENT:
        assert expected in checked.stdout, expected
        assert f"WARNING:mergekit_ace:{expected}" in merged.stderr or expected.startswith(
            "Write"
        ), expected
    lines = [line for line in checked.stdout.splitlines() if line.startswith(f"{cfg}: ")]
    assert len(lines) == len(EXPECTED_SILENT) - 1  # the dtype finding is one message
    assert "x-common" not in checked.stdout + merged.stderr


def test_run_merge_warns_about_each_before_any_tensor_is_read(tiny_family, monkeypatch):
    from mergekit.config import MergeConfiguration
    from mergekit.io.lazy_tensor_loader import LazyTensorLoader
    from mergekit.merge import MergeOptions, run_merge

    events = []
    original = LazyTensorLoader.get_tensor

    def get_tensor(self, *args, **kwargs):
        events.append("load")
        return original(self, *args, **kwargs)

    class Recorder(logging.Handler):
        def emit(self, record):
            events.append(record.getMessage())

    monkeypatch.setattr(LazyTensorLoader, "get_tensor", get_tensor)
    recorder = Recorder()
    logging.getLogger("mergekit_ace").addHandler(recorder)
    config = silent_mistakes(tiny_family, tiny_family[EXPERTS[1]])
    config.pop("x-common")
    source = _yaml_with_anchor(config)
    try:
        with tempfile.TemporaryDirectory() as out:
            run_merge(
                MergeConfiguration.model_validate(config),
                out,
                options=MergeOptions(quiet=True),
                config_source=source,
            )
    finally:
        logging.getLogger("mergekit_ace").removeHandler(recorder)
    first_load = events.index("load")
    for expected in EXPECTED_SILENT:
        assert any(expected in e for e in events[:first_load]), expected


INVALID = {
    "merge_methods": (
        lambda f: {"merge_methods": "ace", "base_model": f["base"], "models": [f[EXPERTS[0]]]},
        "no `merge_method:` is given (`merge_methods:` is written; did you mean `merge_method:`?)",
    ),
    "case": (
        lambda f: {"merge_method": "ACE", "base_model": f["base"], "models": [f[EXPERTS[0]]]},
        "merge_method `ACE` is not known to mergekit, which stops before merging; names are "
        "case-sensitive: write `merge_method: ace`.",
    ),
    "quoted_yes": (
        lambda f: {
            "merge_method": "ace",
            "base_model": f["base"],
            "parameters": {"gate": "yes"},
            "models": [f[EXPERTS[0]]],
        },
        "`gate: 'yes'` (global parameters) is refused by mergekit: parameter `gate` must be one "
        "of auto, on, off, got 'yes'. The quotes make it the string 'yes', not YAML's true; "
        "write `gate: yes` without quotes.",
    ),
    "invalid_value": (
        lambda f: {
            "merge_method": "ace",
            "base_model": f["base"],
            "parameters": {"k_frac": [0.2, 1.5]},
            "models": [f[EXPERTS[0]]],
        },
        "`k_frac: 1.5` (global parameters) is refused by mergekit: parameter `k_frac` must be "
        "in [0, 1], got 1.5",
    ),
    "duplicate": (
        lambda f: {
            "merge_method": "ace",
            "base_model": f["base"],
            "models": [f[EXPERTS[0]], f[EXPERTS[0]]],
        },
        "is listed twice in models: mergekit stops ('Duplicate merge inputs'). List each model "
        "once",
    ),
    "slice_without_base": (
        lambda f: {
            "merge_method": "ace",
            "base_model": f["base"],
            "slices": [{"sources": [f[EXPERTS[0]], f[EXPERTS[1]]]}],
        },
        "slices[0]: the base model `{base}` is not among its sources, and mergekit stops ('Base "
        "input is not present'). Add `- model: {base}` with the same `layer_range` to its "
        "`sources:`.",
    ),
    "moe": (
        lambda f: {
            "base_model": f["base"],
            "gate_mode": "hidden",
            "experts": [{"source_model": f[EXPERTS[0]], "positive_prompts": ["math"]}],
        },
        "this is a mergekit-moe config (it has `experts:`, `gate_mode:` and no `merge_method:`): "
        "build it with `mergekit-moe CONFIG OUT_PATH`",
    ),
}


def _invalid_config(family, build):
    paths = {k: str(v) for k, v in family.items()}
    config = build(paths)
    for key in ("models",):
        if key in config:
            config[key] = [{"model": m} for m in config[key]]
    for out_slice in config.get("slices", ()):
        out_slice["sources"] = [{"model": m, "layer_range": [0, 2]} for m in out_slice["sources"]]
    return config


@pytest.mark.parametrize("case", list(INVALID))
def test_invalid_configs_exit_2_and_the_merge_says_what_to_write(tiny_family, tmp_path, case):
    build, expected = INVALID[case]
    expected = expected.format(base=tiny_family["base"])
    cfg = write_config(tmp_path / f"{case}.yml", _invalid_config(tiny_family, build))
    checked = check_cli(cfg)
    assert checked.returncode == 2, checked.stdout + checked.stderr
    assert f"{cfg}: error: " in checked.stdout and expected in checked.stdout, checked.stdout
    assert "would ignore" not in checked.stdout + checked.stderr
    merged = mergekit_yaml(cfg, tmp_path / "out", "--no-copy-tokenizer", check=False)
    assert merged.returncode != 0
    errors = [line for line in merged.stderr.splitlines() if line.startswith("ERROR:mergekit_ace:")]
    assert any(expected in line for line in errors), merged.stderr[-3000:]
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").glob("*.safetensors"))


def test_empty_and_unreadable_files_exit_2(tmp_path):
    empty = tmp_path / "empty.yml"
    empty.write_text("")
    result = check_cli(empty)
    assert result.returncode == 2 and f"{empty}: error: the file is empty." in result.stdout
    merged = mergekit_yaml(empty, tmp_path / "out", check=False)
    assert merged.returncode != 0 and "ERROR:mergekit_ace:the file is empty." in merged.stderr
    bad = tmp_path / "bad.yml"
    bad.write_text("merge_method: ace\nmodels: [\n")
    result = check_cli(bad)
    assert result.returncode == 2 and "not valid YAML" in result.stderr
    assert check_cli(tmp_path / "missing.yml").returncode == 2  # click: no such file


def test_mergekit_multi_reports_keys_and_refused_recipes(tiny_family, tmp_path):
    base, a, b, c = (tiny_family[k] for k in ["base", *EXPERTS])
    recipe = tmp_path / "recipe.yml"
    recipe.write_text(
        f"name: stage\nmerge_method: ace\nbase_model: {base}\nparamters: {{k_frac: 0.2}}\n"
        f"tokenizer: {{sorce: base}}\nmodels: [{{model: {a}}}, {{model: {b}}}]\n---\n"
        f"merge_method: slerp\nbase_model: stage\nparameters: {{t: 0.3}}\n"
        f"models: [{{model: stage}}, {{model: {c}}}]\n"
    )
    expected = [
        "[stage] `paramters` (top level) is not a configuration key and is ignored; did you "
        "mean `parameters`?",
        "[stage] `sorce` (tokenizer) is not a tokenizer key and is ignored; did you mean `source`?",
    ]
    checked = check_cli(recipe)
    assert checked.returncode == 1
    merged = run_cli(
        "mergekit-multi",
        [
            recipe,
            "-I",
            tmp_path / "stages",
            "--out-path",
            tmp_path / "final",
            "--no-copy-tokenizer",
        ],
    )
    for line in expected:
        assert line in checked.stdout
        assert merged.stderr.count(line) == 1, merged.stderr[-3000:]
    # two unnamed documents: mergekit-multi refuses them; check says what to write first
    twice = tmp_path / "twice.yml"
    stage = f"merge_method: ace\nbase_model: {base}\nmodels: [{{model: {a}}}]\n"
    twice.write_text(stage + "---\n" + stage)
    message = (
        "[document 2] a second document without `name:`: mergekit-multi takes one unnamed "
        "document at most (the final merge, written to --out-path); give this one a `name:`"
    )
    checked = check_cli(twice)
    assert checked.returncode == 2 and message in checked.stdout
    merged = run_cli(
        "mergekit-multi", [twice, "-I", tmp_path / "s2", "--out-path", tmp_path / "f2"], check=False
    )
    assert merged.returncode != 0 and f"ERROR:mergekit_ace:{message}" in merged.stderr


def test_inspect_reports_misspelled_keys(tiny_family, tmp_path):
    cfg = write_config(
        tmp_path / "typo.yml",
        {
            "merge_method": "ace",
            "base_model": str(tiny_family["base"]),
            "paramters": {"k_frac": 0.2},
            "parameters": {"eps": [{"filter": "mpl", "value": 1.0e-3}]},
            "models": [{"model": str(tiny_family[e])} for e in EXPERTS[:2]],
        },
    )
    result = run_cli(
        "mergekit-ace",
        ["inspect", cfg, "--estimate-only", "--no-plots", "-q", "--out", tmp_path / "inspect"],
    )
    assert result.stderr.count("`paramters` (top level) is not a configuration key") == 1
    assert "filter `mpl` matches no tensor of this merge" in result.stderr


def test_a_clean_local_config_is_planned_and_clean(tiny_family, tmp_path):
    """Filters that match, a gradient, the checkpoints' own dtype, a tokenizer section: no
    finding from check (which plans it) and no warning from the merge."""
    cfg = write_config(
        tmp_path / "clean.yml",
        {
            "merge_method": "ace",
            "base_model": str(tiny_family["base"]),
            "dtype": "float32",
            "out_dtype": "bfloat16",
            "tokenizer": {"source": "base", "pad_to_multiple_of": 8},
            "parameters": {
                "k_frac": [{"filter": "mlp.up_proj", "value": 0.2}, {"value": [0.1, 0.3]}],
                "eps": [{"filter": "self_attn", "value": 1.0e-4}, {"value": "auto"}],
                "gate": "on",
            },
            "models": [
                {"model": str(tiny_family[e]), "parameters": {"weight": w}}
                for e, w in zip(EXPERTS, (1.0, 0.5, 2.0))
            ],
        },
    )
    checked = check_cli(cfg)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert checked.stdout.strip() == f"{cfg}: no findings." and "Not planned" not in checked.stderr
    merged = mergekit_yaml(cfg, tmp_path / "out", "--no-copy-tokenizer")
    assert "WARNING:mergekit_ace" not in merged.stderr and "ERROR" not in merged.stderr
