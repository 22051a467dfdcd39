"""Every method's parameters are described once, in its kernel's table: the kernel and the
mergekit adapter take the same defaults and accept or refuse the same values with the same
message, the documentation's tables say what the tables say, and ACE's kernel branch is the
gate function's prediction."""

from __future__ import annotations

import inspect
import math
import re
from pathlib import Path

import pytest
import torch

from mergekit_ace.kernels.ace import ace_merge
from mergekit_ace.kernels.ace.parameters import ACE_PARAMETERS
from mergekit_ace.kernels.actmat import ACTMAT_PARAMETERS
from mergekit_ace.kernels.datafree import merge_tensor
from mergekit_ace.kernels.iso_c import ISO_C_PARAMETERS
from mergekit_ace.kernels.iso_cts import ISO_CTS_PARAMETERS
from mergekit_ace.kernels.parameters import PER_MODEL
from mergekit_ace.kernels.tsv import TSV_PARAMETERS
from mergekit_ace.methods import our_method
from tests.helpers import KERNELS

ROOT = Path(__file__).resolve().parents[1]
TABLES = {
    "ace": ACE_PARAMETERS,
    "actmat": ACTMAT_PARAMETERS,
    "tsv": TSV_PARAMETERS,
    "iso_c": ISO_C_PARAMETERS,
    "iso_cts": ISO_CTS_PARAMETERS,
}
SHARED_VALUES = {
    "drop_noise": [True, False, "no", 2],
    "noise_floor": [True, False, "off", "sometimes"],
    "lambda": [1.0, -0.5, "0.5", math.inf, "x", True],
}
VALUES = {
    "ace": {
        "eps": [0.0, 1e-5, "auto", "AUTO", -1.0, math.inf, "autoo", True],
        "tau": [0.0, 0.3, "0.5", -0.1, math.inf, math.nan, "abc"],
        "gate": ["auto", "on", "ON", "off", True, False, "maybe"],
        "gate_statistic": ["gamma", "log_spread", "Gamma", "x"],
        "refine": [True, False, "yes", 0, "maybe", 2],
        "k_frac": [0.0, 0.3, 1.0, 1.5, -0.1],
        "prior": [True, False, "off", "sometimes"],
        "oom_fallback": ["cpu", "error", "CPU", "gpu"],
        "matmul_precision": ["auto", "float32", "TF32", "tf32x3", "fp16"],
    },
    "actmat": {"rtol": [0.0, 1e-3, "auto", "AUTO", 0.999, 1.0, -0.1, "tiny", True, math.nan]},
    "tsv": {},
    "iso_c": {},
    "iso_cts": {"common_space_fraction": [0.0, 0.5, 1.0, "0.5", 1.5, -0.1, "most", True]},
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


def kernel_defaults(method: str) -> dict:
    """The defaults of the kernel's keyword arguments, the shared frame's included."""
    frame = {} if method == "ace" else inspect.signature(merge_tensor).parameters
    own = inspect.signature(KERNELS[method]).parameters
    return {
        name: p.default
        for name, p in {**frame, **own}.items()
        if p.default is not inspect.Parameter.empty
    }


@pytest.mark.parametrize("method", sorted(TABLES))
def test_kernel_and_adapter_defaults_are_the_table(method):
    table, spec = TABLES[method], {p.name: p for p in our_method(method).spec.parameters}
    assert [p.name for p in table] == [p.name for p in our_method(method).spec.parameters]
    defaults = kernel_defaults(method)
    for parameter in table:
        assert spec[parameter.name].default == parameter.default, parameter.name
        assert spec[parameter.name].description == parameter.description
        if parameter.scope != PER_MODEL:
            assert defaults[parameter.kernel_name] == parameter.default, parameter.name
    assert set(VALUES[method]) | set(SHARED_VALUES) | {"weight"} >= {p.name for p in table}


@pytest.mark.parametrize(
    "method,name", [(m, n) for m in sorted(TABLES) for n in sorted({**VALUES[m], **SHARED_VALUES})]
)
def test_kernel_and_adapter_accept_and_refuse_the_same_values(method, name):
    """The adapter's value (after its check) reaches the kernel; a value it refuses is refused
    by the kernel too, with the same message."""
    spec = {p.name: p for p in our_method(method).spec.parameters}[name]
    keyword = TABLES[method][name].kernel_name
    base, tensors = experts()
    for value in {**VALUES[method], **SHARED_VALUES}[name]:
        adapter, said = outcome(lambda: spec.validate(value))
        kernel, message = outcome(lambda: KERNELS[method](base, tensors, **{keyword: value}))
        assert kernel == adapter, (method, name, value, said, message)
        if adapter == "error":
            assert f"parameter `{name}`" in message and message in said


def rendered(value) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def test_readme_table_gives_ace_table_defaults_and_scopes():
    readme = (ROOT / "README.md").read_text()
    table = readme[readme.index("### Parameters") : readme.index("## Documentation")]
    rows = re.findall(r"^\| `(\w+)` \| ([\w ]+) \| `([^`]+)` \|", table, flags=re.M)
    assert sorted(name for name, _, _ in rows) == sorted(p.name for p in ACE_PARAMETERS)
    for name, scope, default in rows:
        parameter = ACE_PARAMETERS[name]
        assert default == rendered(parameter.default), name
        assert scope == ("per model" if parameter.scope == PER_MODEL else "shared"), name


def test_family_page_gives_the_tables_defaults():
    family = (ROOT / "docs" / "family.md").read_text()
    stated = re.findall(r"`(\w+)`(?:\s+in \[[^\]]*\])?\s+\(default\s+`?([\w.]+)`?", family)
    assert {name for name, _ in stated} >= {
        "lambda",
        "drop_noise",
        "rtol",
        "common_space_fraction",
        "weight",
    }
    defaults = {
        p.name: rendered(p.default)
        for m in ("actmat", "tsv", "iso_c", "iso_cts")
        for p in TABLES[m]
    }
    for name, default in stated:
        assert default == defaults[name], name


@pytest.mark.parametrize("gate", ["auto", "on", "off"])
@pytest.mark.parametrize("statistic", ["gamma", "log_spread"])
def test_kernel_branch_is_the_gate_prediction(gate, statistic):
    from mergekit_ace.kernels.ace.parameters import UNDECIDED, predict_branch

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
