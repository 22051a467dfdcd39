"""Helpers the test modules share (test modules import helper modules, never each other):
synthetic experts for the kernels, broken copies of the tiny checkpoints, what a model card
that credits this package must say, and merges run by mergekit's serial executor and the
overlapped one side by side (with the extra inputs those comparisons read). The tiny
checkpoints themselves and the commands that merge them: :mod:`tests.tiny_models`; the
independent float64 re-derivations: :mod:`tests.reference` (ACE) and
:mod:`tests.family_reference`."""

from __future__ import annotations

import json
import math
import shutil
from importlib.metadata import version
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from mergekit_ace import overlap
from mergekit_ace.card import SECTION_TITLE
from mergekit_ace.kernels.ace import ace_merge
from mergekit_ace.kernels.actmat import actmat_merge
from mergekit_ace.kernels.iso_c import iso_c_merge
from mergekit_ace.kernels.iso_cts import iso_cts_merge
from mergekit_ace.kernels.tsv import tsv_merge
from mergekit_ace.methods import our_method
from tests.tiny_models import (
    EXPERT_SCALES,
    TINY,
    load_state,
    model_list,
    save_model,
    structured_delta,
    write_config,
)

# Every method's kernel, by its merge_method name.
KERNELS = {
    "ace": ace_merge,
    "actmat": actmat_merge,
    "tsv": tsv_merge,
    "iso_c": iso_c_merge,
    "iso_cts": iso_cts_merge,
}
# The tensor broken copies of the tiny checkpoints break.
TENSOR = "model.layers.1.mlp.up_proj.weight"


def low_rank_experts(shape, scales, seed=0, rank=3):
    """A base plus one expert per scale: rank-``rank`` task vectors plus 0.3 of full-rank
    noise, times the scale (1-D shapes: noise only)."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(*shape, generator=g)
    experts = []
    for s in scales:
        if len(shape) == 2:
            m, n = shape
            low = torch.randn(m, rank, generator=g) @ torch.randn(rank, n, generator=g)
            delta = low / math.sqrt(rank) + 0.3 * torch.randn(m, n, generator=g)
        else:
            delta = torch.randn(*shape, generator=g)
        experts.append(base + s * delta)
    return base, experts


def well_conditioned_experts(shape, count, seed=0, scale=0.1):
    """A base and ``count`` experts. 2-D task vectors are ``U diag(s) V^T`` with random
    orthonormal ``U``, ``V`` and a full-rank spectrum decaying from ``2.5 scale`` towards
    ``0.5 scale`` (condition number < 5, distinct singular values), so float32 kernels can be
    compared with float64 references and top-k selections are unambiguous."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(*shape, generator=g)
    if len(shape) != 2:
        return base, [base + scale * torch.randn(*shape, generator=g) for _ in range(count)]
    m, n = shape
    r = min(m, n)
    decay = 0.5 + 2.0 * 0.8 ** torch.arange(r, dtype=torch.float32)
    experts = []
    for _ in range(count):
        U = torch.linalg.qr(torch.randn(m, r, generator=g))[0]
        V = torch.linalg.qr(torch.randn(n, r, generator=g))[0]
        s = scale * decay * (1.0 + 0.1 * torch.rand(r, generator=g))
        experts.append(base + (U * s) @ V.T)
    return base, experts


def rank_deficient_experts(dtype=torch.float64, T=2, m=24, n=96):
    """``T m < n``: the summed proxies have rank at most ``T (m - 1)``, so only the ridge
    holds ACE's system up."""
    g = torch.Generator().manual_seed(0)
    base = 0.02 * torch.randn(m, n, generator=g, dtype=torch.float64)
    experts = [base + 1e-2 * torch.randn(m, n, generator=g, dtype=torch.float64) for _ in range(T)]
    return base.to(dtype), [e.to(dtype) for e in experts]


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


def assert_credits(card: str, method: str) -> None:
    """``card`` (a README.md that mergekit wrote) credits ``method`` of this package."""
    assert card.count(SECTION_TITLE) == 1, card
    section = card[card.index(SECTION_TITLE) :]
    pip = f"pip install mergekit=={version('mergekit')} mergekit-ace=={version('mergekit-ace')}"
    assert pip in section
    assert f"(`merge_method: {method}`)" in section
    assert f"```bibtex\n{our_method(method).citation}\n```" in section


# --- the overlapped executor against mergekit's serial one --------------------------------

EXPERTS = list(EXPERT_SCALES)
SMALL_SHARDS = ("--out-shard-size", "20K")  # ~6 shards: most are written while merging


def mergekit_yaml_here(config: Path, out: Path, *flags: str) -> None:
    """The ``mergekit-yaml`` command (mergekit's click entry point) in this process."""
    from mergekit.scripts.run_yaml import main

    main([str(config), str(out), "--quiet", *flags], standalone_mode=False)


def serial_and_overlapped(monkeypatch, tmp_path, config: dict, *flags: str):
    cfg = write_config(tmp_path / "merge.yml", config)
    outs = {}
    for mode, switch in (("serial", "0"), ("overlapped", "1")):
        monkeypatch.setenv(overlap.SWITCH_VARIABLE, switch)
        outs[mode] = tmp_path / mode / "merged"  # the card names the directory
        mergekit_yaml_here(cfg, outs[mode], *flags)
    return outs["serial"], outs["overlapped"]


def assert_same_files(a: Path, b: Path, skip=()) -> None:
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir())
    assert any(n.endswith(".safetensors") for n in names), names
    for name in set(names) - set(skip):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


def config_of(family, method="ace", names=EXPERTS, **extra):
    return {
        "merge_method": method,
        "base_model": str(family["base"]),
        "dtype": "float32",
        "models": model_list(family, names),
        **extra,
    }


def overlap_inputs(tiny_family, root: Path) -> dict:
    """pytorch_model.bin copies of the tiny family, a LoRA adapter of the base, and an expert
    whose second shard (model.norm.weight) was cut short, as by an interrupted download."""
    import peft
    from transformers import LlamaForCausalLM

    paths = {}
    for name in ["base"] + EXPERTS:
        target = root / f"{name}_bin"
        target.mkdir()
        torch.save(load_state(tiny_family[name]), target / "pytorch_model.bin")
        for file in tiny_family[name].iterdir():
            if file.suffix != ".safetensors":
                shutil.copy(file, target / file.name)
        paths[f"{name}_bin"] = target
    model = LlamaForCausalLM.from_pretrained(tiny_family["base"])
    lora = peft.get_peft_model(
        model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])
    )
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, param in lora.named_parameters():
            if "lora_" in name:
                param.copy_(0.05 * torch.randn(param.shape, generator=gen))
    paths["adapter"] = root / "adapter"
    lora.save_pretrained(paths["adapter"])
    state = load_state(tiny_family["expert_code"])
    cut = root / "expert_cut"
    shutil.copytree(tiny_family["expert_code"], cut)
    (cut / "model.safetensors").unlink()
    late = "model.norm.weight"
    first, second = "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"
    save_file({k: v for k, v in state.items() if k != late}, cut / first, metadata={"format": "pt"})
    save_file({late: state[late]}, cut / second, metadata={"format": "pt"})
    data = (cut / second).read_bytes()
    (cut / second).write_bytes(data[: len(data) - 40])
    index = {"metadata": {}, "weight_map": {k: (second if k == late else first) for k in state}}
    (cut / "model.safetensors.index.json").write_text(json.dumps(index))
    paths["expert_cut"] = cut
    # One added token: with two, the union tokenizer's order of them changes from run to run
    # (it follows the tokenizer's hash map), whichever executor runs the merge.
    base = load_state(tiny_family["base"])
    state = {k: v + structured_delta(v, 0.02, gen) for k, v in base.items()}
    for key in ("model.embed_tokens.weight", "lm_head.weight"):
        row = 0.02 * torch.randn(1, TINY["hidden_size"], generator=gen)
        state[key] = torch.cat([state[key], row])
    paths["expert_token"] = root / "expert_token"
    save_model(
        paths["expert_token"],
        state,
        dict(TINY, vocab_size=TINY["vocab_size"] + 1),
        extra_tokens=("<tool>",),
    )
    return paths
