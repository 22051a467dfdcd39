"""The generative benchmark's settings: domains, held-out documents, expert training, the merge
grid. No merge or training setting here was chosen by looking at held-out scores (the domain
list was: see ``corpora.DOMAINS``)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from benchmarks.generative.corpora import DOMAINS
from benchmarks.real_llama.methods import MethodSpec, method_specs
from benchmarks.real_llama.model import TrainConfig

# Every method with its defaults, plus ACE under the paper's settings: row labels and groups
# of benchmarks.real_llama.methods.method_specs.
FULL_METHODS = ("ace", "ace (paper: eps=1e-5, gamma)", "baseline", "other")
# The methods merged on random subsets of the experts (retention as a function of T).
SWEEP_METHODS = ("ace", "actmat", "tsv", "task_arithmetic (lambda=1)", "ties", "dare_ties")


@dataclass
class GenSet:
    name: str
    domains: Sequence[str]
    steps: int
    lr: float
    batch_size: int
    seq: int  # tokens per training window and per held-out document
    heldout: int  # held-out documents per domain
    train_seeds: Tuple[int, ...] = (0, 1)
    cross_seeds: Tuple[int, ...] = (0,)  # seeds whose experts are scored on every domain
    full_methods: Sequence[str] = FULL_METHODS  # all-experts merges, first training seed
    later_seed_methods: Optional[Sequence[str]] = None  # the other seeds' (None: the same)
    sweep_methods: Sequence[str] = SWEEP_METHODS
    sweep_sizes: Tuple[int, ...] = (2, 4, 3)  # in run order: a run cut short spans the range
    sweep_subsets: int = 2  # random subsets per size
    sweep_seeds: Tuple[int, ...] = (0, 1)  # training seeds whose experts are swept
    subset_seed: int = 0
    data_seed: int = 0
    warmup: int = 5
    description: str = ""

    def train_config(self, seed: int) -> TrainConfig:
        return TrainConfig(
            steps=self.steps,
            batch_size=self.batch_size,
            lr=self.lr,
            warmup=self.warmup,
            max_text_tokens=self.seq,
            seed=seed,
        )

    def expert_group(self) -> str:
        """Cache folder of the experts (sets that share experts name the same one)."""
        return f"gen-{self.name}"

    def merge_key(self, spec) -> str:
        """Identity of a merge row: a stored row whose key differs is merged again."""
        return spec.key()

    def method_specs(self, size: int) -> List[MethodSpec]:
        """The merge configurations the grid's method labels name, for ``size`` experts."""
        return method_specs(size)

    def mergekit_args(self, merged_root: Path) -> List[str]:
        """Extra ``mergekit-yaml`` options."""
        return []


# The second seed's all-experts merges: the swept methods and ACE with the paper's settings.
LATER_SEED_METHODS = SWEEP_METHODS + ("ace (paper: eps=1e-5, gamma)", "task_arithmetic (mean)")

GEN_SETS: Dict[str, GenSet] = {
    "generative": GenSet(
        "generative",
        DOMAINS,
        steps=12,
        lr=2e-4,
        batch_size=4,
        seq=64,
        heldout=24,
        warmup=2,
        description="6 domains, 12 steps x 4 windows of 64 tokens, lr 2e-4 (cosine, 2 "
        "warm-up steps); 24 held-out documents of up to 64 tokens per domain",
        later_seed_methods=LATER_SEED_METHODS,
    ),
}
