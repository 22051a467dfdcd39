"""ACTMat, TSV-M, Iso-C and Iso-CTS through the real ``mergekit-yaml`` CLI, in a fresh process,
on tiny saved Llama checkpoints: every merged tensor must equal the kernel applied directly;
and their parameters validated by mergekit, with messages that name the parameter."""

import pytest
import torch
from mergekit.merge_methods.base import TensorGroup

from mergekit_ace.kernels.actmat import actmat_merge
from mergekit_ace.kernels.iso_c import iso_c_merge
from mergekit_ace.kernels.iso_cts import iso_cts_merge
from mergekit_ace.kernels.tsv import tsv_merge
from mergekit_ace.methods import our_method
from tests.helpers import assert_credits
from tests.tiny_models import EXPERT_SCALES, load_state, mergekit_yaml, model_list, write_config

EXPERTS = list(EXPERT_SCALES)

# method: (kernel, shared yaml parameters, kernel keywords, per-model weights or None)
METHODS = {
    "actmat": (actmat_merge, {"lambda": 0.9}, {"lam": 0.9}, [1.0, 0.5, 2.0]),
    "tsv": (tsv_merge, {}, {}, None),
    "iso_c": (iso_c_merge, {"lambda": 1.2}, {"lam": 1.2}, None),
    "iso_cts": (
        iso_cts_merge,
        {"common_space_fraction": 0.5},
        {"common_space_fraction": 0.5},
        None,
    ),
}


@pytest.mark.slow
@pytest.mark.parametrize("method", list(METHODS))
def test_mergekit_yaml_matches_kernel_and_loads(tiny_family, tmp_path, method):
    from transformers import AutoModelForCausalLM

    kernel, shared, kwargs, weights = METHODS[method]
    per_model = {n: {"weight": w} for n, w in zip(EXPERTS, weights)} if weights else {}
    cfg = write_config(
        tmp_path / f"{method}.yml",
        {
            "merge_method": method,
            "base_model": str(tiny_family["base"]),
            "dtype": "float32",
            **({"parameters": shared} if shared else {}),
            "models": model_list(tiny_family, EXPERTS, per_model),
        },
    )
    out = tmp_path / "out"
    mergekit_yaml(cfg, out)
    merged = load_state(out)
    base = load_state(tiny_family["base"])
    experts = [load_state(tiny_family[n]) for n in EXPERTS]
    assert set(merged) == set(base)
    for key, w0 in base.items():
        expected, diag = kernel(w0, [e[key] for e in experts], weights=weights, **kwargs)
        assert diag.branch == (method if w0.dim() == 2 else "mean"), key
        assert merged[key].dtype == torch.float32, key
        assert torch.allclose(merged[key], expected, rtol=0, atol=1e-5), (
            key,
            float((merged[key] - expected).abs().max()),
        )
    model = AutoModelForCausalLM.from_pretrained(out)
    logits = model(torch.tensor([[1, 5, 9]])).logits
    assert torch.isfinite(logits).all()
    card = (out / "README.md").read_text()
    assert our_method(method).spec.pretty_name in card
    assert_credits(card, method)


def _group():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(6, 4, generator=g)
    return TensorGroup.from_tensors(
        [base, base + torch.randn(6, 4, generator=g), base + torch.randn(6, 4, generator=g)],
        ids=["base", "a", "b"],
        base_index=0,
        name="model.layers.0.mlp.up_proj.weight",
    )


@pytest.mark.parametrize(
    "method,parameters,named",
    [
        ("iso_cts", {"common_space_fraction": 1.5}, "common_space_fraction"),
        ("iso_cts", {"common_space_fraction": "most"}, "common_space_fraction"),
        ("tsv", {"lambda": "abc"}, "lambda"),
        ("iso_c", {"lambda": float("nan")}, "lambda"),
        ("actmat", {"lambda": True}, "lambda"),
        ("actmat", {"weight": {"a": -1.0, "b": 1.0}}, "weight"),
    ],
)
def test_bad_parameter_is_named_by_mergekit_validation(method, parameters, named):
    with pytest.raises(ValueError, match=f"parameter `{named}`"):
        our_method(method)([_group()], parameters=parameters)


@pytest.mark.parametrize("method", ["tsv", "iso_c", "iso_cts"])
def test_weight_is_not_a_parameter_of_the_unweighted_methods(method):
    assert "weight" not in {p.name for p in our_method(method).spec.parameters}
    with pytest.raises(TypeError, match="weight"):
        our_method(method)([_group()], parameters={"weight": 1.0})


def test_methods_run_through_mergekit_in_process():
    group = _group()
    base, a, b = group.tensors
    for method, (kernel, _, kwargs, weights) in METHODS.items():
        params = {"weight": {"a": weights[0], "b": weights[1]}} if weights else {}
        (out,) = our_method(method)([group], parameters={**params, **_yaml(kwargs)})
        expected, _ = kernel(base, [a, b], weights=weights[:2] if weights else None, **kwargs)
        assert torch.allclose(out, expected, rtol=0, atol=1e-6), method


@pytest.mark.parametrize("method", ["ace", *METHODS])
def test_drop_noise_is_a_parameter_of_every_method(method):
    """A third expert equal to the base stored in bf16: left out by default, kept with
    ``drop_noise: false``; the kernel receives the setting."""
    group = _group()
    base, a, b = group.tensors
    noisy = TensorGroup.from_tensors(
        [base, a, b, base.to(torch.bfloat16)],
        ids=["base", "a", "b", "c"],
        base_index=0,
        name=group.metadata.name,
    )
    seen = []
    merge = our_method(method)
    merge.on_diagnostics = seen.append
    (default,) = merge([noisy], parameters={})
    (without,) = merge([group], parameters={})
    (kept,) = merge([noisy], parameters={"drop_noise": False})
    assert torch.equal(default, without) and not torch.equal(kept, without)
    assert [d.noise for d in seen] == [[2], [], [2]]
    assert [d.participants for d in seen] == [[0, 1], [0, 1], [0, 1, 2]]
    with pytest.raises(ValueError, match="parameter `drop_noise`"):
        merge([noisy], parameters={"drop_noise": "sometimes"})


def test_actmat_rtol_reaches_the_kernel():
    group = _group()
    base, a, b = group.tensors
    seen = []
    merge = our_method("actmat")
    merge.on_diagnostics = seen.append
    (out,) = merge([group], parameters={"rtol": 0.5})
    expected, _ = actmat_merge(base, [a, b], rtol=0.5)
    assert torch.equal(out, expected) and seen[0].rtol == 0.5
    merge([group], parameters={"rtol": "auto"})
    assert seen[1].rtol == 12 * torch.finfo(torch.float32).eps  # max(T m, n) = max(2 * 6, 4)
    for bad in (-0.1, 2.0, "small"):
        with pytest.raises(ValueError, match="parameter `rtol`"):
            merge([group], parameters={"rtol": bad})


def _yaml(kwargs):
    return {("lambda" if k == "lam" else k): v for k, v in kwargs.items()}


@pytest.mark.parametrize("setting,t", [(1.5, 0.0), ([0.2, 1.4], 1.0), ("abc", 0.0)])
def test_bad_fraction_is_named_when_mergekit_resolves_the_config(setting, t):
    """The path ``mergekit-yaml`` takes: settings (scalars, gradients) resolved per tensor."""
    from mergekit.parameter_resolver import resolve_parameter

    spec = {p.name: p for p in our_method("iso_cts").spec.parameters}["common_space_fraction"]
    with pytest.raises(ValueError, match="parameter `common_space_fraction`"):
        resolve_parameter(spec, [{"common_space_fraction": setting}], tensor_name="x", t=t)
    assert resolve_parameter(
        spec, [{"common_space_fraction": [0.2, 0.6]}], tensor_name="x", t=0.5
    ) == pytest.approx(0.4)
