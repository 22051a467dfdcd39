"""A tiny random Llama checkpoint (word-level tokenizer) standing in for the real base model
in fast tests of the pipeline."""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Sequence

from benchmarks.real_llama.data import Task


def make_tiny_base(path: Path, tasks: Sequence[Task], seed: int = 0) -> Path:
    words = {":"}
    for t in tasks:
        words.add(t.question)
        words.update(t.labels)
        for text, _ in t.train + t.heldout:
            words.update(text.split())
    return make_tiny_llama(path, words, seed)


def make_tiny_llama(path: Path, words: Iterable[str], seed: int = 0) -> Path:
    """A 2-layer random Llama whose word-level tokenizer knows ``words``."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    words = {"<unk>", "<pad>", "<s>", "</s>", *words}
    vocab = {w: i for i, w in enumerate(sorted(words))}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Whitespace(), pre_tokenizers.Punctuation()]
    )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk, unk_token="<unk>", pad_token="<pad>", bos_token="<s>", eos_token="</s>"
    )
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=True,
        pad_token_id=vocab["<pad>"],
        bos_token_id=vocab["<s>"],
        eos_token_id=vocab["</s>"],
    )
    model = LlamaForCausalLM(cfg)
    path = Path(path)
    model.save_pretrained(path, safe_serialization=True)
    tok.save_pretrained(path)
    return path
