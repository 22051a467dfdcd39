"""Continued training on a domain's text (next-token loss on every token) and per-document
held-out next-token loss and top-1 accuracy.

Documents start with the end-of-text token, as when they are packed one after another in
training, so the first word of a document is predicted too.
"""

from __future__ import annotations

import random
from typing import Callable, Dict, List, Optional, Sequence

import torch

from benchmarks.generative.corpora import Domain
from benchmarks.real_llama.model import TrainConfig, optimize, pad_batch, padding_id


def _start_id(tokenizer) -> int:
    return tokenizer.eos_token_id if tokenizer.eos_token_id is not None else padding_id(tokenizer)


def encode_docs(tokenizer, texts: Sequence[str], max_tokens: int) -> List[List[int]]:
    """Each document as ``[end-of-text] + its first max_tokens tokens``."""
    start = _start_id(tokenizer)
    return [[start] + tokenizer.encode(t, add_special_tokens=False)[:max_tokens] for t in texts]


def lm_fine_tune(
    model,
    tokenizer,
    domain: Domain,
    cfg: TrainConfig,
    progress: Optional[Callable[[int, float], None]] = None,
) -> List[float]:
    """Next-token cross-entropy on windows of ``cfg.max_text_tokens + 1`` tokens cut from the
    domain's training documents, packed end to end in a seeded order."""
    torch.manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)
    window = cfg.max_text_tokens + 1
    start = _start_id(tokenizer)
    stream: List[int] = []
    order: List[str] = []

    def next_window() -> List[int]:
        nonlocal stream, order
        while len(stream) < window:
            if not order:
                order = list(domain.train)
                rng.shuffle(order)
            stream += [start] + tokenizer.encode(order.pop(), add_special_tokens=False)
        out, stream = stream[:window], stream[window:]
        return out

    def step_loss(step: int):
        ids = torch.tensor([next_window() for _ in range(cfg.batch_size)])
        logits = model(input_ids=ids[:, :-1]).logits
        return torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1)
        )

    return optimize(model, cfg, step_loss, progress)


@torch.no_grad()
def doc_scores(
    model, tokenizer, texts: Sequence[str], max_tokens: int, batch_size: int = 16
) -> Dict[str, List[float]]:
    """Per document: mean next-token loss (nats) and top-1 accuracy over its predicted tokens."""
    seqs = encode_docs(tokenizer, texts, max_tokens)
    if any(len(s) < 2 for s in seqs):
        raise ValueError("a held-out document has no token after the start token")
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    loss = [0.0] * len(seqs)
    acc = [0.0] * len(seqs)
    model.eval()
    for b in range(0, len(order), batch_size):
        idx = order[b : b + batch_size]
        ids, mask, _ = pad_batch([seqs[i] for i in idx], padding_id(tokenizer))
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
        target, valid = ids[:, 1:], mask[:, 1:].bool()
        nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), target, reduction="none")
        hit = (logits.argmax(-1) == target).float()
        n = valid.sum(1)
        for k, i in enumerate(idx):
            loss[i] = float((nll[k] * valid[k]).sum() / n[k])
            acc[i] = float((hit[k] * valid[k]).sum() / n[k])
    return {"loss": loss, "acc": acc}
