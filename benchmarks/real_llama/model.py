"""Fine-tuning and scoring of a causal LM on label-word classification tasks.

Only the last prompt position matters (the label token follows ``"<Question>:"``), so both
training and scoring run the transformer body and project that one hidden state onto the
vocabulary (training) or onto the label words' first tokens (scoring); this is exactly the
model's next-token distribution at that position, without the full-sequence LM head.
"""

from __future__ import annotations

import json
import math
import random
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import torch

from benchmarks.real_llama.data import Example, Task


@dataclass
class TrainConfig:
    steps: int = 60
    batch_size: int = 8
    lr: float = 3e-5
    warmup: int = 5
    max_text_tokens: int = 64
    seed: int = 0

    def key(self) -> str:
        return (
            f"s{self.steps}_b{self.batch_size}_lr{self.lr:g}_t{self.max_text_tokens}"
            f"_seed{self.seed}"
        )


def label_token_ids(tokenizer, task: Task) -> List[int]:
    ids = [tokenizer.encode(" " + w, add_special_tokens=False)[0] for w in task.labels]
    if len(set(ids)) != len(ids):
        raise ValueError(f"task {task.name}: label words share a first token: {task.labels}")
    return ids


def encode_prompts(tokenizer, task: Task, texts: Sequence[str], max_text_tokens: int):
    suffix = tokenizer.encode(f"\n{task.question}:", add_special_tokens=False)
    out = []
    for t in texts:
        ids = tokenizer.encode(t, add_special_tokens=False)[:max_text_tokens]
        out.append(ids + suffix)
    return out


def pad_batch(seqs: List[List[int]], pad_id: int):
    """Right-padded batch; returns input_ids, attention_mask, index of each last token."""
    L = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), L), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), L), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = 1
    last = torch.tensor([len(s) - 1 for s in seqs])
    return ids, mask, last


def _last_hidden(model, ids, mask, last):
    hidden = model.model(input_ids=ids, attention_mask=mask).last_hidden_state
    return hidden[torch.arange(ids.shape[0]), last]


def padding_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def fine_tune(
    model,
    tokenizer,
    task: Task,
    cfg: TrainConfig,
    progress: Optional[Callable[[int, float], None]] = None,
) -> List[float]:
    """Full fine-tuning (float32) with cross-entropy on the label token only; returns losses."""
    torch.manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)
    label_ids = label_token_ids(tokenizer, task)
    pad = padding_id(tokenizer)
    order: List[Example] = []

    def step_loss(step: int):
        nonlocal order
        batch = []
        while len(batch) < cfg.batch_size:
            if not order:
                order = list(task.train)
                rng.shuffle(order)
            batch.append(order.pop())
        seqs = encode_prompts(tokenizer, task, [t for t, _ in batch], cfg.max_text_tokens)
        ids, mask, last = pad_batch(seqs, pad)
        h = _last_hidden(model, ids, mask, last)
        logits = model.lm_head(h)
        target = torch.tensor([label_ids[y] for _, y in batch])
        return torch.nn.functional.cross_entropy(logits, target)

    return optimize(model, cfg, step_loss, progress)


def optimize(
    model,
    cfg: TrainConfig,
    step_loss: Callable[[int], "torch.Tensor"],
    progress: Optional[Callable[[int, float], None]] = None,
) -> List[float]:
    """``cfg.steps`` AdamW steps on every weight (cosine schedule after ``cfg.warmup`` linear
    warm-up steps, gradient clipping 1.0) of the loss ``step_loss(step)``; returns the losses."""
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.0)

    def lr_at(step: int) -> float:
        if step < cfg.warmup:
            return (step + 1) / cfg.warmup
        frac = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
        return 0.5 * (1 + math.cos(math.pi * frac))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    losses = []
    for step in range(cfg.steps):
        loss = step_loss(step)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        if progress:
            progress(step, losses[-1])
    model.eval()
    return losses


@torch.no_grad()
def score(
    model,
    tokenizer,
    task: Task,
    examples: Optional[Sequence[Example]] = None,
    max_text_tokens: int = 64,
    batch_size: int = 32,
) -> Dict[str, float]:
    """Accuracy of argmax over the label words' first tokens, with its standard error."""
    examples = list(task.heldout if examples is None else examples)
    label_ids = torch.tensor(label_token_ids(tokenizer, task))
    seqs = encode_prompts(tokenizer, task, [t for t, _ in examples], max_text_tokens)
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    pad = padding_id(tokenizer)
    model.eval()
    head = model.lm_head.weight[label_ids]  # [labels, hidden]
    correct = 0
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        ids, mask, last = pad_batch([seqs[i] for i in idx], pad)
        h = _last_hidden(model, ids, mask, last)
        pred = (h @ head.T).argmax(dim=-1)
        correct += sum(int(p) == examples[i][1] for p, i in zip(pred.tolist(), idx))
    n = len(examples)
    acc = correct / n
    return {"acc": acc, "se": math.sqrt(acc * (1 - acc) / n), "n": n}


def load_model(path: Path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model.eval()
    return model


def load_tokenizer(path: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def train_expert(
    base_dir: Path,
    task: Task,
    cfg: TrainConfig,
    out_dir: Path,
    progress: Optional[Callable[[int, float], None]] = None,
    fit: Optional[Callable] = None,
) -> Path:
    """Fine-tune ``base_dir`` on ``task`` into ``out_dir`` (skipped when already there) with
    ``fit(model, tokenizer, task, cfg, progress)`` (default :func:`fine_tune`)."""
    out_dir = Path(out_dir)
    meta = out_dir / "expert.json"
    if meta.exists() and (out_dir / "model.safetensors").exists():
        return out_dir
    torch.manual_seed(cfg.seed)
    model = load_model(base_dir)
    tok = load_tokenizer(base_dir)
    t0 = time.perf_counter()
    losses = (fit or fine_tune)(model, tok, task, cfg, progress)
    seconds = time.perf_counter() - t0
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    model.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    (tmp / "expert.json").write_text(
        json.dumps(
            {"task": task.name, "train": asdict(cfg), "seconds": seconds, "losses": losses},
            indent=1,
        )
    )
    if out_dir.exists():
        shutil.rmtree(out_dir)
    tmp.rename(out_dir)
    return out_dir
