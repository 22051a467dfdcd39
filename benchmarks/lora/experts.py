"""LoRA experts with ``peft``: a bfloat16 base, adapters trained in float32 on a domain's text,
each saved twice -- as the adapter directory (``save_pretrained``) and as a full checkpoint
with the adapter folded in (``merge_and_unload``), stored in bfloat16 as published fine-tunes
are."""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable, Tuple

import torch

from benchmarks.generative.corpora import Domain
from benchmarks.generative.lm import lm_fine_tune
from benchmarks.lora.config import LoraTrainConfig
from benchmarks.real_llama.model import load_model, load_tokenizer

ADAPTER = "adapter"
FOLDED = "bf16"


def bf16_base(src: Path, out_dir: Path) -> Path:
    """``src`` rounded to bfloat16 and saved (with its tokenizer) in ``out_dir``, once: the base
    the experts are trained from and merged onto, stored as Hub base models are."""
    out_dir = Path(out_dir)
    if (out_dir / "model.safetensors").exists():
        return out_dir
    model = load_model(src).to(torch.bfloat16)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    load_tokenizer(src).save_pretrained(tmp)
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.rename(out_dir)
    return out_dir


def lora_model(base_dir: Path, cfg: LoraTrainConfig):
    """The base (float32) wrapped with fresh LoRA factors (seeded) on ``cfg.targets``."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(cfg.seed)
    lc = LoraConfig(
        r=cfg.rank,
        lora_alpha=cfg.alpha,
        lora_dropout=0.0,
        target_modules=list(cfg.targets),
        bias="none",
        task_type="CAUSAL_LM",
    )
    return get_peft_model(load_model(base_dir), lc)


def train_lora(base_dir: Path, domain: Domain, cfg: LoraTrainConfig, out_dir: Path) -> Path:
    """Train (unless ``out_dir/expert.json`` exists) and save ``out_dir/adapter`` and
    ``out_dir/bf16``."""
    out_dir = Path(out_dir)
    if (out_dir / "expert.json").exists():
        return out_dir
    model = lora_model(base_dir, cfg)
    tok = load_tokenizer(base_dir)
    t0 = time.perf_counter()
    losses = lm_fine_tune(model, tok, domain, cfg)
    seconds = time.perf_counter() - t0
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp / ADAPTER, safe_serialization=True)
    _point_adapter_at(tmp / ADAPTER, base_dir)
    folded = model.merge_and_unload().to(torch.bfloat16)
    folded.save_pretrained(tmp / FOLDED, safe_serialization=True)
    tok.save_pretrained(tmp / FOLDED)
    meta = {"domain": domain.name, "train": asdict(cfg), "seconds": seconds, "losses": losses}
    (tmp / "expert.json").write_text(json.dumps(meta, indent=1))
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.rename(out_dir)
    return out_dir


def _point_adapter_at(adapter_dir: Path, base_dir: Path) -> None:
    """Record the base's absolute path in ``adapter_config.json`` (as a Hub adapter names its
    base repository)."""
    path = adapter_dir / "adapter_config.json"
    cfg = json.loads(path.read_text())
    cfg["base_model_name_or_path"] = str(Path(base_dir).resolve())
    path.write_text(json.dumps(cfg, indent=2))


def load_adapter_expert(base_dir: Path, adapter_dir: Path):
    """The base with the adapter folded in, in float32: what mergekit merges for
    ``base+adapter`` under ``--lora-merge-dtype float32``."""
    from peft import PeftModel

    model = PeftModel.from_pretrained(load_model(base_dir), str(adapter_dir))
    return model.merge_and_unload().eval()


def lora_source(form: str) -> Callable:
    """An expert source of :func:`benchmarks.generative.run.run` for storage form ``form``:
    trains (or reuses) the LoRA expert, returns its merge reference and loader."""

    def source(base_dir: Path, domain: Domain, cfg, out_dir: Path) -> Tuple[str, Callable]:
        out = train_lora(base_dir, domain, cfg, out_dir)
        if form == ADAPTER:
            return f"{base_dir}+{out / ADAPTER}", lambda: load_adapter_expert(
                base_dir, out / ADAPTER
            )
        return str(out / FOLDED), lambda: load_model(out / FOLDED)

    return source
