"""Demo: real SmolLM2-135M experts, merged with ACE through ``mergekit-yaml``.

    bash benchmarks/setup.sh            # once: model file, data sets, plotting
    python -m benchmarks.demo           # 4 experts (about 20 min on 2 idle cores)
    python -m benchmarks.demo --quick   # 2 small experts, a first look

Trains one expert per task (or reuses ``benchmarks/cache/``), merges them with ``ace`` and
with ``task_arithmetic`` through the real ``mergekit-yaml`` CLI, and prints held-out accuracy
per task beside the base model and the experts. The full comparison of every method is
``python -m benchmarks.real_llama.run`` (see docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import time


def demo_methods(n_tasks: int):
    return [f"task_arithmetic (lambda=1/{n_tasks})", "task_arithmetic (lambda=1)", "ace"]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description="ACE-Merging demo on real Llama experts")
    ap.add_argument(
        "--quick",
        action="store_true",
        help="2 tasks, 20 training steps each, 80 held-out examples per task",
    )
    ap.add_argument("--set", default=None, help="expert set (default: main, or quick)")
    ap.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads (default: all cores; 1 is faster on a busy machine)",
    )
    args = ap.parse_args(argv)

    import torch

    from benchmarks.real_llama.base import prepare_base
    from benchmarks.real_llama.config import CACHE, EXPERT_SETS
    from benchmarks.real_llama.pipeline import build_tasks
    from benchmarks.real_llama.report import summary
    from benchmarks.real_llama.run import run

    if args.threads:
        torch.set_num_threads(args.threads)
    es = EXPERT_SETS[args.set or ("quick" if args.quick else "main")]
    t0 = time.perf_counter()
    print(f"[1/3] base model: SmolLM2-135M-Instruct (GGUF -> safetensors, cached in {CACHE})")
    base = prepare_base(CACHE / "base")
    tasks = build_tasks(es.tasks, es.heldout, es.train_pool, es.data_seed)
    print(f"[2/3] experts: {es.description}")
    methods = demo_methods(len(tasks))
    print(
        "[3/3] merges through mergekit-yaml: "
        + ", ".join(methods)
        + f"; scoring {es.heldout} held-out examples per task"
    )
    results = run(
        es,
        only=methods,
        base_dir=base,
        tasks=tasks,
        report=False,
        results_path=CACHE / "demo" / f"{es.name}.json",
    )
    rows = results["rows"]
    cols = ["base", "experts"] + methods
    names = {
        "base": "base",
        "experts": "expert",
        f"task_arithmetic (lambda=1/{len(tasks)})": f"TA 1/{len(tasks)}",
        "task_arithmetic (lambda=1)": "TA 1",
        "ace": "ACE",
    }
    width = max(20, max(len(t.name) for t in tasks) + 2)
    print()
    print(f"  {'held-out accuracy, %':<{width}}" + "".join(f"{names[c]:>10}" for c in cols))
    for t in tasks:
        cells = []
        for c in cols:
            if c == "experts":
                acc = rows[f"expert {t.name}"]["scores"][t.name]["acc"]
            else:
                acc = rows[c]["scores"][t.name]["acc"]
            cells.append(f"{100 * acc:10.1f}")
        print(f"  {t.name:<{width}}" + "".join(cells))
    avg = []
    for c in cols:
        if c == "experts":
            vals = [rows[f"expert {t.name}"]["scores"][t.name]["acc"] for t in tasks]
            avg.append(f"{100 * sum(vals) / len(vals):10.1f}")
        else:
            avg.append(f"{100 * summary(results, c)['avg']:10.1f}")
    print(f"  {'average':<{width}}" + "".join(avg))
    norm = ["", "100.0"] + [f"{100 * summary(results, c)['norm_avg']:.1f}" for c in cols[2:]]
    norm[0] = f"{100 * summary(results, 'base')['norm_avg']:.1f}"
    print(f"  {'normalized':<{width}}" + "".join(f"{x:>10}" for x in norm))
    secs = {c: rows[c].get("merge_seconds") for c in cols[2:]}
    print(
        "\nmergekit-yaml wall time: "
        + ", ".join(f"{names[c]} {s:.0f} s" for c, s in secs.items() if s)
    )
    print(
        f"standard error per task at n={es.heldout}: up to "
        f"{100 * (0.25 / es.heldout) ** 0.5:.1f} points; total {time.perf_counter() - t0:.0f} s"
    )


if __name__ == "__main__":
    main()
