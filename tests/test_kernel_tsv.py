"""The TSV-M kernel against a float64 re-derivation in the layout of the authors' code
(tests/family_reference.py) and hand-checkable cases."""

import pytest
import torch

from mergekit_ace.kernels.inputs import MergeInputError
from mergekit_ace.kernels.tsv import tsv_merge
from tests.family_reference import reference_tsv
from tests.helpers import well_conditioned_experts
from tests.reference import rel_err

CASES = [
    # shape, experts, lam, k = floor(r / T)
    ((24, 16), 3, 1.0, 5),  # T k = 15 < r: one direction unused
    ((16, 24), 2, 1.0, 8),  # T k = r
    ((20, 20), 4, 0.7, 5),
    ((30, 9), 3, 1.0, 3),
]


@pytest.mark.parametrize("shape,count,lam,k", CASES)
def test_kernel_matches_reference(shape, count, lam, k):
    base, experts = well_conditioned_experts(shape, count)
    out, diag = tsv_merge(base, experts, lam=lam)
    ref = reference_tsv(base, experts, lam=lam)
    assert diag.branch == "tsv" and diag.k == k and diag.kept == [k] * count
    assert diag.rank == k * count
    assert out.dtype == torch.float32
    assert rel_err(out.double() - base.double(), ref - base.double()) < 1e-5
    out64, _ = tsv_merge(base.double(), [e.double() for e in experts], lam=lam)
    assert rel_err(out64 - base.double(), ref - base.double()) < 1e-12


def test_one_task_returns_the_expert():
    base, experts = well_conditioned_experts((24, 16), 1)
    out, diag = tsv_merge(base, experts)
    assert diag.k == 16
    assert rel_err(out - base, experts[0] - base) < 1e-6


def test_mutually_orthogonal_task_vectors_are_summed():
    """Task vectors on disjoint row and column blocks, each of rank <= k: the concatenated
    singular vectors are already orthonormal, so TSV-M is plain task arithmetic."""
    g = torch.Generator().manual_seed(1)
    base = torch.randn(12, 9, generator=g, dtype=torch.float64)
    deltas = []
    for t in range(3):  # r = 9, T = 3, k = 3; task t lives on rows 4t..4t+3, columns 3t..3t+2
        d = torch.zeros(12, 9, dtype=torch.float64)
        d[4 * t : 4 * t + 4, 3 * t : 3 * t + 3] = torch.randn(
            4, 3, generator=g, dtype=torch.float64
        )
        deltas.append(d)
    out, diag = tsv_merge(base, [base + d for d in deltas])
    assert diag.k == 3 and diag.rank == 9
    assert torch.allclose(out, base + sum(deltas), rtol=0, atol=1e-12)


def test_low_rank_task_vectors_contribute_only_their_rank():
    g = torch.Generator().manual_seed(2)
    base = torch.zeros(12, 12, dtype=torch.float64)
    d1 = torch.randn(12, 1, generator=g, dtype=torch.float64) @ torch.randn(
        1, 12, generator=g, dtype=torch.float64
    )
    d2 = torch.randn(12, 12, generator=g, dtype=torch.float64)
    out, diag = tsv_merge(base, [d1, d2])
    assert diag.k == 6 and diag.kept == [1, 6]


def test_order_of_the_experts_does_not_matter():
    base, experts = well_conditioned_experts((24, 16), 3)
    a, _ = tsv_merge(base, experts)
    b, _ = tsv_merge(base, experts[::-1])
    assert torch.allclose(a, b, rtol=0, atol=1e-5)


def test_more_tasks_than_rank_falls_back_to_the_mean():
    base, experts = well_conditioned_experts((8, 2), 3)  # r = 2 < T = 3: floor(r / T) = 0
    out, diag = tsv_merge(base, experts)
    assert diag.branch == "mean" and "floor" in diag.reason
    assert torch.allclose(out, sum(experts) / 3, rtol=0, atol=1e-6)
    assert rel_err(out, reference_tsv(base, experts)) < 1e-6


def test_non_2d_tensors_take_the_mean_and_zero_task_vectors_do_not_count():
    base, experts = well_conditioned_experts((16,), 2)
    out, diag = tsv_merge(base, experts + [base.clone()])
    assert diag.branch == "mean" and diag.participants == [0, 1]
    assert torch.allclose(out, (experts[0] + experts[1]) / 2, rtol=0, atol=1e-6)


def test_per_model_weights_are_refused():
    base, experts = well_conditioned_experts((8, 6), 2)
    with pytest.raises(MergeInputError, match="weight"):
        tsv_merge(base, experts, weights=[1.0, 2.0])
