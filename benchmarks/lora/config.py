"""The LoRA benchmark's settings: the expert training (fixed before any merge was scored), the
two storage forms and the merge grid. Domains, held-out documents, token windows and the
number of training steps are the generative benchmark's (:mod:`benchmarks.generative.config`),
so the LoRA experts see the same text as the full fine-tunes."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Tuple

from benchmarks.generative.config import GEN_SETS, GenSet
from benchmarks.real_llama.methods import MethodSpec, method_specs
from benchmarks.real_llama.model import TrainConfig

# Attention and MLP projections of a Llama block.
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# The methods of this package; their rows carry a fingerprint of its code (see merge_key).
OURS = ("ace", "actmat", "tsv", "iso_c", "iso_cts")
FULL_METHODS = (
    "ace",
    "ace (eps=0.01)",
    "ace (eps=0.1)",
    "actmat",
    "tsv",
    "iso_c",
    "iso_cts",
    "ties",
    "dare_ties",
    "task_arithmetic (lambda=1)",
    "task_arithmetic (mean)",
    "linear",
)
# ACE with a fixed ridge (its defaults otherwise): on LoRA experts the default scale-free ridge
# (2^-12 of each proxy's trace) leaves the closed form's solve nearly singular; added after
# the defaults were scored, to measure the advice of docs/benchmarks.md.
RIDGE_SPECS = tuple(
    MethodSpec(f"ace (eps={eps:g})", "ace", "lora-ridge", {"eps": eps}) for eps in (1e-2, 1e-1)
)
SWEEP_METHODS = (
    "ace",
    "ace (eps=0.01)",
    "tsv",
    "ties",
    "task_arithmetic (lambda=1)",
    "task_arithmetic (mean)",
)
# adapter: "model: <base>+<adapter dir>", folded by mergekit in float32 (--lora-merge-dtype);
# bf16: the expert checkpoint with the adapter folded in, stored in bfloat16.
FORMS = ("adapter", "bf16")
PACKAGE = Path(__file__).resolve().parents[2] / "mergekit_ace"


def code_fingerprint(root: Path = PACKAGE) -> str:
    """SHA-1 (12 hex digits) of the merge code of this package: every ``.py`` file under
    ``kernels/`` and ``methods/``, by relative path and content."""
    h = hashlib.sha1()
    for sub in ("kernels", "methods"):
        for f in sorted((root / sub).rglob("*.py")):
            h.update(str(f.relative_to(root)).encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()[:12]


@dataclass
class LoraTrainConfig(TrainConfig):
    rank: int = 8
    alpha: float = 16.0
    targets: Tuple[str, ...] = TARGETS

    def key(self) -> str:
        return f"lora_r{self.rank}_a{self.alpha:g}_{len(self.targets)}m_" + super().key()


@dataclass
class LoraSet(GenSet):
    rank: int = 8
    alpha: float = 16.0
    form: str = "adapter"
    targets: Tuple[str, ...] = TARGETS

    def train_config(self, seed: int) -> LoraTrainConfig:
        base = super().train_config(seed)
        return LoraTrainConfig(
            **vars(base), rank=self.rank, alpha=self.alpha, targets=tuple(self.targets)
        )

    def expert_group(self) -> str:
        return self.name.rsplit("-", 1)[0]  # both storage forms share the trained experts

    def merge_key(self, spec) -> str:
        key = spec.key()
        if spec.method in OURS:
            key += f" | code {code_fingerprint()}"
        return key

    def method_specs(self, size: int) -> List[MethodSpec]:
        return method_specs(size) + list(RIDGE_SPECS)

    def mergekit_args(self, merged_root: Path) -> List[str]:
        if self.form != "adapter":
            return []
        return [
            "--lora-merge-cache",
            str(merged_root / "lora-merge-cache"),
            "--lora-merge-dtype",
            "float32",
        ]


def _set(rank: int, form: str) -> LoraSet:
    g = GEN_SETS["generative"]
    return LoraSet(
        f"lora-r{rank}-{form}",
        g.domains,
        steps=g.steps,
        lr=LR,
        batch_size=g.batch_size,
        seq=g.seq,
        heldout=g.heldout,
        warmup=g.warmup,
        train_seeds=(0,),
        cross_seeds=(),
        full_methods=FULL_METHODS,
        sweep_methods=SWEEP_METHODS,
        sweep_sizes=(2, 4, 3),
        sweep_subsets=2,
        sweep_seeds=(0,),
        rank=rank,
        alpha=2.0 * rank,
        form=form,
        description=(
            f"LoRA rank {rank} (alpha {2 * rank}) on {', '.join(TARGETS)}; the generative "
            f"benchmark's 6 domains and windows, {g.steps} steps x {g.batch_size} windows of "
            f"{g.seq} tokens, lr {LR:g} (cosine, {g.warmup} warm-up steps); merged as "
            + (
                "adapters (base+adapter, folded by mergekit in float32)"
                if form == "adapter"
                else "bf16 checkpoints with the adapter folded in"
            )
        ),
    )


LR = 2e-3  # AdamW on the LoRA factors only; 10x the full fine-tunes' 2e-4
LORA_SETS: Dict[str, LoraSet] = {s.name: s for s in (_set(r, f) for r in (8, 32) for f in FORMS)}
