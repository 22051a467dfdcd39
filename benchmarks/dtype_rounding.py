"""What a ``dtype:`` coarser than the checkpoints does to a merge, measured through
``mergekit-yaml``.

Tiny float32 Llama checkpoints (2 layers, hidden size 32, 16 matrices; the base is the test
suite's tiny base, same seed): one base and three experts whose task vectors are a given
fraction of each base matrix's standard deviation (scales 1, 3 and 0.5 times that fraction).
Each method merges them twice, with ``dtype: float32`` and with ``dtype: bfloat16``
(``out_dtype: float32`` both times); per matrix the change of the merged update is
``||U_bf16 - U_f32|| / ||U_f32||`` with ``U = merged - base``. Prints min, median and max over
the 16 matrices per method and fraction.

    python -m benchmarks.dtype_rounding [--root DIR]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file

TINY = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=128,
    max_position_embeddings=64,
    tie_word_embeddings=False,
)
FRACTIONS = (1e-1, 1e-2, 1e-3)
SCALES = (1.0, 3.0, 0.5)
METHODS = ("ace", "task_arithmetic")


def save_model(path: Path, state: dict) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(**TINY))
    model.load_state_dict(state)
    model.save_pretrained(path, safe_serialization=True)


def load_state(path: Path) -> dict:
    state = {}
    for file in sorted(Path(path).glob("*.safetensors")):
        state.update(load_file(file))
    return state


def tiny_base(root: Path) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**TINY))
    save_model(root / "base", {k: v.detach().clone() for k, v in model.state_dict().items()})
    return root / "base"


def structured_delta(tensor: torch.Tensor, scale: float, gen: torch.Generator) -> torch.Tensor:
    """A rank-2 update plus 0.2 of full-rank noise for matrices, noise for vectors."""
    if tensor.dim() == 2:
        m, n = tensor.shape
        low = torch.randn(m, 2, generator=gen) @ torch.randn(2, n, generator=gen)
        return scale * (low + 0.2 * torch.randn(m, n, generator=gen))
    return scale * torch.randn(tensor.shape, generator=gen)


def mergekit_yaml(config: dict, config_path: Path, out: Path) -> None:
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    script = Path(sys.executable).with_name("mergekit-yaml")
    subprocess.run(
        [str(script), str(config_path), str(out), "--no-copy-tokenizer"],
        check=True,
        capture_output=True,
    )


def experts(root: Path, base: dict, fraction: float) -> list:
    gen = torch.Generator().manual_seed(7)
    paths = []
    for i, scale in enumerate(SCALES):
        state = {
            k: v + structured_delta(v, fraction * scale * v.float().std().item(), gen)
            for k, v in base.items()
        }
        path = root / f"expert-{fraction:g}-{i}"
        save_model(path, state)
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
        mergekit_yaml(config, root / f"{method}-{dtype}.yml", out)
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
    base_path = tiny_base(root)
    base = load_state(base_path)
    for fraction in FRACTIONS:
        models = experts(root, base, fraction)
        for method in METHODS:
            changes = update_changes(root, base_path, models, method)
            print(
                f"task vectors {fraction:g} x weight std, {method}: update change "
                f"min {100 * changes[0]:.1f} %, median {100 * changes[len(changes) // 2]:.1f} %, "
                f"max {100 * changes[-1]:.1f} % over {len(changes)} matrices",
                flush=True,
            )


if __name__ == "__main__":
    main()
