"""ACE's parameters are described once: the kernel and the mergekit adapter take the same
defaults and accept or refuse the same values with the same message, and the kernel's branch
is the gate function's prediction."""

from __future__ import annotations

import inspect
import math

import pytest
import torch

from mergekit_ace.kernels.ace import ace_merge
from mergekit_ace.methods.ace import ace_method

KERNEL_NAMES = {"lambda": "lam"}
VALUES = {
    "eps": [0.0, 1e-5, "auto", "AUTO", -1.0, math.inf, "autoo", True],
    "tau": [0.0, 0.3, "0.5", -0.1, math.inf, math.nan, "abc"],
    "gate": ["auto", "on", "ON", "off", True, False, "maybe"],
    "gate_statistic": ["gamma", "log_spread", "Gamma", "x"],
    "refine": [True, False, "yes", 0, "maybe", 2],
    "k_frac": [0.0, 0.3, 1.0, 1.5, -0.1],
    "prior": [True, False, "off", "sometimes"],
    "oom_fallback": ["cpu", "error", "CPU", "gpu"],
    "matmul_precision": ["auto", "float32", "TF32", "tf32x3", "fp16"],
    "drop_noise": [True, False, "no", 2],
    "lambda": [1.0, -0.5, math.inf, "x"],
}


def experts():
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(6, 4, generator=gen)
    return base, [base + s * torch.randn(6, 4, generator=gen) for s in (0.1, 0.5)]


def outcome(call):
    try:
        return "ok", call()
    except ValueError as error:
        return "error", str(error)


def test_kernel_defaults_are_the_adapter_defaults():
    spec = {p.name: p for p in ace_method().spec.parameters}
    signature = inspect.signature(ace_merge).parameters
    assert set(VALUES) | {"weight"} == set(spec)
    for name in VALUES:
        assert signature[KERNEL_NAMES.get(name, name)].default == spec[name].default, name
        assert spec[name].description


@pytest.mark.parametrize("name", sorted(VALUES))
def test_kernel_and_adapter_accept_and_refuse_the_same_values(name):
    """The adapter's value (after its check) reaches the kernel; a value it refuses is refused
    by the kernel too, with the same message."""
    spec = {p.name: p for p in ace_method().spec.parameters}[name]
    base, tensors = experts()
    for value in VALUES[name]:
        adapter, said = outcome(lambda: spec.validate(value))
        kernel, message = outcome(lambda: ace_merge(base, tensors, **{KERNEL_NAMES.get(name, name): value}))
        assert kernel == adapter, (name, value, said, message)
        if adapter == "error":
            assert f"parameter `{name}`" in message and message in said


@pytest.mark.parametrize("gate", ["auto", "on", "off"])
@pytest.mark.parametrize("statistic", ["gamma", "log_spread"])
def test_kernel_branch_is_the_gate_prediction(gate, statistic):
    from mergekit_ace.kernels.ace_parameters import UNDECIDED, predict_branch

    gen = torch.Generator().manual_seed(1)
    for scales in [(0.1, 0.1, 0.11), (0.01, 1.0, 0.1), (0.3,)]:
        base = torch.randn(12, 8, generator=gen)
        tensors = [base + s * torch.randn(12, 8, generator=gen) for s in scales]
        _, diag = ace_merge(base, tensors, gate=gate, gate_statistic=statistic, tau=0.3)
        predicted = predict_branch(2, diag.energies, tau=0.3, gate=gate, gate_statistic=statistic)
        assert predicted.branch == diag.branch
        assert (predicted.gamma, predicted.log_spread) == (diag.gamma, diag.log_spread)
        # without the energies: known in advance exactly when the gate does not need them
        blind = predict_branch(2, None, gate=gate, gate_statistic=statistic, n_experts=len(scales))
        assert blind.branch in (diag.branch, UNDECIDED)
        assert (blind.branch == UNDECIDED) == (gate == "auto" and len(scales) > 1)
    assert predict_branch(1, [1.0, 2.0]).branch == "mean"
