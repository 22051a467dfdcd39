"""Every example config runs, unchanged but for model names, on tiny stand-in checkpoints:
``mergekit-yaml`` for single-stage configs, ``mergekit-multi`` for the multi-stage recipe."""

from pathlib import Path

import pytest
import torch
import yaml

from mergekit_ace.kernels.ace import ace_merge
from tests.helpers import assert_credits
from tests.tiny_models import load_state, mergekit_yaml, run_cli

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
STAND_INS = {
    "meta-llama/Llama-3.1-8B": "base",
    "nvidia/OpenMath2-Llama3.1-8B": "expert_math",
    "allenai/Llama-3.1-Tulu-3-8B": "expert_chat",
    "deepseek-ai/DeepSeek-R1-Distill-Llama-8B": "expert_code",
    "meta-llama/Llama-3.1-8B-Instruct": "expert_chat",
}


def localized(text: str, family) -> str:
    for hub_id, stand_in in sorted(STAND_INS.items(), key=lambda item: -len(item[0])):
        text = text.replace(hub_id, str(family[stand_in]))
    return text


def test_all_examples_are_covered():
    assert sorted(p.name for p in EXAMPLES.glob("*.yml")) == [
        "ace-llama31-experts.yml",
        "ace-per-tensor.yml",
        "ace-then-slerp.yml",
    ]


@pytest.mark.parametrize("name", ["ace-llama31-experts.yml", "ace-per-tensor.yml"])
def test_single_stage_example(name, tiny_family, tmp_path):
    config_text = localized((EXAMPLES / name).read_text(), tiny_family)
    config_path = tmp_path / name
    config_path.write_text(config_text)
    out = tmp_path / "out"
    mergekit_yaml(config_path, out)
    merged = load_state(out)
    config = yaml.safe_load(config_text)
    base = load_state(tiny_family["base"])
    experts = [load_state(m["model"]) for m in config["models"]]
    weights = [m.get("parameters", {}).get("weight", 1.0) for m in config["models"]]
    key = "model.layers.1.self_attn.o_proj.weight"
    if name == "ace-per-tensor.yml":
        kwargs = dict(eps="auto", gate="auto", k_frac=0.3, lam=0.9)
    else:
        kwargs = dict(eps="auto", gate_statistic="log_spread", tau=0.3, k_frac=0.3)
    expected, _ = ace_merge(
        base[key].bfloat16(), [e[key].bfloat16() for e in experts], weights=weights, **kwargs
    )
    assert merged[key].dtype == torch.bfloat16
    assert torch.equal(merged[key], expected)
    assert all(torch.isfinite(v.float()).all() for v in merged.values())
    assert_credits((out / "README.md").read_text(), "ace")


def test_multi_stage_example_ace_then_slerp(tiny_family, tmp_path):
    config_path = tmp_path / "ace-then-slerp.yml"
    config_path.write_text(localized((EXAMPLES / "ace-then-slerp.yml").read_text(), tiny_family))
    final = tmp_path / "final"
    run_cli("mergekit-multi", [config_path, "-I", tmp_path / "intermediate", "--out-path", final])
    stage1 = load_state(tmp_path / "intermediate" / "llama31-experts-ace")
    merged = load_state(final)
    chat = load_state(tiny_family["expert_chat"])
    base = load_state(tiny_family["base"])
    key = "model.layers.0.mlp.up_proj.weight"
    expected, _ = ace_merge(
        base[key].bfloat16(),
        [load_state(tiny_family[n])[key].bfloat16() for n in ("expert_math", "expert_code")],
    )
    assert torch.equal(stage1[key], expected)
    # SLERP sits between its two inputs
    a, b, m = stage1[key].float(), chat[key].float(), merged[key].float()
    assert 0 < float((m - a).norm()) < float((b - a).norm())
    # the final (SLERP) card still credits the ACE stage it builds on
    card = (final / "README.md").read_text()
    assert_credits(card, "ace")
    assert (
        f"The input `{tmp_path / 'intermediate' / 'llama31-experts-ace'}` was itself merged" in card
    )
