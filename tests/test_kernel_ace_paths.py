"""The ACE kernel's fast paths (Cholesky + Sherman-Morrison solve, Gram-eigh spectral step,
reassociated Gram products) and their fallbacks, each against tests/reference.py; the cost
estimate and the out-of-memory decision for CUDA inputs (tested without a GPU)."""

import logging
import math

import pytest
import torch

import mergekit_ace.kernels.ace.fallback as fallback
import mergekit_ace.kernels.ace.refine as refine
import mergekit_ace.kernels.ace.settings as settings
import mergekit_ace.kernels.ace.workspace as workspace
from mergekit_ace.kernels.ace import AceOutOfMemoryError, ace_merge, estimate_ace_cost
from mergekit_ace.kernels.ace.fallback import needs_cpu_fallback
from mergekit_ace.kernels.linalg import RightSolver, short_side_gram, top_k_isotropic_update
from tests.reference import reference_ace, rel_err
from tests.helpers import low_rank_experts

SHAPES = [
    ((24, 16), (0.01, 1.0, 0.1)),  # m >= n: C^T C formed per task
    ((10, 32), (0.01, 1.0, 0.1, 0.3)),  # 2m < n: (C C^T) C reassociation
    ((16, 24), (0.5, 0.6, 0.55)),
]  # n/2 <= m < n, homogeneous


@pytest.mark.parametrize("shape,scales", SHAPES)
@pytest.mark.parametrize("force", ["none", "lu", "svd", "both"])
def test_fast_paths_and_fallbacks_match_reference(shape, scales, force, monkeypatch):
    if force in ("lu", "both"):
        monkeypatch.setattr(RightSolver, "_cholesky", classmethod(lambda cls, B, c: None))
    if force in ("svd", "both"):
        monkeypatch.setattr(refine, "isotropic_projector", lambda G, k, floor=0.0: None)
    base, experts = low_rank_experts(shape, scales)
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
    solver = RightSolver.factor(B.float(), c.float())
    got, info = solver.solve(N.float()), solver.info
    assert info.method == "cholesky" and 0 < info.rcond <= 1
    assert rel_err(got, expected) < 1e-4
    # rows are independent: blocks of rows give the same answer
    assert (
        rel_err(torch.cat([solver.solve(N[:3].float()), solver.solve(N[3:].float())]), got) < 1e-6
    )


def test_cholesky_solve_declines_indefinite_or_singular_systems():
    B = torch.diag(torch.tensor([1.0, -1.0, 2.0]))
    assert RightSolver._cholesky(B, torch.zeros(3)) is None
    solver = RightSolver.factor(B, torch.zeros(3))
    assert solver.info.method == "lu"
    assert rel_err(solver.solve(torch.ones(2, 3)) @ B, torch.ones(2, 3)) < 1e-6
    # 1 + 1^T B^{-1} c = 0: B + 1 c^T is singular although B is not.
    B = torch.eye(3)
    c = torch.tensor([-1.0, 0.0, 0.0])
    assert RightSolver._cholesky(B, c) is None
    assert RightSolver.factor(B, c).info.method == "lstsq"


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
    whole = short_side_gram(F)
    blocks = short_side_gram(F, block_bytes=8 * 12 * 7)  # blocks of 7 rows
    assert rel_err(blocks, whole) < 1e-12
    assert rel_err(whole, F.double().T @ F.double()) < 1e-12
    assert rel_err(short_side_gram(F.T, block_bytes=8 * 12 * 7), whole) < 1e-12  # wide: F F^T


# Row blocks of 5 rows and no second [m, n] buffer: the streaming plan of the embeddings,
# on tensors small enough to check against the float64 reference.
@pytest.mark.parametrize(
    "shape,scales", SHAPES + [((37, 8), (0.02, 1.0, 0.3)), ((37, 8), (0.5, 0.6, 0.55))]
)
@pytest.mark.parametrize(
    "kwargs",
    [{"eps": 1e-2, "gate_statistic": "gamma"}, {}, {"gate": "on"}, {"gate": "on", "prior": False}],
)
def test_blocked_and_streaming_plans_match_reference(shape, scales, kwargs, monkeypatch):
    base, experts = low_rank_experts(shape, scales)
    whole, _ = ace_merge(base, experts, **kwargs)
    monkeypatch.setattr(workspace, "BLOCK_BYTES", 5 * shape[1] * 4)
    monkeypatch.setattr(workspace, "STREAM_BLOCK_BYTES", 5 * shape[1] * 4)
    monkeypatch.setattr(workspace, "KEEP_F_BYTES", 0)
    out, diag = ace_merge(base, experts, **kwargs)
    plan = estimate_ace_cost(shape, len(experts), k_frac=0.3 if diag.k else 0.0)["plan"]
    if 2 * shape[0] >= shape[1]:
        assert plan.block_rows == 5 and len(plan.blocks) > 1
        assert plan.keep_f == (diag.k == 0)
    ref, branch = reference_ace(
        base, experts, **{"eps": "auto", "gate_statistic": "log_spread", **kwargs}
    )
    assert diag.branch == branch
    assert rel_err(out - base, ref - base.double()) < 2e-4
    assert rel_err(out - base, whole - base) < 1e-4


def test_streaming_plan_falls_back_to_svd(monkeypatch):
    base, experts = low_rank_experts((37, 8), (0.02, 1.0, 0.3))
    monkeypatch.setattr(workspace, "STREAM_BLOCK_BYTES", 5 * 8 * 4)
    monkeypatch.setattr(workspace, "KEEP_F_BYTES", 0)
    monkeypatch.setattr(refine, "isotropic_projector", lambda G, k, floor=0.0: None)
    out, diag = ace_merge(base, experts, gate="on")
    assert diag.spectral == "svd"
    ref, _ = reference_ace(base, experts, eps="auto", gate_statistic="log_spread", gate="on")
    assert rel_err(out - base, ref - base.double()) < 2e-4


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


def test_float64_share_of_the_work():
    """The refinement's Gram of F (``x^T x`` on F's short side, blocks above the diagonal once:
    k (r^2 + 4 (r/4)^2) for four blocks of r/4) and its eigh (10 r^3 / 3) run in float64
    whatever the compute dtype; the rest in it."""
    m, n, r = 4096, 14336, 4096
    het = estimate_ace_cost((m, n), 3)
    gram_of_f = n * (r * r + 4 * (r // 4) ** 2)
    assert het["flops_float64"] == pytest.approx(gram_of_f + 10 * r**3 / 3)
    assert het["flops_float64"] < het["flops_spectral"] < het["flops"]
    assert het["flops"] == pytest.approx(
        het["flops_grams"] + het["flops_solve"] + het["flops_spectral"]
    )
    assert estimate_ace_cost((m, n), 3, refine=False)["flops_float64"] == 0
    in_float64 = estimate_ace_cost((m, n), 3, 8)
    assert in_float64["flops_float64"] == in_float64["flops"]
    assert estimate_ace_cost((8,), 3)["flops_float64"] == 0
    assert estimate_ace_cost((8,), 3, 8)["flops_float64"] == estimate_ace_cost((8,), 3)["flops"]


LLAMA3_8B = {
    "q_proj": (4096, 4096),
    "k_proj": (1024, 4096),
    "gate_proj": (14336, 4096),
    "down_proj": (4096, 14336),
    "embed_tokens": (128256, 4096),
}


@pytest.mark.parametrize("name", list(LLAMA3_8B))
def test_no_llama3_8b_tensor_needs_more_than_4_gib(name):
    shape = LLAMA3_8B[name]
    for refined in (True, False):
        costs = [estimate_ace_cost(shape, t, refine=refined) for t in (2, 3, 8, 16)]
        assert len({c["bytes"] for c in costs}) == 1  # flat in T
        assert costs[0]["bytes"] <= 4 * 2**30, (name, refined, costs[0]["bytes"] / 2**30)
    plan = estimate_ace_cost(shape, 3)["plan"]
    # Only the embeddings are too large to keep F beside N: they stream it.
    assert plan.keep_f == (name != "embed_tokens")
    assert estimate_ace_cost(shape, 3, k_frac=0.0)["flops_spectral"] == 0


def test_oom_decision_fits_falls_back_or_raises(caplog):
    shape, need = (4096, 14336), estimate_ace_cost((4096, 14336), 8)["bytes"]
    assert not needs_cpu_fallback(
        shape, 8, 4, 2 * need, tensor_name="model.layers.0.mlp.down_proj.weight"
    )
    with caplog.at_level(logging.WARNING, logger="mergekit_ace.kernels.ace"):
        assert needs_cpu_fallback(
            shape, 8, 4, need // 2, tensor_name="model.layers.0.mlp.down_proj.weight"
        )
    assert "model.layers.0.mlp.down_proj.weight" in caplog.text and "on the CPU" in caplog.text
    assert "[4096, 14336]" in caplog.text and "GiB is free" in caplog.text
    with pytest.raises(AceOutOfMemoryError, match=r"down_proj.*GiB.*oom_fallback: cpu"):
        needs_cpu_fallback(
            shape,
            8,
            4,
            need // 2,
            policy="error",
            tensor_name="model.layers.0.mlp.down_proj.weight",
        )


def test_oom_fallback_parameter_is_validated_and_ignored_on_cpu():
    base, experts = low_rank_experts((24, 16), (0.01, 1.0, 0.1))
    a, _ = ace_merge(base, experts)
    b, diag = ace_merge(base, experts, oom_fallback="error", free_device_bytes=0)
    assert torch.equal(a, b) and diag.device is None
    with pytest.raises(ValueError, match="oom_fallback"):
        ace_merge(base, experts, oom_fallback="gpu")


def test_cuda_inputs_that_do_not_fit_are_merged_on_cpu(monkeypatch):
    """The fallback branch, driven on CPU tensors that claim to live on CUDA."""
    base, experts = low_rank_experts((24, 16), (0.01, 1.0, 0.1))
    expected, _ = ace_merge(base, experts)

    class FakeCuda(torch.Tensor):
        @property
        def device(self):
            return torch.device("cuda", 0)

        def cpu(self):
            return self.as_subclass(torch.Tensor)

    monkeypatch.setattr(fallback, "return_to", lambda tensor, device: tensor)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    fake_base = base.clone().as_subclass(FakeCuda)
    fake_experts = [e.clone().as_subclass(FakeCuda) for e in experts]
    out, diag = ace_merge(fake_base, fake_experts, free_device_bytes=0, tensor_name="w")
    assert diag.device == "cpu (fallback)"
    assert torch.equal(out.as_subclass(torch.Tensor), expected)
    with pytest.raises(AceOutOfMemoryError, match="'w'"):
        ace_merge(
            fake_base, fake_experts, free_device_bytes=0, tensor_name="w", oom_fallback="error"
        )


def test_adapter_exposes_oom_fallback():
    from mergekit_ace.methods.ace import ace_method

    params = {p.name: p for p in ace_method().spec.parameters}
    assert params["oom_fallback"].default == "cpu"


def test_tf32_split_is_exact_and_its_head_fits_tf32():
    from mergekit_ace.kernels.linalg import tf32_split

    x = torch.randn(300, generator=torch.Generator().manual_seed(5)) * 1e3
    head, rest = tf32_split(x)
    for part in (head, rest):  # what tensor cores read of them is all there is
        assert int((part.view(torch.int32) & 0x1FFF).abs().sum()) == 0  # low 13 bits clear
    assert bool(((x - head).abs() <= 2.0**-11 * x.abs()).all())  # rounded, not truncated
    assert bool(((head.double() + rest.double() - x.double()).abs() <= 2.0**-22 * x.abs()).all())
    # rounding is symmetric: -x splits into -head, -rest
    neg_head, neg_rest = tf32_split(-x)
    assert torch.equal(neg_head, -head) and torch.equal(neg_rest, -rest)


@pytest.mark.parametrize("precision", ["float32", "tf32x3", "tf32"])
def test_split_products_equal_plain_products_on_cpu(precision):
    """The split algebra (three products, the Gram's symmetric cross term) is exact math;
    on a CPU, which has no TF32, every precision gives float32 products."""
    from mergekit_ace.kernels.linalg import add_gram_, addmm_, gram

    g = torch.Generator().manual_seed(6)
    a, b = torch.randn(40, 30, generator=g), torch.randn(30, 20, generator=g)
    out = torch.ones(40, 20)
    expected = torch.ones(40, 20, dtype=torch.float64) + 0.5 * a.double() @ b.double()
    assert rel_err(addmm_(out, a, b, alpha=0.5, precision=precision), expected) < 1e-6
    assert rel_err(gram(a, precision=precision), a.double().T @ a.double()) < 1e-6
    assert rel_err(gram(a, rows=True, precision=precision), a.double() @ a.double().T) < 1e-6
    twice = add_gram_(gram(a, precision=precision), a, alpha=2.0, precision=precision)
    assert rel_err(twice, 3 * a.double().T @ a.double()) < 1e-6


def test_matmul_precision_resolves_to_float32_off_cuda_and_is_validated():
    from mergekit_ace.kernels.linalg import resolve_matmul_precision

    for p in ("auto", "float32", "tf32x3", "tf32"):
        assert resolve_matmul_precision(p, torch.device("cpu"), torch.float32) == "float32"
    base, experts = low_rank_experts((24, 16), (0.01, 1.0, 0.1))
    a, diag = ace_merge(base, experts, matmul_precision="tf32")
    assert diag.matmul == "float32" and torch.equal(a, ace_merge(base, experts)[0])
    with pytest.raises(ValueError, match="matmul_precision"):
        ace_merge(base, experts, matmul_precision="bf16")


@pytest.mark.parametrize("shape,scales", SHAPES + [((37, 8), (0.02, 1.0, 0.3))])
@pytest.mark.parametrize("stream", [False, True])
def test_split_products_through_the_kernel_match_reference(shape, scales, stream, monkeypatch):
    """The tf32x3 code path (run in float32 here, where TF32 does not exist) gives the
    float64 reference's answer on every plan."""
    monkeypatch.setattr(settings, "resolve_matmul_precision", lambda p, d, t: "tf32x3")
    if stream:
        monkeypatch.setattr(workspace, "STREAM_BLOCK_BYTES", 5 * shape[1] * 4)
        monkeypatch.setattr(workspace, "KEEP_F_BYTES", 0)
    base, experts = low_rank_experts(shape, scales)
    for gate in ("on", "off"):
        out, diag = ace_merge(base, experts, gate=gate)
        assert diag.matmul == "tf32x3"
        ref, _ = reference_ace(base, experts, eps="auto", gate_statistic="log_spread", gate=gate)
        assert rel_err(out - base, ref - base.double()) < 2e-4


def test_split_products_in_column_blocks_equal_one_product(monkeypatch):
    import mergekit_ace.kernels.linalg as linalg

    g = torch.Generator().manual_seed(8)
    a, b = torch.randn(12, 40, generator=g), torch.randn(40, 33, generator=g)
    whole = linalg.addmm_(torch.zeros(12, 33), a, b, alpha=2.0, precision="tf32x3")
    monkeypatch.setattr(linalg, "SPLIT_BLOCK_BYTES", 40 * 4 * 5)  # 5 columns at a time
    blocks = linalg.addmm_(torch.zeros(12, 33), a, b, alpha=2.0, precision="tf32x3")
    assert rel_err(blocks, whole) < 1e-6
    assert rel_err(blocks, 2 * a.double() @ b.double()) < 1e-6


@pytest.mark.parametrize("width", [1, 7, 12, 23])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_symmetric_products_in_blocks_equal_full_products(width, dtype, monkeypatch):
    """Blocks of at least 5 columns (the last narrower), the upper ones mirrored: every entry is
    a dot product of two columns, as in one full product, so the result is as accurate."""
    import mergekit_ace.kernels.linalg as linalg

    monkeypatch.setattr(linalg, "SYMMETRIC_BLOCK_MIN", 5)
    blocks = linalg._symmetric_blocks(width)
    assert len(blocks) == {1: 1, 7: 2, 12: 3, 23: 4}[width]
    g = torch.Generator().manual_seed(7)
    x = torch.randn(31, width, generator=g, dtype=dtype)
    x[:, 0] *= 100.0
    full = x.double().T @ x.double()
    tol = 1e-6 if dtype == torch.float32 else 1e-13
    out = linalg.add_symmetric_(torch.ones(width, width, dtype=dtype), x, alpha=-0.5)
    assert rel_err(out, 1.0 - 0.5 * full) < tol
    for precision in ("float32", "tf32"):  # one product each (no TF32 off CUDA)
        got = linalg.gram(x, precision=precision)
        assert rel_err(got, full) < tol
        for (i0, i1), (j0, j1) in zip(blocks, blocks[1:]):  # mirrored, not recomputed
            assert torch.equal(got[j0:j1, i0:i1], got[i0:i1, j0:j1].T)
        rows = linalg.gram(x.T.contiguous(), rows=True, precision=precision)
        assert rel_err(rows, full) < tol
        acc = linalg.add_gram_(
            torch.zeros(width, width, dtype=dtype), x, alpha=2.0, precision=precision
        )
        assert rel_err(acc, 2 * full) < tol
    assert rel_err(linalg.short_side_gram(x.T), full) < 1e-13  # wide: rows of the short side


def test_symmetric_product_flops_count_the_blocks():
    from mergekit_ace.kernels.linalg import symmetric_product_flops

    # width 1000: four blocks of 250 (above the 192 minimum); width 576: three of 192;
    # width 100: one block, a full product
    assert symmetric_product_flops(7, 1000) == 7 * (1000**2 + 4 * 250**2)
    assert symmetric_product_flops(7, 576) == 7 * (576**2 + 3 * 192**2)
    assert symmetric_product_flops(7, 100) == 2 * 7 * 100**2


@pytest.mark.parametrize("shape,scales", SHAPES + [((37, 8), (0.02, 1.0, 0.3))])
@pytest.mark.parametrize("gate", ["on", "off"])
def test_kernel_with_symmetric_blocks_matches_reference(shape, scales, gate, monkeypatch):
    import mergekit_ace.kernels.linalg as linalg

    base, experts = low_rank_experts(shape, scales)
    whole, _ = ace_merge(base, experts, gate=gate)
    monkeypatch.setattr(linalg, "SYMMETRIC_BLOCK_MIN", 3)
    blocked, _ = ace_merge(base, experts, gate=gate)
    ref, _ = reference_ace(base, experts, eps="auto", gate_statistic="log_spread", gate=gate)
    assert rel_err(blocked - base, ref - base.double()) < 2e-4
    assert rel_err(blocked - base, whole - base) < 1e-4
