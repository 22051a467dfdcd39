"""Pipeline steps shared by the benchmark, the demo and the smoke test."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import yaml

from benchmarks.real_llama.data import Task, build_task
from benchmarks.real_llama.model import TrainConfig, train_expert


def build_tasks(names: Sequence[str], heldout: int, train_pool: int, seed: int) -> List[Task]:
    return [build_task(n, heldout=heldout, train=train_pool, seed=seed) for n in names]


def expert_dir(
    cache: Path, set_name: str, task: Task, cfg: TrainConfig, heldout: int, seed: int
) -> Path:
    return Path(cache) / "experts" / set_name / f"{task.name}_h{heldout}_d{seed}_{cfg.key()}"


def trained_expert_dirs(cache: Path, es) -> List[Path]:
    """The checkpoint directories of expert set ``es``, in task order; exits with a message
    when one has not been trained yet."""
    tasks = build_tasks(es.tasks, es.heldout, es.train_pool, es.data_seed)
    dirs = [
        expert_dir(cache, es.name, t, es.train[t.name], es.heldout, es.data_seed) for t in tasks
    ]
    missing = [str(d) for d in dirs if not (d / "expert.json").exists()]
    if missing:
        raise SystemExit(f"experts not trained yet: {missing}; run benchmarks.real_llama.run")
    return dirs


def ensure_experts(
    base_dir: Path,
    tasks: Sequence[Task],
    cfgs: Dict[str, TrainConfig],
    cache: Path,
    set_name: str,
    heldout: int,
    seed: int,
    bar=None,
) -> Dict[str, Path]:
    """Train (or reuse) one expert per task; ``bar`` is an optional tqdm bar counting steps."""
    out = {}
    for task in tasks:
        cfg = cfgs[task.name]
        d = expert_dir(cache, set_name, task, cfg, heldout, seed)
        if bar is not None:
            bar.set_description(f"expert {task.name}")

        def progress(step, loss, _bar=bar):
            if _bar is not None:
                _bar.update(1)
                _bar.set_postfix(loss=f"{loss:.3f}")

        cached = (d / "expert.json").exists()
        out[task.name] = train_expert(base_dir, task, cfg, d, progress)
        if cached and bar is not None:
            bar.update(cfg.steps)
    return out


def merge_config(
    method: str,
    base_dir: Optional[Path],
    experts: Sequence[Path],
    parameters: Optional[dict] = None,
    model_parameters: Optional[dict] = None,
) -> dict:
    models = []
    for e in experts:
        entry = {"model": str(e)}
        if model_parameters:
            entry["parameters"] = dict(model_parameters)
        models.append(entry)
    cfg = {"merge_method": method}
    if base_dir is not None:
        cfg["base_model"] = str(base_dir)
    cfg.update({"models": models, "dtype": "float32"})
    if parameters:
        cfg["parameters"] = dict(parameters)
    return cfg


def run_mergekit(
    config: dict,
    out_dir: Path,
    seed: Optional[int] = None,
    log: Optional[Path] = None,
    extra_args: Sequence[str] = (),
) -> float:
    """Run the real ``mergekit-yaml`` CLI on ``config`` (with ``extra_args``); returns wall
    seconds."""
    out_dir = Path(out_dir)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    cfg_path = out_dir.parent / (out_dir.name + ".yml")
    cfg_path.write_text(yaml.safe_dump(config, sort_keys=False))
    exe = shutil.which("mergekit-yaml") or str(Path(sys.executable).with_name("mergekit-yaml"))
    cmd = [exe, str(cfg_path), str(out_dir), "--copy-tokenizer", "--quiet"]
    if seed is not None:
        cmd += ["--random-seed", str(seed)]
    cmd += list(extra_args)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ))
    seconds = time.perf_counter() - t0
    if log is not None:
        log.write_text(" ".join(cmd) + "\n" + proc.stdout + proc.stderr)
    if proc.returncode != 0:
        raise RuntimeError(f"mergekit-yaml failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return seconds
