"""What ACE does on the real expert deltas, tensor by tensor, grouped by module type.

    python -m benchmarks.real_llama.diagnose [--set main] [--eps 1e-5]

Calls the kernel :func:`mergekit_ace.kernels.ace.ace_merge` directly on the expert
checkpoints' tensors with the paper's settings (``eps`` 1e-5 unless ``--eps``, ``gate_statistic:
gamma``; the package's defaults are ``eps: auto``, ``log_spread``) and tabulates the heterogeneity
``gamma``, the branch taken, the task-vector energies, the scale of the covariance proxies
against ``eps``, and how the ACE task vector compares with the plain mean of the task vectors.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Dict, List

import torch

from benchmarks.real_llama.config import CACHE, EXPERT_SETS
from benchmarks.real_llama.pipeline import trained_expert_dirs

RESULTS = Path(__file__).resolve().parents[1] / "results"


def module_type(name: str) -> str:
    m = re.search(r"\.(\w+_proj|embed_tokens|lm_head)\.weight$", name)
    if m:
        return m.group(1)
    return "norm" if "norm" in name else name.rsplit(".", 1)[0]


def load_tensors(path: Path) -> Dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(Path(path).glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def layer_of(name: str):
    m = re.search(r"\.layers\.(\d+)\.", name)
    return int(m.group(1)) if m else None


def diagnose(base_dir: Path, expert_dirs: List[Path], *, eps=1e-5, every: int = 1) -> List[Dict]:
    from mergekit_ace.kernels.ace import ace_merge

    base = load_tensors(base_dir)
    experts = [load_tensors(d) for d in expert_dirs]
    rows = []
    for name, w0 in base.items():
        layer = layer_of(name)
        if layer is not None and layer % every:
            continue
        ws = [e[name] for e in experts]
        merged, diag = ace_merge(w0, ws, eps=eps, gate_statistic="gamma", tensor_name=name)
        row = {
            "tensor": name,
            "type": module_type(name),
            "shape": list(w0.shape),
            "branch": diag.branch,
            "gamma": diag.gamma,
            "energies": diag.energies,
            "log_spread": getattr(diag, "log_spread", None),
        }
        if w0.dim() == 2 and diag.branch not in ("unchanged",):
            taus = [w - w0 for w in ws]
            mean_tau = sum(taus) / len(taus)
            w_ace = merged - w0
            n = w0.shape[1]
            # mean eigenvalue of each proxy S_t = C_t^T C_t (trace / n) vs the ridge eps
            centred = [float(((t - t.mean(0)) ** 2).sum()) / n for t in taus]
            row.update(
                {
                    "w0_norm": float(w0.norm()),
                    "rel_delta": [math.sqrt(e) / float(w0.norm()) for e in diag.energies],
                    "proxy_mean_eig": centred,
                    "ace_over_mean": float(w_ace.norm() / (mean_tau.norm() + 1e-30)),
                    "ace_over_sum": float(w_ace.norm() / (sum(taus).norm() + 1e-30)),
                    "cos_ace_mean": float(
                        (w_ace * mean_tau).sum() / (w_ace.norm() * mean_tau.norm() + 1e-30)
                    ),
                }
            )
        rows.append(row)
    return rows


def _fmt(x, spec=".3g"):
    return "-" if x is None else format(x, spec)


def summarize(rows: List[Dict], task_names: List[str], eps: float) -> str:
    by = defaultdict(list)
    for r in rows:
        by[r["type"]].append(r)
    out = [
        "| Module | Tensors | Branch (het./hom./other) | gamma median [min, max] | "
        "rel. delta norm per expert (" + ", ".join(task_names) + ") | proxy mean eig / eps "
        "(median) | ACE / mean-task-vector norm | cos(ACE, mean) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for typ, rs in sorted(by.items()):
        het = sum(r["branch"] == "heterogeneous" for r in rs)
        hom = sum(r["branch"] == "homogeneous" for r in rs)
        gam = [r["gamma"] for r in rs if r["gamma"] is not None]
        rel = [r["rel_delta"] for r in rs if "rel_delta" in r]
        rel_s = (
            ", ".join(
                _fmt(statistics.median(x[i] for x in rel), ".2g") for i in range(len(task_names))
            )
            if rel
            else "-"
        )
        eig = [statistics.median(r["proxy_mean_eig"]) / eps for r in rs if "proxy_mean_eig" in r]
        ratio = [r["ace_over_mean"] for r in rs if "ace_over_mean" in r]
        cos = [r["cos_ace_mean"] for r in rs if "cos_ace_mean" in r]
        out.append(
            f"| {typ} | {len(rs)} | {het}/{hom}/{len(rs) - het - hom} | "
            + (f"{statistics.median(gam):.3f} [{min(gam):.3f}, {max(gam):.3f}]" if gam else "-")
            + f" | {rel_s} | {_fmt(statistics.median(eig)) if eig else '-'} | "
            f"{_fmt(statistics.median(ratio), '.2f') if ratio else '-'} | "
            f"{_fmt(statistics.median(cos), '.2f') if cos else '-'} |"
        )
    return "\n".join(out)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--set", default="main", choices=sorted(EXPERT_SETS))
    ap.add_argument("--eps", type=float, default=1e-5)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument(
        "--every",
        type=int,
        default=1,
        help="only every N-th transformer layer (plus embeddings and norms)",
    )
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    es = EXPERT_SETS[args.set]
    dirs = trained_expert_dirs(CACHE, es)
    rows = diagnose(CACHE / "base", dirs, eps=args.eps, every=args.every)
    table = summarize(rows, es.tasks, args.eps)
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = f"{es.name}_diagnostics" + ("" if args.eps == 1e-5 else f"_eps{args.eps:g}")
    (RESULTS / f"{stem}.json").write_text(json.dumps(rows, indent=0))
    (RESULTS / f"{stem}.md").write_text(table + "\n")
    doc = RESULTS.parents[1] / "docs" / "benchmarks.md"
    if doc.exists() and args.eps == 1e-5:
        from benchmarks.real_llama.report import replace_block

        doc.write_text(replace_block(doc.read_text(), f"diagnostics-{es.name}", table))
    print(table)


if __name__ == "__main__":
    main()
