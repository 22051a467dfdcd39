"""The ACE system's condition number: bounded from the ridge, measured from the Cholesky factor
where float round-off could matter, reported by the kernel, and turned into a warning when
float32 can change the merged update by more than 1 % (a fixed ``eps`` too small for the
experts' scale)."""

import logging
import math
import re

import pytest
import torch

from mergekit_ace.kernels.ace import ace_merge
from mergekit_ace.kernels.linalg import (
    ACCURACY_WARN,
    RightSolver,
    cholesky_condition,
    unit_roundoff,
)
from mergekit_ace.kernels.reports import reset_reports
from tests.helpers import rank_deficient_experts


@pytest.fixture(autouse=True)
def _fresh_reports():
    reset_reports()
    yield
    reset_reports()


def _spd(eigenvalues, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(
        torch.randn(len(eigenvalues), len(eigenvalues), generator=g, dtype=torch.float64)
    )
    lam = torch.tensor(eigenvalues, dtype=torch.float64)
    return ((Q * lam) @ Q.T).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("spectrum", ["geometric", "ridge_cluster"])
def test_cholesky_condition_against_the_constructed_spectrum(dtype, spectrum):
    n = 160
    if spectrum == "geometric":
        lam = torch.logspace(0, 5, n).tolist()
    else:  # a rank-40 sum of proxies plus a ridge: 120 eigenvalues at the ridge
        lam = [1e-4] * 120 + torch.linspace(0.5, 3.0, 40).tolist()
    true = max(lam) / min(lam)
    L = torch.linalg.cholesky(_spd(lam, dtype=dtype))
    estimate = cholesky_condition(L)
    assert 0.7 * true <= estimate <= 1.01 * true


def _true_condition(base, experts, eps):
    """cond_2 of the homogeneous system ``sum_t (C_t^T C_t + eps I)``, all in float64."""
    C = [(e.double() - base.double()) - (e.double() - base.double()).mean(0) for e in experts]
    B = sum(c.T @ c for c in C) + len(C) * eps * torch.eye(base.shape[1], dtype=torch.float64)
    ev = torch.linalg.eigvalsh(B)
    return float(ev[-1] / ev[0])


def _relative_change(out, reference, base):
    d, d_ref = out.double() - base.double(), reference.double() - base.double()
    return float((d - d_ref).norm() / d_ref.norm())


def test_bound_from_the_ridge_when_it_is_small_enough():
    # eps: auto sets the ridge to tr / 4096: bound tr(B) / ridge - n + 1 = 4097 exactly.
    base, experts = rank_deficient_experts()
    _, diag = ace_merge(base, experts, gate="off")
    assert diag.condition == pytest.approx(4097.0, rel=1e-9)
    assert _true_condition(base, experts, diag.ridge) <= diag.condition


def test_factor_bound_by_hand():
    B = torch.diag(torch.tensor([3.0, 2.0, 1.0], dtype=torch.float64))
    # floor 1: tr / floor - n + 1 = 6 - 3 + 1 = 4 >= true 3 (float64: not measured)
    assert RightSolver.factor(B, None, floor=1.0).info.condition == pytest.approx(4.0)
    assert RightSolver.factor(B, None, floor=1.0, measure=True).info.condition == pytest.approx(
        3.0, rel=1e-6
    )
    assert RightSolver.factor(B, None).info.condition is None


@pytest.mark.parametrize("eps,warns", [(1e-6, False), (1e-8, True)])
def test_float32_warning_tracks_the_real_error(eps, warns, caplog):
    """The measured condition number matches the constructed system's; ``condition * u``
    bounds the float32 result's distance from float64; past 1 % the merge warns, naming the
    tensor and the ways out."""
    base, experts = rank_deficient_experts()
    reference, _ = ace_merge(base, experts, eps=eps, gate="off")
    with caplog.at_level(logging.WARNING, logger="mergekit_ace"):
        out, diag = ace_merge(
            base.float(),
            [e.float() for e in experts],
            eps=eps,
            gate="off",
            tensor_name="model.layers.0.mlp.down_proj.weight",
        )
    true = _true_condition(base, experts, eps)
    assert diag.solver == "cholesky"
    assert diag.condition == pytest.approx(true, rel=0.05)
    change = _relative_change(out, reference, base)
    loss = diag.condition * unit_roundoff(torch.float32)
    assert change <= loss
    messages = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    if warns:
        assert change > ACCURACY_WARN  # the warning is not a false alarm
        # measured: about sqrt(2) times the distance from float64
        assert change < diag.roundoff_change < 2 * change
        assert len(messages) == 1
        for part in (
            "model.layers.0.mlp.down_proj.weight",
            "eps 1e-08",
            "float32",
            "eps: auto",
            "dtype: float64",
            f"changes the merged update by about {diag.roundoff_change:.1%} of its size",
        ):
            assert part in messages[0]
    else:
        # the bound is below 1 %: nothing is measured
        assert loss < ACCURACY_WARN and diag.roundoff_change is None
        assert change < ACCURACY_WARN and not messages


def test_no_warning_with_auto_or_float64_and_once_per_eps(caplog):
    base, experts = rank_deficient_experts()
    with caplog.at_level(logging.DEBUG, logger="mergekit_ace"):
        ace_merge(base.float(), [e.float() for e in experts], gate="off")  # eps: auto
        ace_merge(base, experts, eps=1e-8, gate="off")  # float64
        assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
        for name in ("a", "b"):
            ace_merge(
                base.float(), [e.float() for e in experts], eps=1e-8, gate="off", tensor_name=name
            )
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    debug = [
        r.getMessage()
        for r in caplog.records
        if r.levelno == logging.DEBUG and "condition number" in r.getMessage()
    ]
    assert len(warned) == 1 and "'a'" in warned[0]
    assert len(debug) == 1 and "'b'" in debug[0]


def test_singular_in_float32_is_reported_as_such(caplog):
    base, experts = rank_deficient_experts()
    with caplog.at_level(logging.WARNING, logger="mergekit_ace"):
        out, diag = ace_merge(base.float(), [e.float() for e in experts], eps=1e-14, gate="off")
    assert diag.solver in ("lu", "lstsq") and torch.isfinite(out).all()
    assert diag.condition == float("inf")
    message = caplog.records[-1].getMessage()
    assert "singular or indefinite in float32" in message and "more than its own size" in message


def _nearly_low_rank_experts(noise, m=512, n=512, seed=0):
    """Rank-8 updates of uneven scale plus ``noise`` times a full-rank part: the refined
    matrix's spectrum falls steeply, so its k-th singular value is small beside the first."""
    g = torch.Generator().manual_seed(seed)
    base = 0.02 * torch.randn(m, n, generator=g)
    experts = [
        base
        + s
        * (
            torch.randn(m, 8, generator=g) @ torch.randn(8, n, generator=g) / 8
            + noise * torch.randn(m, n, generator=g)
        )
        for s in (0.002, 0.02, 0.006)
    ]
    return base, experts


def test_refinement_boost_ratio_warning_tracks_the_real_error(caplog):
    """Boosting directions down to ``s_1 / boost_ratio`` multiplies the solve's float32
    round-off by ``boost_ratio``: with ``eps: auto`` (condition bounded by 4097) the estimate
    ``condition * u * boost_ratio`` is measured, stays within a small factor of the real
    distance from float64, and past 1 % the merge warns with the remedies that apply (float64,
    a lower k_frac)."""
    from tests.reference import reference_ace, rel_err

    base, experts = _nearly_low_rank_experts(noise=0.003)
    ref, _ = reference_ace(base, experts, gate="on", eps="auto", gate_statistic="log_spread")
    with caplog.at_level(logging.WARNING, logger="mergekit_ace"):
        out, diag = ace_merge(base, experts, gate="on", tensor_name="t")
    change = rel_err(out - base, ref - base.double())
    estimate = diag.condition * unit_roundoff(torch.float32) * diag.boost_ratio
    assert diag.branch == "heterogeneous" and diag.boost_ratio > 1000
    assert diag.condition < 4097  # measured (the bound alone would allow a warning)
    assert change > ACCURACY_WARN and estimate / 10 < change < 2 * estimate
    assert change < diag.roundoff_change < 2 * change
    message = caplog.records[-1].getMessage()
    assert "the spectral refinement boosts 153 directions down to 1/" in message
    assert f"changes the merged update by about {diag.roundoff_change:.1%}" in message
    assert "For this tensor, lower `k_frac`, or compute in float64 (`dtype: float64`)" in message


def test_a_bound_above_one_percent_is_measured_and_a_false_alarm_is_silent(caplog):
    """Where the bound exceeds 1 % but float32 is really closer to float64 than that, the
    measured change (a second computation, rows and columns permuted) is recorded and tracks
    the real distance from the float64 reference; no warning, the bound is logged at debug
    level."""
    from tests.reference import reference_ace, rel_err

    base, experts = _nearly_low_rank_experts(noise=0.01)
    ref, _ = reference_ace(base, experts, gate="on", eps="auto", gate_statistic="log_spread")
    with caplog.at_level(logging.DEBUG, logger="mergekit_ace"):
        out, diag = ace_merge(base, experts, gate="on", tensor_name="t")
    change = rel_err(out - base, ref - base.double())
    bound = diag.condition * unit_roundoff(torch.float32) * diag.boost_ratio
    assert bound > ACCURACY_WARN > 2 * change
    assert change < diag.roundoff_change < 2 * change
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert any("no warning" in r.getMessage() for r in caplog.records)


def test_the_second_computation_equals_the_first_in_exact_arithmetic():
    """The permuted computation is the same merge: in float64 the two differ by round-off of
    float64 (the measurement's premise), whatever the branch."""
    from mergekit_ace.kernels.ace.merge import DEFAULTS, merged_update
    from mergekit_ace.kernels.ace.roundoff import roundoff_change
    from mergekit_ace.kernels.ace.scan import scan_experts
    from mergekit_ace.kernels.ace.settings import AceSettings
    from mergekit_ace.kernels.inputs import TensorNames

    base, experts = _nearly_low_rank_experts(noise=0.01, m=96, n=64)
    base, experts = base.double(), [e.double() for e in experts]
    for gate in ("on", "off"):
        parameters = {**DEFAULTS, "gate": gate}
        parameters.pop("weight", None)
        settings = AceSettings.resolve(
            base, experts, compute_dtype=None, out_dtype=None, spectra=False, **parameters
        )
        names = TensorNames("t", ["a", "b", "c"])
        scan = scan_experts(base, experts, [1.0] * 3, settings, **names.keywords)
        W, diag, _ = merged_update(base, experts, settings, scan, names=names)
        assert diag.branch == ("heterogeneous" if gate == "on" else "homogeneous")
        change = roundoff_change(merged_update, base, experts, settings, scan, names, W, diag)
        assert change is not None and change < 1e-9


def test_the_second_computation_takes_the_first_scan_permuted():
    """The measurement's second computation runs on the participants alone, with the first
    computation's scan: numbered from 0, the same weights and energies, a storage-noise expert
    that was kept renumbered, and the column means a scan of the permuted participants finds."""
    from mergekit_ace.kernels.ace.merge import DEFAULTS
    from mergekit_ace.kernels.ace.roundoff import permutations, permuted_scan
    from mergekit_ace.kernels.ace.scan import scan_experts
    from mergekit_ace.kernels.ace.settings import AceSettings

    base, (a, b, c) = _nearly_low_rank_experts(noise=0.01, m=96, n=64)
    noise = base.to(torch.bfloat16).float()  # the base's own storage rounding
    experts = [a, base.clone(), b, noise, c]  # the unchanged expert takes no part
    weights = [1.0, 1.0, 2.0, 1.0, 3.0]
    parameters = {**DEFAULTS, "drop_noise": False}
    parameters.pop("weight", None)
    settings = AceSettings.resolve(
        base, experts, compute_dtype=None, out_dtype=None, spectra=False, **parameters
    )
    scan = scan_experts(base, experts, weights, settings, tensor_name="t", expert_names=None)
    assert scan.participation.indices == [0, 2, 3, 4] and scan.participation.noise == [3]
    rows, cols = permutations(*base.shape, base.device)
    shared = permuted_scan(scan, cols)
    who = scan.participation.indices
    fresh = scan_experts(
        base[rows][:, cols],
        [experts[i][rows][:, cols] for i in who],
        [weights[i] for i in who],
        settings,
        tensor_name="t",
        expert_names=None,
    )
    assert shared.participation.indices == fresh.participation.indices == [0, 1, 2, 3]
    assert shared.participation.noise == fresh.participation.noise == [2]
    assert shared.participation.weights == pytest.approx(fresh.participation.weights)
    assert shared.participation.energies == pytest.approx(fresh.participation.energies, rel=1e-5)
    for mine, theirs in zip(shared.means, fresh.means, strict=True):
        torch.testing.assert_close(mine, theirs)


def test_no_measurement_or_warning_for_a_well_spread_spectrum(caplog):
    base, experts = _nearly_low_rank_experts(noise=0.3)
    with caplog.at_level(logging.WARNING, logger="mergekit_ace"):
        _, diag = ace_merge(base, experts, gate="on")
    assert diag.boost_ratio < 41  # 4097 * 6e-8 * 41 = 1 %: the bound suffices
    assert diag.condition == pytest.approx(4097.0)
    assert not caplog.records


def test_each_run_merge_reports_afresh_and_counts_every_tensor(tiny_family, tmp_path, caplog):
    """In one process, every ``run_merge`` names its first affected tensor as a warning (the
    reports start afresh per merge) and ends with the number of affected tensors, which is the
    number of per-tensor reports the log received."""
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    from tests.tiny_models import model_list

    config = MergeConfiguration.model_validate(
        {
            "merge_method": "ace",
            "base_model": str(tiny_family["base"]),
            "dtype": "float32",
            "parameters": {"eps": 1.0e-8},
            "models": model_list(tiny_family, ["expert_math", "expert_chat"]),
        }
    )
    counts = []
    for i in range(2):
        caplog.clear()
        with caplog.at_level(logging.DEBUG, logger="mergekit_ace"):
            run_merge(config, str(tmp_path / f"out{i}"), MergeOptions(quiet=True))
        tensors = [r for r in caplog.records if r.getMessage().startswith("ACE: tensor ")]
        assert tensors[0].levelno == logging.WARNING
        assert all(r.levelno == logging.DEBUG for r in tensors[1:])
        summary = [r.getMessage() for r in caplog.records if "in this merge" in r.getMessage()]
        assert len(tensors) > 1
        assert summary == [
            f"ACE: in this merge, round-off can change the merged update of "
            f"{len(tensors)} tensors by more than 1 % (the first is named above, "
            "all of them with -vv)."
        ]
        counts.append(len(tensors))
    assert counts[0] == counts[1]


def test_mergekit_yaml_is_silent_where_only_the_bound_passes_one_percent(tiny_family, tmp_path):
    """The tiny experts with a fixed ``eps: 1e-6`` and ``gate: on``: on both ``down_proj`` the
    bound ``condition * u * boost_ratio`` passes 1 % while float32 is within 0.2 % of float64;
    the kernel measures that (0.5-3x the real distance; sqrt(2) on average) and
    ``mergekit-yaml`` writes no round-off warning, and the same tensors as the kernel (the
    measurement changes no bit)."""
    from tests.tiny_models import load_state, mergekit_yaml, model_list, write_config

    names = ["expert_math", "expert_code", "expert_chat"]
    params = {"eps": 1e-6, "gate": "on"}
    base = load_state(tiny_family["base"])
    experts = [load_state(tiny_family[n]) for n in names]
    for key in ("model.layers.0.mlp.down_proj.weight", "model.layers.1.mlp.down_proj.weight"):
        out, diag = ace_merge(base[key], [e[key] for e in experts], **params)
        ref, _ = ace_merge(
            base[key], [e[key] for e in experts], compute_dtype=torch.float64, **params
        )
        change = _relative_change(out, ref, base[key])
        bound = diag.condition * unit_roundoff(torch.float32) * diag.boost_ratio
        assert bound > ACCURACY_WARN > 5 * change
        assert change / 2 < diag.roundoff_change < 3 * change
    config = {
        "merge_method": "ace",
        "base_model": str(tiny_family["base"]),
        "dtype": "float32",
        "parameters": params,
        "models": model_list(tiny_family, names),
    }
    result = mergekit_yaml(write_config(tmp_path / "ace.yml", config), tmp_path / "out")
    assert "ACE: tensor" not in result.stderr and "in this merge" not in result.stderr
    merged = load_state(tmp_path / "out")
    for key, tensor in base.items():
        expected, _ = ace_merge(tensor, [e[key] for e in experts], **params)
        assert torch.equal(merged[key], expected), key


def test_isotropic_projector_reports_the_gap_at_the_cut():
    """``cut_gap = (s_k - s_{k+1}) / ||F||_F`` read off a Gram of known spectrum; ``None``
    when every direction is boosted; ``P``, ``sigma`` and ``boost_ratio`` as before."""
    from mergekit_ace.kernels.linalg import isotropic_projector

    s = torch.tensor([4.0, 3.0, 2.5, 2.0, 1.0], dtype=torch.float64)
    G = _spd((s**2).tolist())
    top = isotropic_projector(G, 3)
    assert top.k == 3 and top.sigma == pytest.approx(9.5 / 3)
    assert top.boost_ratio == pytest.approx(4.0 / 2.5)
    assert top.cut_gap == pytest.approx(0.5 / float(s.square().sum().sqrt()))
    assert isotropic_projector(G, 5).cut_gap is None


def test_tie_change_by_hand():
    """The first-order turn ``theta = roundoff / (sqrt(2 m n) cut_gap)`` moves the boosted
    part by ``sqrt(2) sin(theta) sigma_iso``; an exact tie is a swap; no gap, no change."""
    from mergekit_ace.kernels.ace.refine import tie_change

    theta = 1e-6 / (math.sqrt(2 * 64 * 32) * 1e-5)
    expected = math.sqrt(2) * math.sin(theta) * 3.0 / 50.0
    assert tie_change(1e-6, 1e-5, (64, 32), 3.0, 50.0) == pytest.approx(expected)
    assert tie_change(1e-6, 0.0, (64, 32), 3.0, 50.0) == pytest.approx(math.sqrt(2) * 3.0 / 50)
    assert tie_change(1e-6, None, (64, 32), 3.0, 50.0) == 0.0


def _tied_experts(a=32, seed=0):
    """Two experts on the two diagonal blocks of a block-diagonal base, with the same task
    vector (columns summing to zero, so that centering keeps the blocks apart): without the
    prior, which couples the blocks, ``F`` is ``diag(G, G)`` and every singular value comes
    twice; an odd ``k`` cuts a pair in two."""
    g = torch.Generator().manual_seed(seed)
    B = 0.02 * torch.randn(a, a, generator=g, dtype=torch.float64)
    A = 0.002 * torch.randn(a, a, generator=g, dtype=torch.float64)
    A -= A.mean(dim=0)
    Z = torch.zeros(a, a, dtype=torch.float64)
    base = torch.block_diag(B, B)
    return base, [base + torch.block_diag(A, Z), base + torch.block_diag(Z, A)]


def test_a_tie_at_the_kth_direction_is_real_and_warned(caplog):
    """Where ``s_k`` and ``s_{k+1}`` tie, which of the two directions is boosted is decided by
    anything of the size of round-off: in float64, scaling either expert's task vector by
    ``1 + 1e-6`` moves the merged update by more than 10 %. The float32 merge says so (the
    estimate within 2x of that move) and names the remedy; a ``k_frac`` that cuts between two
    pairs is silent."""
    base, (a, b) = _tied_experts()
    tied = {"gate": "on", "prior": False, "k_frac": 0.3}  # k = 19 of 64

    def nudged(expert):
        return base + (expert - base) * (1 + 1e-6)

    out_a, diag = ace_merge(base, [nudged(a), b], **tied)
    out_b, _ = ace_merge(base, [a, nudged(b)], **tied)
    moved = float((out_a - out_b).norm() / (out_a - base).norm())
    assert diag.branch == "heterogeneous" and diag.k == 19 and diag.cut_gap < 1e-6
    assert moved > 0.1
    with caplog.at_level(logging.WARNING, logger="mergekit_ace"):
        ace_merge(base.float(), [a.float(), b.float()], tensor_name="t", **tied)
    message = caplog.records[-1].getMessage()
    assert "singular values 19 and 20 of what it refines differ by only" in message
    estimate = float(re.search(r"by up to about ([\d.]+)% of its size", message).group(1)) / 100
    assert moved / 2 < estimate < 2 * moved
    assert "a slightly different `k_frac` (the tie is at direction 19 of 64)" in message
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="mergekit_ace"):
        _, apart = ace_merge(base.float(), [a.float(), b.float()], **{**tied, "k_frac": 0.3125})
    assert apart.k == 20 and apart.cut_gap > 1e-3 and not caplog.records


def test_real_experts_script_on_tiny_folders(tmp_path):
    """benchmarks/roundoff_real.py on folders laid out like the benchmark cache's: the tied
    tensor is warned about with a cut that splits a pair and not with one between pairs, and
    the summary counts what the rows say."""
    from safetensors.torch import save_file

    from benchmarks.roundoff_real import Warnings, matrices, one_tensor, parse_setting, summary

    name = "model.layers.0.self_attn.q_proj.weight"
    base, experts = _tied_experts()
    (tmp_path / "base").mkdir()
    save_file(
        {name: base.float(), "model.norm.weight": torch.ones(64)},
        str(tmp_path / "base" / "model.safetensors"),
    )
    paths = []
    for i, expert in enumerate(experts):
        (tmp_path / f"e{i}").mkdir()
        paths.append(tmp_path / f"e{i}" / "model.safetensors")
        save_file({name: expert.float(), "model.norm.weight": torch.ones(64)}, str(paths[-1]))
    assert matrices(tmp_path / "base" / "model.safetensors") == [name]
    caught = Warnings()
    logger = logging.getLogger("mergekit_ace")
    logger.addHandler(caught)
    try:
        rows = [
            one_tensor(
                tmp_path / "base" / "model.safetensors", paths, name, parse_setting(text), caught
            )
            for text in ("gate=on,prior=False,k_frac=0.3", "gate=on,prior=False,k_frac=0.3125")
        ]
    finally:
        logger.removeHandler(caught)
    assert parse_setting("gate=on,k_frac=0.3") == {"gate": "on", "k_frac": 0.3}
    assert rows[0]["k"] == 19 and "singular values 19 and 20" in rows[0]["warned"][0]
    assert rows[1]["k"] == 20 and not rows[1]["warned"]
    counts = summary(rows)
    assert counts["tensors"] == 2 and counts["warned"] == [name]
    assert counts["real_max"] == max(r["real"] for r in rows)
