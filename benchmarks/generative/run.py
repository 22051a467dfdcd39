"""Generative benchmark: domain experts made by continued training, merged by every method
through ``mergekit-yaml``, scored by held-out next-token loss and retention.

    python -m benchmarks.generative.run            # the full grid (cached, resumable)
    python -m benchmarks.generative.run --quick    # tiny stand-ins, a smoke test of the pipeline
    python -m benchmarks.generative.run --report-only

Work runs in priority order: the first training seed's experts and their all-expert merges,
one random subset per size T, the second seed's experts and merges, then the remaining subsets.
Every scored model is saved at once to ``benchmarks/results/<set>.json`` and is not redone on
the next run while its configuration and the data are unchanged, so an interrupted run resumes.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import os
import random
import shutil
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from benchmarks.generative.config import GEN_SETS, GenSet
from benchmarks.generative.corpora import Domain, build_domain, synthetic_domains
from benchmarks.generative.lm import doc_scores, lm_fine_tune
from benchmarks.real_llama.base import prepare_base
from benchmarks.real_llama.config import CACHE
from benchmarks.real_llama.methods import MethodSpec, method_specs, select
from benchmarks.real_llama.model import load_model, load_tokenizer, train_expert
from benchmarks.real_llama.pipeline import expert_dir, merge_config, run_mergekit
from benchmarks.real_llama.run import RESULTS, check_merged, cpu_name

ALL = "all"
# (base dir, domain, training config, expert dir) -> (merge reference, loader of the expert)
ExpertSource = Callable[[Path, Domain, object, Path], Tuple[str, Callable]]


def canonical_label(spec: MethodSpec, size: int) -> str:
    """Row name independent of the number of experts (the mean of task vectors is 1/T)."""
    return spec.label.replace(f"lambda=1/{size}", "mean")


def method_rows(
    methods: Sequence[str], size: int, specs: Optional[List[MethodSpec]] = None
) -> List[Tuple[str, MethodSpec]]:
    """The available specs named by ``methods``: an exact row label picks that row alone (so
    ``ace`` is the defaults only), anything else is a group of ``specs`` (default
    :func:`benchmarks.real_llama.methods.method_specs`)."""
    specs = method_specs(size) if specs is None else specs
    labels = {canonical_label(s, size) for s in specs}
    picked: List[MethodSpec] = []
    for key in methods:
        picked += [
            s
            for s in specs
            if s not in picked
            and (canonical_label(s, size) == key if key in labels else s.group == key)
        ]
    return [(canonical_label(s, size), s) for s in select(picked)]


def sweep_subsets(
    domains: Sequence[str], sizes: Sequence[int], per_size: int, seed: int
) -> Dict[int, List[Tuple[str, ...]]]:
    """``per_size`` distinct random subsets of each size, the same for every training seed."""
    out = {}
    for size in sizes:
        combos = list(itertools.combinations(domains, size))
        random.Random(1000 * seed + size).shuffle(combos)
        out[size] = combos[:per_size]
    return out


def plan(gs: GenSet) -> List[Tuple[str, int, int]]:
    """``(phase, training seed, subset round)`` in the order they run."""
    first = gs.train_seeds[0]
    steps = []
    for seed in gs.train_seeds:
        steps += [("experts", seed, 0), ("full", seed, 0)]
        if seed == first and gs.sweep_subsets and first in gs.sweep_seeds:
            steps.append(("sweep", seed, 0))
    for r in range(gs.sweep_subsets):
        for seed in gs.sweep_seeds:
            if (seed, r) != (first, 0):
                steps.append(("sweep", seed, r))
    return steps


def row_key(seed: int, subset: Sequence[str], label: str, domains: Sequence[str]) -> str:
    members = ALL if list(subset) == list(domains) else "+".join(subset)
    return f"seed {seed} | {members} | {label}"


def data_signature(gs: GenSet, domains: Sequence[Domain]) -> Dict:
    held = hashlib.sha1("\x00".join(t for d in domains for t in d.heldout).encode()).hexdigest()
    return {
        "set": gs.name,
        "domains": [d.name for d in domains],
        "heldout": gs.heldout,
        "seq": gs.seq,
        "data_seed": gs.data_seed,
        "heldout_sha1": held[:16],
        "train": {str(s): gs.train_config(s).key() for s in gs.train_seeds},
    }


def _rounded(scores: Dict[str, List[float]]) -> Dict[str, List[float]]:
    return {
        "loss": [round(x, 5) for x in scores["loss"]],
        "acc": [round(x, 4) for x in scores["acc"]],
    }


def score_domains(model, tok, domains: Sequence[Domain], seq: int) -> Dict[str, Dict]:
    return {d.name: _rounded(doc_scores(model, tok, d.heldout, seq)) for d in domains}


def _save(path: Path, results: Dict, mine: set) -> None:
    """Write ``results`` to ``path``, first adopting the rows and runs another process (running
    other phases on the same data) saved there meanwhile; serialized by a lock file."""
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if path.exists():
            disk = json.loads(path.read_text())
            if disk.get("data") == results["data"]:
                for k, v in disk["rows"].items():
                    if k not in mine:
                        results["rows"][k] = v
                ids = {(r["started"], r.get("pid")) for r in results["runs"]}
                results["runs"] += [
                    r for r in disk.get("runs", []) if (r["started"], r.get("pid")) not in ids
                ]
                results["runs"].sort(key=lambda r: r["started"])
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(results, indent=0))
        os.replace(tmp, path)


def run(
    gs: GenSet,
    *,
    cache: Path = CACHE,
    results_path: Optional[Path] = None,
    base_dir: Optional[Path] = None,
    domains: Optional[List[Domain]] = None,
    report: bool = True,
    phases: Optional[Sequence[str]] = None,
    seeds: Optional[Sequence[int]] = None,
    sizes: Optional[Sequence[int]] = None,
    source: Optional[ExpertSource] = None,
    redo: Optional[Callable[[MethodSpec], bool]] = None,
    only: Optional[Sequence[str]] = None,
    log=print,
) -> Dict:
    """Run (or resume) the grid of ``gs`` (only ``phases`` -- experts, full, sweep --, training
    ``seeds`` and sweep ``sizes`` when given); returns the results dict (saved as JSON).
    Processes running different parts at once share the JSON file safely.

    ``source`` makes the experts (default :func:`full_fine_tune`); a merge row is redone when
    ``gs.merge_key(spec)`` changed or ``redo(spec)`` is true; ``only``: run only these methods
    (row labels) of the grid."""
    t_start = time.perf_counter()
    results_path = results_path or RESULTS / f"{gs.name}.json"
    base_dir = base_dir or prepare_base(cache / "base")
    domains = domains or [build_domain(n, gs.heldout, gs.data_seed) for n in gs.domains]
    names = [d.name for d in domains]
    by_name = {d.name: d for d in domains}
    sig = data_signature(gs, domains)
    results: Dict = json.loads(results_path.read_text()) if results_path.exists() else {}
    if results.get("data") != sig:
        results = {"data": sig}
    results.setdefault("rows", {})
    results.setdefault("runs", [])
    results["description"] = gs.description
    results["machine"] = {
        "cpu": cpu_name(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }
    results["subsets"] = {
        str(k): [list(s) for s in v]
        for k, v in sweep_subsets(names, gs.sweep_sizes, gs.sweep_subsets, gs.subset_seed).items()
    }
    this_run = {"started": time.strftime("%Y-%m-%d %H:%M:%S"), "pid": os.getpid(), "seconds": 0.0}
    results["runs"].append(this_run)
    rows = results["rows"]
    mine: set = set()

    def save(*keys):
        mine.update(keys)
        this_run["seconds"] = round(time.perf_counter() - t_start, 1)
        _save(results_path, results, mine)

    tok = load_tokenizer(base_dir)
    if "base" not in rows:
        t0 = time.perf_counter()
        rows["base"] = {
            "kind": "base",
            "scores": score_domains(load_model(base_dir), tok, domains, gs.seq),
        }
        rows["base"]["eval_seconds"] = round(time.perf_counter() - t0, 1)
        save("base")
    experts: Dict[int, Dict[str, Path]] = {}

    def ensure(seed: int) -> Dict[str, Path]:
        """Train (or reuse) and score seed ``seed``'s experts: on every domain for the
        ``cross_seeds``, on their own domain otherwise."""
        if seed in experts:
            return experts[seed]
        experts[seed] = {}
        cfg = gs.train_config(seed)
        for d in domains:
            out = expert_dir(cache, gs.expert_group(), d, cfg, gs.heldout, gs.data_seed)
            label = f"seed {seed} | expert {d.name}"
            if not (out / "expert.json").exists():
                log(f"training {label} ({cfg.steps} steps)")
            ref, load = (source or full_fine_tune)(base_dir, d, cfg, out)
            experts[seed][d.name] = ref
            if label not in rows:
                t0 = time.perf_counter()
                meta = json.loads((out / "expert.json").read_text())
                on = domains if seed in gs.cross_seeds else [d]
                rows[label] = {
                    "kind": "expert",
                    "seed": seed,
                    "domain": d.name,
                    "train_seconds": round(meta["seconds"], 1),
                    "train_losses": [round(x, 4) for x in meta["losses"]],
                    "scores": score_domains(load(), tok, on, gs.seq),
                }
                rows[label]["eval_seconds"] = round(time.perf_counter() - t0, 1)
                save(label)
                log(f"scored {label}")
        return experts[seed]

    subsets = sweep_subsets(names, gs.sweep_sizes, gs.sweep_subsets, gs.subset_seed)
    for phase, seed, rnd in plan(gs):
        if (phases and phase not in phases) or (seeds is not None and seed not in seeds):
            continue
        if phase == "experts":
            ensure(seed)
            continue
        if phase == "full":
            methods = gs.full_methods
            if seed != gs.train_seeds[0] and gs.later_seed_methods is not None:
                methods = gs.later_seed_methods
            jobs = [(tuple(names), m) for m in methods]
        else:
            jobs = [
                (subsets[size][rnd], m)
                for size in gs.sweep_sizes
                if rnd < len(subsets[size]) and (sizes is None or size in sizes)
                for m in gs.sweep_methods
            ]
        for subset, method in jobs:
            if only is not None and method not in only:
                continue
            for label, spec in method_rows([method], len(subset), gs.method_specs(len(subset))):
                key = row_key(seed, subset, label, names)
                old = rows.get(key)
                fresh = old and old.get("key") == gs.merge_key(spec) and "error" not in old
                if fresh and not (redo and redo(spec)):
                    continue
                _merge_and_score(
                    rows,
                    key,
                    label,
                    spec,
                    gs,
                    seed,
                    subset,
                    base_dir,
                    [ensure(seed)[n] for n in subset],
                    [by_name[n] for n in subset],
                    tok,
                    gs.seq,
                    cache / "merged" / f"gen-{gs.name}",
                )
                save(key)
                log(f"{key}: {rows[key].get('merge_seconds', 'failed')} s merge")
    save()
    if report:
        from benchmarks.generative.report import write_report

        write_report(results)
    return results


def _merge_and_score(
    rows,
    key,
    label,
    spec,
    gs,
    seed,
    subset,
    base_dir,
    expert_dirs,
    domains,
    tok,
    seq,
    merged_root: Path,
) -> None:
    out_dir = merged_root / key.replace(" | ", "_").replace(" ", "").replace("/", "-")
    cfg = merge_config(
        spec.method,
        base_dir if spec.base else None,
        expert_dirs,
        spec.parameters,
        spec.model_parameters,
    )
    row = {
        "kind": "merge",
        "seed": seed,
        "subset": list(subset),
        "label": label,
        "method": spec.method,
        "key": gs.merge_key(spec),
        "parameters": spec.parameters,
        "model_parameters": spec.model_parameters,
    }
    try:
        row["merge_seconds"] = round(
            run_mergekit(
                cfg,
                out_dir,
                seed=0 if spec.seeded else None,
                log=out_dir.parent / (out_dir.name + ".log"),
                extra_args=gs.mergekit_args(merged_root),
            ),
            1,
        )
    except RuntimeError as exc:
        shutil.rmtree(out_dir, ignore_errors=True)
        rows[key] = {**row, "error": str(exc)[-500:]}
        return
    t0 = time.perf_counter()
    model = load_model(out_dir)
    row["checkpoint"] = check_merged(out_dir, model)
    row["scores"] = score_domains(model, tok, domains, seq)
    row["eval_seconds"] = round(time.perf_counter() - t0, 1)
    del model
    shutil.rmtree(out_dir, ignore_errors=True)
    rows[key] = row


def full_fine_tune(base_dir: Path, domain: Domain, cfg, out_dir: Path) -> Tuple[str, Callable]:
    """The generative experts: continued training of every weight, saved in float32; returns
    the merge reference (the checkpoint directory) and a loader of the expert for scoring."""
    out = train_expert(base_dir, domain, cfg, out_dir, fit=lm_fine_tune)
    return str(out), lambda: load_model(out)


def quick_set() -> GenSet:
    return GenSet(
        "generative-quick",
        ("alpha", "beta", "gamma"),
        steps=30,
        lr=1e-2,
        batch_size=8,
        seq=16,
        heldout=15,
        train_seeds=(0, 1),
        full_methods=("ace", "task_arithmetic (lambda=1)"),
        later_seed_methods=("ace",),
        sweep_methods=("ace", "ties"),
        sweep_sizes=(2,),
        sweep_subsets=1,
        sweep_seeds=(0,),
        warmup=2,
        description="tiny stand-ins: a random 2-layer Llama, 3 synthetic domains",
    )


def run_quick(root: Path, report: bool = True, log=print) -> Dict:
    """The pipeline end to end on tiny stand-ins, everything under ``root``."""
    from benchmarks.real_llama.tiny import make_tiny_llama

    gs = quick_set()
    domains = synthetic_domains()
    words = {w for d in domains for t in d.train + d.heldout for w in t.split()}
    base_dir = root / "base"
    if not (base_dir / "model.safetensors").exists():
        make_tiny_llama(base_dir, words)
    results = run(
        gs,
        cache=root / "cache",
        results_path=root / "results.json",
        base_dir=base_dir,
        domains=domains,
        report=False,
        log=log,
    )
    if report:
        from benchmarks.generative.report import write_report

        write_report(results, doc=None, img_dir=root, out_dir=root)
    return results


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--set", default="generative", choices=sorted(GEN_SETS))
    ap.add_argument(
        "--quick",
        action="store_true",
        help="tiny stand-ins under benchmarks/cache/generative-quick (seconds)",
    )
    ap.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads (default: all cores; 1 is faster on a busy machine)",
    )
    ap.add_argument("--report-only", action="store_true")
    ap.add_argument(
        "--phases",
        nargs="*",
        choices=("experts", "full", "sweep"),
        help="run only these phases (default: all); several processes may run "
        "different phases at once",
    )
    ap.add_argument("--seeds", nargs="*", type=int, help="only these training seeds")
    ap.add_argument("--sizes", nargs="*", type=int, help="only these subset sizes T (sweep)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    if args.quick:
        run_quick(CACHE / "generative-quick")
    elif args.report_only:
        from benchmarks.generative.report import write_report

        write_report(json.loads((RESULTS / f"{args.set}.json").read_text()))
    else:
        run(GEN_SETS[args.set], phases=args.phases, seeds=args.seeds, sizes=args.sizes)
    print(f"done in {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
