"""Expert sets: which tasks, how much data, and how each expert is trained.

``main`` is the benchmark and the demo; ``uneven`` trains the same four tasks with different
learning rates and step counts per expert (task vectors of very different sizes, the case a
scale-free ``eps`` must handle); ``quick`` is the demo's first look.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Dict

from benchmarks.real_llama.model import TrainConfig

CACHE = Path(__file__).resolve().parents[1] / "cache"
TASKS = ("news", "sentiment", "language", "supersense")
MAX_TEXT_TOKENS = 32


@dataclass
class ExpertSet:
    name: str
    train: Dict[str, TrainConfig]
    heldout: int = 128  # held-out examples per task (balanced over labels)
    train_pool: int = 2000  # training examples per task
    data_seed: int = 0
    description: str = ""

    @property
    def tasks(self):
        return list(self.train)


def _same(steps: int, lr: float, tasks=TASKS) -> Dict[str, TrainConfig]:
    return {t: TrainConfig(steps=steps, lr=lr, max_text_tokens=MAX_TEXT_TOKENS) for t in tasks}


EXPERT_SETS: Dict[str, ExpertSet] = {
    "main": ExpertSet(
        "main",
        _same(30, 5e-5),
        description="4 tasks, 30 steps x 8 examples each, lr 5e-5 (cosine, 5 warm-up steps)",
    ),
    "uneven": ExpertSet(
        "uneven",
        {
            "news": TrainConfig(steps=60, lr=1e-4, max_text_tokens=MAX_TEXT_TOKENS),
            "sentiment": TrainConfig(steps=40, lr=5e-5, max_text_tokens=MAX_TEXT_TOKENS),
            "language": TrainConfig(steps=15, lr=2e-5, max_text_tokens=MAX_TEXT_TOKENS),
            "supersense": TrainConfig(steps=30, lr=1e-5, max_text_tokens=MAX_TEXT_TOKENS),
        },
        description="same 4 tasks, uneven training: news 60 steps at 1e-4, sentiment 40 at "
        "5e-5, language 15 at 2e-5, supersense 30 at 1e-5",
    ),
    "quick": ExpertSet(
        "quick",
        _same(20, 5e-5, ("sentiment", "language")),
        heldout=80,
        train_pool=400,
        description="2 tasks, 20 steps each, 80 held-out examples per task",
    ),
}
