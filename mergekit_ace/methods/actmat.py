"""``merge_method: actmat`` — the mergekit adapter of
:func:`mergekit_ace.kernels.actmat.actmat_merge`."""

from __future__ import annotations

from mergekit_ace.kernels.actmat import ACTMAT_PARAMETERS, actmat_merge
from mergekit_ace.methods.common import KernelMergeMethod

PRETTY_NAME = "ACTMat"
REFERENCE_URL = "https://arxiv.org/abs/2604.01329"
CITATION = """\
@misc{gamalabdelhameed2026actmat,
  title         = {Model Merging via Data-Free Covariance Estimation},
  author        = {Gamal Abdel Hameed, Marawan and Tam, Derek and Tikeng Notsawo, Pascal Jr and Raffel, Colin and Rabusseau, Guillaume},
  year          = {2026},
  eprint        = {2604.01329},
  archivePrefix = {arXiv},
  primaryClass  = {cs.LG},
}"""  # noqa: E501 (one BibTeX field per line, as the model card shows it)


def actmat_method() -> KernelMergeMethod:
    return KernelMergeMethod(
        name="actmat",
        pretty_name=PRETTY_NAME,
        reference_url=REFERENCE_URL,
        citation=CITATION,
        kernel=actmat_merge,
        parameters=ACTMAT_PARAMETERS,
    )
