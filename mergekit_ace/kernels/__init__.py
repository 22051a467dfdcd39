"""Numerical kernels: pure torch functions (tensors in; merged tensor and diagnostics out).

Nothing here imports mergekit, so the kernels can be read, tested and reused on their own.
One module per method (:mod:`.ace`, a package, and :mod:`.actmat`, :mod:`.tsv`, :mod:`.iso_c`,
:mod:`.iso_cts` on the shared frame of :mod:`.datafree`), each with its parameter table
(:mod:`.parameters`); the shared steps: :mod:`.inputs` (checks), :mod:`.task_vectors` (who
takes part), :mod:`.storage_noise`, :mod:`.finishing`, :mod:`.reports` (the log), and the
numerics: :mod:`.linalg` and :mod:`.cutoffs` (every numerical-rank decision).
"""

from mergekit_ace.kernels.ace import AceDiagnostics, ace_merge
from mergekit_ace.kernels.actmat import actmat_merge
from mergekit_ace.kernels.inputs import MergeInputError
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
