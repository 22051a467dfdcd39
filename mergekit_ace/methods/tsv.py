"""``merge_method: tsv`` — the mergekit adapter of :func:`mergekit_ace.kernels.tsv.tsv_merge`."""

from __future__ import annotations

from mergekit_ace.kernels.tsv import TSV_PARAMETERS, tsv_merge
from mergekit_ace.methods.common import KernelMergeMethod

PRETTY_NAME = "TSV-M (Task Singular Vectors)"
REFERENCE_URL = "https://arxiv.org/abs/2412.00081"
CITATION = """\
@inproceedings{gargiulo2025tsv,
  title         = {Task Singular Vectors: Reducing Task Interference in Model Merging},
  author        = {Gargiulo, Antonio Andrea and Crisostomi, Donato and Bucarelli, Maria Sofia and Scardapane, Simone and Silvestri, Fabrizio and Rodol{\\`a}, Emanuele},
  booktitle     = {Proceedings of the Computer Vision and Pattern Recognition Conference (CVPR)},
  pages         = {18695--18705},
  year          = {2025},
  eprint        = {2412.00081},
  archivePrefix = {arXiv},
}"""  # noqa: E501 (one BibTeX field per line, as the model card shows it)


def tsv_method() -> KernelMergeMethod:
    return KernelMergeMethod(
        name="tsv",
        pretty_name=PRETTY_NAME,
        reference_url=REFERENCE_URL,
        citation=CITATION,
        kernel=tsv_merge,
        parameters=TSV_PARAMETERS,
    )
