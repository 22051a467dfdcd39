"""Full quality benchmark: experts -> every merge method via ``mergekit-yaml`` -> held-out scores.

    python -m benchmarks.real_llama.run                 # main expert set, every method
    python -m benchmarks.real_llama.run --set uneven --methods ace eps
    python -m benchmarks.real_llama.run --report-only   # redraw tables and chart

Scores are written after every method to ``benchmarks/results/<set>.json`` and reused on the
next run when the merge configuration and the data are unchanged, so an interrupted run
resumes where it stopped. Merged checkpoints are deleted after scoring unless ``--keep``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import time
from pathlib import Path
from typing import Dict, List, Optional

import torch
from tqdm import tqdm

from benchmarks.real_llama.base import prepare_base
from benchmarks.real_llama.config import CACHE, EXPERT_SETS, ExpertSet
from benchmarks.real_llama.methods import method_specs, select
from benchmarks.real_llama.model import load_model, load_tokenizer, score
from benchmarks.real_llama.pipeline import (
    build_tasks,
    ensure_experts,
    merge_config,
    run_mergekit,
)

RESULTS = Path(__file__).resolve().parents[1] / "results"


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def check_merged(out_dir: Path, model) -> Dict:
    """What mergekit wrote for the (tied) LM head, and whether transformers ties it on load."""
    from safetensors import safe_open

    keys = []
    for f in sorted(out_dir.glob("*.safetensors")):
        with safe_open(str(f), "pt") as fh:
            keys += list(fh.keys())
    cfg = json.loads((out_dir / "config.json").read_text())
    return {
        "tie_word_embeddings": bool(cfg.get("tie_word_embeddings")),
        "lm_head_in_checkpoint": "lm_head.weight" in keys,
        "tensors": len(keys),
        "head_is_embedding": model.lm_head.weight.data_ptr()
        == model.model.embed_tokens.weight.data_ptr(),
    }


def score_model(model, tok, tasks, max_text_tokens: int) -> Dict[str, Dict]:
    return {t.name: score(model, tok, t, max_text_tokens=max_text_tokens) for t in tasks}


def data_signature(es: ExpertSet) -> Dict:
    return {
        "set": es.name,
        "tasks": es.tasks,
        "heldout": es.heldout,
        "train_pool": es.train_pool,
        "data_seed": es.data_seed,
        "train": {k: v.key() for k, v in es.train.items()},
    }


def run(
    es: ExpertSet,
    *,
    only: Optional[List[str]] = None,
    cache: Path = CACHE,
    results_path: Optional[Path] = None,
    base_dir: Optional[Path] = None,
    tasks=None,
    keep: bool = False,
    seed: int = 0,
    report: bool = True,
    references: bool = True,
    on_progress=None,
) -> Dict:
    """Run the benchmark for one expert set; returns the results dict (also saved as JSON)."""
    results_path = results_path or RESULTS / f"{es.name}.json"
    base_dir = base_dir or prepare_base(cache / "base")
    tasks = tasks or build_tasks(es.tasks, es.heldout, es.train_pool, es.data_seed)
    max_tokens = next(iter(es.train.values())).max_text_tokens
    sig = data_signature(es)
    results: Dict = {}
    if results_path.exists():
        results = json.loads(results_path.read_text())
        if results.get("data") != sig:
            results = {}
    results.setdefault("data", sig)
    results.setdefault("rows", {})
    results["machine"] = {
        "cpu": cpu_name(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }
    results["description"] = es.description

    def save():
        results_path.parent.mkdir(parents=True, exist_ok=True)
        results_path.write_text(json.dumps(results, indent=1))

    tok = load_tokenizer(base_dir)
    bar = tqdm(total=sum(c.steps for c in es.train.values()), desc="experts", unit="step")
    experts = ensure_experts(
        base_dir, tasks, es.train, cache, es.name, es.heldout, es.data_seed, bar=bar
    )
    bar.close()
    rows = results["rows"]
    if references and "base" not in rows:
        rows["base"] = {
            "group": "reference",
            "scores": score_model(load_model(base_dir), tok, tasks, max_tokens),
        }
        save()
    for t in tasks:
        label = f"expert {t.name}"
        if references and label not in rows:
            model = load_model(experts[t.name])
            rows[label] = {
                "group": "expert",
                "task": t.name,
                "scores": {t.name: score(model, tok, t, max_text_tokens=max_tokens)},
            }
            save()
    specs = select(method_specs(len(tasks)), only)
    merged_root = cache / "merged" / es.name
    pbar = tqdm(specs, desc="merges", unit="merge")
    for spec in pbar:
        pbar.set_description(spec.label)
        row = rows.get(spec.label)
        if row and row.get("key") == spec.key() and "error" not in row:
            continue  # scored before with the same configuration (failed merges are retried)
        out_dir = merged_root / spec.label.replace(" ", "_").replace("/", "-")
        cfg = merge_config(
            spec.method,
            base_dir if spec.base else None,
            [experts[t.name] for t in tasks],
            spec.parameters,
            spec.model_parameters,
        )
        try:
            seconds = run_mergekit(
                cfg,
                out_dir,
                seed=seed if spec.seeded else None,
                log=out_dir.parent / (out_dir.name + ".log"),
            )
        except RuntimeError as exc:
            shutil.rmtree(out_dir, ignore_errors=True)
            rows[spec.label] = {"group": spec.group, "key": spec.key(), "error": str(exc)[-500:]}
            save()
            continue
        model = load_model(out_dir)
        rows[spec.label] = {
            "group": spec.group,
            "method": spec.method,
            "key": spec.key(),
            "parameters": spec.parameters,
            "model_parameters": spec.model_parameters,
            "note": spec.note,
            "merge_seconds": seconds,
            "checkpoint": check_merged(out_dir, model),
            "scores": score_model(model, tok, tasks, max_tokens),
        }
        del model
        if not keep:
            shutil.rmtree(out_dir, ignore_errors=True)
        save()
        if on_progress:
            on_progress(spec.label, rows[spec.label])
    save()
    if report:
        from benchmarks.real_llama.report import write_report

        write_report(results, es.name)
    return results


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--set", default="main", choices=sorted(EXPERT_SETS))
    ap.add_argument(
        "--methods",
        nargs="*",
        help="row labels or groups (baseline, ace, ablation, eps, other) to run",
    )
    ap.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads (default: all cores; 1 is faster on a busy machine)",
    )
    ap.add_argument("--keep", action="store_true", help="keep merged checkpoints")
    ap.add_argument("--seed", type=int, default=0, help="--random-seed for dare_ties")
    ap.add_argument("--report-only", action="store_true")
    ap.add_argument(
        "--results",
        type=Path,
        default=None,
        help="results JSON (default benchmarks/results/<set>.json)",
    )
    ap.add_argument("--no-report", action="store_true", help="skip tables and chart")
    ap.add_argument(
        "--no-references", action="store_true", help="do not score the base model and the experts"
    )
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.report_only:
        from benchmarks.real_llama.report import write_report

        path = args.results or RESULTS / f"{args.set}.json"
        write_report(json.loads(path.read_text()), args.set)
        return
    t0 = time.perf_counter()
    run(
        EXPERT_SETS[args.set],
        only=args.methods,
        keep=args.keep,
        seed=args.seed,
        results_path=args.results,
        report=not args.no_report,
        references=not args.no_references,
    )
    print(f"done in {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
