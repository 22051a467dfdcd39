"""Experts whose task vector is storage noise (the base re-stored at the expert's precision):
detected for every method, reported, left out by default, kept with ``drop_noise=False``; and
real experts, however small, are not mistaken for noise."""

import logging

import pytest
import torch

from mergekit_ace.kernels.ace import ace_merge
from mergekit_ace.kernels.reports import reset_reports
from mergekit_ace.kernels.storage_noise import storage_precision
from mergekit_ace.kernels.tsv import tsv_merge
from tests.helpers import KERNELS


@pytest.fixture(autouse=True)
def _fresh_reports():
    reset_reports()
    yield
    reset_reports()


def _real_experts(shape=(48, 40), rel=(1.1e-3, 1.3e-3, 1.5e-3), seed=0):
    """A float32 base at an LLM's weight scale and experts with low-rank-plus-noise task
    vectors of ``rel * ||W0||`` (the benchmark's fine-tunes have ~1e-3)."""
    g = torch.Generator().manual_seed(seed)
    base = 0.02 * torch.randn(*shape, generator=g)
    return base, [base + _delta(base, r, g) for r in rel], g


def _delta(base, rel, g):
    m, n = base.shape
    d = torch.randn(m, 4, generator=g) @ torch.randn(4, n, generator=g)
    d = d / d.norm() + 0.3 * torch.randn(m, n, generator=g) / (m * n) ** 0.5
    return d * (rel * base.norm() / d.norm())


def _noise_cases():
    """(name, base, storage-noise expert) for the realistic ways a no-op expert arises."""
    base, _, g = _real_experts()
    bf16 = base.to(torch.bfloat16)
    return {
        # an fp32 base saved in bf16 (and read back as bf16, or upcast by `dtype: float32`)
        "fp32 base saved as bf16": (base, bf16),
        "saved as bf16, read back as fp32": (base, bf16.float()),
        "saved as fp16": (base, base.to(torch.float16)),
        # a bf16 checkpoint re-saved after a perturbation far below bf16's precision
        "bf16 base + 1e-6 noise, saved as bf16": (
            bf16,
            (bf16.float() + 1e-6 * torch.randn(base.shape, generator=g)).to(torch.bfloat16),
        ),
        # a bf16 copy of a bf16 base with a handful of entries moved by a few ulps
        "bf16 base, one entry moved by 1 ulp": (bf16, _moved(bf16, [(5, 7)], 1)),
        "bf16 base, 8 entries moved by 3 ulp": (bf16, _moved(bf16, _entries(8), 3)),
        # a 1e-4 (relative) fine-tune saved in bf16 from an fp32 base: its task vector is
        # mostly the base's rounding to bf16
        "1e-4 fine-tune saved as bf16 from an fp32 base": (base, _light(base, g)),
    }


def _entries(count, shape=(48, 40)):
    return [(7 * i % shape[0], 11 * i % shape[1]) for i in range(count)]


def _moved(tensor, entries, ulps):
    """``tensor`` (bf16) with each of ``entries`` moved up by ``ulps`` units in the last place
    (``nextafter`` ``ulps`` times)."""
    out = tensor.clone()
    for i, j in entries:
        value = out[i, j]
        for _ in range(ulps):
            value = torch.nextafter(value, torch.tensor(float("inf"), dtype=tensor.dtype))
        out[i, j] = value
    return out


def _light(base, g, rel=1e-4):
    return (base * (1 + rel * torch.randn(base.shape, generator=g))).to(torch.bfloat16)


@pytest.mark.parametrize("case", list(_noise_cases()))
@pytest.mark.parametrize("method", list(KERNELS))
def test_storage_noise_expert_is_left_out_by_default(method, case):
    base, noise = _noise_cases()[case]
    _, experts, _ = _real_experts()
    experts = [e.to(base.dtype) for e in experts]
    kernel = KERNELS[method]
    f32 = {"out_dtype": torch.float32}  # bf16 output would round the difference away
    without, _ = kernel(base, experts, **f32)
    merged, diag = kernel(base, experts + [noise], **f32)
    assert diag.noise == [3] and diag.participants == [0, 1, 2]
    assert torch.equal(merged, without)
    # Without the noise floor: TSV-M would otherwise drop every direction of a task vector
    # that is all rounding (test_noise_floor.py), so the expert kept would change nothing.
    kept, diag_kept = kernel(base, experts + [noise], drop_noise=False, noise_floor=False, **f32)
    assert diag_kept.noise == [3] and diag_kept.participants == [0, 1, 2, 3]
    assert not torch.equal(kept, without)


def test_noise_expert_would_take_over_ace():
    """Why noise experts are left out: bf16 rounding of an fp32 base is as large as a light
    fine-tune's update (~1e-3 of ||W0||), so kept it enters the merge as a full task of white
    noise."""
    base, experts, _ = _real_experts()
    noise = base.to(torch.bfloat16)
    without, _ = ace_merge(base, experts)
    kept, diag = ace_merge(base, experts + [noise], drop_noise=False)
    change = float((kept - without).norm() / (without - base).norm())
    assert change > 0.3, change


@pytest.mark.parametrize("method", list(KERNELS))
def test_real_experts_are_not_noise(method):
    """A real expert with 100x less energy than the others (float32, and bf16 from a bf16
    base, where most of its change is rounded away on saving), and real experts saved in bf16
    from an fp32 base (their task vectors carry bf16 rounding too)."""
    base, experts, g = _real_experts()
    delta = _delta(base, 1.3e-4, g)
    kernel = KERNELS[method]
    _, diag = kernel(base, experts + [base + delta])
    assert diag.noise == [] and diag.participants == [0, 1, 2, 3]
    base16 = base.to(torch.bfloat16)
    experts16 = [e.to(torch.bfloat16) for e in experts]
    _, diag = kernel(base16, experts16 + [(base16.float() + delta).to(torch.bfloat16)])
    assert diag.noise == [] and diag.participants == [0, 1, 2, 3]
    _, diag = kernel(base, experts16)
    assert diag.noise == [] and diag.participants == [0, 1, 2]


def test_fp32_perturbation_far_above_fp32_rounding_is_not_noise():
    """``W0 + 1e-6 * randn`` in float32 is ~800 times float32's unit round-off (relative to
    ``||W0||`` here): a tiny change, not storage noise (docs/method.md explains the line)."""
    base, experts, g = _real_experts()
    tiny = base + 1e-6 * torch.randn(base.shape, generator=g)
    _, diag = ace_merge(base, experts + [tiny])
    assert diag.noise == [] and 3 in diag.participants


def test_storage_precision_sees_through_an_upcast():
    x = torch.randn(30, 20)
    assert storage_precision(x) == torch.float32
    assert storage_precision(x.to(torch.bfloat16).float()) == torch.bfloat16
    assert storage_precision(x.to(torch.float16).float()) == torch.float16
    assert storage_precision(x.to(torch.bfloat16)) == torch.bfloat16
    assert storage_precision(x.double()) == torch.float64


def test_warning_names_model_and_tensor_once_per_model(caplog):
    base, experts, _ = _real_experts()
    names = ["a", "b", "c", "base_in_bf16"]
    with caplog.at_level(logging.DEBUG, logger="mergekit_ace.kernels.reports"):
        tsv_merge(
            base, experts + [base.to(torch.bfloat16)], tensor_name="layer.0.w", expert_names=names
        )
        tsv_merge(
            base, experts + [base.to(torch.bfloat16)], tensor_name="layer.1.w", expert_names=names
        )
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    text = warnings[0].getMessage()
    assert "base_in_bf16" in text and "'layer.0.w'" in text and "bfloat16" in text
    assert "drop_noise: false" in text
    later = [
        r for r in caplog.records if r.levelno == logging.DEBUG and "layer.1.w" in r.getMessage()
    ]
    assert len(later) == 1


def test_non_2d_tensors_and_single_expert():
    """Noise is left out of non-2-D tensors too; a noise expert alone leaves the base."""
    g = torch.Generator().manual_seed(4)
    base = 1.0 + 0.1 * torch.randn(64, generator=g)
    real = base + 1e-3 * torch.randn(64, generator=g)
    for kernel in KERNELS.values():
        out, diag = kernel(base, [real, base.to(torch.bfloat16)])
        assert diag.branch == "mean" and diag.noise == [1]
        assert torch.equal(out, real)
        out, diag = kernel(base, [base.to(torch.bfloat16)])
        assert diag.branch == "unchanged" and torch.equal(out, base)


def test_bfloat16_bit_test_agrees_with_the_round_trip():
    from mergekit_ace.kernels.storage_noise import holds_exactly

    g = torch.Generator().manual_seed(11)
    x = torch.randn(64, 48, generator=g)
    stored = x.to(torch.bfloat16).float()
    for block, expected in ((stored, True), (x, False), (stored[:, ::2], True)):
        assert holds_exactly(block, torch.bfloat16) is expected
        assert torch.equal(block.to(torch.bfloat16).float(), block) is expected
    one_bit = stored.clone()
    one_bit.view(torch.int32)[5, 7] |= 1  # one value no longer a bfloat16
    assert not holds_exactly(one_bit, torch.bfloat16)


def test_all_finite_finds_nan_inf_and_does_not_mistake_overflowing_sums():
    from mergekit_ace.kernels.inputs import all_finite

    big = torch.full((8, 8), 3e38)  # finite values whose float32 sum overflows
    assert all_finite(big)
    for bad in (float("nan"), float("inf"), -float("inf")):
        x = torch.randn(8, 8)
        x[3, 4] = bad
        assert not all_finite(x) and not all_finite(x.to(torch.bfloat16))


def _finding(base, expert):
    from mergekit_ace.kernels.storage_noise import BaseScale, noise_finding

    energy = float((expert.double() - base.double()).norm()) ** 2
    scale = BaseScale(float(base.double().norm()), float(base.abs().max()))
    return noise_finding(base, expert, energy, scale, torch.float32)


def _spacing(value, dtype):
    """The gap from ``|value|`` to the next larger ``dtype`` value (independent of frexp)."""
    v = torch.tensor(abs(float(value)), dtype=dtype)
    return float(torch.nextafter(v, torch.tensor(float("inf"), dtype=dtype))) - float(v)


def test_entries_and_ulps_by_hand():
    """A bf16 base with 8 entries moved by 3 ulp: the finding counts 8 changed entries of 1920,
    3 ulp each in their own units, and in units of the largest entry's ulp the largest move
    divided by that spacing; 9 entries (the cap is max(8, 0.1 %) = 8) or 5 ulp at the largest
    entry are not noise."""
    base, _, _ = _real_experts()
    bf16 = base.to(torch.bfloat16)
    entries = _entries(8)
    finding = _finding(bf16, _moved(bf16, entries, 3))
    assert finding is not None and (finding.changed, finding.entries) == (8, 1920)
    assert finding.entry_ulps == 3.0
    top = _spacing(bf16.float().abs().max(), torch.bfloat16)
    moves = [3 * _spacing(bf16[i, j], torch.bfloat16) for i, j in entries]
    assert finding.ulps == pytest.approx(max(moves) / top)
    assert finding.base_precision == finding.precision == torch.bfloat16
    assert _finding(bf16, _moved(bf16, _entries(9), 3)) is None
    i, j = divmod(int(bf16.float().abs().argmax()), bf16.shape[1])
    assert _finding(bf16, _moved(bf16, [(i, j)], 4)).ulps == 4.0
    assert _finding(bf16, _moved(bf16, [(i, j)], 5)) is None


def test_a_large_move_in_the_first_rows_ends_the_test_there(monkeypatch):
    """A bf16 copy of the base with one entry moved by 5 ulp of the largest entry: in the
    first rows the verdict (not noise) comes from those rows alone, the blocks of the whole
    tensor are never read; past them the whole-tensor pass finds it; 3 ulp anywhere stays
    noise."""
    from mergekit_ace.kernels import storage_noise

    g = torch.Generator().manual_seed(3)
    base = (0.02 * torch.randn(4096, 8, generator=g)).to(torch.bfloat16)
    top = _spacing(base.float().abs().max(), torch.bfloat16)
    head_rows = storage_noise.sample_head(base).shape[0]
    assert head_rows == storage_noise.SAMPLE_ENTRIES // 8 < base.shape[0]

    def moved(row, ulps):
        out = base.clone()
        out[row, 0] = base[row, 0].float() + ulps * top
        return out

    for row in (0, head_rows - 1, head_rows, base.shape[0] - 1):
        assert _finding(base, moved(row, 3)) is not None
        assert _finding(base, moved(row, 5)) is None
    real_blocks = storage_noise.row_blocks

    def whole_tensor_pass(tensor, step):
        assert tensor.shape[0] <= head_rows, "read the whole tensor"
        return real_blocks(tensor, step)

    monkeypatch.setattr(storage_noise, "row_blocks", whole_tensor_pass)
    assert _finding(base, moved(head_rows - 1, 5)) is None
    with pytest.raises(AssertionError, match="whole tensor"):
        _finding(base, moved(head_rows, 5))


def test_rounding_share_by_hand():
    """A 1e-4 fine-tune saved in bf16 from an fp32 base: the expert's own change beyond the
    rounded base carries ``||W_t - fl(W0)||^2 / ||W_t - W0||^2`` of the task vector (under
    a third: noise); a 1e-3 fine-tune (the benchmark's experts) saved the same way carries most
    of it (not noise)."""
    base, experts, g = _real_experts()
    light = _light(base, g)
    own = float((light.double() - base.to(torch.bfloat16).double()).norm() ** 2)
    share = own / float((light.double() - base.double()).norm() ** 2)
    finding = _finding(base, light)
    assert 0.0 < share < 1 / 3 and finding.own_share == pytest.approx(share, rel=1e-6)
    assert (finding.precision, finding.base_precision) == (torch.bfloat16, torch.float32)
    assert _finding(base, experts[0].to(torch.bfloat16)) is None


def test_messages_name_the_right_dtypes():
    base, _, g = _real_experts()
    bf16 = base.to(torch.bfloat16)
    assert _finding(base, base.to(torch.float16)).describe() == (
        "equals the base (float32) rounded to float16, the expert's storage precision"
    )
    text = _finding(bf16, _moved(bf16, [(5, 7)], 1)).describe()
    assert text == (
        "equals the base (stored as bfloat16), except for 1 of its 1920 entries, each moved "
        "by at most 1 ulp of bfloat16"
    )
    text = _finding(base, _light(base, g)).describe()
    assert text.startswith("equals the base (float32) rounded to bfloat16, the expert's storage")
    assert "of its task vector is the base's rounding to bfloat16" in text


def test_a_light_bf16_fine_tune_of_an_fp32_base_would_move_ace():
    """Kept, the 1e-4 fine-tune saved in bf16 (most of its task vector the base's rounding)
    moves ACE's merge by more than half; left out, the merge is the other experts'."""
    base, experts, g = _real_experts()
    without, _ = ace_merge(base, experts)
    merged, diag = ace_merge(base, experts + [_light(base, g)])
    kept, _ = ace_merge(
        base, experts + [_light(base, torch.Generator().manual_seed(0))], drop_noise=False
    )
    assert diag.noise == [3] and torch.equal(merged, without)
    assert float((kept - without).norm() / (without - base).norm()) > 0.5


def test_the_merge_summary_shows_each_model_whole(caplog):
    """A model that is storage noise in some tensors and a real fine-tune in others: the
    summary names it once, with how many tensors were noise and which were not; a model that
    is noise everywhere is told to be removed."""
    from mergekit_ace.kernels.storage_noise import noise_ledger

    base, experts, g = _real_experts()
    names = ["a", "b", "c", "half", "copy"]
    for t in range(4):
        half = base + _delta(base, 1.2e-3, g) if t == 2 else base.to(torch.bfloat16)
        tsv_merge(
            base,
            experts + [half, base.to(torch.float16)],
            tensor_name=f"layer.{t}.w",
            expert_names=names,
        )
    lines = noise_ledger.summary()
    assert lines == [
        "storage noise: model half (stored as bfloat16, the base as float32) is the base "
        "re-stored, not a fine-tune, in 3 of the 4 tensors compared; left out there. It "
        "carries a real change in 1: 'layer.2.w', merged there. To leave it out everywhere "
        "remove it from `models:`; to keep it everywhere set `drop_noise: false`.",
        "storage noise: model copy (stored as float16, the base as float32) is the base "
        "re-stored, not a fine-tune, in 4 of the 4 tensors compared; left out there. Remove "
        "it from `models:`: it changes nothing the merge should keep.",
    ]
