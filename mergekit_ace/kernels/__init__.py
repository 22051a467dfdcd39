"""Numerical kernels: pure torch functions (tensors in; merged tensor and diagnostics out).

Nothing here imports mergekit, so the kernels can be read, tested and reused on their own.
"""

from mergekit_ace.kernels.ace import AceDiagnostics, ace_merge
from mergekit_ace.kernels.common import MergeInputError

__all__ = ["AceDiagnostics", "MergeInputError", "ace_merge"]
