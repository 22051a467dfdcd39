"""End-to-end merge benchmark through ``mergekit-yaml``: ``ace`` against ``task_arithmetic``.

Builds synthetic Llama checkpoints locally (random base; experts = base + low-rank-plus-noise
task vectors of uneven scale; bfloat16 safetensors) under ``benchmarks/cache/e2e/``, merges them
with both methods in the same run, interleaved, and reports wall time and peak resident set
size of each ``mergekit-yaml`` process (GNU ``time -v``: "Maximum resident set size"; on CUDA
the script also polls ``nvidia-smi`` for the GPU's peak used memory). The checkpoints are
deleted at the end unless ``--keep``.

``--cold`` evicts every input shard from the page cache before each run
(``posix_fadvise(POSIX_FADV_DONTNEED)``, no root needed), so the reads come from the disk;
without it every shard is read once before the first run, so every run finds its inputs in
the page cache.
``--timeline DIR`` runs each merge under a tracer (this module's ``--trace-run``) that records,
per tensor and thread, when it was read, merged and written, and ACE's phases inside each
merge; DIR gets one JSON-lines trace per run and ``--out`` a summary row per run
(``python -m benchmarks.perf_report --timeline`` draws and tabulates them). A method's runs
take environment variables and parameters: ``ace:MERGEKIT_ACE_OVERLAP=0`` is ``ace`` on
mergekit's serial executor, ``ace/gate=off`` the homogeneous branch. ``--digest`` records a
SHA-256 of each run's output shards and says which runs wrote identical files.

    python -m benchmarks.perf_e2e --layers 2 --experts 3 --out benchmarks/runs/e2e_cpu.jsonl
    python -m benchmarks.perf_e2e --preset tiny --flags=";--low-cpu-memory;--lazy-unpickle"
    python -m benchmarks.perf_e2e --flags="--cuda;--cuda --read-to-gpu;--cuda --multi-gpu"
    python -m benchmarks.perf_e2e --base BASE --models E1 E2 E3 --dtype float32 --repeat 2
    python -m benchmarks.perf_e2e --methods task_arithmetic ace ace:OMP_NUM_THREADS=1
    python -m benchmarks.perf_e2e --base B --models E1 E2 --methods task_arithmetic \
        ace:MERGEKIT_ACE_OVERLAP=0 ace --cold --timeline runs/timeline --out runs/e2e.jsonl
    python -m benchmarks.perf_e2e --methods task_arithmetic ace ace/gate=off --digest
"""

from __future__ import annotations

import argparse
import concurrent.futures
import functools
import hashlib
import json
import math
import os
import re
import shlex
import shutil
import subprocess
import sys
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


def write_yaml(path, method, base_dir, expert_dirs, dtype="bfloat16", parameters=""):
    lines = [f"merge_method: {method}", f"base_model: {base_dir}", f"dtype: {dtype}", "models:"]
    for d in expert_dirs:
        lines += [f"  - model: {d}", "    parameters:", "      weight: 1.0"]
    if method == "task_arithmetic":
        lines += ["parameters:", "  normalize: false"]
    elif parameters:
        lines += [f"parameters: {parameters}"]
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


INPUT_SUFFIXES = (".safetensors", ".bin", ".pt")


def input_shards(model_dirs):
    """The weight files of ``model_dirs``, in name order per folder."""
    for directory in model_dirs:
        for path in sorted(Path(directory).iterdir()):
            if path.suffix in INPUT_SUFFIXES and path.is_file():
                yield path


def evict(model_dirs):
    """Drop every input shard of ``model_dirs`` from the page cache; returns the bytes."""
    total = 0
    for path in input_shards(model_dirs):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
        total += path.stat().st_size
    return total


def warm(model_dirs):
    """Read every input shard of ``model_dirs`` once, so that a hot run finds it in the page
    cache (a cold run of another invocation may have evicted a shared base); returns the
    bytes."""
    total = 0
    for path in input_shards(model_dirs):
        with open(path, "rb") as f:
            while chunk := f.read(64 * 2**20):
                total += len(chunk)
    return total


def digest(out_dir):
    """SHA-256 over the output's weight files, in name order (hashed in parallel)."""
    files = sorted(
        p
        for p in Path(out_dir).iterdir()
        if p.suffix in INPUT_SUFFIXES or p.name.endswith(".index.json")
    )

    def one(path):
        h = hashlib.sha256()
        with open(path, "rb") as f:
            while chunk := f.read(1 << 24):
                h.update(chunk)
        return h.hexdigest()

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        parts = list(pool.map(one, files))
    return hashlib.sha256(
        "".join(f"{p.name}:{d}" for p, d in zip(files, parts)).encode()
    ).hexdigest()


def parse_spec(spec):
    """``method[/key=value,...][:VAR=value,...]`` -> (method, parameters as YAML flow, env)."""
    head, _, env_spec = spec.partition(":")
    method, _, params = head.partition("/")
    env = dict(kv.split("=", 1) for kv in env_spec.split(",") if kv)
    yaml = "{" + ", ".join(kv.replace("=", ": ", 1) for kv in params.split(",") if kv) + "}"
    return method, (yaml if params else ""), env


def run_merge(config, out_dir, flags, gpu=False, env=None, trace=None, keep_digest=False):
    if out_dir.exists():
        shutil.rmtree(out_dir)
    exe = shutil.which("mergekit-yaml") or "mergekit-yaml"
    if trace:
        exe = [sys.executable, "-m", "benchmarks.perf_e2e", "--trace-run", str(trace), "--"]
    cmd = [
        "/usr/bin/time",
        "-v",
        *([exe] if isinstance(exe, str) else exe),
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
    if keep_digest and done.returncode == 0:
        result["digest"] = digest(out_dir)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    return result


# --- the tracer: one mergekit-yaml run with every task and ACE phase timed ------------------

# The steps ``kernels.ace.merge.merge_matrix`` calls (timed where it looks them up);
# ``solve_and_refine`` is the heterogeneous branch's solve and refinement together.
KERNEL_PHASES = (
    "scan_experts",
    "accumulate",
    "build_system",
    "solve_rows_",
    "solve_and_refine",
    "finish_rows",
)


def trace_run(trace_path, mergekit_args):
    """Run ``mergekit-yaml mergekit_args`` in this process, writing one JSON line per timed
    call to ``trace_path``: ``phase`` (read, stage, merge, write, finalize, take, hand_off,
    acquire (waiting for the look-ahead's room), and the kernel's scan_experts, accumulate,
    build_system, solve_rows_, solve_and_refine, finish_rows, factor, eigh), ``tensor``,
    ``thread``, ``start`` / ``end`` (seconds since this process started Python) and ``cpu``
    (the process's CPU seconds meanwhile, every thread counted)."""
    t0 = time.perf_counter() - (time.time() - _process_start())
    out = open(trace_path, "w")
    lock = threading.Lock()
    current = threading.local()

    def emit(row):
        with lock:
            out.write(json.dumps(row) + "\n")
            out.flush()

    def timed(owner, attr, phase, name_of=lambda args: getattr(current, "tensor", None)):
        original = getattr(owner, attr)

        @functools.wraps(original)
        def wrapper(*args, **kwargs):
            start, cpu = time.perf_counter(), time.process_time()
            try:
                return original(*args, **kwargs)
            finally:
                emit(
                    {
                        "phase": phase,
                        "tensor": name_of(args),
                        "thread": threading.current_thread().name,
                        "start": start - t0,
                        "end": time.perf_counter() - t0,
                        "cpu": time.process_time() - cpu,
                    }
                )

        setattr(owner, attr, wrapper)

    import torch  # noqa: F401
    from mergekit.io import tasks
    from mergekit.merge_methods.task_adapter import ExecuteMergeMethodTask

    import mergekit_ace.kernels.ace.merge as ace
    from mergekit_ace import overlap
    from mergekit_ace.kernels.linalg import RightSolver

    def merge_name(args):
        return args[0].output_weight.name

    original_execute = ExecuteMergeMethodTask.execute

    def execute(self, *args, **kwargs):
        current.tensor = self.output_weight.name
        try:
            return original_execute(self, *args, **kwargs)
        finally:
            current.tensor = None

    ExecuteMergeMethodTask.execute = execute
    timed(ExecuteMergeMethodTask, "execute", "merge", merge_name)
    timed(tasks.LoadTensor, "execute", "read", lambda a: a[0].tensor)
    timed(tasks.SaveTensor, "execute", "write", lambda a: a[0].tensor_name)
    timed(tasks.FinalizeModel, "execute", "finalize", lambda a: None)
    timed(overlap.OverlappedExecutor, "_read", "stage", lambda a: a[1].task().tensor)
    timed(overlap.OverlappedExecutor, "_take", "take", lambda a: a[1].task().tensor)
    timed(overlap.OverlappedExecutor, "_hand_off", "hand_off", lambda a: a[1].task().tensor_name)
    timed(overlap.Budget, "acquire", "acquire", lambda a: None)
    for name in KERNEL_PHASES:
        timed(ace, name, name)
    timed(RightSolver, "factor", "factor")
    timed(torch.linalg, "eigh", "eigh")
    emit(
        {
            "phase": "start",
            "start": 0.0,
            "end": time.perf_counter() - t0,
            "tensor": None,
            "thread": "MainThread",
            "cpu": time.process_time(),
        }
    )
    from mergekit.scripts.run_yaml import main as mergekit_yaml

    try:
        mergekit_yaml.main(mergekit_args, standalone_mode=False)
    finally:
        emit(
            {
                "phase": "end",
                "start": time.perf_counter() - t0,
                "end": time.perf_counter() - t0,
                "tensor": None,
                "thread": "MainThread",
                "cpu": time.process_time(),
            }
        )
        out.close()


def _process_start() -> float:
    """This process's start (seconds since the epoch), from /proc (Linux)."""
    try:
        ticks = int(open("/proc/self/stat").read().rsplit(")", 1)[1].split()[19])
        boot = next(
            float(line.split()[1]) for line in open("/proc/stat") if line.startswith("btime")
        )
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, StopIteration, IndexError):
        return time.time()


def summarize_trace(path):
    """Where one traced run's time went: seconds per phase and thread, the merge loop's span
    (first read to the end of finalize), and ACE's phases per branch (a tensor is
    heterogeneous when its merge ran the refinement)."""
    rows = [json.loads(line) for line in open(path) if line.strip()]
    spans = {}
    for r in rows:
        key = f"{r['phase']}@{r['thread']}"
        spans[key] = spans.get(key, 0.0) + r["end"] - r["start"]
    work = [r for r in rows if r["phase"] in ("read", "stage", "merge", "write", "finalize")]
    first = min((r["start"] for r in work), default=0.0)
    last = max((r["end"] for r in work), default=0.0)
    heterogeneous = {r["tensor"] for r in rows if r["phase"] == "solve_and_refine"}
    kernel = {}
    for r in rows:
        if r["phase"] in KERNEL_PHASES + ("factor", "eigh") and r["tensor"]:
            branch = "heterogeneous" if r["tensor"] in heterogeneous else "homogeneous"
            entry = kernel.setdefault(branch, {}).setdefault(
                r["phase"], {"seconds": 0.0, "cpu": 0.0}
            )
            entry["seconds"] += r["end"] - r["start"]
            entry["cpu"] += r["cpu"]
    merges = [r for r in rows if r["phase"] == "merge"]
    for branch in kernel:
        names = (
            heterogeneous
            if branch == "heterogeneous"
            else {r["tensor"] for r in merges} - heterogeneous
        )
        kernel[branch]["merge"] = {
            "tensors": len(names),
            "seconds": sum(r["end"] - r["start"] for r in merges if r["tensor"] in names),
            "cpu": sum(r["cpu"] for r in merges if r["tensor"] in names),
        }
    end = next((r["end"] for r in rows if r["phase"] == "end"), last)
    return {
        "before_first_read": first,
        "merge_loop": last - first,
        "after_last_write": end - last,
        "seconds_by_phase_and_thread": spans,
        "kernel": kernel,
    }


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["--trace-run"]:
        rest = argv[3:] if argv[2:3] == ["--"] else argv[2:]
        return trace_run(argv[1], rest)
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
    p.add_argument(
        "--cold",
        action="store_true",
        help="evict every input shard from the page cache before each run",
    )
    p.add_argument(
        "--timeline",
        metavar="DIR",
        help="trace every run (per tensor: read, merge, write; ACE's phases) into DIR",
    )
    p.add_argument(
        "--parameters",
        default="",
        help="extra `parameters:` of this package's methods, as YAML flow "
        "(e.g. '{gate: off}'); a method's own (ace/gate=off) replace them",
    )
    p.add_argument(
        "--digest", action="store_true", help="hash every run's output shards and compare the runs'"
    )
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
    if not args.cold:
        warm([base_dir, *expert_dirs[: args.experts]])
    try:
        for flags in flag_sets:
            times, runs = {}, []
            for rep in range(args.repeat):
                for spec in args.methods:  # interleaved
                    method, parameters, env = parse_spec(spec)
                    tag = re.sub(r"[^A-Za-z0-9_.=-]+", "_", spec.partition(":")[0])
                    config = root / f"{tag}-T{args.experts}.yml"
                    write_yaml(
                        config,
                        method,
                        base_dir,
                        expert_dirs[: args.experts],
                        args.dtype,
                        parameters or args.parameters,
                    )
                    trace = None
                    if args.timeline:
                        Path(args.timeline).mkdir(parents=True, exist_ok=True)
                        label = re.sub(
                            r"[^A-Za-z0-9_.=-]+",
                            "_",
                            f"{spec}-{flags}-T{args.experts}-L{args.layers}-rep{rep}",
                        )
                        trace = Path(args.timeline) / f"{label}{'-cold' if args.cold else ''}.jsonl"
                    inputs = [base_dir, *expert_dirs[: args.experts]]
                    evicted = evict(inputs) if args.cold else 0
                    r = run_merge(
                        config,
                        root / "merged",
                        flags,
                        gpu=gpu,
                        env=env,
                        trace=trace,
                        keep_digest=args.digest,
                    )
                    r.update(
                        method=method,
                        env=env,
                        flags=flags,
                        preset="real" if args.base else args.preset,
                        layers=args.layers,
                        experts=args.experts,
                        rep=rep,
                        spec=spec,
                        cold=args.cold,
                        evicted_bytes=evicted,
                        parameters=parameters or args.parameters,
                        checkpoint_bytes=(base_dir / "model.safetensors").stat().st_size,
                        load=os.getloadavg()[0],
                    )
                    if trace and trace.exists():
                        r.update(trace=str(trace), timeline=summarize_trace(trace))
                    times.setdefault(spec, []).append(r["seconds"])
                    runs.append(r)
                    line = json.dumps(r)
                    print(line, flush=True)
                    if out:
                        out.write(line + "\n")
                        out.flush()
            if args.digest:
                digests = {}
                for r in runs:
                    digests.setdefault(r.get("digest"), []).append(r["spec"])
                line = json.dumps(
                    {
                        "flags": flags,
                        "identical_outputs": [
                            sorted(set(specs)) for d, specs in digests.items() if d
                        ],
                    }
                )
                print(line, flush=True)
                if out:
                    out.write(line + "\n")
            if "task_arithmetic" in times:
                for spec, seconds in times.items():
                    if spec == "task_arithmetic":
                        continue
                    ratio = min(seconds) / min(times["task_arithmetic"])
                    line = json.dumps(
                        {
                            "flags": flags,
                            "experts": args.experts,
                            "spec": spec,
                            "cold": args.cold,
                            "over_task_arithmetic": ratio,
                            **({"ace_over_task_arithmetic": ratio} if spec == "ace" else {}),
                        }
                    )
                    print(line, flush=True)
                    if out:
                        out.write(line + "\n")
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
