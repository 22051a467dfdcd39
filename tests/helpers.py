"""Helpers the test modules share (test modules import helper modules, never each other):
synthetic experts for the kernels, broken copies of the tiny checkpoints, and what a model card
that credits this package must say. The tiny checkpoints themselves and the commands that
merge them: :mod:`tests.tiny_models`; the independent float64 re-derivations:
:mod:`tests.reference` (ACE) and :mod:`tests.family_reference`."""

from __future__ import annotations

import math
import shutil
from importlib.metadata import version
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from mergekit_ace.card import SECTION_TITLE
from mergekit_ace.kernels.ace import ace_merge
from mergekit_ace.kernels.actmat import actmat_merge
from mergekit_ace.kernels.iso_c import iso_c_merge
from mergekit_ace.kernels.iso_cts import iso_cts_merge
from mergekit_ace.kernels.tsv import tsv_merge
from mergekit_ace.methods import our_method

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
