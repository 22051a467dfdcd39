"""The real ``mergekit-yaml`` CLI, in a fresh process, on tiny saved Llama checkpoints:
every merged tensor must equal the ACE kernel applied to the same inputs."""

import pytest
import torch

from mergekit_ace.kernels.ace import ace_merge
from tests.tiny_models import EXPERT_SCALES, load_state, mergekit_yaml, model_list, write_config

EXPERTS = list(EXPERT_SCALES)


def kernel_merge(paths, names, *, dtype=torch.float32, params_for=lambda name: {}, weights=None):
    base = load_state(paths["base"])
    experts = [load_state(paths[n]) for n in names]
    out, branches = {}, {}
    for key, w0 in base.items():
        merged, diag = ace_merge(
            w0.to(dtype), [e[key].to(dtype) for e in experts], weights=weights, **params_for(key)
        )
        out[key], branches[key] = merged, diag.branch
    return out, branches


def assert_matches(merged, expected, atol):
    assert set(merged) == set(expected)
    for key, value in expected.items():
        assert merged[key].dtype == value.dtype, key
        assert torch.isfinite(merged[key].float()).all(), key
        assert torch.allclose(merged[key].float(), value.float(), rtol=0, atol=atol), (
            key,
            float((merged[key].float() - value.float()).abs().max()),
        )


def test_mergekit_yaml_ace_matches_kernel_and_loads(tiny_family, tmp_path):
    from transformers import AutoModelForCausalLM

    cfg = write_config(
        tmp_path / "ace.yml",
        {
            "merge_method": "ace",
            "base_model": str(tiny_family["base"]),
            "dtype": "float32",
            "parameters": {"eps": 1.0e-5, "gate_statistic": "gamma"},  # the paper's settings
            "models": model_list(tiny_family, EXPERTS, {"expert_code": {"weight": 0.5}}),
        },
    )
    out = tmp_path / "out"
    mergekit_yaml(cfg, out)
    merged = load_state(out)
    expected, branches = kernel_merge(
        tiny_family,
        EXPERTS,
        weights=[1.0, 0.5, 1.0],
        params_for=lambda key: {"eps": 1e-5, "gate_statistic": "gamma"},
    )
    assert_matches(merged, expected, atol=1e-6)
    # the experts were built so that both branches occur
    assert {"heterogeneous", "homogeneous", "mean"} <= set(branches.values())
    # the merge moved away from the base, and the output is a loadable causal LM
    base = load_state(tiny_family["base"])
    assert any(not torch.equal(merged[k], base[k]) for k in base)
    model = AutoModelForCausalLM.from_pretrained(out)
    logits = model(torch.tensor([[1, 5, 9]])).logits
    assert logits.shape == (1, 3, 128) and torch.isfinite(logits).all()
    card = (out / "README.md").read_text()
    assert "[ACE-Merging](https://arxiv.org/abs/2603.02945)" in card


def test_per_tensor_eps_filter_and_shared_parameters(tiny_family, tmp_path):
    cfg = write_config(
        tmp_path / "ace_filters.yml",
        {
            "merge_method": "ace",
            "base_model": str(tiny_family["base"]),
            "dtype": "float32",
            "parameters": {
                "eps": [{"filter": "mlp", "value": 1.0e-2}, {"value": "1e-6"}],
                "gate": "on",  # YAML would also read a bare `on` as a boolean
                "k_frac": 0.5,
                "lambda": 0.8,
            },
            "models": model_list(tiny_family, EXPERTS),
        },
    )
    out = tmp_path / "out"
    mergekit_yaml(cfg, out)

    def params_for(key):
        return {"eps": 1e-2 if "mlp" in key else 1e-6, "gate": "on", "k_frac": 0.5, "lam": 0.8}

    expected, _ = kernel_merge(tiny_family, EXPERTS, params_for=params_for)
    assert_matches(load_state(out), expected, atol=1e-6)
    # the filter mattered: the default eps gives a different mlp tensor
    key = "model.layers.0.mlp.down_proj.weight"
    other, _ = kernel_merge(
        tiny_family,
        EXPERTS,
        params_for=lambda k: {"eps": 1e-6, "gate": "on", "k_frac": 0.5, "lam": 0.8},
    )
    assert not torch.allclose(other[key], expected[key], atol=1e-6)


def test_yaml_boolean_gate_off(tiny_family, tmp_path):
    path = tmp_path / "gate_off.yml"
    path.write_text(
        f"merge_method: ace\nbase_model: {tiny_family['base']}\ndtype: float32\n"
        "parameters:\n  gate: off\n  prior: false\nmodels:\n"
        + "".join(f"  - model: {tiny_family[n]}\n" for n in EXPERTS)
    )
    out = tmp_path / "out"
    mergekit_yaml(path, out)
    expected, branches = kernel_merge(
        tiny_family, EXPERTS, params_for=lambda k: {"gate": "off", "prior": False}
    )
    assert "heterogeneous" not in branches.values()
    assert_matches(load_state(out), expected, atol=1e-6)


def test_bfloat16_run(tiny_family, tmp_path):
    cfg = write_config(
        tmp_path / "ace_bf16.yml",
        {
            "merge_method": "ace",
            "base_model": str(tiny_family["base"]),
            "dtype": "bfloat16",
            "models": model_list(tiny_family, EXPERTS),
        },
    )
    out = tmp_path / "out"
    mergekit_yaml(cfg, out)
    expected, _ = kernel_merge(tiny_family, EXPERTS, dtype=torch.bfloat16)
    assert all(v.dtype == torch.bfloat16 for v in expected.values())
    assert_matches(load_state(out), expected, atol=0)


def test_vocabulary_aligned_by_mergekit_tokenizer(tiny_family, tmp_path):
    names = EXPERTS + ["expert_tokens"]
    cfg = write_config(
        tmp_path / "ace_tokens.yml",
        {
            "merge_method": "ace",
            "base_model": str(tiny_family["base"]),
            "dtype": "float32",
            "tokenizer": {"source": "union"},
            "models": model_list(tiny_family, names),
        },
    )
    out = tmp_path / "out"
    mergekit_yaml(cfg, out)
    merged = load_state(out)

    # Reproduce mergekit's union alignment: the two new tokens exist only in expert_tokens,
    # so every model (the base included) takes that expert's rows for them, at the ids the
    # merged tokenizer gives them (their order is mergekit's choice).
    from transformers import AutoTokenizer

    merged_ids = AutoTokenizer.from_pretrained(out).convert_tokens_to_ids(["<tool>", "</tool>"])
    source_ids = AutoTokenizer.from_pretrained(tiny_family["expert_tokens"]).convert_tokens_to_ids(
        ["<tool>", "</tool>"]
    )
    assert sorted(merged_ids) == [128, 129] and source_ids == [128, 129]
    order = [source_ids[merged_ids.index(i)] for i in (128, 129)]
    base = load_state(tiny_family["base"])
    experts = [load_state(tiny_family[n]) for n in names]
    for key in ("model.embed_tokens.weight", "lm_head.weight"):
        donor = experts[-1][key][order]
        experts[-1][key] = torch.cat([experts[-1][key][:128], donor])
        aligned = [
            torch.cat([e[key][:128], donor]) if e[key].shape[0] == 128 else e[key] for e in experts
        ]
        expected, diag = ace_merge(torch.cat([base[key], donor]), aligned)
        assert merged[key].shape == (130, 32)
        assert torch.allclose(merged[key], expected, atol=1e-6), key
        assert diag.branch in ("heterogeneous", "homogeneous")


def test_missing_base_model_fails_before_loading(tiny_family, tmp_path):
    cfg = write_config(
        tmp_path / "nobase.yml",
        {
            "merge_method": "ace",
            "dtype": "float32",
            "models": model_list(tiny_family, EXPERTS),
        },
    )
    result = mergekit_yaml(cfg, tmp_path / "out", check=False)
    assert result.returncode != 0
    assert "ace needs a base model" in result.stderr
    assert "base_model:" in result.stderr
    assert not (tmp_path / "out" / "model.safetensors").exists()


def run_merge_in_process(config: dict, out):
    """mergekit's Python API in this process (the import is shared across tests)."""
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    run_merge(MergeConfiguration.model_validate(config), str(out), options=MergeOptions(quiet=True))


@pytest.mark.parametrize(
    "param,value",
    [
        ("k_frac", 1.5),
        ("eps", -1),
        ("gate", "sometimes"),
        ("tau", "abc"),
        ("refine", "maybe"),
        ("eps", "autoo"),
    ],
)
def test_bad_parameter_is_named_before_merging(tiny_family, tmp_path, param, value):
    config = {
        "merge_method": "ace",
        "base_model": str(tiny_family["base"]),
        "parameters": {param: value},
        "models": model_list(tiny_family, EXPERTS),
    }
    with pytest.raises(Exception, match=f"parameter `{param}`"):
        run_merge_in_process(config, tmp_path / "out")
    assert not (tmp_path / "out" / "model.safetensors").exists()


def test_negative_weight_is_named(tiny_family, tmp_path):
    config = {
        "merge_method": "ace",
        "base_model": str(tiny_family["base"]),
        "models": model_list(tiny_family, EXPERTS, {"expert_math": {"weight": -1}}),
    }
    with pytest.raises(Exception, match="parameter `weight` must be >= 0"):
        run_merge_in_process(config, tmp_path / "out")
    assert not (tmp_path / "out" / "model.safetensors").exists()


def test_library_errors_name_the_tensor(monkeypatch):
    """An error raised inside a numerical library is re-raised with the tensor's name."""
    from mergekit_ace.methods import our_method
    from mergekit.merge_methods.base import TensorGroup

    def failing_svd(*args, **kwargs):
        raise torch.linalg.LinAlgError("linalg.svd: The algorithm failed to converge")

    base = torch.randn(24, 16)
    experts = [base + s * torch.randn(24, 16) for s in (0.01, 1.0, 0.1)]
    group = TensorGroup.from_tensors(
        [base, *experts], base_index=0, name="model.layers.3.mlp.up_proj.weight"
    )
    monkeypatch.setattr(torch.linalg, "svd", failing_svd)
    monkeypatch.setattr(torch.linalg, "eigh", failing_svd)
    with pytest.raises(
        RuntimeError,
        match=r"ace failed on tensor 'model\.layers\.3\.mlp\.up_proj\.weight'.*converge",
    ):
        our_method("ace")([group], parameters={"gate": "on"})


def test_base_resaved_in_bf16_is_left_out_with_a_warning(tiny_family, tmp_path):
    """An "expert" that is the float32 base saved as bfloat16 (written back as float32, so
    only its values say bf16) changes nothing, and the log names it."""
    from tests.tiny_models import TINY, save_model

    base = load_state(tiny_family["base"])
    noise_path = tmp_path / "base_as_bf16"
    save_model(noise_path, {k: v.to(torch.bfloat16).float() for k, v in base.items()}, TINY)
    paths = dict(tiny_family, base_as_bf16=noise_path)
    cfg = write_config(
        tmp_path / "ace.yml",
        {
            "merge_method": "ace",
            "base_model": str(paths["base"]),
            "dtype": "float32",
            "models": model_list(paths, EXPERTS + ["base_as_bf16"]),
        },
    )
    out = tmp_path / "out"
    result = mergekit_yaml(cfg, out)
    expected, _ = kernel_merge(paths, EXPERTS)
    assert_matches(load_state(out), expected, atol=1e-6)
    assert "base_as_bf16" in result.stderr and "storage noise" in result.stderr


def test_mergekit_yaml_warns_when_float32_cannot_hold_a_fixed_eps(tiny_family, tmp_path):
    """Two experts span at most 2 (m - 1) input directions of a tensor: 30 of k_proj's 32,
    62 of down_proj's 64. There a tiny fixed eps alone holds the system up; the log says which
    tensor, how much float32 can change it, and the ways out; the merge equals the kernel's."""
    import re

    names = ["expert_math", "expert_chat"]
    cfg = write_config(
        tmp_path / "ace.yml",
        {
            "merge_method": "ace",
            "base_model": str(tiny_family["base"]),
            "dtype": "float32",
            "parameters": {"eps": 1.0e-8},
            "models": model_list(tiny_family, names),
        },
    )
    result = mergekit_yaml(cfg, tmp_path / "out")
    expected, _ = kernel_merge(tiny_family, names, params_for=lambda key: {"eps": 1e-8})
    assert_matches(load_state(tmp_path / "out"), expected, atol=1e-6)
    warning = re.search(
        r"ACE: tensor 'model\.layers\.\d\.(self_attn\.[kv]|mlp\.down)_proj\.weight' "
        r"\(\[\d+, \d+\], 2 experts, eps 1e-08\): its system's condition number is about "
        r"[0-9.e+]+(,| and the spectral refinement[^,]*), so float32 round-off changes the "
        r"merged update by about (\d+\.\d% of its size|more than its own size) \(measured",
        result.stderr,
    )
    assert warning is not None, result.stderr[-3000:]
    assert "`eps: auto`" in result.stderr and "`dtype: float64`" in result.stderr
