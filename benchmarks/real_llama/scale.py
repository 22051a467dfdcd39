"""The scale test on real experts: does ACE's merge depend on the units of the task vectors?

    python -m benchmarks.real_llama.scale [--set main] [--every 5] [--factors 0.1 10]

For every sampled tensor of a trained expert set, each task vector ``tau_t`` is multiplied by
the same factor ``a`` (the experts become ``W0 + a tau_t``, as if trained with larger or
smaller steps), merged with the kernel :func:`mergekit_ace.kernels.ace.ace_merge`, and the
merged task vector divided by ``a`` is compared with the unscaled merge. A scale-free method
gives relative deviation 0 and the same branch at every factor. Computation runs in float64
so that the deviations measure the method, not float32 round-off.

Configurations compared: the paper's (``eps`` 1e-5, ``gate_statistic: gamma``), the defaults
(``eps: auto``, ``log_spread``), and each of the two changes alone. ``--report-only`` rebuilds
the table from the saved rows.
"""

from __future__ import annotations

import argparse
import json
import statistics
from typing import Dict, List, Sequence

import torch

from benchmarks.real_llama.config import CACHE, EXPERT_SETS
from benchmarks.real_llama.diagnose import RESULTS, layer_of, load_tensors, module_type
from benchmarks.real_llama.pipeline import trained_expert_dirs

CONFIGS = {
    "eps 1e-5, gamma (paper)": {"eps": 1e-5, "gate_statistic": "gamma"},
    "eps 1e-5, log_spread": {"eps": 1e-5, "gate_statistic": "log_spread"},
    "eps auto, gamma": {"eps": "auto", "gate_statistic": "gamma"},
    "eps auto, log_spread (default)": {"eps": "auto", "gate_statistic": "log_spread"},
}


def scale_test(
    base: Dict[str, torch.Tensor],
    experts: List[Dict[str, torch.Tensor]],
    factors: Sequence[float],
    *,
    every: int = 5,
) -> List[Dict]:
    """One row per (sampled 2-D tensor, configuration, factor)."""
    from mergekit_ace.kernels.ace import ace_merge

    rows = []
    for name, w0 in base.items():
        layer = layer_of(name)
        if w0.dim() != 2 or (layer is not None and layer % every):
            continue
        w0 = w0.double()
        taus = [e[name].double() - w0 for e in experts]
        for label, kwargs in CONFIGS.items():
            ref, d1 = ace_merge(w0, [w0 + t for t in taus], tensor_name=name, **kwargs)
            ref = ref - w0
            for a in factors:
                out, da = ace_merge(w0, [w0 + a * t for t in taus], tensor_name=name, **kwargs)
                dev = float(((out - w0) / a - ref).norm() / ref.norm().clamp_min(1e-300))
                rows.append(
                    {
                        "tensor": name,
                        "type": module_type(name),
                        "config": label,
                        "factor": a,
                        "rel_deviation": dev,
                        "branch_1": d1.branch,
                        "branch_a": da.branch,
                    }
                )
    return rows


def summarize(rows: List[Dict], factors: Sequence[float]) -> str:
    head = ["Configuration"]
    for a in factors:
        head += [f"x{a:g}: median deviation", f"x{a:g}: max deviation", f"x{a:g}: branch flips"]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label in CONFIGS:
        cells = [label]
        for a in factors:
            rs = [r for r in rows if r["config"] == label and r["factor"] == a]
            devs = [r["rel_deviation"] for r in rs]
            flips = [r for r in rs if r["branch_a"] != r["branch_1"]]
            which = sorted({r["type"] for r in flips})
            cells += [
                f"{statistics.median(devs):.2g}",
                f"{max(devs):.2g}",
                f"{len(flips)}/{len(rs)}" + (f" ({', '.join(which)})" if which else ""),
            ]
        out.append("| " + " | ".join(cells) + " |")
    het = {
        label: sum(
            r["branch_1"] == "heterogeneous"
            for r in rows
            if r["config"] == label and r["factor"] == factors[0]
        )
        for label in CONFIGS
    }
    n = len({r["tensor"] for r in rows})
    out.append("")
    out.append(
        f"{n} tensors. Heterogeneous at the experts' own scale: "
        + ", ".join(f"{label} {het[label]}/{n}" for label in CONFIGS)
        + "."
    )
    return "\n".join(out)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--set", default="main", choices=sorted(EXPERT_SETS))
    ap.add_argument(
        "--every",
        type=int,
        default=5,
        help="only every N-th transformer layer (plus the embedding)",
    )
    ap.add_argument("--factors", type=float, nargs="+", default=[0.1, 10.0])
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--report-only", action="store_true")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    es = EXPERT_SETS[args.set]
    saved = RESULTS / f"{es.name}_scale.json"
    if args.report_only:
        rows = json.loads(saved.read_text())
        write_outputs(es.name, rows, summarize(rows, sorted({r["factor"] for r in rows})))
        return
    dirs = trained_expert_dirs(CACHE, es)
    rows = scale_test(
        load_tensors(CACHE / "base"),
        [load_tensors(d) for d in dirs],
        args.factors,
        every=args.every,
    )
    write_outputs(es.name, rows, summarize(rows, args.factors))


def write_outputs(set_name: str, rows: List[Dict], table: str) -> None:
    """``<set>_scale.json`` / ``.md`` under benchmarks/results and the docs block."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{set_name}_scale.json").write_text(json.dumps(rows, indent=0))
    (RESULTS / f"{set_name}_scale.md").write_text(table + "\n")
    doc = RESULTS.parents[1] / "docs" / "benchmarks.md"
    if doc.exists():
        from benchmarks.real_llama.report import replace_block

        doc.write_text(replace_block(doc.read_text(), f"scale-{set_name}", table))
    print(table)


if __name__ == "__main__":
    main()
