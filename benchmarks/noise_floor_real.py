"""The noise floor on real SmolLM2-135M experts, tensor by tensor through the kernels (CPU):
LoRA experts folded into the bfloat16 base and stored in bfloat16 (share of each merged update
outside the adapters' input span, with and without the floor), and full fine-tunes stored in
float32 (how many merged tensors change at all).

    python -m benchmarks.noise_floor_real --lora benchmarks/cache/experts/lora-r8 \\
        --lora-base benchmarks/cache/base-bf16 --full benchmarks/cache/experts/main \\
        --full-base benchmarks/cache/base

Each folder under ``--lora`` holds ``bf16/model.safetensors`` (the adapter folded in) and
``adapter/adapter_model.safetensors`` (its ``lora_A``, whose rows span the inputs the expert
changed); each folder under ``--full`` holds ``model.safetensors``.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Dict, List, Sequence

import torch
from safetensors import safe_open

from benchmarks.noise_floor import KERNELS, directions, outside_share

SETTINGS = [(name, name, {}) for name in KERNELS] + [("ace, gate: on", "ace", {"gate": "on"})]
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def tensor_names(layers: Sequence[int]) -> List[str]:
    part = {p: ("self_attn" if p[0] in "qkvo" else "mlp") for p in PROJECTIONS}
    return [f"model.layers.{i}.{part[p]}.{p}.weight" for i in layers for p in PROJECTIONS]


def read(path: Path, name: str) -> torch.Tensor:
    with safe_open(str(path), "pt") as handle:
        return handle.get_tensor(name)


def input_span(adapters: Sequence[Path], name: str) -> torch.Tensor:
    """An orthonormal basis of the adapters' input rows (``lora_A``) for tensor ``name``."""
    key = "base_model.model." + name.replace(".weight", ".lora_A.weight")
    rows = torch.cat([read(a, key).double() for a in adapters], dim=0)
    return torch.linalg.qr(rows.T).Q


def lora_rows(experts: Sequence[Path], base: Path, names: Sequence[str]) -> List[Dict]:
    """Per method and floor setting: mean outside share and the directions kept or boosted
    (ACE's diagnostics ``k``: boosted; ``-`` where the gate chose the homogeneous branch)."""
    adapters = [e / "adapter" / "adapter_model.safetensors" for e in experts]
    results: Dict[str, Dict[str, list]] = {}
    for name in names:
        W0 = read(base / "model.safetensors", name).float()
        stored = [read(e / "bf16" / "model.safetensors", name).float() for e in experts]
        V = input_span(adapters, name)
        total = sum(s - W0 for s in stored)
        results.setdefault("task_arithmetic", {}).setdefault("off", []).append(
            outside_share(total, V)
        )
        for label, method, extra in SETTINGS:
            row = results.setdefault(label, {})
            for key, floor in (("off", False), ("on", True)):
                out, diag = KERNELS[method](W0, stored, noise_floor=floor, **extra)
                row.setdefault(key, []).append(outside_share(out - W0, V))
                row.setdefault("k_" + key, []).append(directions(method, diag))
    return [dict(method=m, **r) for m, r in results.items()]


def full_rows(experts: Sequence[Path], base: Path, names: Sequence[str]) -> List[Dict]:
    """Per method: merged tensors bit-identical with and without the floor, largest change."""
    rows = []
    for method, kernel in KERNELS.items():
        same, worst = 0, 0.0
        for name in names:
            W0 = read(base / "model.safetensors", name)
            stored = [read(e / "model.safetensors", name) for e in experts]
            on, _ = kernel(W0, stored, tensor_name=name)
            off, _ = kernel(W0, stored, noise_floor=False, tensor_name=name)
            same += bool(torch.equal(on, off))
            d_off = (off - W0).double()
            worst = max(worst, float(((on - W0).double() - d_off).norm() / d_off.norm()))
        rows.append(dict(method=method, same=same, count=len(names), worst=worst))
    return rows


def mean(values: Sequence[float]) -> float:
    return sum(values) / len(values)


def k_range(values: Sequence[str]) -> str:
    numbers = sorted(int(v) for v in values if v != "-")
    return f"{numbers[0]}-{numbers[-1]}" if numbers else "-"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lora", type=Path, required=True)
    parser.add_argument("--lora-base", type=Path, required=True)
    parser.add_argument("--full", type=Path, required=True)
    parser.add_argument("--full-base", type=Path, required=True)
    parser.add_argument("--layers", default="0,10,20,29")
    args = parser.parse_args()
    torch.set_num_threads(1)
    names = tensor_names([int(x) for x in args.layers.split(",")])
    experts = sorted(p for p in args.lora.iterdir() if p.is_dir())
    print(f"LoRA experts: {len(experts)}, {len(names)} tensors (layers {args.layers})\n")
    print("| method | directions (floor off / on) | outside, false | outside, true |")
    print("|---|---|---|---|")
    for row in lora_rows(experts, args.lora_base, names):
        if row["method"] == "task_arithmetic":
            print(f"| task arithmetic | - | {mean(row['off']):.3f} | - |")
            continue
        k = f"{k_range(row['k_off'])} / {k_range(row['k_on'])}"
        print(f"| {row['method']} | {k} | {mean(row['off']):.3f} | {mean(row['on']):.3f} |")
    full = sorted(p for p in args.full.iterdir() if p.is_dir())
    print(f"\nFull fine-tunes (float32): {len(full)} experts\n")
    print("| method | tensors identical | largest change of the merged update |")
    print("|---|---|---|")
    for row in full_rows(full, args.full_base, names):
        print(f"| {row['method']} | {row['same']} / {row['count']} | {row['worst']:.1e} |")


if __name__ == "__main__":
    main()
