"""Every kernel refuses to return non-finite values, with advice that fits the method (only
ACE has an ``eps``; ACTMat has ``rtol``), also when the cast to ``out_dtype`` overflows."""

import pytest
import torch

from mergekit_ace.kernels.ace import ace_merge
from mergekit_ace.kernels.actmat import actmat_merge
from mergekit_ace.kernels.iso_c import iso_c_merge
from mergekit_ace.kernels.iso_cts import iso_cts_merge
from mergekit_ace.kernels.tsv import tsv_merge
from tests.helpers import well_conditioned_experts

ADVICE = {  # kernel: (must appear, must not appear)
    ace_merge: ("`eps`", None),
    actmat_merge: ("`rtol`", "eps"),
    tsv_merge: ("float64", "eps"),
    iso_c_merge: ("float64", "eps"),
    iso_cts_merge: ("float64", "eps"),
}


@pytest.mark.parametrize("kernel", list(ADVICE), ids=lambda k: k.__name__)
def test_overflow_is_refused_with_the_methods_advice(kernel):
    base, experts = well_conditioned_experts((12, 10), 2, scale=10.0)
    with pytest.raises(FloatingPointError, match="non-finite") as error:
        kernel(base, experts, lam=1e38, tensor_name="layers.0.w")
    message = str(error.value)
    must, must_not = ADVICE[kernel]
    assert "'layers.0.w'" in message and must in message
    assert must_not is None or must_not not in message


@pytest.mark.parametrize("kernel", list(ADVICE), ids=lambda k: k.__name__)
def test_overflow_of_the_output_dtype_is_refused(kernel):
    """Finite in float32 but beyond float16's range: refused instead of writing Inf."""
    base, experts = well_conditioned_experts((12, 10), 2, scale=10.0)
    with pytest.raises(FloatingPointError, match="float16") as error:
        kernel(base, experts, lam=1e5, out_dtype=torch.float16, tensor_name="layers.0.w")
    assert "'layers.0.w'" in str(error.value)
