"""``merge_method: ace`` — the mergekit adapter of :func:`mergekit_ace.kernels.ace.ace_merge`.

Its parameters are the kernel's table (:data:`~mergekit_ace.kernels.ace.parameters.
ACE_PARAMETERS`): same defaults, same checks, same descriptions.
"""

from __future__ import annotations

from mergekit_ace.kernels.ace import ace_merge
from mergekit_ace.kernels.ace.parameters import ACE_PARAMETERS
from mergekit_ace.methods.common import KernelMergeMethod

PRETTY_NAME = "ACE-Merging"
REFERENCE_URL = "https://arxiv.org/abs/2603.02945"
CITATION = """\
@inproceedings{xu2026acemerging,
  title         = {{ACE-Merging}: Data-Free Model Merging with Adaptive Covariance Estimation},
  author        = {Xu, Bo and Wu, Haotian and Lin, Hehai and Huang, Weiquan and Zhu, Beier and Shu, Yao and Qin, Chengwei},
  booktitle     = {IEEE/CVF Conference on Computer Vision and Pattern Recognition (CVPR)},
  year          = {2026},
  eprint        = {2603.02945},
  archivePrefix = {arXiv},
}"""  # noqa: E501 (one BibTeX field per line, as the model card shows it)


def ace_method() -> KernelMergeMethod:
    return KernelMergeMethod(
        name="ace",
        pretty_name=PRETTY_NAME,
        reference_url=REFERENCE_URL,
        citation=CITATION,
        kernel=ace_merge,
        parameters=ACE_PARAMETERS,
    )
