"""The ACE-Merging kernel: :func:`ace_merge` (:mod:`.merge`) and what it is built from.

:mod:`.parameters` (the parameter table and the gate), :mod:`.settings` (the parameters
resolved for one call), :mod:`.scan` (energies, column means, participants),
:mod:`.workspace` (the memory plan), :mod:`.closed_form` (steps 2-5), :mod:`.refine`
(step 6), :mod:`.reports` (round-off warnings, spectra), :mod:`.cost` (the workspace and flop
estimate) and :mod:`.fallback` (CUDA to CPU when memory is short).
"""

from mergekit_ace.kernels.ace.cost import estimate_ace_cost
from mergekit_ace.kernels.ace.fallback import AceOutOfMemoryError
from mergekit_ace.kernels.ace.merge import AceDiagnostics, ace_merge

__all__ = ["AceDiagnostics", "AceOutOfMemoryError", "ace_merge", "estimate_ace_cost"]
