"""The Iso-CTS kernel against a float64 re-derivation in the layout of the authors' code
(tests/family_reference.py), its rank budget, and its limits (Iso-C)."""

import pytest
import torch

from mergekit_ace.kernels.iso_c import iso_c_merge
from mergekit_ace.kernels.iso_cts import iso_cts_merge, rank_budget
from tests.family_reference import reference_iso_cts
from tests.helpers import well_conditioned_experts
from tests.reference import rel_err

CASES = [
    # shape, experts, fraction, lam, (k_common, per_task)
    ((24, 16), 3, 0.8, 1.0, (13, 1)),  # k0 = 12, round(4 / 3) = 1
    ((40, 32), 3, 0.8, 1.0, (26, 2)),  # k0 = 25, round(7 / 3) = 2
    ((16, 24), 2, 0.5, 0.8, (8, 4)),
    ((20, 20), 4, 0.0, 1.0, (0, 5)),
    ((20, 12), 3, 0.6, 1.0, (6, 2)),  # k0 = 7, round(5 / 3) = 2: the budget takes from common
]


@pytest.mark.parametrize("shape,count,fraction,lam,budget", CASES)
def test_kernel_matches_reference(shape, count, fraction, lam, budget):
    base, experts = well_conditioned_experts(shape, count)
    out, diag = iso_cts_merge(base, experts, common_space_fraction=fraction, lam=lam)
    ref = reference_iso_cts(base, experts, common_space_fraction=fraction, lam=lam)
    assert diag.branch == "iso_cts"
    assert (diag.k_common, diag.per_task) == budget and diag.rank == min(shape)
    assert rel_err(out.double() - base.double(), ref - base.double()) < 1e-5
    out64, _ = iso_cts_merge(
        base.double(), [e.double() for e in experts], common_space_fraction=fraction, lam=lam
    )
    assert rel_err(out64 - base.double(), ref - base.double()) < 1e-12


@pytest.mark.parametrize(
    "r,tasks,fraction,budget",
    [
        (32, 3, 0.8, (26, 2)),
        (16, 3, 0.8, (13, 1)),
        (4096, 8, 0.8, (3280, 102)),
        (10, 3, 1.0, (10, 0)),
        (2, 3, 0.0, (2, 0)),  # more tasks than rank: all common (the reference would go negative)
        (5, 2, 0.0, (1, 2)),  # round(2.5) = 2 (half to even, as Python rounds)
    ],
)
def test_rank_budget(r, tasks, fraction, budget):
    k, p = rank_budget(r, tasks, fraction)
    assert (k, p) == budget and k + tasks * p == r


@pytest.mark.parametrize("shape,count", [((24, 16), 3), ((9, 30), 2)])
def test_full_common_space_is_iso_c(shape, count):
    base, experts = well_conditioned_experts(shape, count)
    a, diag = iso_cts_merge(base, experts, common_space_fraction=1.0)
    b, _ = iso_c_merge(base, experts)
    assert diag.per_task == 0
    assert torch.allclose(a, b, rtol=0, atol=1e-6)


def test_one_task_is_iso_c():
    base, experts = well_conditioned_experts((24, 16), 1)
    a, diag = iso_cts_merge(base, experts)
    b, _ = iso_c_merge(base, experts)
    assert (diag.k_common, diag.per_task) == (12, 4)
    assert rel_err(a - base, b - base) < 1e-5


def test_update_is_isotropic_with_full_rank():
    base, experts = well_conditioned_experts((20, 14), 3)
    out, diag = iso_cts_merge(base.double(), [e.double() for e in experts])
    s = torch.linalg.svdvals(out - base.double())
    assert torch.allclose(s, torch.full_like(s, diag.sigma_iso))


@pytest.mark.parametrize("fraction", [-0.1, 1.5, float("nan")])
def test_fraction_outside_unit_interval_is_refused(fraction):
    base, experts = well_conditioned_experts((8, 6), 2)
    with pytest.raises(ValueError, match="common_space_fraction"):
        iso_cts_merge(base, experts, common_space_fraction=fraction)


def test_non_2d_tensors_take_the_mean():
    base, experts = well_conditioned_experts((5,), 2)
    out, diag = iso_cts_merge(base, experts)
    assert diag.branch == "mean"
    assert torch.allclose(out, (experts[0] + experts[1]) / 2, rtol=0, atol=1e-6)


def test_polar_factor_survives_svd_failure(monkeypatch):
    """When LAPACK's SVD does not converge, the polar factor comes from X^T X instead."""
    from mergekit_ace.kernels import linalg

    X = torch.randn(40, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    expected = linalg.nearest_orthonormal(X)

    def failing_svd(*args, **kwargs):
        raise torch.linalg.LinAlgError("linalg.svd: The algorithm failed to converge")

    monkeypatch.setattr(torch.linalg, "svd", failing_svd)
    got = linalg.nearest_orthonormal(X)
    assert torch.allclose(got, expected, atol=1e-10)
    assert torch.allclose(got.T @ got, torch.eye(6, dtype=torch.float64), atol=1e-10)
