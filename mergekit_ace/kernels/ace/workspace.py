"""How one ``[m, n]`` tensor is laid out in memory during ACE's closed form and refinement.

``N = sum w C_t R_t`` is the only ``[m, n]`` buffer that always exists (it becomes ``W_pre``,
then ``W``, then the output). Every other ``[m, n]`` quantity (``tau_t``, ``C_t``,
``sum w tau_t``, ``sum w eps_t C_t``) is re-formed a block of rows at a time from the inputs,
which the caller holds anyway, so the workspace does not grow with the number of experts, and
for tall tensors (embeddings, LM heads) it is about one ``[m, n]`` buffer in the compute dtype
plus ``[n, n]`` matrices (docs/method.md, "Cost").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Sequence, Tuple

# Rows per block: at most this many bytes of one task vector in the compute dtype.
BLOCK_BYTES = 256 * 2**20
# Refinement keeps F = W_pre + D in a second [m, n] buffer up to this size; larger tensors
# (Llama-3's embeddings: 2.1 GB in float32) re-form F block by block, in smaller blocks.
KEEP_F_BYTES = 2**30
STREAM_BLOCK_BYTES = 64 * 2**20


@dataclass(frozen=True)
class WorkspacePlan:
    """``row_gram``: ``2m < n``, the Grams are formed on the row side (``C C^T``, ``[m, m]``)
    and each task vector is formed whole. Otherwise ``C^T C`` (``[n, n]``) is accumulated over
    blocks of ``block_rows`` rows. ``k``: refined directions (0: no refinement). ``keep_f``:
    refinement holds ``F`` in a second ``[m, n]`` buffer; else it re-forms ``F`` block by
    block in two passes (one more solve and residual product per block). ``matmul``: the
    resolved precision of the large products (``linalg.resolve_matmul_precision``).
    """

    m: int
    n: int
    element_bytes: int
    row_gram: bool
    block_rows: int
    k: int
    keep_f: bool
    matmul: str = "float32"

    @property
    def blocks(self) -> List[Tuple[int, int]]:
        return [(s, min(s + self.block_rows, self.m)) for s in range(0, self.m, self.block_rows)]


def plan_workspace(
    shape: Sequence[int],
    element_bytes: int,
    k: int,
    *,
    spectra: bool = False,
    matmul: str = "float32",
) -> WorkspacePlan:
    """The plan for an ``[m, n]`` tensor in a dtype of ``element_bytes``, refined on ``k``
    directions; ``spectra`` (recording ``W_pre``'s singular values) keeps ``F``."""
    m, n = shape
    row_gram = 2 * m < n
    keep_f = k == 0 or row_gram or spectra or m * n * element_bytes <= KEEP_F_BYTES
    block = BLOCK_BYTES if keep_f else STREAM_BLOCK_BYTES
    block_rows = m if row_gram else max(1, min(m, block // (n * element_bytes)))
    return WorkspacePlan(m, n, element_bytes, row_gram, block_rows, k, keep_f, matmul)


def scan_block_rows(m: int, n: int, element_bytes: int) -> int:
    """Rows per block of the experts' scan: at most :data:`STREAM_BLOCK_BYTES` of one task
    vector."""
    return max(1, min(m, STREAM_BLOCK_BYTES // (n * element_bytes)))
