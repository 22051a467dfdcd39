"""Storage noise and the rank decisions: how much of each method's merged update lies outside the
experts' span when LoRA-style experts are stored in bfloat16, with the noise floor
(``noise_floor: true``, the default) and without it; and how far float32 and float64 merges of
exactly low-rank experts differ (docs/method.md, "Directions at the storage noise floor").

    python -m benchmarks.noise_floor            # both tables, Markdown

The case: a ``[512, 512]`` base at Llama's weight scale (entries ``0.02 N(0, 1)``, stored in
bfloat16) and three rank-8 experts with task-vector energies ``1 : 9 : 0.25`` (the first one's
``||tau||_F`` is 2.4 % of ``||W0||_F``), each stored in bfloat16 (read back as float32, as
mergekit's ``dtype: float32`` hands them over). Their rounding is full rank; the experts' span
is the 24 input directions they were trained in. "Outside" is the share of the merged update's
Frobenius norm outside that span: ``||dW (I - V V^T)||_F / ||dW||_F``.
"""

from __future__ import annotations

import argparse
import math
from typing import Dict, List, Sequence, Tuple

import torch

from mergekit_ace.kernels.ace import ace_merge
from mergekit_ace.kernels.actmat import actmat_merge
from mergekit_ace.kernels.iso_c import iso_c_merge
from mergekit_ace.kernels.iso_cts import iso_cts_merge
from mergekit_ace.kernels.tsv import tsv_merge

SHAPE = (512, 512)
RANK = 8
ENERGIES = (1.0, 9.0, 0.25)
BASE_SCALE = 0.02  # Llama's initialization scale of a weight entry
FIRST_NORM = 0.25  # ||tau_1||_F (2.4 % of ||W0||_F = 10.2)
# The tiny test Llamas' MLP shapes and expert scales, with exactly rank-2 task vectors.
TINY_SHAPES = ((64, 32), (32, 64), (32, 32), (128, 32))
TINY_SCALES = (0.002, 0.03, 0.01)

KERNELS = {
    "ace": ace_merge,
    "tsv": tsv_merge,
    "iso_c": iso_c_merge,
    "iso_cts": iso_cts_merge,
    "actmat": actmat_merge,
}


def lora_experts(
    seed: int = 0, stored: torch.dtype = torch.bfloat16
) -> Tuple[torch.Tensor, List[torch.Tensor], torch.Tensor]:
    """``(base, experts, V)``: the base and the experts as float32 tensors holding values of
    ``stored``, and ``V`` (``[n, 24]``), an orthonormal basis of the experts' input span."""
    g = torch.Generator().manual_seed(seed)
    m, n = SHAPE
    base = (BASE_SCALE * torch.randn(m, n, generator=g)).to(stored).float()
    experts, rows = [], []
    for energy in ENERGIES:
        U = torch.linalg.qr(torch.randn(m, RANK, generator=g)).Q
        V = torch.linalg.qr(torch.randn(n, RANK, generator=g)).Q
        s = torch.rand(RANK, generator=g) + 0.5
        s = s / s.norm() * math.sqrt(energy) * FIRST_NORM
        experts.append((base + (U * s) @ V.T).to(stored).float())
        rows.append(V)
    return base, experts, torch.linalg.qr(torch.cat(rows, dim=1)).Q


def outside_share(update: torch.Tensor, V: torch.Tensor) -> float:
    """``||dW (I - V V^T)||_F / ||dW||_F`` in float64."""
    d, V = update.double(), V.double()
    return float((d - (d @ V) @ V.T).norm() / d.norm())


def directions(name: str, diag) -> str:
    """What the method's rank decision kept: ACE's boosted ``k``, the siblings' ``rank``."""
    if name == "ace":
        return str(diag.k) if diag.branch == "heterogeneous" else "-"
    return str(diag.rank)


def outside_table(seed: int = 0) -> List[Dict[str, object]]:
    """One row per method and setting: directions kept or boosted, the share outside the
    span with the noise floor and without it."""
    base, experts, V = lora_experts(seed)
    total = sum(e - base for e in experts)
    rows = [dict(method="task_arithmetic", k="-", off=outside_share(total, V), on=None)]
    settings = [("ace", {}), ("ace", {"k_frac": 0.1}), ("ace", {"gate": "off"})]
    settings += [(name, {}) for name in KERNELS if name != "ace"]
    for name, extra in settings:
        row: Dict[str, object] = {"method": name + "".join(f", {k}: {v}" for k, v in extra.items())}
        for key, floor in (("off", False), ("on", True)):
            out, diag = KERNELS[name](base, experts, noise_floor=floor, **extra)
            row[key] = outside_share(out - base, V)
            row["k" if floor else "k_off"] = directions(name, diag)
        rows.append(row)
    return rows


def tiny_rank2(shape: Sequence[int], seed: int = 0):
    """A float32 base at weight scale and three experts with exactly rank-2 task vectors."""
    g = torch.Generator().manual_seed(seed)
    m, n = shape
    base = BASE_SCALE * torch.randn(m, n, generator=g)
    low = [torch.randn(m, 2, generator=g) @ torch.randn(2, n, generator=g) for _ in TINY_SCALES]
    return base, [base + s * x for s, x in zip(TINY_SCALES, low)]


def float32_vs_float64(name: str, shape: Sequence[int], noise_floor: bool = True) -> float:
    """``||dW_32 - dW_64||_F / ||dW_64||_F`` of ``name``'s merge of :func:`tiny_rank2`."""
    base, experts = tiny_rank2(shape)
    out32, _ = KERNELS[name](base, experts, noise_floor=noise_floor)
    out64, _ = KERNELS[name](base.double(), [e.double() for e in experts], noise_floor=noise_floor)
    d64 = out64 - base.double()
    return float((out32.double() - base.double() - d64).norm() / d64.norm())


def main() -> None:
    argparse.ArgumentParser(description=__doc__.split("\n\n")[0]).parse_args()
    torch.manual_seed(0)
    print("| method | directions (floor off / on) | outside, noise_floor: false | outside, true |")
    print("|---|---|---|---|")
    for row in outside_table():
        on = "-" if row["on"] is None else f"{row['on']:.3f}"
        k = row["k"] if row["on"] is None else f"{row['k_off']} / {row['k']}"
        print(f"| {row['method']} | {k} | {row['off']:.3f} | {on} |")
    print()
    print("| method | shape | float32 vs float64, noise_floor: false | true |")
    print("|---|---|---|---|")
    for name in KERNELS:
        for shape in TINY_SHAPES:
            off, on = float32_vs_float64(name, shape, False), float32_vs_float64(name, shape)
            print(f"| {name} | {list(shape)} | {off:.1e} | {on:.1e} |")


if __name__ == "__main__":
    main()
