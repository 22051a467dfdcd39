"""The ACE kernel against the independent float64 re-derivation in tests/reference.py,
the paper's limiting cases (App. B.1) and the spec's decisions for degenerate inputs."""

import math

import pytest
import torch

from mergekit_ace.kernels.ace import ace_merge
from mergekit_ace.kernels.ace.parameters import heterogeneity, log_spread
from mergekit_ace.kernels.inputs import MergeInputError
from tests.helpers import low_rank_experts
from tests.reference import reference_ace, rel_err

# The paper's settings of the two parameters whose package defaults are the scale-free ones;
# most tests here check the paper's algorithm against the float64 re-derivation.
PAPER = {"eps": 1e-5, "gate_statistic": "gamma"}


CASES = [
    # shape, scales, kwargs, expected branch
    ((24, 16), (0.01, 1.0, 0.1), {}, "heterogeneous"),
    ((24, 16), (0.5, 0.6, 0.55), {}, "homogeneous"),
    ((24, 16), (0.01, 1.0, 0.1), {"prior": False}, "heterogeneous"),
    ((24, 16), (0.01, 1.0, 0.1), {"refine": False}, "heterogeneous"),
    ((24, 16), (0.01, 1.0, 0.1), {"prior": False, "refine": False}, "heterogeneous"),
    ((24, 16), (0.5, 0.6, 0.55), {"prior": False}, "homogeneous"),
    ((24, 16), (0.01, 1.0, 0.1), {"weights": [2.0, 1.0, 0.5]}, "heterogeneous"),
    ((24, 16), (0.5, 0.6, 0.55), {"weights": [0.2, 3.0, 1.0]}, "homogeneous"),
    ((24, 16), (0.5, 0.6, 0.55), {"gate": "on", "k_frac": 0.5}, "heterogeneous"),
    ((24, 16), (0.01, 1.0, 0.1), {"gate": "off"}, "homogeneous"),
    ((24, 16), (0.01, 1.0, 0.1), {"lam": 0.7, "eps": 1e-2}, "heterogeneous"),
    ((10, 32), (0.01, 1.0, 0.1, 0.3), {"eps": 1e-2}, "heterogeneous"),  # m < n: rank-deficient
    ((10, 32), (0.5, 0.6, 0.55), {"eps": 1e-2}, "homogeneous"),
    ((24, 16), (0.01, 1.0, 0.1), {"eps": "auto"}, "heterogeneous"),
    ((24, 16), (0.5, 0.6, 0.55), {"eps": "auto"}, "homogeneous"),
    ((24, 16), (0.5, 0.6, 0.55), {"gate_statistic": "log_spread", "tau": 0.01}, "heterogeneous"),
]


@pytest.mark.parametrize("shape,scales,kwargs,branch", CASES)
def test_kernel_matches_float64_reference(shape, scales, kwargs, branch):
    base, experts = low_rank_experts(shape, scales)
    kwargs = {**PAPER, **kwargs}
    out, diag = ace_merge(base, experts, **kwargs)
    ref, ref_branch = reference_ace(base, experts, **kwargs)
    assert diag.branch == branch == ref_branch
    assert out.dtype == torch.float32
    delta, ref_delta = out.double() - base.double(), ref - base.double()
    assert rel_err(delta, ref_delta) < 2e-4
    if diag.branch == "heterogeneous" and kwargs.get("refine", True):
        assert diag.k == math.floor(min(shape) * kwargs.get("k_frac", 0.3)) > 0
        assert diag.sigma_iso > 0


@pytest.mark.parametrize(
    "scales,branch", [((0.01, 1.0, 0.1), "heterogeneous"), ((0.5, 0.6, 0.55), "homogeneous")]
)
def test_defaults_are_eps_auto_and_log_spread(scales, branch):
    base, experts = low_rank_experts((24, 16), scales)
    out, diag = ace_merge(base, experts)
    ref, ref_branch = reference_ace(base, experts, eps="auto", gate_statistic="log_spread")
    assert diag.gate_statistic == "log_spread" and diag.branch == branch == ref_branch
    deltas = [e.double() - base.double() for e in experts]
    traces = [float((d - d.mean(dim=0)).square().sum()) for d in deltas]  # tr(C_t^T C_t)
    expected_ridge = 2.0**-12 * (1.0 if branch == "heterogeneous" else sum(traces) / 3)
    assert diag.ridge == pytest.approx(expected_ridge, rel=1e-5)
    assert rel_err(out.double() - base.double(), ref - base.double()) < 2e-4
    paper, _ = ace_merge(base, experts, **PAPER)
    assert rel_err(paper.double() - base.double(), ref - base.double()) > 1e-3


def test_gamma_matches_independent_formula():
    energies = [0.5, 3.0, 40.0]
    logs = torch.log(torch.tensor(energies, dtype=torch.float64) + 1e-12)
    expected = float(logs.var(unbiased=True) / (logs.mean() ** 2 + 1e-12))
    assert heterogeneity(energies) == pytest.approx(expected, rel=1e-12)
    base, experts = low_rank_experts((12, 8), (0.2, 1.0, 3.0))
    _, diag = ace_merge(base, experts)
    e = [float(((x.double() - base.double()) ** 2).sum()) for x in experts]
    assert diag.energies == pytest.approx(e, rel=1e-6)
    assert diag.gamma == pytest.approx(heterogeneity(e), rel=1e-6)


def test_float64_inputs_compute_in_float64():
    base, experts = low_rank_experts((24, 16), (0.01, 1.0, 0.1))
    out, _ = ace_merge(base.double(), [e.double() for e in experts], **PAPER)
    ref, _ = reference_ace(base, experts, **PAPER)
    assert out.dtype == torch.float64
    assert rel_err(out - base.double(), ref - base.double()) < 1e-10


def test_bf16_inputs_are_computed_in_float32_and_returned_in_bf16():
    base, experts = low_rank_experts((24, 16), (0.01, 1.0, 0.1))
    base16, experts16 = base.bfloat16(), [e.bfloat16() for e in experts]
    out, _ = ace_merge(base16, experts16, **PAPER)
    assert out.dtype == torch.bfloat16
    ref, _ = reference_ace(base16.float(), [e.float() for e in experts16], **PAPER)
    assert (
        torch.equal(out, ref.to(torch.bfloat16))
        or rel_err(out.float() - base16.float(), ref - base16.double()) < 1e-2
    )


# ---- limiting cases (paper App. B.1) ----


def test_large_eps_homogeneous_tends_to_mean_of_centered_task_vectors():
    base, experts = low_rank_experts((24, 16), (0.5, 0.6, 0.55))
    out, diag = ace_merge(base, experts, eps=1e8, gate="off")
    centered = [(e - base) - (e - base).mean(dim=0, keepdim=True) for e in experts]
    expected = sum(centered) / len(centered)
    assert diag.branch == "homogeneous"
    assert rel_err(out - base, expected) < 1e-5


def test_k_frac_zero_equals_no_refinement():
    base, experts = low_rank_experts((24, 16), (0.01, 1.0, 0.1))
    a, da = ace_merge(base, experts, k_frac=0.0)
    b, _ = ace_merge(base, experts, refine=False)
    assert da.branch == "heterogeneous" and da.k == 0 and da.sigma_iso is None
    assert torch.equal(a, b)


def test_tau_limits():
    base, experts = low_rank_experts((24, 16), (0.01, 1.0, 0.1))
    assert ace_merge(base, experts, tau=1e12)[1].branch == "homogeneous"
    base, experts = low_rank_experts((24, 16), (0.5, 0.6, 0.55))
    assert ace_merge(base, experts, tau=0.0)[1].branch == "heterogeneous"
    # equal energies: gamma == 0, so even tau = 0 stays homogeneous
    delta, zero = experts[0] - base, torch.zeros_like(base)  # exact task vectors
    equal = [delta, delta.flip(0), -delta]
    _, diag = ace_merge(zero, equal, tau=0.0)
    assert diag.gamma == pytest.approx(0.0, abs=1e-12)
    assert diag.branch == "homogeneous"


def test_trace_normalization_makes_heterogeneous_proxies_scale_invariant():
    # Heterogeneous, eps = 0, no prior/refinement: W_pre = (sum C_t Shat_t)(sum Shat_t)^-1.
    # Shat_t does not change when tau_t is rescaled, so W_pre is linear in each C_t.
    base, experts = low_rank_experts((24, 16), (0.01, 1.0, 0.1))
    b = base.double()
    kw = dict(gate="on", prior=False, refine=False, eps=0.0)
    deltas = [e.double() - b for e in experts]
    out, _ = ace_merge(b, [b + d for d in deltas], **kw)
    out_s, _ = ace_merge(b, [b + 10.0 * deltas[0]] + [b + d for d in deltas[1:]], **kw)
    C0 = deltas[0] - deltas[0].mean(dim=0, keepdim=True)
    shat = [(d - d.mean(0)).T @ (d - d.mean(0)) for d in deltas]
    shat = [x / torch.trace(x) for x in shat]
    expected_change = 9.0 * C0 @ shat[0] @ torch.linalg.inv(sum(shat))
    assert rel_err(out_s - out, expected_change) < 1e-8


def test_paper_gamma_gate_depends_on_units():
    base, experts = low_rank_experts((24, 16), (0.5, 1.0, 0.7))
    zero = torch.zeros_like(base)
    deltas = [e - base for e in experts]
    # energies near 1 make mean(log e) ~ 0, so the same experts in other units flip branch
    near_one = ace_merge(zero, [0.1 * d for d in deltas], **PAPER)[1]
    large = ace_merge(zero, deltas, **PAPER)[1]
    assert near_one.log_spread == pytest.approx(large.log_spread, rel=1e-6)
    assert (near_one.branch, large.branch) == ("heterogeneous", "homogeneous")


def test_log_spread_is_unit_free_and_gamma_is_not():
    energies = [0.5, 3.0, 40.0]
    scaled = [e * 1e4 for e in energies]
    assert log_spread(scaled) == pytest.approx(log_spread(energies), rel=1e-12)
    assert heterogeneity(scaled) != pytest.approx(heterogeneity(energies), rel=1e-3)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"gate": "off"},  # homogeneous branch, prior and refinement irrelevant / on
        {"gate": "off", "prior": False},
        {"gate": "on", "prior": False},  # heterogeneous with refinement
        {"gate_statistic": "log_spread"},  # heterogeneous, prior and refinement on
        {"gate_statistic": "log_spread", "tau": 100.0},
    ],
)
def test_eps_auto_is_scale_equivariant(kwargs):
    base, experts = low_rank_experts((24, 16), (0.05, 1.0, 0.2))
    alpha = 37.0
    out, d1 = ace_merge(base.double(), [e.double() for e in experts], eps="auto", **kwargs)
    scaled = [base.double() + alpha * (e.double() - base.double()) for e in experts]
    out_s, d2 = ace_merge(base.double(), scaled, eps="auto", **kwargs)
    assert d1.branch == d2.branch
    assert rel_err(out_s - base.double(), alpha * (out - base.double())) < 1e-9


@pytest.mark.parametrize("kwargs", [{"gate": "off"}, {"gate": "on", "prior": False}])
def test_fixed_eps_on_rescaled_task_vectors_is_a_rescaled_eps(kwargs):
    # With a fixed eps, multiplying every task vector by a is the same as merging the
    # original experts with eps / a^2 and multiplying the result by a (homogeneous branch,
    # or heterogeneous without the energy-normalized prior): an eps sweep is a sweep over
    # the units of the task vectors. docs/benchmarks.md reads its eps sweep this way.
    base, experts = low_rank_experts((24, 16), (0.05, 1.0, 0.2))
    b = base.double()
    alpha, eps = 10.0, 1e-3
    scaled = [b + alpha * (e.double() - b) for e in experts]
    out_s, _ = ace_merge(b, scaled, eps=eps, **kwargs)
    out, _ = ace_merge(b, [e.double() for e in experts], eps=eps / alpha**2, **kwargs)
    assert rel_err(out_s - b, alpha * (out - b)) < 1e-9
    unscaled_eps, _ = ace_merge(b, [e.double() for e in experts], eps=eps, **kwargs)
    assert rel_err(out_s - b, alpha * (unscaled_eps - b)) > 1e-3


# ---- decisions for degenerate inputs ----


def test_zero_delta_expert_is_excluded():
    base, experts = low_rank_experts((24, 16), (0.01, 1.0))
    with_unchanged, diag = ace_merge(base, experts + [base.clone()])
    without, _ = ace_merge(base, experts)
    assert diag.participants == [0, 1]
    assert torch.allclose(with_unchanged, without, rtol=0, atol=1e-6)


def test_no_expert_changed_the_tensor_returns_base():
    base, _ = low_rank_experts((24, 16), ())
    out, diag = ace_merge(base, [base.clone(), base.clone()])
    assert diag.branch == "unchanged"
    assert torch.equal(out, base)


def test_small_tensor_with_k_zero_skips_refinement_without_nan():
    base, experts = low_rank_experts((2, 3), (0.01, 1.0, 0.1), rank=1)
    out, diag = ace_merge(base, experts, gate="on", **PAPER)
    assert diag.k == 0 and torch.isfinite(out).all()
    ref, _ = reference_ace(base, experts, gate="on", **PAPER)
    assert rel_err(out - base, ref - base.double()) < 1e-4


def test_singular_system_falls_back_to_least_squares():
    # eps = 0 and m < n: every proxy has rank < n, so sum R_t is singular.
    base, experts = low_rank_experts((6, 16), (0.5, 0.6), rank=1)
    out, diag = ace_merge(base, experts, eps=0.0, gate="off", prior=False)
    assert diag.solver == "lstsq"
    assert torch.isfinite(out).all()
    ref, _ = reference_ace(base, experts, eps=0.0, gate="off", prior=False, singular=True)
    assert rel_err(out - base, ref - base.double()) < 1e-3


def test_single_expert_uses_homogeneous_branch():
    base, experts = low_rank_experts((24, 16), (0.3,))
    out, diag = ace_merge(base, experts)
    assert diag.gamma is None and diag.log_spread is None and diag.branch == "homogeneous"
    ref, _ = reference_ace(base, experts, eps="auto")
    assert rel_err(out - base, ref - base.double()) < 1e-4


def test_non_finite_input_names_tensor_and_model():
    base, experts = low_rank_experts((8, 4), (0.1, 0.2))
    experts[1] = experts[1].clone()
    experts[1][3, 2] = float("nan")
    with pytest.raises(
        MergeInputError,
        match=r"model\.layers\.0\.mlp\.up_proj\.weight.*org/math-expert.*non-finite",
    ):
        ace_merge(
            base,
            experts,
            tensor_name="model.layers.0.mlp.up_proj.weight",
            expert_names=["org/code-expert", "org/math-expert"],
        )


def test_non_2d_tensors_take_weighted_mean_of_task_vectors():
    base, experts = low_rank_experts((16,), (0.1, 0.2, 0.3))
    out, diag = ace_merge(base, experts, weights=[1.0, 2.0, 1.0], lam=0.5)
    deltas = [e - base for e in experts]
    expected = base + 0.5 * (deltas[0] + 2 * deltas[1] + deltas[2]) / 4
    assert diag.branch == "mean"
    assert torch.allclose(out, expected, atol=1e-6)


def test_weights_only_ratios_matter_and_zero_removes_a_task():
    base, experts = low_rank_experts((24, 16), (0.01, 1.0, 0.1))
    a, _ = ace_merge(base, experts, weights=[1.0, 2.0, 3.0])
    b, _ = ace_merge(base, experts, weights=[10.0, 20.0, 30.0])
    assert torch.allclose(a, b, atol=1e-5)
    c, diag = ace_merge(base, experts, weights=[1.0, 0.0, 1.0])
    d, _ = ace_merge(base, [experts[0], experts[2]])
    assert diag.participants == [0, 2]
    assert torch.allclose(c, d, atol=1e-6)


@pytest.mark.parametrize(
    "weights,match",
    [([1.0, -1.0], "weights must be finite and >= 0"), ([0.0, 0.0], "every model's weight is 0")],
)
def test_bad_weights_are_refused(weights, match):
    base, experts = low_rank_experts((8, 4), (0.1, 0.2))
    with pytest.raises(MergeInputError, match=match):
        ace_merge(base, experts, weights=weights)


@pytest.mark.parametrize(
    "kwargs,name",
    [
        ({"eps": -1.0}, "eps"),
        ({"k_frac": 1.5}, "k_frac"),
        ({"gate": "maybe"}, "gate"),
        ({"tau": -0.1}, "tau"),
        ({"gate_statistic": "x"}, "gate_statistic"),
    ],
)
def test_bad_parameters_name_the_parameter(kwargs, name):
    base, experts = low_rank_experts((8, 4), (0.1, 0.2))
    with pytest.raises(ValueError, match=name):
        ace_merge(base, experts, **kwargs)


def test_spectral_concentration_diagnostics():
    base, experts = low_rank_experts((40, 40), (0.01, 1.0, 0.1), rank=1)
    _, diag = ace_merge(base, experts, spectra=True)
    s = torch.tensor(diag.singular_values_pre, dtype=torch.float64)
    top = math.ceil(0.05 * s.numel())
    assert diag.concentration_pre == pytest.approx(
        float((s[:top] ** 2).sum() / (s**2).sum()), rel=1e-9
    )
    assert 0 < diag.concentration_post <= 1
