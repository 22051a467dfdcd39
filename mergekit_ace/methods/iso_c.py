"""``merge_method: iso_c`` — the mergekit adapter of
:func:`mergekit_ace.kernels.iso_c.iso_c_merge`."""

from __future__ import annotations

from mergekit_ace.kernels.iso_c import iso_c_merge
from mergekit_ace.methods.common import KernelMergeMethod, lambda_parameter

PRETTY_NAME = "Iso-C"
REFERENCE_URL = "https://arxiv.org/abs/2502.04959"


def iso_c_method() -> KernelMergeMethod:
    return KernelMergeMethod(
        name="iso_c",
        pretty_name=PRETTY_NAME,
        reference_url=REFERENCE_URL,
        kernel=iso_c_merge,
        parameters=(lambda_parameter(),),
    )
