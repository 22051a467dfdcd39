"""LoRA benchmark: LoRA experts of the generative benchmark's domains, merged by every method
through ``mergekit-yaml`` in both storage forms, scored by held-out next-token loss.

    python -m benchmarks.lora.run --ranks 8 --phases experts full   # rank 8, T=6, both forms
    python -m benchmarks.lora.run --ranks 32 --phases experts full
    python -m benchmarks.lora.run --phases sweep --sizes 2 4 3      # retention as a function of T
    python -m benchmarks.lora.run --redo ours      # merge this package's methods again
    python -m benchmarks.lora.run --quick          # tiny stand-ins, a smoke test (seconds)
    python -m benchmarks.lora.run --report-only

One results file per rank and storage form (``benchmarks/results/lora-r<rank>-<form>.json``),
cached and resumable as the generative benchmark's. Rows of this package's methods carry a
fingerprint of its merge code: after a change to ``mergekit_ace/kernels`` or ``methods``, a run
merges them again and leaves the other methods' rows alone.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import torch

from benchmarks.generative.corpora import synthetic_domains
from benchmarks.generative.run import run
from benchmarks.lora.config import FORMS, LORA_SETS, OURS, LoraSet
from benchmarks.lora.experts import bf16_base, lora_source
from benchmarks.real_llama.base import prepare_base
from benchmarks.real_llama.config import CACHE
from benchmarks.real_llama.methods import MethodSpec
from benchmarks.real_llama.run import RESULTS


def redo_rule(names: Optional[Sequence[str]]) -> Optional[Callable[[MethodSpec], bool]]:
    """``--redo`` values as a predicate: ``ours`` (this package's methods), ``all``, or merge
    methods / row labels by name."""
    if not names:
        return None
    names = set(names)
    if "all" in names:
        return lambda spec: True
    methods = set(OURS) if "ours" in names else set()
    return lambda spec: spec.method in methods or spec.method in names or spec.label in names


def run_sets(
    sets: Sequence[LoraSet],
    *,
    cache: Path = CACHE,
    results_dir: Path = RESULTS,
    base_dir: Optional[Path] = None,
    domains=None,
    phases: Optional[Sequence[str]] = None,
    sizes: Optional[Sequence[int]] = None,
    redo: Optional[Sequence[str]] = None,
    only: Optional[Sequence[str]] = None,
    log=print,
) -> Dict[str, Dict]:
    """Run (or resume) each set in turn on the bfloat16 base; returns results by set name."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # every model is local
    base_dir = base_dir or bf16_base(prepare_base(cache / "base"), cache / "base-bf16")
    out = {}
    for gs in sets:
        log(f"== {gs.name}")
        out[gs.name] = run(
            gs,
            cache=cache,
            results_path=results_dir / f"{gs.name}.json",
            base_dir=base_dir,
            domains=domains,
            report=False,
            phases=phases,
            sizes=sizes,
            source=lora_source(gs.form),
            redo=redo_rule(redo),
            only=only,
            log=log,
        )
    return out


def quick_sets() -> List[LoraSet]:
    """Rank-2 adapters of a tiny random Llama on three synthetic domains, both forms."""
    quick = LoraSet(
        "lora-quick-adapter",
        ("alpha", "beta", "gamma"),
        steps=30,
        lr=3e-2,
        batch_size=8,
        seq=16,
        heldout=15,
        warmup=2,
        train_seeds=(0,),
        cross_seeds=(0,),
        full_methods=("ace", "task_arithmetic (lambda=1)"),
        sweep_methods=("ace", "ties"),
        sweep_sizes=(2,),
        sweep_subsets=1,
        sweep_seeds=(0,),
        rank=2,
        alpha=4.0,
        form="adapter",
        description="tiny stand-ins: a random 2-layer Llama (bf16), 3 synthetic domains, "
        "rank-2 LoRA",
    )
    return [quick, dataclasses.replace(quick, name="lora-quick-bf16", form="bf16")]


def run_quick(root: Path, report: bool = True, redo=None, log=print) -> Dict[str, Dict]:
    """The pipeline end to end on tiny stand-ins, everything under ``root``."""
    from benchmarks.real_llama.tiny import make_tiny_llama

    domains = synthetic_domains()
    words = {w for d in domains for t in d.train + d.heldout for w in t.split()}
    if not (root / "base" / "model.safetensors").exists():
        make_tiny_llama(root / "base", words)
    base = bf16_base(root / "base", root / "base-bf16")
    results = run_sets(
        quick_sets(),
        cache=root / "cache",
        results_dir=root,
        base_dir=base,
        domains=domains,
        redo=redo,
        log=log,
    )
    if report:
        from benchmarks.lora.report import write_report

        write_report(results, doc=None, img_dir=root, out_dir=root, name="lora-quick")
    return results


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny stand-ins (seconds)")
    ap.add_argument("--ranks", nargs="*", type=int, default=[8, 32])
    ap.add_argument("--forms", nargs="*", choices=FORMS, default=list(FORMS))
    ap.add_argument("--phases", nargs="*", choices=("experts", "full", "sweep"))
    ap.add_argument("--sizes", nargs="*", type=int, help="only these subset sizes T (sweep)")
    ap.add_argument(
        "--redo",
        nargs="*",
        help="merge these again even when cached: 'ours' (ace, actmat, tsv, iso_c, iso_cts), "
        "'all', or method names / row labels",
    )
    ap.add_argument("--methods", nargs="*", help="only these row labels of the grid")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (1 on a busy machine)")
    ap.add_argument("--report-only", action="store_true")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    from benchmarks.lora.report import load_results, write_report

    if args.quick:
        run_quick(CACHE / "lora-quick", redo=args.redo)
    else:
        if not args.report_only:
            sets = [LORA_SETS[f"lora-r{r}-{f}"] for r in args.ranks for f in args.forms]
            run_sets(sets, phases=args.phases, sizes=args.sizes, redo=args.redo, only=args.methods)
        write_report(load_results())
    print(f"done in {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
