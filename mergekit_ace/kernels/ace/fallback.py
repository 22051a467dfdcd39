"""With ``--cuda``, a tensor whose estimated workspace (:func:`~mergekit_ace.kernels.ace.cost.
estimate_ace_cost`) does not fit in free GPU memory is merged on the CPU (``oom_fallback:
cpu``, logged) or refused before any work (``oom_fallback: error``)."""

from __future__ import annotations

import logging
from typing import Callable, Optional, Sequence, Tuple, TypeVar

import torch

from mergekit_ace.kernels.ace.cost import estimate_ace_cost
from mergekit_ace.kernels.ace.settings import AceSettings

logger = logging.getLogger(__name__)

# Share of the free GPU memory the estimated workspace may take: the estimate is within
# -14 %..+30 % of the true peak (docs/performance.md) and ignores the allocator's
# fragmentation and cuBLAS/cuSOLVER workspaces.
CUDA_HEADROOM = 0.75
Result = TypeVar("Result")


class AceOutOfMemoryError(MemoryError):
    """A tensor's ACE workspace does not fit in free GPU memory and ``oom_fallback`` is
    ``error``; the message names the tensor, the sizes and what to change."""


def cuda_free_bytes(device: torch.device) -> int:
    """Free memory on ``device``: the driver's free bytes plus what PyTorch's caching
    allocator holds but does not use (it can hand that out again), within the process's cap
    (``torch.cuda.set_per_process_memory_fraction``) where one is set. A ``device`` without
    an index (mergekit's ``torch.device("cuda")``) is the current one."""
    device = torch.device(device)
    if device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    free, total = torch.cuda.mem_get_info(device)
    allocated = torch.cuda.memory_allocated(device)
    available = free + torch.cuda.memory_reserved(device) - allocated
    fraction = getattr(torch.cuda, "get_per_process_memory_fraction", lambda d: 1.0)(device)
    return int(max(0, min(available, fraction * total - allocated)))


def goes_to_cpu(
    base: torch.Tensor,
    n_experts: int,
    settings: AceSettings,
    free_device_bytes: Optional[int],
    tensor_name: Optional[str],
) -> bool:
    """Whether this call's 2-D CUDA tensor is merged on the CPU instead
    (:func:`needs_cpu_fallback`); ``free_device_bytes`` overrides the measured free memory."""
    if base.dim() != 2 or base.device.type != "cuda":
        return False
    if free_device_bytes is None:
        free_device_bytes = cuda_free_bytes(base.device)
    return needs_cpu_fallback(
        tuple(base.shape),
        n_experts,
        settings.element_bytes,
        free_device_bytes,
        policy=settings.oom_fallback,
        tensor_name=tensor_name,
        k_frac=settings.k_frac if settings.refine else 0.0,
        matmul=settings.matmul,
    )


def needs_cpu_fallback(
    shape: Sequence[int],
    n_experts: int,
    bytes_per_element: int,
    free_bytes: int,
    *,
    policy: str = "cpu",
    tensor_name: Optional[str] = None,
    k_frac: float = 0.3,
    matmul: str = "float32",
) -> bool:
    """Decide where a CUDA tensor is merged. True: on the CPU (``policy="cpu"``, logged);
    False: the estimated workspace fits in ``CUDA_HEADROOM`` of ``free_bytes``;
    ``policy="error"`` raises :class:`AceOutOfMemoryError` instead of falling back."""
    need = estimate_ace_cost(shape, n_experts, bytes_per_element, k_frac=k_frac, matmul=matmul)
    if need["bytes"] <= CUDA_HEADROOM * free_bytes:
        return False
    where = f"tensor {tensor_name!r}" if tensor_name else "a tensor"
    sizes = (
        f"{where} of shape {list(shape)} with {n_experts} expert(s) needs about "
        f"{need['bytes'] / 2**30:.2f} GiB of GPU workspace but only "
        f"{free_bytes / 2**30:.2f} GiB is free"
    )
    if policy == "error":
        raise AceOutOfMemoryError(
            f"{sizes}. Set `oom_fallback: cpu` under `parameters:` to merge such tensors on the "
            "CPU, or free GPU memory (drop --read-to-gpu, merge fewer experts at once, or run "
            "without --cuda)."
        )
    logger.warning("ACE: %s; merging it on the CPU (oom_fallback: cpu).", sizes)
    return True


def merge_on_cpu(
    merge: Callable[
        [torch.Tensor, Sequence[torch.Tensor], AceSettings], Tuple[torch.Tensor, Result]
    ],
    base: torch.Tensor,
    experts: Sequence[torch.Tensor],
    settings: AceSettings,
) -> Tuple[torch.Tensor, Result]:
    """``merge(base, experts, settings)`` on CPU copies of the inputs, the result moved back to
    the inputs' device; the diagnostics say ``device: "cpu (fallback)"``."""
    out, diag = merge(base.cpu(), [e.cpu() for e in experts], settings.on_cpu())
    diag.device = "cpu (fallback)"
    return return_to(out, base.device), diag


def return_to(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Move a CPU-fallback result back to the inputs' device."""
    return tensor.to(device)
