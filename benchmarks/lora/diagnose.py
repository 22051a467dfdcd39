"""Where ACE's merged update of LoRA experts lies: against the sum and the mean of the task
vectors, per module type, for both storage forms; and how much the experts' input subspaces
overlap.

    python -m benchmarks.lora.diagnose --rank 8   # benchmarks/results/lora_diagnostics_r8.*

For a tensor with task vectors ``tau_t`` and ACE's merged update ``W`` (the kernel with its
defaults, float32), it reports ``a_sum = <W, S> / <S, S>`` with ``S = sum_t tau_t`` (1: ACE
adds the experts, as task arithmetic at lambda 1; 1/T: it averages them), ``|W| / |S|``, the
share of ``W`` outside the line of ``S``, ``1 - <W, S>^2 / (|W|^2 |S|^2)``, and the mean pairwise
overlap of the experts' input (row) subspaces, ``||P_i P_j||_F^2 / r`` for the projections
``P`` onto each ``tau_t``'s top-``r`` right singular vectors (0: orthogonal, 1: the same).
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path
from typing import Dict, List

import torch
from safetensors import safe_open

from benchmarks.lora.config import LORA_SETS
from benchmarks.lora.experts import ADAPTER, FOLDED
from benchmarks.real_llama.config import CACHE
from benchmarks.real_llama.run import RESULTS
from mergekit_ace.kernels.ace import ace_merge

MODULES = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
)


def _tensor(path: Path, name: str) -> torch.Tensor:
    with safe_open(str(path), "pt") as f:
        return f.get_tensor(name).float()


def adapter_delta(adapter_dir: Path, name: str) -> torch.Tensor:
    """``(alpha / r) B A`` of the tensor ``name`` (``...q_proj.weight``), from the saved factors."""
    cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    stem = "base_model.model." + name[: -len(".weight")]
    f = adapter_dir / "adapter_model.safetensors"
    a, b = _tensor(f, f"{stem}.lora_A.weight"), _tensor(f, f"{stem}.lora_B.weight")
    return cfg["lora_alpha"] / cfg["r"] * (b @ a)


def overlap(taus: List[torch.Tensor], r: int) -> float:
    ps = [torch.linalg.svd(t.double(), full_matrices=False)[2][:r] for t in taus]
    return float(
        sum((p @ q.T).pow(2).sum() / r for p, q in itertools.combinations(ps, 2))
        / (len(ps) * (len(ps) - 1) / 2)
    )


def tensor_row(
    base: torch.Tensor, experts: List[torch.Tensor], r: int, **params
) -> Dict[str, float]:
    """The numbers of the module docstring for one tensor; ``params``: ``ace_merge``'s."""
    taus = [e - base for e in experts]
    merged, diag = ace_merge(base, experts, **params)
    w = (merged.float() - base).double()
    s = sum(t.double() for t in taus)
    dot = float((w * s).sum())
    return {
        "a_sum": dot / float((s * s).sum()),
        "norm_ratio": float(w.norm() / s.norm()),
        "outside": 1 - dot**2 / float((w * w).sum() * (s * s).sum()),
        "overlap": overlap(taus, r),
        "branch": diag.branch,
        "k": int(diag.k or 0),
    }


def diagnose(rank: int, layers=range(0, 30, 5), cache: Path = CACHE, **params) -> Dict[str, Dict]:
    """Means over ``layers`` per storage form and module type; ``params``: ACE's (default:
    its defaults)."""
    gs = LORA_SETS[f"lora-r{rank}-adapter"]
    cfg = gs.train_config(0)
    root = cache / "experts" / gs.expert_group()
    dirs = [next(root.glob(f"{d}_h{gs.heldout}_d{gs.data_seed}_{cfg.key()}")) for d in gs.domains]
    base_file = cache / "base-bf16" / "model.safetensors"
    out: Dict[str, Dict] = {}
    for form in (ADAPTER, FOLDED):
        for mod in MODULES:
            rows = []
            for layer in layers:
                name = f"model.layers.{layer}.{mod}.weight"
                base = _tensor(base_file, name)
                if form == ADAPTER:
                    experts = [base + adapter_delta(d / ADAPTER, name) for d in dirs]
                else:
                    experts = [_tensor(d / FOLDED / "model.safetensors", name) for d in dirs]
                rows.append(tensor_row(base, experts, rank, **params))
            out.setdefault(form, {})[mod] = {
                k: sum(r[k] for r in rows) / len(rows)
                for k in ("a_sum", "norm_ratio", "outside", "overlap")
            }
            out[form][mod]["branches"] = sorted({r["branch"] for r in rows})
            out[form][mod]["k_max"] = max(r["k"] for r in rows)
    return out


def markdown(res: Dict[str, Dict], rank: int, n: int, layers, params: Dict) -> str:
    lines = [
        "| form | module | a_sum (1 = sum, 1/T = mean) | norm W / norm sum | outside span(sum) "
        "| input-subspace overlap | branch | k |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for form, mods in res.items():
        for mod, v in mods.items():
            lines.append(
                f"| {form} | {mod} | {v['a_sum']:.3f} | {v['norm_ratio']:.2f} | {v['outside']:.3f} "
                f"| {v['overlap']:.3f} "
                f"| {', '.join(v['branches'])} | {v['k_max']} |"
            )
    lines.append("")
    lines.append(
        f"Rank {rank}, {n} experts (1/T = {1 / n:.3f}); means over layers "
        f"{', '.join(map(str, layers))}; ACE with {params or 'its defaults'} on the task vectors "
        "of each storage form."
    )
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--eps", type=float, default=None, help="a fixed ridge (default: auto)")
    ap.add_argument("--layers", nargs="*", type=int, default=list(range(0, 30, 5)))
    args = ap.parse_args(argv)
    params = {} if args.eps is None else {"eps": args.eps}
    res = diagnose(args.rank, args.layers, **params)
    n = len(LORA_SETS[f"lora-r{args.rank}-adapter"].domains)
    md = markdown(res, args.rank, n, args.layers, params)
    stem = f"lora_diagnostics_r{args.rank}" + (f"_eps{args.eps:g}" if params else "")
    (RESULTS / f"{stem}.json").write_text(json.dumps(res, indent=1))
    (RESULTS / f"{stem}.md").write_text(md + "\n")
    print(md)


if __name__ == "__main__":
    main()
