"""Numerical kernels: pure torch functions (tensors in; merged tensor and diagnostics out).

Nothing here imports mergekit, so the kernels can be read, tested and reused on their own.
"""

from mergekit_ace.kernels.ace import AceDiagnostics, ace_merge
from mergekit_ace.kernels.actmat import actmat_merge
from mergekit_ace.kernels.common import MergeInputError
from mergekit_ace.kernels.iso_c import iso_c_merge
from mergekit_ace.kernels.iso_cts import iso_cts_merge
from mergekit_ace.kernels.tsv import tsv_merge

__all__ = [
    "AceDiagnostics",
    "MergeInputError",
    "ace_merge",
    "actmat_merge",
    "iso_c_merge",
    "iso_cts_merge",
    "tsv_merge",
]
