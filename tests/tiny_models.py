"""Tiny real Llama checkpoints (``save_pretrained``) for end-to-end tests, and helpers to run
the real ``mergekit-yaml`` / ``mergekit-multi`` CLIs on them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence

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
# Uneven expert scales on the MLP and embeddings (heterogeneous branch); attention tensors
# get one common scale (homogeneous branch).
EXPERT_SCALES = {"expert_math": 0.002, "expert_code": 0.03, "expert_chat": 0.01}
ATTENTION_SCALE = 0.01


def expert_scale(key: str, scale: float) -> float:
    return ATTENTION_SCALE if "self_attn" in key else scale


def _tokenizer(vocab_size: int, extra: Sequence[str] = ()):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for i in range(3, vocab_size):
        vocab[f"w{i}"] = i
    for token in extra:
        vocab[token] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )


def save_model(path: Path, state: Dict[str, torch.Tensor], config_kwargs: dict, extra_tokens=()):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**config_kwargs)
    model = LlamaForCausalLM(config)
    model.load_state_dict(state)
    model.save_pretrained(path, safe_serialization=True)
    _tokenizer(TINY["vocab_size"], extra_tokens).save_pretrained(path)


def structured_delta(tensor: torch.Tensor, scale: float, gen: torch.Generator) -> torch.Tensor:
    """A low-rank-plus-noise update for matrices, small noise for vectors."""
    if tensor.dim() == 2:
        m, n = tensor.shape
        low = torch.randn(m, 2, generator=gen) @ torch.randn(2, n, generator=gen)
        return scale * (low + 0.2 * torch.randn(m, n, generator=gen))
    return scale * torch.randn(tensor.shape, generator=gen)


def build_tiny_family(
    root: Path, *, extra_token_expert: bool = False, seed: int = 0
) -> Dict[str, Path]:
    """Base + three experts (base + structured deltas of uneven scale) under ``root``.

    With ``extra_token_expert`` a fourth expert, ``expert_tokens``, adds two tokens to the
    vocabulary (its embedding and lm_head get two more rows), as community fine-tunes do.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    base_model = LlamaForCausalLM(LlamaConfig(**TINY))
    base_state = {k: v.detach().clone() for k, v in base_model.state_dict().items()}
    paths = {"base": root / "base"}
    save_model(paths["base"], base_state, TINY)
    gen = torch.Generator().manual_seed(seed + 1)
    for name, scale in EXPERT_SCALES.items():
        state = {
            k: v + structured_delta(v, expert_scale(k, scale), gen) for k, v in base_state.items()
        }
        paths[name] = root / name
        save_model(paths[name], state, TINY)
    if extra_token_expert:
        state = {k: v + structured_delta(v, 0.02, gen) for k, v in base_state.items()}
        for key in ("model.embed_tokens.weight", "lm_head.weight"):
            state[key] = torch.cat(
                [state[key], 0.02 * torch.randn(2, TINY["hidden_size"], generator=gen)]
            )
        cfg = dict(TINY, vocab_size=TINY["vocab_size"] + 2)
        paths["expert_tokens"] = root / "expert_tokens"
        save_model(paths["expert_tokens"], state, cfg, extra_tokens=("<tool>", "</tool>"))
    return paths


def load_state(path: Path) -> Dict[str, torch.Tensor]:
    state: Dict[str, torch.Tensor] = {}
    for file in sorted(Path(path).glob("*.safetensors")):
        state.update(load_file(file))
    return state


def write_config(path: Path, config: dict) -> Path:
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def _cli(name: str) -> str:
    candidate = Path(sys.executable).with_name(name)
    return str(candidate) if candidate.exists() else name


def run_cli(
    name: str,
    args: Iterable[str],
    *,
    env: Optional[dict] = None,
    check: bool = True,
    preexec_fn=None,
):
    """Run a console script of this environment in a fresh process (``preexec_fn`` runs in it
    first); return the result."""
    full_env = dict(os.environ, **(env or {}))
    full_env.setdefault("HF_HUB_OFFLINE", "1")
    result = subprocess.run(
        [_cli(name), *map(str, args)],
        capture_output=True,
        text=True,
        env=full_env,
        timeout=600,
        preexec_fn=preexec_fn,
    )
    if check and result.returncode != 0:
        raise AssertionError(
            f"{name} failed ({result.returncode}):\nSTDOUT:\n{result.stdout[-4000:]}\n"
            f"STDERR:\n{result.stderr[-8000:]}"
        )
    return result


def mergekit_yaml(config_path: Path, out: Path, *extra: str, check: bool = True):
    return run_cli("mergekit-yaml", [config_path, out, *extra], check=check)


def model_list(paths: Dict[str, Path], names: List[str], params: Optional[Dict[str, dict]] = None):
    params = params or {}
    return [
        {"model": str(paths[n]), **({"parameters": params[n]} if n in params else {})}
        for n in names
    ]


def read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())
