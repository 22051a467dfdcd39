"""``merge_method: actmat`` — the mergekit adapter of
:func:`mergekit_ace.kernels.actmat.actmat_merge`."""

from __future__ import annotations

from mergekit_ace.kernels.actmat import actmat_merge
from mergekit_ace.methods.common import KernelMergeMethod, lambda_parameter, weight_parameter

PRETTY_NAME = "ACTMat"
REFERENCE_URL = "https://arxiv.org/abs/2604.01329"


def actmat_method() -> KernelMergeMethod:
    return KernelMergeMethod(
        name="actmat",
        pretty_name=PRETTY_NAME,
        reference_url=REFERENCE_URL,
        kernel=actmat_merge,
        parameters=(lambda_parameter(), weight_parameter()),
    )
