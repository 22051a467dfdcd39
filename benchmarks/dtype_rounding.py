"""What a ``dtype:`` coarser than the checkpoints does to a merge, measured through
``mergekit-yaml``.

Tiny float32 Llama checkpoints (``tests.tiny_models``): one base and three experts whose task
vectors are a given fraction of each base matrix's standard deviation (scales 1, 3 and 0.5
times that fraction). Each method merges them twice, with ``dtype: float32`` and with
``dtype: bfloat16`` (``out_dtype: float32`` both times); per matrix the change of the merged
update is ``||U_bf16 - U_f32|| / ||U_f32||`` with ``U = merged - base``. Prints min, median and
max over the 16 matrices per method and fraction.

    python -m benchmarks.dtype_rounding [--root DIR]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from tests.tiny_models import (
    TINY,
    build_tiny_family,
    load_state,
    mergekit_yaml,
    save_model,
    structured_delta,
    write_config,
)

FRACTIONS = (1e-1, 1e-2, 1e-3)
SCALES = (1.0, 3.0, 0.5)
METHODS = ("ace", "task_arithmetic")


def experts(root: Path, base: dict, fraction: float) -> list:
    gen = torch.Generator().manual_seed(7)
    paths = []
    for i, scale in enumerate(SCALES):
        state = {
            k: v + structured_delta(v, fraction * scale * v.float().std().item(), gen)
            for k, v in base.items()
        }
        path = root / f"expert-{fraction:g}-{i}"
        save_model(path, state, TINY)
        paths.append(str(path))
    return paths


def update_changes(root: Path, base_path: Path, models: list, method: str) -> list:
    merged = {}
    for dtype in ("float32", "bfloat16"):
        entries = [{"model": m} for m in models]
        if method == "task_arithmetic":
            entries = [{**e, "parameters": {"weight": 1.0}} for e in entries]
        config = {
            "merge_method": method,
            "base_model": str(base_path),
            "dtype": dtype,
            "out_dtype": "float32",
            "models": entries,
        }
        out = root / f"out-{method}-{dtype}"
        mergekit_yaml(
            write_config(root / f"{method}-{dtype}.yml", config), out, "--no-copy-tokenizer"
        )
        merged[dtype] = load_state(out)
    base = load_state(base_path)
    changes = []
    for name, tensor in base.items():
        if tensor.ndim != 2:
            continue
        exact = merged["float32"][name].double() - tensor.double()
        rounded = merged["bfloat16"][name].double() - tensor.double()
        changes.append(((rounded - exact).norm() / exact.norm()).item())
    return sorted(changes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=None)
    args = parser.parse_args()
    root = args.root or Path(tempfile.mkdtemp(prefix="dtype-rounding-"))
    family = build_tiny_family(root / "family")
    base = load_state(family["base"])
    for fraction in FRACTIONS:
        models = experts(root, base, fraction)
        for method in METHODS:
            changes = update_changes(root, family["base"], models, method)
            print(
                f"task vectors {fraction:g} x weight std, {method}: update change "
                f"min {100 * changes[0]:.1f} %, median {100 * changes[len(changes) // 2]:.1f} %, "
                f"max {100 * changes[-1]:.1f} % over {len(changes)} matrices",
                flush=True,
            )


if __name__ == "__main__":
    main()
