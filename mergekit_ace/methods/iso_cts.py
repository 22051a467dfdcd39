"""``merge_method: iso_cts`` — the mergekit adapter of
:func:`mergekit_ace.kernels.iso_cts.iso_cts_merge`."""

from __future__ import annotations

from mergekit_ace.kernels.iso_cts import ISO_CTS_PARAMETERS, iso_cts_merge
from mergekit_ace.methods.common import KernelMergeMethod
from mergekit_ace.methods.iso_c import CITATION  # one paper describes Iso-C and Iso-CTS

PRETTY_NAME = "Iso-CTS"
REFERENCE_URL = "https://arxiv.org/abs/2502.04959"


def iso_cts_method() -> KernelMergeMethod:
    return KernelMergeMethod(
        name="iso_cts",
        pretty_name=PRETTY_NAME,
        reference_url=REFERENCE_URL,
        citation=CITATION,
        kernel=iso_cts_merge,
        parameters=ISO_CTS_PARAMETERS,
    )
