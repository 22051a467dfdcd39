"""mergekit-ace: ACE-Merging and its data-free relatives as mergekit merge methods.

Importing the package registers its methods with mergekit (idempotently). Installing it is
enough for new processes: a start-up hook registers them as soon as mergekit's registry loads.
"""

from mergekit_ace.kernels import AceDiagnostics, MergeInputError, ace_merge
from mergekit_ace.registration import install_hooks, register_all
from mergekit_ace.version import __version__

register_all()
install_hooks()

__all__ = ["AceDiagnostics", "MergeInputError", "ace_merge", "register_all", "__version__"]
