"""The ACE kernel's fast paths (Cholesky + Sherman-Morrison solve, Gram-eigh spectral step,
reassociated Gram products) and their fallbacks, each against tests/reference.py; the cost
estimate and the out-of-memory decision for CUDA inputs (tested without a GPU)."""

import logging
import math

import pytest
import torch

import mergekit_ace.kernels.ace as ace_module
from mergekit_ace.kernels.ace import (
    AceOutOfMemoryError,
    ace_merge,
    estimate_ace_cost,
    needs_cpu_fallback,
)
from mergekit_ace.kernels.linalg import solve_right_spd_rank_one, top_k_isotropic_update
from tests.reference import reference_ace, rel_err
from tests.test_kernel_ace import make_experts

SHAPES = [((24, 16), (0.01, 1.0, 0.1)),  # m >= n: C^T C formed per task
          ((10, 32), (0.01, 1.0, 0.1, 0.3)),  # 2m < n: (C C^T) C reassociation
          ((16, 24), (0.5, 0.6, 0.55))]  # n/2 <= m < n, homogeneous


@pytest.mark.parametrize("shape,scales", SHAPES)
@pytest.mark.parametrize("force", ["none", "lu", "svd", "both"])
def test_fast_paths_and_fallbacks_match_reference(shape, scales, force, monkeypatch):
    if force in ("lu", "both"):
        monkeypatch.setattr(ace_module, "solve_right_spd_rank_one", lambda B, c, N: None)
    if force in ("svd", "both"):
        monkeypatch.setattr(ace_module, "top_k_isotropic_update", lambda F, k: None)
    base, experts = make_experts(shape, scales)
    out, diag = ace_merge(base, experts, eps=1e-2, gate_statistic="gamma")
    ref, branch = reference_ace(base, experts, eps=1e-2, gate_statistic="gamma")
    assert diag.branch == branch
    assert diag.solver == ("lu" if force in ("lu", "both") else "cholesky")
    if branch == "heterogeneous":
        assert diag.spectral == ("svd" if force in ("svd", "both") else "gram-eigh")
    assert rel_err(out - base, ref - base.double()) < 2e-4


def test_cholesky_solve_with_rank_one_prior_matches_float64_solve():
    g = torch.Generator().manual_seed(1)
    X = torch.randn(50, 30, generator=g, dtype=torch.float64)
    B = X.T @ X / 50 + 0.1 * torch.eye(30, dtype=torch.float64)
    c = torch.randn(30, generator=g, dtype=torch.float64) * 0.1
    N = torch.randn(7, 30, generator=g, dtype=torch.float64)
    expected = torch.linalg.solve((B + c.unsqueeze(0)).T, N.T).T
    got, info = solve_right_spd_rank_one(B.float(), c.float(), N.float())
    assert info.method == "cholesky" and 0 < info.rcond <= 1
    assert rel_err(got, expected) < 1e-4


def test_cholesky_solve_declines_indefinite_or_singular_systems():
    B = torch.diag(torch.tensor([1.0, -1.0, 2.0]))
    assert solve_right_spd_rank_one(B, torch.zeros(3), torch.ones(2, 3)) is None
    # 1 + 1^T B^{-1} c = 0: B + 1 c^T is singular although B is not.
    B = torch.eye(3)
    c = torch.tensor([-1.0, 0.0, 0.0])
    assert solve_right_spd_rank_one(B, c, torch.ones(2, 3)) is None


@pytest.mark.parametrize("shape", [(60, 20), (20, 60), (32, 32)])
def test_top_k_update_matches_float64_svd(shape):
    g = torch.Generator().manual_seed(2)
    F = torch.randn(*shape, generator=g, dtype=torch.float64)
    F[:, :3] *= 10.0  # uneven spectrum
    k = math.floor(0.3 * min(shape))
    U, s, Vh = torch.linalg.svd(F, full_matrices=False)
    M, sigma = top_k_isotropic_update(F.float(), k)
    assert sigma == pytest.approx(float(s[:k].mean()), rel=1e-5)
    assert rel_err(M, U[:, :k] @ Vh[:k]) < 1e-4


def test_top_k_update_declines_when_top_k_reaches_the_null_space():
    g = torch.Generator().manual_seed(3)
    F = torch.randn(40, 2, generator=g) @ torch.randn(2, 30, generator=g)  # rank 2 < k = 9
    assert top_k_isotropic_update(F, 9) is None


def test_blocked_gram_accumulation_is_exact_in_blocks():
    g = torch.Generator().manual_seed(4)
    F = torch.randn(100, 12, generator=g)
    F[:, 0] *= 5.0
    a = top_k_isotropic_update(F, 3)
    b = top_k_isotropic_update(F, 3, block_bytes=8 * 12 * 7)  # blocks of 7 rows
    assert rel_err(a[0], b[0]) < 1e-6 and a[1] == pytest.approx(b[1], rel=1e-12)


def test_estimate_keeps_its_keys_and_does_not_grow_with_experts():
    for shape in [(4096, 4096), (1024, 4096), (14336, 4096), (4096, 14336)]:
        three, eight = estimate_ace_cost(shape, 3), estimate_ace_cost(shape, 8)
        assert {"bytes", "flops"} <= set(three)
        assert three["bytes"] == eight["bytes"] > 0
        assert eight["flops"] > three["flops"] > 0
        assert estimate_ace_cost(shape, 3, 8)["bytes"] > three["bytes"]
    # down_proj: dominated by the [n, n] system and its factor (822 MB each).
    assert estimate_ace_cost((4096, 14336), 8)["bytes"] > 2 * 14336**2 * 4
    assert estimate_ace_cost((8,), 3)["bytes"] == 64


def test_oom_decision_fits_falls_back_or_raises(caplog):
    shape, need = (4096, 14336), estimate_ace_cost((4096, 14336), 8)["bytes"]
    assert not needs_cpu_fallback(shape, 8, 4, 2 * need, tensor_name="model.layers.0.mlp.down_proj.weight")
    with caplog.at_level(logging.WARNING, logger="mergekit_ace.kernels.ace"):
        assert needs_cpu_fallback(shape, 8, 4, need // 2, tensor_name="model.layers.0.mlp.down_proj.weight")
    assert "model.layers.0.mlp.down_proj.weight" in caplog.text and "on the CPU" in caplog.text
    assert "[4096, 14336]" in caplog.text and "GiB is free" in caplog.text
    with pytest.raises(AceOutOfMemoryError, match=r"down_proj.*GiB.*oom_fallback: cpu"):
        needs_cpu_fallback(shape, 8, 4, need // 2, policy="error",
                           tensor_name="model.layers.0.mlp.down_proj.weight")


def test_oom_fallback_parameter_is_validated_and_ignored_on_cpu():
    base, experts = make_experts((24, 16), (0.01, 1.0, 0.1))
    a, _ = ace_merge(base, experts)
    b, diag = ace_merge(base, experts, oom_fallback="error", free_device_bytes=0)
    assert torch.equal(a, b) and diag.device is None
    with pytest.raises(ValueError, match="oom_fallback"):
        ace_merge(base, experts, oom_fallback="gpu")


def test_cuda_inputs_that_do_not_fit_are_merged_on_cpu(monkeypatch):
    """The fallback branch, driven on CPU tensors that claim to live on CUDA."""
    base, experts = make_experts((24, 16), (0.01, 1.0, 0.1))
    expected, _ = ace_merge(base, experts)

    class FakeCuda(torch.Tensor):
        @property
        def device(self):
            return torch.device("cuda", 0)

        def cpu(self):
            return self.as_subclass(torch.Tensor)

    monkeypatch.setattr(ace_module, "_return_to", lambda tensor, device: tensor)
    fake_base = base.clone().as_subclass(FakeCuda)
    fake_experts = [e.clone().as_subclass(FakeCuda) for e in experts]
    out, diag = ace_merge(fake_base, fake_experts, free_device_bytes=0, tensor_name="w")
    assert diag.device == "cpu (fallback)"
    assert torch.equal(out.as_subclass(torch.Tensor), expected)
    with pytest.raises(AceOutOfMemoryError, match="'w'"):
        ace_merge(fake_base, fake_experts, free_device_bytes=0, tensor_name="w",
                  oom_fallback="error")


def test_adapter_exposes_oom_fallback():
    from mergekit_ace.methods.ace import ace_method

    params = {p.name: p for p in ace_method().spec.parameters}
    assert params["oom_fallback"].default == "cpu"
