"""End-to-end merge benchmark through ``mergekit-yaml``: ``ace`` against ``task_arithmetic``.

Builds synthetic Llama checkpoints locally (random base; experts = base + low-rank-plus-noise
task vectors of uneven scale; bfloat16 safetensors) under ``benchmarks/cache/e2e/``, merges them
with both methods in the same run, interleaved, and reports wall time and peak resident set
size of each ``mergekit-yaml`` process (GNU ``time -v``: "Maximum resident set size"; on CUDA
the script also polls ``nvidia-smi`` for the GPU's peak used memory). The checkpoints are
deleted at the end unless ``--keep``.

    python -m benchmarks.perf_e2e --layers 2 --experts 3 --out benchmarks/runs/e2e_cpu.jsonl
    python -m benchmarks.perf_e2e --preset tiny --flags=";--low-cpu-memory;--lazy-unpickle"
    python -m benchmarks.perf_e2e --flags="--cuda;--cuda --read-to-gpu;--cuda --multi-gpu"
    python -m benchmarks.perf_e2e --base BASE --models E1 E2 E3 --dtype float32 --repeat 2
    python -m benchmarks.perf_e2e --methods task_arithmetic ace ace:OMP_NUM_THREADS=1
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shlex
import shutil
import subprocess
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / "benchmarks" / "cache" / "e2e"
PRESETS = {
    # ~0.5B-class widths (TinyLlama-like); layers set on the command line.
    "small": dict(hidden=2048, intermediate=5632, heads=16, kv_heads=4, vocab=32000),
    # Llama-3-8B widths (32/8 heads, vocabulary 128256); layers set on the command line.
    "llama3-8b": dict(hidden=4096, intermediate=14336, heads=32, kv_heads=8, vocab=128256),
    # for checking that command-line flags run
    "tiny": dict(hidden=256, intermediate=688, heads=4, kv_heads=2, vocab=1024),
}
SCALES = (0.002, 0.02, 0.006, 0.05, 0.004, 0.01, 0.03, 0.008)


def llama_shapes(p, layers):
    h, i, v = p["hidden"], p["intermediate"], p["vocab"]
    kv = h // p["heads"] * p["kv_heads"]
    shapes = {
        "model.embed_tokens.weight": (v, h),
        "model.norm.weight": (h,),
        "lm_head.weight": (v, h),
    }
    for layer in range(layers):
        pre = f"model.layers.{layer}."
        shapes.update(
            {
                pre + "self_attn.q_proj.weight": (h, h),
                pre + "self_attn.k_proj.weight": (kv, h),
                pre + "self_attn.v_proj.weight": (kv, h),
                pre + "self_attn.o_proj.weight": (h, h),
                pre + "mlp.gate_proj.weight": (i, h),
                pre + "mlp.up_proj.weight": (i, h),
                pre + "mlp.down_proj.weight": (h, i),
                pre + "input_layernorm.weight": (h,),
                pre + "post_attention_layernorm.weight": (h,),
            }
        )
    return shapes


def write_config(path, p, layers):
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": p["hidden"],
        "intermediate_size": p["intermediate"],
        "num_attention_heads": p["heads"],
        "num_key_value_heads": p["kv_heads"],
        "num_hidden_layers": layers,
        "vocab_size": p["vocab"],
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "hidden_act": "silu",
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "bos_token_id": 1,
        "eos_token_id": 2,
    }
    (path / "config.json").write_text(json.dumps(config, indent=1))


def build(preset, layers, n_experts, rank=16, device="cpu"):
    """Base + experts under CACHE/<tag>/; returns (base_dir, [expert_dirs]). The random
    numbers are drawn on ``device`` (a GPU makes 8B-wide checkpoints in seconds)."""
    from safetensors.torch import load_file, save_file

    p = PRESETS[preset]
    tag = f"{preset}-L{layers}"
    root = CACHE / tag
    shapes = llama_shapes(p, layers)
    base_dir = root / "base"
    if not (base_dir / "model.safetensors").exists():
        base_dir.mkdir(parents=True, exist_ok=True)
        g = torch.Generator(device=device).manual_seed(0)
        tensors = {}
        for name, shape in shapes.items():
            if len(shape) == 1:
                tensors[name] = torch.ones(shape, dtype=torch.bfloat16)
            else:
                w = torch.randn(*shape, generator=g, device=device) / math.sqrt(shape[1])
                tensors[name] = w.to(torch.bfloat16).cpu()
        save_file(tensors, str(base_dir / "model.safetensors"), metadata={"format": "pt"})
        write_config(base_dir, p, layers)
    base = None
    dirs = []
    for t in range(n_experts):
        d = root / f"expert{t}"
        dirs.append(d)
        if (d / "model.safetensors").exists():
            continue
        if base is None:
            base = load_file(str(base_dir / "model.safetensors"))
        g = torch.Generator(device=device).manual_seed(100 + t)
        scale = SCALES[t % len(SCALES)]
        tensors = {}
        for name, w in base.items():
            w = w.to(device).float()

            def randn(*size):
                return torch.randn(*size, generator=g, device=device)

            if w.dim() == 2:
                m, n = w.shape
                delta = randn(m, rank) @ randn(rank, n)
                delta.div_(math.sqrt(rank)).add_(randn(m, n), alpha=0.3)
                delta.mul_(scale / math.sqrt(n))
            else:
                delta = scale * randn(*w.shape)
            tensors[name] = (w + delta).to(torch.bfloat16).cpu()
        d.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(d / "model.safetensors"), metadata={"format": "pt"})
        write_config(d, p, layers)
    return base_dir, dirs


def write_yaml(path, method, base_dir, expert_dirs, dtype="bfloat16"):
    lines = [f"merge_method: {method}", f"base_model: {base_dir}", f"dtype: {dtype}", "models:"]
    for d in expert_dirs:
        lines += [f"  - model: {d}", "    parameters:", "      weight: 1.0"]
    if method == "task_arithmetic":
        lines += ["parameters:", "  normalize: false"]
    path.write_text("\n".join(lines) + "\n")


class GpuPoller:
    """Peak ``memory.used`` of GPU 0 (MiB) polled from nvidia-smi every 0.2 s."""

    def __init__(self):
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            try:
                out = subprocess.run(
                    ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                    capture_output=True,
                    text=True,
                    timeout=5,
                ).stdout
                self.peak = max([self.peak] + [int(x) for x in out.split() if x.isdigit()])
            except Exception:
                pass
            self._stop.wait(0.2)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def run_merge(config, out_dir, flags, gpu=False, env=None):
    if out_dir.exists():
        shutil.rmtree(out_dir)
    exe = shutil.which("mergekit-yaml") or "mergekit-yaml"
    cmd = [
        "/usr/bin/time",
        "-v",
        exe,
        str(config),
        str(out_dir),
        "--no-copy-tokenizer",
        "--quiet",
    ] + shlex.split(flags)
    start = time.perf_counter()
    poller = GpuPoller() if gpu else None
    if poller:
        poller.__enter__()
    try:
        done = subprocess.run(
            cmd, capture_output=True, text=True, env={**os.environ, **(env or {})}
        )
    finally:
        if poller:
            poller.__exit__()
    seconds = time.perf_counter() - start
    match = re.search(r"Maximum resident set size \(kbytes\): (\d+)", done.stderr)
    result = {
        "seconds": seconds,
        "rc": done.returncode,
        "peak_rss_bytes": int(match.group(1)) * 1024 if match else None,
    }
    if poller:
        result["peak_gpu_mib"] = poller.peak
    if done.returncode != 0:
        tail = [
            line for line in done.stderr.splitlines() if line.strip() and not line.startswith("\t")
        ]
        result["error"] = "\n".join(tail[-5:])
    if out_dir.exists():
        shutil.rmtree(out_dir)
    return result


def main(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--preset", default="small", choices=sorted(PRESETS))
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--experts", type=int, default=3)
    p.add_argument(
        "--methods",
        nargs="+",
        default=["task_arithmetic", "ace"],
        help="merge methods, each optionally with environment variables for its "
        "runs: ace:OMP_NUM_THREADS=8,MKL_NUM_THREADS=8",
    )
    p.add_argument(
        "--flags",
        default="",
        help="mergekit-yaml option sets to run, separated by ';' (empty: defaults)",
    )
    p.add_argument("--repeat", type=int, default=1)
    p.add_argument("--out", help="append JSON lines here")
    p.add_argument("--keep", action="store_true", help="keep the synthetic checkpoints")
    p.add_argument("--gen-device", default="cpu", help="where the random checkpoints are drawn")
    p.add_argument("--base", help="merge these real checkpoints instead: the base model ...")
    p.add_argument("--models", nargs="+", help="... and the experts (with --base)")
    p.add_argument("--dtype", default="bfloat16", help="the merge's dtype: in the configs")
    args = p.parse_args(argv)
    flag_sets = [f.strip() for f in args.flags.split(";")]
    gpu = any("--cuda" in f or "--gpu" in f for f in flag_sets)
    if args.base:
        base_dir, expert_dirs = Path(args.base), [Path(m) for m in args.models]
        args.experts, args.keep = len(expert_dirs), True
        root = CACHE / "real"
        root.mkdir(parents=True, exist_ok=True)
    else:
        base_dir, expert_dirs = build(
            args.preset, args.layers, args.experts, device=args.gen_device
        )
        root = base_dir.parent
    out = open(args.out, "a") if args.out else None
    try:
        for flags in flag_sets:
            times = {}
            for rep in range(args.repeat):
                for spec in args.methods:  # interleaved
                    method, _, env_spec = spec.partition(":")
                    env = dict(kv.split("=", 1) for kv in env_spec.split(",") if kv)
                    config = root / f"{method}-T{args.experts}.yml"
                    write_yaml(config, method, base_dir, expert_dirs[: args.experts], args.dtype)
                    r = run_merge(config, root / "merged", flags, gpu=gpu, env=env)
                    r.update(
                        method=method,
                        env=env,
                        flags=flags,
                        preset="real" if args.base else args.preset,
                        layers=args.layers,
                        experts=args.experts,
                        rep=rep,
                        checkpoint_bytes=(base_dir / "model.safetensors").stat().st_size,
                    )
                    times.setdefault(spec, []).append(r["seconds"])
                    line = json.dumps(r)
                    print(line, flush=True)
                    if out:
                        out.write(line + "\n")
                        out.flush()
            if "ace" in times and "task_arithmetic" in times:
                ratio = min(times["ace"]) / min(times["task_arithmetic"])
                line = json.dumps(
                    {"flags": flags, "experts": args.experts, "ace_over_task_arithmetic": ratio}
                )
                print(line, flush=True)
                if out:
                    out.write(line + "\n")
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
