"""The benchmark's scale test (benchmarks/real_llama/scale.py) on small synthetic tensors:
the scale-free configuration must come out invariant and the paper's default must not."""

import math

import torch

from benchmarks.real_llama.scale import CONFIGS, scale_test, summarize


def _checkpoints(seed=0):
    g = torch.Generator().manual_seed(seed)
    base = {
        "model.layers.0.self_attn.k_proj.weight": torch.randn(12, 20, generator=g),
        "model.layers.0.mlp.down_proj.weight": torch.randn(16, 24, generator=g),
        "model.layers.1.mlp.down_proj.weight": torch.randn(16, 24, generator=g),  # not sampled
        "model.norm.weight": torch.ones(20),  # not 2-D: skipped
    }
    experts = []
    # energies within a factor ~1.5 (log_spread < tau) but of order 1e-2 * entries
    for scale in (0.010, 0.012, 0.009):
        experts.append({k: v + scale * torch.randn(v.shape, generator=g) for k, v in base.items()})
    return base, experts


def test_scale_test_separates_scale_free_from_fixed_eps():
    base, experts = _checkpoints()
    rows = scale_test(base, experts, [0.1, 10.0], every=5)
    sampled = {r["tensor"] for r in rows}
    assert sampled == {
        "model.layers.0.self_attn.k_proj.weight",
        "model.layers.0.mlp.down_proj.weight",
    }
    assert len(rows) == len(sampled) * len(CONFIGS) * 2

    def devs(config):
        return [r["rel_deviation"] for r in rows if r["config"] == config]

    assert max(devs("eps auto, log_spread (default)")) < 1e-6
    assert all(
        r["branch_a"] == r["branch_1"]
        for r in rows
        if r["config"] == "eps auto, log_spread (default)"
    )
    # with a fixed eps the ridge's weight changes by a^2: the merge is not a rescaled copy
    assert min(devs("eps 1e-5, gamma (paper)")) > 1e-3

    table = summarize(rows, [0.1, 10.0])
    lines = table.splitlines()
    assert lines[0].count("|") == 1 + 1 + 3 * 2
    assert sum(line.startswith("| eps") for line in lines) == len(CONFIGS)
    assert "2 tensors" in table
    assert all(math.isfinite(r["rel_deviation"]) for r in rows)
