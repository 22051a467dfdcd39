"""``merge_method: tsv`` — the mergekit adapter of :func:`mergekit_ace.kernels.tsv.tsv_merge`."""

from __future__ import annotations

from mergekit_ace.kernels.tsv import tsv_merge
from mergekit_ace.methods.common import KernelMergeMethod, lambda_parameter

PRETTY_NAME = "TSV-M (Task Singular Vectors)"
REFERENCE_URL = "https://arxiv.org/abs/2412.00081"


def tsv_method() -> KernelMergeMethod:
    return KernelMergeMethod(
        name="tsv",
        pretty_name=PRETTY_NAME,
        reference_url=REFERENCE_URL,
        kernel=tsv_merge,
        parameters=(lambda_parameter(),),
    )
