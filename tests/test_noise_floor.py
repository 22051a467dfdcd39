"""The noise floor (docs/method.md, "Directions at the storage noise floor"): singular directions
whose value the experts' storage rounding explains are not boosted by ACE's refinement nor kept
by the siblings' rank decisions; ACE's floor also covers a float32 solve's round-off, so float32
and float64 merges decide alike; full-rank float32 experts merge bit for bit as without it."""

from __future__ import annotations

import math

import pytest
import torch

from benchmarks.noise_floor import (
    TINY_SHAPES,
    float32_vs_float64,
    outside_share,
    outside_table,
    tiny_rank2,
)
from mergekit_ace.kernels.linalg import unit_roundoff
from mergekit_ace.kernels.storage_noise import rounding_noise, total
from tests.family_reference import (
    reference_actmat,
    reference_iso_c,
    reference_iso_cts,
    reference_tsv,
    rounding_variance,
    storage_floor,
)
from tests.helpers import KERNELS, well_conditioned_experts
from tests.reference import reference_ace, rel_err


@pytest.mark.parametrize("fmt", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(32, 64), (96, 96), (512, 256)])
def test_rounding_noise_predicts_the_measured_noise(fmt, shape):
    """Per entry the variance is ``spacing^2 / 12`` (the independent ``nextafter`` formula);
    the estimated spectral norm lies above the real rounding error's, by at most 50 %."""
    g = torch.Generator().manual_seed(1)
    W = 0.02 * torch.randn(*shape, generator=g) + 1e-3 * torch.randn(*shape, generator=g)
    stored = W.to(fmt).float()  # a checkpoint read back as float32
    noise = rounding_noise(stored)
    variance = rounding_variance(stored, fmt)
    assert torch.allclose(noise.rows, variance.sum(1), rtol=1e-6)  # 1/12 in float32
    assert torch.allclose(noise.cols, variance.sum(0), rtol=1e-6)
    assert noise.floor() == pytest.approx(storage_floor(variance), rel=1e-6)
    measured = float(torch.linalg.matrix_norm((stored - W).double(), ord=2))
    assert 1.0 < noise.spectral_norm() / measured < 1.5


def test_float32_storage_floor_is_far_below_its_bfloat16_one():
    g = torch.Generator().manual_seed(2)
    W = 0.02 * torch.randn(64, 48, generator=g)
    f32, bf16 = rounding_noise(W).floor(), rounding_noise(W.bfloat16().float()).floor()
    assert bf16 / f32 == pytest.approx(2.0**16, rel=0.05)  # 8 against 24 significand bits
    assert rounding_noise(W.double()).floor() < f32 * 1e-8


def test_lora_experts_in_bfloat16_outside_share_at_most_twice_task_arithmetic():
    """The [512, 512] case of benchmarks/noise_floor.py: without the floor ACE boosts 153
    directions, most of them bfloat16 rounding, and 28 % of its update lies outside the
    experts' span (8x task arithmetic's); with it ACE boosts the 24 trained directions and
    stays within 2x. TSV-M, Iso-C and Iso-CTS keep the 24 directions only."""
    rows = {row["method"]: row for row in outside_table()}
    ta = rows["task_arithmetic"]["off"]
    assert 0.02 < ta < 0.05
    assert rows["ace"]["off"] > 5 * ta and rows["ace"]["k_off"] == "153"
    assert rows["ace"]["on"] <= 2 * ta and rows["ace"]["k"] == "24"
    assert rows["ace, k_frac: 0.1"]["on"] <= 2 * ta
    for name in ("tsv", "iso_c", "iso_cts", "actmat"):
        assert rows[name]["k"] == "24" and rows[name]["on"] <= 2 * ta, name
    assert rows["iso_c"]["off"] > 0.5  # the floor is what keeps the rounding out


@pytest.mark.parametrize("shape", TINY_SHAPES)
def test_float32_and_float64_agree_on_rank_deficient_experts(shape):
    """Exactly rank-2 experts at the tiny test Llamas' scales: without the floor float32 boosts
    3 directions of solve round-off that float64 does not (30 % apart); with it both boost the
    6 real ones and differ by the solve's float32 round-off only (its own estimate)."""
    base, experts = tiny_rank2(shape)
    _, d32 = KERNELS["ace"](base, experts)
    _, d64 = KERNELS["ace"](base.double(), [e.double() for e in experts])
    assert d32.k == d64.k == 6
    change = float32_vs_float64("ace", shape)
    assert change < d32.condition * unit_roundoff(torch.float32) * d32.boost_ratio
    assert change < 1e-3
    assert float32_vs_float64("ace", shape, noise_floor=False) > 0.1
    for name in ("tsv", "iso_c", "iso_cts", "actmat"):
        assert float32_vs_float64(name, shape) < 1e-5, name


def _bf16_lora(shape=(96, 64), ranks=(3, 3, 3), scales=(0.05, 0.15, 0.025), seed=3):
    """A bfloat16 base at weight scale and rank-3 experts stored in bfloat16 (read back as
    float32): each task vector is low rank plus full-rank rounding."""
    g = torch.Generator().manual_seed(seed)
    m, n = shape
    base = (0.02 * torch.randn(m, n, generator=g)).bfloat16().float()
    experts, spans = [], []
    for r, s in zip(ranks, scales):
        U = torch.linalg.qr(torch.randn(m, r, generator=g)).Q
        V = torch.linalg.qr(torch.randn(n, r, generator=g)).Q
        experts.append((base + s * (U * torch.linspace(1.0, 0.6, r)) @ V.T).bfloat16().float())
        spans.append(V)
    return base, experts, torch.linalg.qr(torch.cat(spans, dim=1)).Q


def _floors(base, experts):
    """The independent floors: each task vector's, and the sum's (variances add)."""
    variances = [rounding_variance(e, torch.bfloat16) for e in experts]
    return [storage_floor(v) for v in variances], storage_floor(sum(variances)), variances


def test_tsv_keeps_no_direction_at_the_noise_floor():
    base, experts, V = _bf16_lora()
    per_task, _, _ = _floors(base, experts)
    out, diag = KERNELS["tsv"](base, experts)
    assert diag.kept == [3, 3, 3] and diag.rank == 9
    assert rel_err(out, reference_tsv(base, experts, floors=per_task)) < 1e-5
    without, diag_off = KERNELS["tsv"](base, experts, noise_floor=False)
    assert diag_off.kept == [21, 21, 21]  # floor(64 / 3): rounding fills the budget
    assert outside_share(out - base, V) < 0.1 < outside_share(without - base, V)


def test_iso_c_keeps_no_direction_at_the_noise_floor():
    base, experts, V = _bf16_lora()
    _, floor, _ = _floors(base, experts)
    out, diag = KERNELS["iso_c"](base, experts)
    assert diag.rank == 9 and diag.noise_floor == pytest.approx(floor, rel=1e-6)
    assert rel_err(out, reference_iso_c(base, experts, floor=floor)) < 1e-5
    without, diag_off = KERNELS["iso_c"](base, experts, noise_floor=False)
    assert diag_off.rank == 64
    assert outside_share(out - base, V) < 0.1 < outside_share(without - base, V)


def test_iso_cts_keeps_no_direction_at_the_noise_floor():
    base, experts, V = _bf16_lora()
    per_task, floor, _ = _floors(base, experts)
    out, diag = KERNELS["iso_cts"](base, experts)
    assert diag.rank == 9  # the common subspace holds the 9 trained directions, no residual
    reference = reference_iso_cts(base, experts, floors=(floor, per_task))
    assert rel_err(out, reference) < 1e-5
    without, _ = KERNELS["iso_cts"](base, experts, noise_floor=False)
    assert outside_share(out - base, V) < 0.1 < outside_share(without - base, V)


def test_actmat_keeps_no_eigen_direction_at_the_noise_floor():
    """The Gram's eigenvalues are the stack's squared singular values: its floor is the
    stack's noise (rows of every task, columns summed), squared. ``rtol: 0`` leaves the
    decision to the floor."""
    base, experts, V = _bf16_lora()
    _, _, variances = _floors(base, experts)
    floor = storage_floor(torch.cat(variances, dim=0))
    out, diag = KERNELS["actmat"](base, experts, rtol=0.0)
    assert diag.rank == 9 and diag.noise_floor == pytest.approx(floor, rel=1e-6)
    assert rel_err(out, reference_actmat(base, experts, floor=floor**2)) < 1e-5
    # The default rtol (the float32 pinv tolerance) already leaves these out; without it the
    # floor alone decides.
    _, diag_default = KERNELS["actmat"](base, experts, noise_floor=False)
    _, diag_off = KERNELS["actmat"](base, experts, rtol=0.0, noise_floor=False)
    assert diag_default.rank == 9 and diag_off.rank == 64


def test_ace_boosts_no_direction_at_the_noise_floor():
    """ACE's floor is the noisiest participant's; here it lies far above the solve's
    round-off term, so the float64 reference with that floor is the judge."""
    base, experts, V = _bf16_lora()
    per_task, _, _ = _floors(base, experts)
    kwargs = dict(gate="on", eps="auto", gate_statistic="log_spread")
    out, diag = KERNELS["ace"](base, experts, **kwargs)
    assert diag.k == 9 and diag.noise_floor == pytest.approx(max(per_task), rel=1e-3)
    reference, _ = reference_ace(base, experts, floor=max(per_task), **kwargs)
    assert rel_err(out - base, reference - base.double()) < 1e-4
    without, diag_off = KERNELS["ace"](base, experts, noise_floor=False, **kwargs)
    assert diag_off.k == math.floor(0.3 * 64)
    assert outside_share(out - base, V) < 0.1 < outside_share(without - base, V)


@pytest.mark.parametrize("method", list(KERNELS))
@pytest.mark.parametrize("shape", [(48, 40), (40, 64)])
def test_full_rank_float32_experts_merge_bit_for_bit_as_without_the_floor(method, shape):
    """Full fine-tunes stored in float32: every kept direction lies far above the floor."""
    base, experts = well_conditioned_experts(shape, 3, scale=0.01)
    experts = [base + (e - base) * s for e, s in zip(experts, (1.0, 3.0, 0.5))]
    extra = {"gate": "on"} if method == "ace" else {}
    on, diag = KERNELS[method](base, experts, **extra)
    off, _ = KERNELS[method](base, experts, noise_floor=False, **extra)
    assert torch.equal(on, off)
    assert diag.noise_floor is not None


def test_sum_of_independent_noises_adds_variances():
    g = torch.Generator().manual_seed(4)
    a, b = (0.02 * torch.randn(40, 30, generator=g)).bfloat16().float(), torch.ones(40, 30)
    both = total([rounding_noise(a), rounding_noise(b)])
    assert torch.allclose(both.rows, rounding_noise(a).rows + rounding_noise(b).rows)
    assert both.mean_variance == pytest.approx(
        rounding_noise(a).mean_variance + rounding_noise(b).mean_variance
    )


def test_rounding_noise_covers_an_outlier_channel():
    """Real layers have a few input channels of far larger weights: their rounding noise is
    concentrated in a column, which the mean variance's edge ``(sqrt(m) + sqrt(n)) rms``
    misses and the row and column maxima cover."""
    g = torch.Generator().manual_seed(5)
    W = 0.02 * torch.randn(256, 256, generator=g)
    W[:, :2] *= 64.0
    stored = W.bfloat16().float()
    noise = rounding_noise(stored)
    measured = float(torch.linalg.matrix_norm((stored - W).double(), ord=2))
    assert (16 + 16) * math.sqrt(noise.mean_variance) < 0.3 * measured  # 0.17
    assert measured < noise.spectral_norm() < 1.5 * measured


@pytest.mark.parametrize("path", ["held", "streaming", "svd", "streaming-svd"])
def test_every_refinement_path_applies_the_floor(path, monkeypatch):
    """F held whole or re-formed a block of rows at a time, top directions from the Gram or
    from the SVD: the same 9 directions boosted, the same merge as the float64 reference."""
    import mergekit_ace.kernels.ace.refine as refine
    import mergekit_ace.kernels.ace.workspace as workspace

    base, experts, _ = _bf16_lora()
    per_task, _, _ = _floors(base, experts)
    if "streaming" in path:
        monkeypatch.setattr(workspace, "STREAM_BLOCK_BYTES", 7 * 64 * 4)
        monkeypatch.setattr(workspace, "KEEP_F_BYTES", 0)
    if "svd" in path:
        monkeypatch.setattr(refine, "isotropic_projector", lambda G, k, floor=0.0: None)
    kwargs = dict(gate="on", eps="auto", gate_statistic="log_spread")
    out, diag = KERNELS["ace"](base, experts, **kwargs)
    assert diag.k == 9 and diag.spectral == ("svd" if "svd" in path else "gram-eigh")
    reference, _ = reference_ace(base, experts, floor=max(per_task), **kwargs)
    assert rel_err(out - base, reference - base.double()) < 1e-4


@pytest.mark.parametrize("streaming", [False, True])
def test_nothing_above_the_floor_leaves_the_preliminary_solution(streaming, monkeypatch):
    """Experts whose whole update is rounding (a handful of one-ulp changes per expert): no
    direction is boosted and the merge is W_pre, as the reference with that floor computes."""
    import mergekit_ace.kernels.ace.workspace as workspace

    if streaming:
        monkeypatch.setattr(workspace, "STREAM_BLOCK_BYTES", 7 * 64 * 4)
        monkeypatch.setattr(workspace, "KEEP_F_BYTES", 0)
    g = torch.Generator().manual_seed(6)
    base = (0.02 * torch.randn(96, 64, generator=g)).bfloat16()
    experts = []
    for count in (40, 400, 120):  # uneven energies: the heterogeneous branch
        flat = base.float().flatten().clone()
        where = torch.randperm(flat.numel(), generator=g)[:count]
        flat[where] = torch.nextafter(base.flatten()[where], torch.tensor(1.0).bfloat16()).float()
        experts.append(flat.view(96, 64))
    base = base.float()
    kwargs = dict(gate="on", eps="auto", gate_statistic="log_spread", drop_noise=False)
    out, diag = KERNELS["ace"](base, experts, **kwargs)
    assert diag.k == 0 and diag.sigma_iso is None and diag.noise_floor > 0
    kwargs.pop("drop_noise")
    reference, _ = reference_ace(base, experts, floor=math.inf, **kwargs)
    assert rel_err(out - base, reference - base.double()) < 1e-4
    _, diag_off = KERNELS["ace"](base, experts, noise_floor=False, drop_noise=False, gate="on")
    assert diag_off.k == math.floor(0.3 * 64)


def test_real_experts_script_on_tiny_folders(tmp_path):
    """benchmarks/noise_floor_real.py on folders laid out like the benchmark cache's: LoRA
    adapters folded into a bf16 base (the floor brings Iso-C's update back into the adapters'
    span) and float32 full fine-tunes (nothing changes)."""
    from safetensors.torch import save_file

    from benchmarks.noise_floor_real import full_rows, lora_rows

    name = "model.layers.0.self_attn.q_proj.weight"
    key = "base_model.model." + name.replace(".weight", ".lora_{}.weight")
    g = torch.Generator().manual_seed(7)
    base = (0.02 * torch.randn(64, 48, generator=g)).bfloat16()
    (tmp_path / "base").mkdir()
    save_file({name: base}, str(tmp_path / "base" / "model.safetensors"))
    for i, scale in enumerate((0.02, 0.06, 0.01)):
        A, B = torch.randn(4, 48, generator=g), scale * torch.randn(64, 4, generator=g)
        for sub in ("adapter", "bf16"):
            (tmp_path / "lora" / f"e{i}" / sub).mkdir(parents=True)
        adapter = tmp_path / "lora" / f"e{i}" / "adapter" / "adapter_model.safetensors"
        save_file({key.format("A"): A, key.format("B"): B}, str(adapter))
        folded = (base.float() + B @ A).bfloat16()
        save_file({name: folded}, str(tmp_path / "lora" / f"e{i}" / "bf16" / "model.safetensors"))
        (tmp_path / "full" / f"e{i}").mkdir(parents=True)
        full = base.float() + scale * torch.randn(64, 48, generator=g)
        save_file({name: full}, str(tmp_path / "full" / f"e{i}" / "model.safetensors"))
    experts = sorted((tmp_path / "lora").iterdir())
    rows = {r["method"]: r for r in lora_rows(experts, tmp_path / "base", [name])}
    assert rows["iso_c"]["k_on"] == ["12"] and rows["iso_c"]["k_off"] == ["48"]
    assert rows["iso_c"]["on"][0] < 0.1 < rows["iso_c"]["off"][0]
    float32 = tmp_path / "base32"
    float32.mkdir()
    save_file({name: base.float()}, str(float32 / "model.safetensors"))
    full = full_rows(sorted((tmp_path / "full").iterdir()), float32, [name])
    assert all(r["same"] == r["count"] == 1 and r["worst"] == 0.0 for r in full)


@pytest.mark.parametrize("fmt", [torch.bfloat16, torch.float16, torch.float32])
def test_the_bound_from_the_largest_entry_lies_above_the_estimate(fmt):
    """``ulp(x) <= 2^(1 - p) max |x|`` entry by entry, so the bound covers the estimate, an
    outlier channel included; nothing stored, nothing to bound."""
    from mergekit_ace.kernels.storage_noise import rounding_floor_bound

    g = torch.Generator().manual_seed(6)
    W = 0.02 * torch.randn(96, 64, generator=g)
    W[:, :2] *= 16.0
    stored = W.to(fmt).float()
    exact = rounding_noise(stored).floor()
    assert exact < rounding_floor_bound(stored) < 40 * exact
    assert rounding_floor_bound(stored, step=7) == rounding_floor_bound(stored)
    assert rounding_floor_bound(torch.zeros(8, 8)) == 0.0


def test_storage_precision_reads_past_its_first_rows():
    """The first rows can only refute a format: a tensor that fits bfloat16 in them and not
    below is float32."""
    from mergekit_ace.kernels.storage_noise import SAMPLE_ENTRIES, storage_precision

    rows = 2 * SAMPLE_ENTRIES // 64
    g = torch.Generator().manual_seed(8)
    W = (0.02 * torch.randn(rows, 64, generator=g)).bfloat16().float()
    assert storage_precision(W) == torch.bfloat16
    W[-1, -1] += 1e-7
    assert storage_precision(W) == torch.float32 == storage_precision(W, step=5)


def test_a_merge_estimates_the_floor_entry_by_entry_only_where_the_bound_decides(monkeypatch):
    """float32 full fine-tunes: the bound lies below every boosted direction, no expert is
    read entry by entry and the merge equals the one from the estimate (``spectra=True``,
    inspect's way, computes it); bf16 LoRA experts: the bound reaches the boosted directions
    and the estimate decides, as its reference says (tests above)."""
    import mergekit_ace.kernels.ace.merge as merge

    calls = []
    monkeypatch.setattr(
        merge, "rounding_noise", lambda *a, **k: calls.append(1) or rounding_noise(*a, **k)
    )
    base, experts = well_conditioned_experts((48, 40), 3, scale=0.01)
    experts = [base + (e - base) * s for e, s in zip(experts, (1.0, 3.0, 0.5))]
    out, diag = KERNELS["ace"](base, experts, gate="on")
    assert not calls and diag.k == math.floor(0.3 * 40)
    inspected, exact = KERNELS["ace"](base, experts, gate="on", spectra=True)
    assert len(calls) == 3 and torch.equal(out, inspected)
    assert exact.noise_floor < diag.noise_floor < diag.sigma_iso
    lora_base, lora_experts, _ = _bf16_lora()
    calls.clear()
    KERNELS["ace"](lora_base, lora_experts, gate="on")
    assert len(calls) == 3


def test_relative_change_by_hand():
    from benchmarks.noise_floor_real import relative_change

    W0 = torch.zeros(2)
    off = torch.tensor([3.0, 4.0])  # ||off - W0|| = 5
    assert relative_change(off + torch.tensor([0.0, 1.0]), off, W0) == pytest.approx(0.2)
    assert relative_change(off.clone(), off, W0) == 0.0


def test_full_rows_name_every_changed_tensor(tmp_path):
    """Every tensor of a checkpoint through ``full_rows``: rank-4 experts stored at bfloat16's
    resolution (the floor changes Iso-C's merge of that matrix, by the relative change computed
    here independently), a norm vector the experts change and a matrix none changes (both
    merged alike with and without the floor)."""
    from safetensors.torch import save_file

    from benchmarks.noise_floor_real import FULL_SETTINGS, checkpoint_names, full_rows, read

    q, norm, embed = "model.layers.0.self_attn.q_proj.weight", "model.norm.weight", "model.embed"
    g = torch.Generator().manual_seed(7)
    base = {
        q: (0.02 * torch.randn(64, 48, generator=g)).bfloat16().float(),
        norm: torch.ones(48),
        embed: torch.randn(16, 8, generator=g),
    }
    (tmp_path / "base").mkdir()
    save_file(base, str(tmp_path / "base" / "model.safetensors"))
    experts = []
    for i, scale in enumerate((0.02, 0.06, 0.01)):
        update = scale * torch.randn(64, 4, generator=g) @ torch.randn(4, 48, generator=g)
        tensors = dict(base, **{q: (base[q] + update).bfloat16().float()})
        tensors[norm] = base[norm] + 0.01 * (i + 1)
        (tmp_path / f"e{i}").mkdir()
        save_file(tensors, str(tmp_path / f"e{i}" / "model.safetensors"))
        experts.append(tmp_path / f"e{i}")
    names = checkpoint_names(tmp_path / "base" / "model.safetensors")
    rows = {r["method"]: r for r in full_rows(experts, tmp_path / "base", names)}
    assert set(rows) == {label for label, _, _ in FULL_SETTINGS}
    for row in rows.values():
        assert (row["count"], row["matrices"]) == (3, 2)
        assert sorted(row["touched"]) == sorted([q, norm])
        assert row["same"] == 3 - len(row["changed"]) and row["same_matrices"] >= 1
        assert all(name == q for name, _ in row["changed"])
    W0 = base[q]
    stored = [read(e / "model.safetensors", q) for e in experts]
    on, _ = KERNELS["iso_c"](W0, stored)
    off, _ = KERNELS["iso_c"](W0, stored, noise_floor=False)
    expected = float((on - off).double().norm() / (off - W0).double().norm())
    assert rows["iso_c"]["changed"] == [(q, pytest.approx(expected))] and expected > 0.1
    assert rows["iso_c"]["worst"] == pytest.approx(expected)


def test_benchmark_settings_are_the_grid_rows_under_kernel_names():
    """``--grid``: the classification grid's rows that merge with the five methods (not
    ``ties`` or ``linear``), ``lambda`` passed as the kernels' ``lam``, every set of parameters
    accepted by its kernel."""
    from benchmarks.noise_floor_real import benchmark_settings

    rows = {label: (method, extra) for label, method, extra in benchmark_settings(3)}
    assert rows["ace (paper: eps=1e-5, gamma)"] == ("ace", {"eps": 1e-5, "gate_statistic": "gamma"})
    assert rows["tsv"] == ("tsv", {"lam": 1.0}) and rows["ace, gate: on"] == ("ace", {"gate": "on"})
    assert "ties" not in rows and "linear" not in rows
    assert {method for method, _ in rows.values()} == set(KERNELS)
    assert sum(label.startswith("ace eps=") for label in rows) == 7  # six fixed eps and auto
    g = torch.Generator().manual_seed(3)
    base = torch.randn(8, 6, generator=g)
    experts = [base + 0.1 * torch.randn(8, 6, generator=g) for _ in range(3)]
    for method, extra in rows.values():
        out, _ = KERNELS[method](base, experts, **extra)
        assert out.shape == base.shape and bool(torch.isfinite(out).all())
