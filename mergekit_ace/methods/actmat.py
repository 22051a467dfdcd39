"""``merge_method: actmat`` — the mergekit adapter of
:func:`mergekit_ace.kernels.actmat.actmat_merge`."""

from __future__ import annotations

from mergekit_ace.kernels.actmat import DEFAULT_RTOL, actmat_merge
from mergekit_ace.methods.common import (
    KernelMergeMethod,
    _number_or_word,
    lambda_parameter,
    shared,
    weight_parameter,
)

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
}"""


def actmat_method() -> KernelMergeMethod:
    return KernelMergeMethod(
        name="actmat",
        pretty_name=PRETTY_NAME,
        reference_url=REFERENCE_URL,
        citation=CITATION,
        kernel=actmat_merge,
        parameters=(
            shared("rtol", _number_or_word("rtol", "auto", 0.0, "a number in [0, 1)", 1.0), DEFAULT_RTOL,
                   "eigenvalues of the Gram at or below rtol * largest count as zero; auto: "
                   "max(T m, n) * 2^-23, the float32 pinv tolerance, in every dtype"),
            lambda_parameter(),
            weight_parameter(),
        ),
    )
