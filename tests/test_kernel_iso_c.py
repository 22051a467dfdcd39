"""The Iso-C kernel against a float64 re-derivation (tests/family_reference.py) and
hand-checkable cases."""

import pytest
import torch

from mergekit_ace.kernels.inputs import MergeInputError
from mergekit_ace.kernels.iso_c import iso_c_merge
from tests.family_reference import reference_iso_c
from tests.helpers import well_conditioned_experts
from tests.reference import rel_err


@pytest.mark.parametrize(
    "shape,count,lam", [((24, 16), 3, 1.0), ((16, 24), 2, 0.5), ((10, 10), 5, 1.3)]
)
def test_kernel_matches_reference(shape, count, lam):
    base, experts = well_conditioned_experts(shape, count)
    out, diag = iso_c_merge(base, experts, lam=lam)
    ref = reference_iso_c(base, experts, lam=lam)
    assert diag.branch == "iso_c" and diag.rank == min(shape)
    assert rel_err(out.double() - base.double(), ref - base.double()) < 1e-5
    out64, _ = iso_c_merge(base.double(), [e.double() for e in experts], lam=lam)
    assert rel_err(out64 - base.double(), ref - base.double()) < 1e-12


def test_one_task_by_hand():
    """tau = diag(3, 1) (padded to 3 x 2): singular values 3 and 1 become their mean, 2."""
    base = torch.ones(3, 2, dtype=torch.float64)
    tau = torch.tensor([[3.0, 0.0], [0.0, 1.0], [0.0, 0.0]], dtype=torch.float64)
    out, diag = iso_c_merge(base, [base + tau])
    assert diag.sigma_iso == pytest.approx(2.0)
    expected = torch.tensor([[2.0, 0.0], [0.0, 2.0], [0.0, 0.0]], dtype=torch.float64)
    assert torch.allclose(out - base, expected, rtol=0, atol=1e-12)


def test_flat_spectrum_and_sum_of_tasks():
    """The output's task vector has every singular value equal to the mean of the sum's
    singular values; with a flat-spectrum sum Iso-C is task arithmetic."""
    base, experts = well_conditioned_experts((12, 8), 3)
    out, diag = iso_c_merge(base.double(), [e.double() for e in experts])
    total = sum(e.double() - base.double() for e in experts)
    s = torch.linalg.svdvals(out - base.double())
    assert torch.allclose(s, torch.full_like(s, float(torch.linalg.svdvals(total).mean())))
    q = torch.linalg.qr(torch.randn(12, 8, dtype=torch.float64))[0]
    out, _ = iso_c_merge(torch.zeros(12, 8, dtype=torch.float64), [0.5 * q, 1.5 * q])
    assert torch.allclose(out, 2.0 * q, rtol=0, atol=1e-12)


def test_low_rank_sum_stays_in_its_span():
    """Numerically zero singular values (rank 2 here) neither join the mean nor get
    directions: the update is rank 2 with both singular values equal to the mean of the two."""
    g = torch.Generator().manual_seed(4)
    u = torch.randn(10, 2, generator=g, dtype=torch.float64)
    v = torch.randn(2, 8, generator=g, dtype=torch.float64)
    base = torch.zeros(10, 8, dtype=torch.float64)
    out, diag = iso_c_merge(base, [u[:, :1] @ v[:1], u[:, 1:] @ v[1:]])
    s_sum = torch.linalg.svdvals(u @ v)[:2]
    assert diag.rank == 2
    s = torch.linalg.svdvals(out)
    assert torch.allclose(s[:2], s_sum.mean().expand(2)) and float(s[2:].abs().max()) < 1e-12


def test_cancelling_tasks_leave_the_base_and_non_2d_take_the_mean():
    tau = torch.randn(6, 4)
    base = torch.zeros(6, 4)
    out, diag = iso_c_merge(base, [tau, -tau])
    assert diag.rank == 0 and torch.equal(out, base)
    base, experts = well_conditioned_experts((7,), 3)
    out, diag = iso_c_merge(base, experts)
    assert diag.branch == "mean"
    assert torch.allclose(out, sum(experts) / 3, rtol=0, atol=1e-6)


def test_per_model_weights_are_refused():
    base, experts = well_conditioned_experts((8, 6), 2)
    with pytest.raises(MergeInputError, match="weight"):
        iso_c_merge(base, experts, weights=[1.0, 1.0])


def test_float32_and_float64_keep_the_same_directions():
    """A singular value of 1e-6 s_max is round-off in float32 but resolved in float64. The
    numerical-rank cutoff uses float32's epsilon in every dtype, so both drop it and agree
    (with each dtype's own epsilon, float64 gave that direction the weight s_bar: 12.5 %)."""
    g = torch.Generator().manual_seed(0)
    U = torch.linalg.qr(torch.randn(64, 64, generator=g, dtype=torch.float64))[0]
    V = torch.linalg.qr(torch.randn(64, 64, generator=g, dtype=torch.float64))[0]
    s = torch.linspace(1.0, 0.5, 64, dtype=torch.float64)
    s[-1] = 1e-6
    base = torch.randn(64, 64, generator=g, dtype=torch.float64)
    expert = base + 0.01 * (U * s) @ V.T
    out32, d32 = iso_c_merge(base.float(), [expert.float()])
    out64, d64 = iso_c_merge(base, [expert])
    assert d32.rank == d64.rank == 63
    assert rel_err(out32.double() - base.float().double(), out64 - base) < 1e-3
