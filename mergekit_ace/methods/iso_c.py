"""``merge_method: iso_c`` — the mergekit adapter of
:func:`mergekit_ace.kernels.iso_c.iso_c_merge`."""

from __future__ import annotations

from mergekit_ace.kernels.iso_c import ISO_C_PARAMETERS, iso_c_merge
from mergekit_ace.methods.common import KernelMergeMethod

PRETTY_NAME = "Iso-C"
REFERENCE_URL = "https://arxiv.org/abs/2502.04959"
CITATION = """\
@inproceedings{marczak2025isotropic,
  title         = {No Task Left Behind: Isotropic Model Merging with Common and Task-Specific Subspaces},
  author        = {Marczak, Daniel and Magistri, Simone and Cygert, Sebastian and Twardowski, Bart{\\l}omiej and Bagdanov, Andrew D. and Van De Weijer, Joost},
  booktitle     = {Proceedings of the 42nd International Conference on Machine Learning},
  series        = {Proceedings of Machine Learning Research},
  volume        = {267},
  pages         = {43177--43199},
  year          = {2025},
  eprint        = {2502.04959},
  archivePrefix = {arXiv},
}"""  # noqa: E501 (one BibTeX field per line, as the model card shows it)


def iso_c_method() -> KernelMergeMethod:
    return KernelMergeMethod(
        name="iso_c",
        pretty_name=PRETTY_NAME,
        reference_url=REFERENCE_URL,
        citation=CITATION,
        kernel=iso_c_merge,
        parameters=ISO_C_PARAMETERS,
    )
