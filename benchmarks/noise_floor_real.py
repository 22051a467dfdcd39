"""The noise floor on real SmolLM2-135M experts, tensor by tensor through the kernels (CPU):
LoRA experts folded into the bfloat16 base and stored in bfloat16 (share of each merged update
outside the adapters' input span, with and without the floor), and full fine-tunes stored in
float32 (how many merged tensors change at all, and which, by how much).

    python -m benchmarks.noise_floor_real --lora benchmarks/cache/experts/lora-r8 \\
        --lora-base benchmarks/cache/base-bf16 --full benchmarks/cache/experts/main \\
        --full-base benchmarks/cache/base
    python -m benchmarks.noise_floor_real --full benchmarks/cache/experts/uneven \\
        --full-base benchmarks/cache/base --layers all   # every tensor, full fine-tunes only

Each folder under ``--lora`` holds ``bf16/model.safetensors`` (the adapter folded in) and
``adapter/adapter_model.safetensors`` (its ``lora_A``, whose rows span the inputs the expert
changed); each folder under ``--full`` holds ``model.safetensors``.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import torch
from safetensors import safe_open

from benchmarks.noise_floor import KERNELS, directions, outside_share
from benchmarks.real_llama.methods import PAPER, method_specs
from mergekit_ace.kernels.parameters import LAMBDA

SETTINGS = [(name, name, {}) for name in KERNELS] + [("ace, gate: on", "ace", {"gate": "on"})]
# The full fine-tunes' check adds the benchmarks' other ACE row: the paper's eps and gate.
FULL_SETTINGS = SETTINGS + [("ace, eps: 1e-5, gamma", "ace", dict(PAPER))]
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def benchmark_settings(n_experts: int) -> List[Tuple[str, str, Dict]]:
    """Every row of the classification benchmark's grid that merges with one of the five
    methods (benchmarks/real_llama/methods.py), with its parameters under the kernels' names,
    plus ``ace, gate: on``."""
    rows = []
    for spec in method_specs(n_experts):
        if spec.method in KERNELS:
            extra = {
                (LAMBDA.kernel_name if k == LAMBDA.name else k): v
                for k, v in spec.parameters.items()
            }
            rows.append((spec.label, spec.method, extra))
    return rows + [SETTINGS[-1]]


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


def checkpoint_names(path: Path) -> List[str]:
    """Every tensor of a checkpoint, in the file's order."""
    with safe_open(str(path), "pt") as handle:
        return list(handle.keys())


def relative_change(on: torch.Tensor, off: torch.Tensor, W0: torch.Tensor) -> float:
    """``||on - off||_F / ||off - W0||_F`` in float64 (0 when both are equal)."""
    if torch.equal(on, off):
        return 0.0
    d_off = (off - W0).double()
    return float((on.double() - off.double()).norm() / d_off.norm())


def full_rows(
    experts: Sequence[Path], base: Path, names: Sequence[str], settings=FULL_SETTINGS
) -> List[Dict]:
    """Per setting (``(label, method, parameters)``), over the tensors ``names``: how many
    (``count``; 2-D: ``matrices``) merge bit for bit alike with and without the floor
    (``same``; 2-D: ``same_matrices``), each changed one with its :func:`relative_change`
    (``changed``) and the largest (``worst``); ``touched``: the tensors at least one expert
    differs from the base in."""
    rows = {label: dict(method=label, changed=[], worst=0.0) for label, _, _ in settings}
    counts = dict(count=0, matrices=0)
    same = {label: [0, 0] for label in rows}
    touched = []
    for name in names:
        W0 = read(base / "model.safetensors", name)
        stored = [read(e / "model.safetensors", name) for e in experts]
        counts["count"] += 1
        counts["matrices"] += W0.dim() == 2
        touched += [name] if any(not torch.equal(s, W0) for s in stored) else []
        for label, method, extra in settings:
            on, _ = KERNELS[method](W0, stored, tensor_name=name, **extra)
            off, _ = KERNELS[method](W0, stored, noise_floor=False, tensor_name=name, **extra)
            if torch.equal(on, off):
                same[label][0] += 1
                same[label][1] += W0.dim() == 2
                continue
            change = relative_change(on, off, W0)
            rows[label]["changed"].append((name, change))
            rows[label]["worst"] = max(rows[label]["worst"], change)
    return [
        dict(row, **counts, same=same[k][0], same_matrices=same[k][1], touched=touched)
        for k, row in rows.items()
    ]


def mean(values: Sequence[float]) -> float:
    return sum(values) / len(values)


def k_range(values: Sequence[str]) -> str:
    numbers = sorted(int(v) for v in values if v != "-")
    return f"{numbers[0]}-{numbers[-1]}" if numbers else "-"


def print_lora(folder: Path, base: Path, names: Sequence[str], layers: str) -> None:
    experts = sorted(p for p in folder.iterdir() if p.is_dir())
    print(f"LoRA experts: {len(experts)}, {len(names)} tensors (layers {layers})\n")
    print("| method | directions (floor off / on) | outside, false | outside, true |")
    print("|---|---|---|---|")
    for row in lora_rows(experts, base, names):
        if row["method"] == "task_arithmetic":
            print(f"| task arithmetic | - | {mean(row['off']):.3f} | - |")
            continue
        k = f"{k_range(row['k_off'])} / {k_range(row['k_on'])}"
        print(f"| {row['method']} | {k} | {mean(row['off']):.3f} | {mean(row['on']):.3f} |")


def print_full(folder: Path, base: Path, names: Sequence[str], grid: bool) -> None:
    experts = sorted(p for p in folder.iterdir() if p.is_dir())
    settings = benchmark_settings(len(experts)) if grid else FULL_SETTINGS
    dtypes = {str(read(e / "model.safetensors", names[0]).dtype) for e in experts}
    print(f"\nFull fine-tunes ({', '.join(sorted(dtypes))}): {len(experts)} experts\n")
    print("| method | tensors identical | matrices identical | largest change |")
    print("|---|---|---|---|")
    rows = full_rows(experts, base, names, settings)
    for row in rows:
        same = f"{row['same']} / {row['count']}"
        matrices = f"{row['same_matrices']} / {row['matrices']}"
        print(f"| {row['method']} | {same} | {matrices} | {row['worst']:.1e} |")
    for row in rows:
        for name, change in row["changed"]:
            print(f"changed: {row['method']}: {name}: {change:.2e}")
    untouched = [n for n in names if n not in rows[0]["touched"]]
    print(f"tensors no expert changed: {len(untouched)} {untouched[:8]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lora", type=Path)
    parser.add_argument("--lora-base", type=Path)
    parser.add_argument("--full", type=Path)
    parser.add_argument("--full-base", type=Path)
    parser.add_argument(
        "--layers",
        default="0,10,20,29",
        help="comma-separated; `all`: every tensor of the base (the LoRA part: its projections)",
    )
    parser.add_argument(
        "--grid",
        action="store_true",
        help="full fine-tunes: every row of the classification benchmark's grid that merges "
        "with one of the five methods (eps sweep, ablations), not only the defaults",
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.layers == "all":
        base = args.full_base or args.lora_base
        names = checkpoint_names(base / "model.safetensors")
    else:
        names = tensor_names([int(x) for x in args.layers.split(",")])
    if args.lora:
        projections = [n for n in names if n.split(".")[-2] in PROJECTIONS]
        print_lora(args.lora, args.lora_base, projections, args.layers)
    if args.full:
        print_full(args.full, args.full_base, names, args.grid)


if __name__ == "__main__":
    main()
