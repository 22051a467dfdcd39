"""Six text domains that install offline, as documents split into held-out and training sets.

Every loader returns ``(group, text)`` pairs: documents of one group (one source file) land on
the same side of the split, so no held-out text is ever trained on, not even a neighbouring
function of the same module. The held-out documents are drawn first, with a fixed seed.
"""

from __future__ import annotations

import random
import re
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Tuple

from benchmarks.real_llama.data import (
    FORTUNE_ROOT,
    _fortune_files,
    load_bbc,
    load_sentiment,
    load_supersense,
)

Doc = Tuple[str, str]  # (group, text)
MIN_CHARS = 40
MAX_CHARS = 1200  # raw text cut before tokenization (documents are cut to a token count later)


@dataclass
class Domain:
    name: str
    train: List[str] = field(default_factory=list)
    heldout: List[str] = field(default_factory=list)


def _decode(raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


def python_docs() -> List[Doc]:
    """Top-level ``def``/``class`` blocks of the Python standard library's own modules."""
    root = Path(sysconfig.get_paths()["stdlib"])
    docs = []
    for f in sorted(root.glob("*.py")):
        text = _decode(f.read_bytes())
        for block in re.split(r"\n(?=(?:def|class) )", text)[1:]:
            block = block.strip()
            if len(block) >= 4 * MIN_CHARS:
                docs.append((f.name, block[:MAX_CHARS]))
    return docs


def fortune_docs(sub: str) -> List[Doc]:
    """Prose quotes of one ``fortunes-<sub>`` package (the same filter as the language task)."""
    if not FORTUNE_ROOT.exists():
        raise RuntimeError("fortunes are not installed; run benchmarks/setup.sh")
    docs, seen = [], set()
    for f in _fortune_files(sub):
        for quote in re.split(r"\n%\n", _decode(f.read_bytes())):
            text = quote.strip()
            letters = sum(ch.isalpha() for ch in text)
            if len(text) < MIN_CHARS or letters < 0.6 * len(text) or text in seen:
                continue
            seen.add(text)
            docs.append((f"{f.name}:{len(docs)}", text[:MAX_CHARS]))
    return docs


def _rows(loader) -> List[Doc]:
    _, _, rows = loader()
    return [(str(i), text) for i, (text, _) in enumerate(rows) if len(text) >= MIN_CHARS]


LOADERS: Dict[str, Callable[[], List[Doc]]] = {
    "python": python_docs,
    "german": lambda: fortune_docs("de"),
    "spanish": lambda: fortune_docs("es"),
    "italian": lambda: fortune_docs("it"),
    "news": lambda: _rows(load_bbc),
    "glosses": lambda: _rows(load_supersense),
    "tweets": lambda: _rows(load_sentiment),
}
# The benchmark's six. Python code is left out: on it, the short continued training of the
# experts did not improve the held-out loss (the base already models code well).
DOMAINS = ("german", "spanish", "italian", "news", "glosses", "tweets")


def split_docs(docs: List[Doc], heldout: int, seed: int) -> Tuple[List[str], List[str]]:
    """``heldout`` documents drawn group by group (seeded) and the training documents of the
    remaining groups."""
    groups: Dict[str, List[str]] = {}
    for g, text in docs:
        groups.setdefault(g, []).append(text)
    names = sorted(groups)
    random.Random(seed).shuffle(names)
    held: List[str] = []
    train: List[str] = []
    for g in names:
        if len(held) < heldout:
            held.extend(groups[g][: heldout - len(held)])
        else:
            train.extend(groups[g])
    if len(held) < heldout or not train:
        raise RuntimeError(f"too few documents: {len(docs)} for {heldout} held out")
    random.Random(seed + 1).shuffle(train)
    return train, held


def build_domain(name: str, heldout: int, seed: int = 0) -> Domain:
    train, held = split_docs(LOADERS[name](), heldout, seed)
    return Domain(name, train, held)


def synthetic_domains(seed: int = 0, n: int = 60) -> List[Domain]:
    """Three tiny domains for tests: each repeats its own short phrases (predictable text a few
    training steps can learn) in random order."""
    rng = random.Random(seed)
    phrases = {
        "alpha": ["red fox runs", "blue fox sleeps", "red hen runs"],
        "beta": ["one two three", "four five six", "seven eight nine"],
        "gamma": ["up down left", "right up down", "left left right"],
    }
    out = []
    for name, ps in phrases.items():
        docs = [(str(i), " ".join(rng.choice(ps) for _ in range(6))) for i in range(n)]
        train, held = split_docs(docs, n // 4, seed)
        out.append(Domain(name, train, held))
    return out
