"""The ACTMat kernel against an explicit float64 pseudo-inverse (tests/family_reference.py),
in both of its forms, and the spec's exact cases: one task returns W_1, directions outside the
span of the Gram keep W0."""

import pytest
import torch

from mergekit_ace.kernels.actmat import actmat_merge
from mergekit_ace.kernels.inputs import MergeInputError
from tests.family_reference import reference_actmat
from tests.helpers import well_conditioned_experts
from tests.reference import rel_err

CASES = [
    # shape, experts, kwargs, form the kernel must pick
    ((24, 16), 3, {}, "inputs"),
    ((16, 24), 2, {}, "inputs"),  # T m = 32 >= n = 24
    ((4, 32), 3, {}, "tasks"),  # T m = 12 < n = 32
    ((6, 40), 2, {"weights": [3.0, 0.5]}, "tasks"),
    ((24, 16), 3, {"weights": [2.0, 1.0, 0.25], "lam": 0.6}, "inputs"),
]


@pytest.mark.parametrize("shape,count,kwargs,form", CASES)
def test_kernel_matches_explicit_pinv(shape, count, kwargs, form):
    base, experts = well_conditioned_experts(shape, count)
    out, diag = actmat_merge(base, experts, **kwargs)
    ref = reference_actmat(base, experts, **kwargs)
    assert diag.branch == "actmat" and diag.form == form
    assert diag.rank == min(count * shape[0], shape[1])
    assert out.dtype == torch.float32
    assert rel_err(out.double() - base.double(), ref - base.double()) < 1e-4
    out64, diag64 = actmat_merge(base.double(), [e.double() for e in experts], **kwargs)
    assert out64.dtype == torch.float64
    assert rel_err(out64 - base.double(), ref - base.double()) < 1e-10


@pytest.mark.parametrize("shape", [(24, 16), (4, 32)])
def test_one_task_returns_the_expert(shape):
    base, experts = well_conditioned_experts(shape, 1)
    out, diag = actmat_merge(base, experts)
    assert diag.form == ("tasks" if shape[0] < shape[1] else "inputs")
    assert rel_err(out - base, experts[0] - base) < 2e-6
    out64, _ = actmat_merge(base.double(), [experts[0].double()])
    assert torch.allclose(out64, experts[0].double(), rtol=0, atol=1e-12)


@pytest.mark.parametrize("shape", [(24, 16), (3, 40)])
def test_directions_outside_the_span_keep_the_base(shape):
    """Task vectors whose rows live in a 5-dim input subspace S: for x orthogonal to S the
    merged layer maps x exactly as W0 does, and the update stays in the deltas' column span."""
    m, n = shape
    g = torch.Generator().manual_seed(3)
    basis = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))[0]
    S, outside = basis[:, :5], basis[:, 5:]
    base = torch.randn(m, n, generator=g, dtype=torch.float64)
    deltas = [torch.randn(m, 5, generator=g, dtype=torch.float64) @ S.T for _ in range(3)]
    out, diag = actmat_merge(base, [base + d for d in deltas])
    assert diag.rank == min(5, 3 * m)
    assert torch.allclose(out @ outside, base @ outside, rtol=0, atol=1e-12)
    ref = reference_actmat(base, [base + d for d in deltas])
    assert rel_err(out - base, ref - base) < 1e-9
    cols = torch.linalg.svd(torch.cat(deltas, dim=1))[0][:, : min(m, 15)]
    update = out - base
    assert torch.allclose(update - cols @ (cols.T @ update), torch.zeros_like(update), atol=1e-12)


def test_one_task_with_a_rank_deficient_gram_returns_the_expert():
    base, _ = well_conditioned_experts((12, 20), 1)
    g = torch.Generator().manual_seed(5)
    delta = torch.randn(12, 2, generator=g) @ torch.randn(2, 20, generator=g)
    out, diag = actmat_merge(base, [base + delta])
    assert diag.rank == 2
    assert rel_err(out - base, delta) < 1e-5


def test_only_weight_ratios_matter_and_zero_leaves_a_model_out():
    base, experts = well_conditioned_experts((24, 16), 3)
    a, _ = actmat_merge(base, experts, weights=[1.0, 2.0, 3.0])
    b, _ = actmat_merge(base, experts, weights=[10.0, 20.0, 30.0])
    assert torch.allclose(a, b, rtol=0, atol=1e-5)
    c, diag = actmat_merge(base, experts, weights=[1.0, 0.0, 3.0])
    d, _ = actmat_merge(base, [experts[0], experts[2]], weights=[1.0, 3.0])
    assert diag.participants == [0, 2]
    assert torch.equal(c, d)


def test_lambda_scales_the_merged_task_vector():
    base, experts = well_conditioned_experts((24, 16), 3)
    one, _ = actmat_merge(base, experts)
    half, _ = actmat_merge(base, experts, lam=0.5)
    assert torch.allclose(half - base, 0.5 * (one - base), rtol=0, atol=1e-6)


def test_non_2d_tensors_take_the_weighted_mean():
    base, experts = well_conditioned_experts((16,), 3)
    out, diag = actmat_merge(base, experts, weights=[1.0, 1.0, 2.0])
    assert diag.branch == "mean"
    expected = base + (experts[0] + experts[1] + 2 * experts[2] - 4 * base) / 4
    assert torch.allclose(out, expected, rtol=0, atol=1e-6)


def test_unchanged_tensor_returns_the_base_and_bad_weights_are_refused():
    base, _ = well_conditioned_experts((8, 6), 1)
    out, diag = actmat_merge(base, [base.clone(), base.clone()])
    assert diag.branch == "unchanged" and torch.equal(out, base)
    with pytest.raises(MergeInputError, match="weight"):
        actmat_merge(base, [base + 1, base - 1], weights=[1.0, -1.0])


def test_bf16_inputs_compute_in_float32_and_return_bf16():
    base, experts = well_conditioned_experts((24, 16), 3)
    out, _ = actmat_merge(base.bfloat16(), [e.bfloat16() for e in experts])
    assert out.dtype == torch.bfloat16
    ref = reference_actmat(base.bfloat16(), [e.bfloat16() for e in experts])
    assert torch.allclose(out.double(), ref, rtol=2**-8, atol=1e-6)  # bf16 rounding only


def _tiny_model_experts(shape, seed):
    """Task vectors like the tiny test Llamas': rank 2 plus 20 % noise, scales 0.002 / 0.03 /
    0.01: the small expert's noise directions sit near the eigenvalue cutoff."""
    g = torch.Generator().manual_seed(seed)
    m, n = shape
    base = 0.02 * torch.randn(m, n, generator=g)
    experts = []
    for scale in (0.002, 0.03, 0.01):
        low = torch.randn(m, 2, generator=g) @ torch.randn(2, n, generator=g)
        experts.append(base + scale * (low + 0.2 * torch.randn(m, n, generator=g)))
    return base, experts


@pytest.mark.parametrize(
    "shape,seed", [((32, 64), 7), ((32, 64), 9), ((32, 128), 7), ((64, 32), 3)]
)
def test_float32_and_float64_agree(shape, seed):
    """The cutoff belongs to the method (``rtol``), not to the compute dtype: the same
    directions are kept in both, and the merges agree (they differed by up to 70 % when the
    cutoff came from each dtype's machine epsilon)."""
    base, experts = _tiny_model_experts(shape, seed)
    out32, d32 = actmat_merge(base, experts)
    out64, d64 = actmat_merge(base.double(), [e.double() for e in experts])
    assert d32.rank == d64.rank and d32.rtol == d64.rtol
    assert d32.rtol == max(3 * shape[0], shape[1]) * torch.finfo(torch.float32).eps
    assert rel_err(out32.double() - base.double(), out64 - base.double()) < 1e-3


def test_rtol_is_the_eigenvalue_cutoff():
    """``rtol`` keeps exactly the eigen-directions of the Gram above ``rtol * lambda_max``
    (checked against the Gram's eigenvalues), and ``rtol: 0`` in float64 is the exact
    pseudo-inverse."""
    base, experts = _tiny_model_experts((32, 64), 7)
    base, experts = base.double(), [e.double() for e in experts]
    gram = sum((e - base).T @ (e - base) for e in experts)
    evals = torch.linalg.eigvalsh(gram)
    for rtol in (1e-2, 1e-4, 1e-6):
        _, diag = actmat_merge(base, experts, rtol=rtol)
        assert diag.rtol == rtol and diag.rank == int((evals > rtol * evals.max()).sum())
    out, diag = actmat_merge(base, experts, rtol=0.0)
    assert diag.rank == 64
    assert rel_err(out - base, reference_actmat(base, experts) - base) < 1e-8


@pytest.mark.parametrize("rtol", [-1e-3, 1.0, float("nan"), "tiny"])
def test_bad_rtol_is_refused(rtol):
    base, experts = well_conditioned_experts((8, 6), 2)
    with pytest.raises(ValueError, match="rtol"):
        actmat_merge(base, experts, rtol=rtol)
