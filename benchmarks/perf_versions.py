"""The ACE kernel of this checkout beside an older one, interleaved, on a model's tensor shapes.

Every measurement runs in a fresh process that imports one kernel (the older one from its
directory, first on the path); the parent runs each case (shape, branch) with both kernels in
turn, alternating which goes first, so that both see the same machine load. (Long-lived
worker processes, one per kernel, gave one of them a slower floor on the embeddings after the
other shapes, 8.8 s against 6.1 s, where fresh processes measured both at 5.6 s.) Inputs are
synthetic (a random base and ``T`` experts with low-rank-plus-noise task vectors of uneven
scale, in bfloat16 like the checkpoints, ``benchmarks.perf_kernel.make_inputs``), the same in
both processes, which also report a checksum of the output, so a changed result shows.

``--old DIR``: a directory holding the older kernel's ``mergekit_ace`` and nothing else::

    mkdir -p /tmp/old && git archive main mergekit_ace | tar -x -C /tmp/old
    python -m benchmarks.perf_versions --old /tmp/old --preset smollm2 --experts 5 --reps 3

Per shape and branch: the best of ``--reps`` timed calls (after one untimed call), the ratio
new / old of the best over the rounds and the median of the rounds' ratios, and the whole
model's kernel time (each shape times its count in the model).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# name: ([(tensor, (m, n), tensors of that shape in the model)], layers)
PRESETS = {
    "smollm2": [  # SmolLM2-135M: hidden 576, MLP 1536, 9 heads, 3 KV heads, 30 layers
        ("q_proj, o_proj", (576, 576), 60),
        ("k_proj, v_proj", (192, 576), 60),
        ("gate_proj, up_proj", (1536, 576), 60),
        ("down_proj", (576, 1536), 30),
        ("embed_tokens", (49152, 576), 1),
    ],
}


def measure(case: dict) -> dict:
    """One case in this process: the best of ``reps`` timed calls after an untimed one."""
    import torch

    from benchmarks.perf_kernel import make_inputs
    from mergekit_ace.kernels.ace import ace_merge

    torch.set_num_threads(case["threads"])
    base, experts = make_inputs(tuple(case["shape"]), case["experts"])
    out, diag = ace_merge(base, experts, gate=case["gate"])
    best = float("inf")
    for _ in range(case["reps"]):
        start = time.perf_counter()
        out, diag = ace_merge(base, experts, gate=case["gate"])
        best = min(best, time.perf_counter() - start)
    return {
        "seconds": best,
        "branch": diag.branch,
        "checksum": float(out.double().sum()),
        "kernel": ace_merge.__code__.co_filename,
    }


def run_case(kernel_dir: Path, case: dict) -> dict:
    """:func:`measure` in a fresh process that imports the kernel in ``kernel_dir``."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(kernel_dir), str(ROOT)]))
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.perf_versions", "--one", json.dumps(case)],
        cwd=kernel_dir,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--old", type=Path, help="directory of the older mergekit_ace")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="smollm2")
    parser.add_argument("--experts", type=int, default=5)
    parser.add_argument("--gates", nargs="+", default=["on", "off"])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds per case")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--only", nargs="+", help="tensors whose name contains one of these")
    parser.add_argument("--out", type=Path, help="append JSON lines here")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(measure(json.loads(args.one))))
        return
    kernels = {"old": args.old.resolve(), "new": ROOT}
    cases = [c for c in PRESETS[args.preset] if not args.only or any(o in c[0] for o in args.only)]
    rows = []
    for round_ in range(args.rounds):
        for (name, shape, count), gate in itertools.product(cases, args.gates):
            case = dict(
                shape=shape, experts=args.experts, gate=gate, reps=args.reps, threads=args.threads
            )
            for version in ["old", "new"] if round_ % 2 == 0 else ["new", "old"]:
                row = dict(version=version, tensor=name, count=count, round=round_, **case)
                row.update(run_case(kernels[version], case))
                rows.append(row)
                print(json.dumps(row), flush=True)
                if args.out:
                    with open(args.out, "a") as fp:
                        fp.write(json.dumps(row) + "\n")
    print(summary(rows))


def summary(rows) -> str:
    """Per shape and branch: the best seconds of each version over the rounds, their ratio, the
    median over the rounds of each round's ratio, and the whole model's kernel time (best)."""
    seconds = {}
    for row in rows:
        key = (row["tensor"], row["gate"])
        seconds.setdefault(key, {}).setdefault(row["round"], {})[row["version"]] = row
    lines = [
        "| tensor | shape | branch | old s | new s | new / old | median of rounds |",
        "|---|---|---|---|---|---|---|",
    ]
    totals = {}
    for (tensor, gate), rounds in seconds.items():
        old = min(r["old"]["seconds"] for r in rounds.values())
        new = min(r["new"]["seconds"] for r in rounds.values())
        ratios = sorted(r["new"]["seconds"] / r["old"]["seconds"] for r in rounds.values())
        median = statistics.median(ratios)
        first = next(iter(rounds.values()))["new"]
        for version, best in (("old", old), ("new", new)):
            totals[(gate, version)] = totals.get((gate, version), 0.0) + first["count"] * best
        lines.append(
            f"| {tensor} | {first['shape'][0]}x{first['shape'][1]} | {first['branch']} "
            f"| {old:.3f} | {new:.3f} | {new / old:.3f} | {median:.3f} |"
        )
    for gate in sorted({g for g, _ in totals}):
        old, new = totals[(gate, "old")], totals[(gate, "new")]
        lines.append(f"| whole model | | gate {gate} | {old:.1f} | {new:.1f} | {new / old:.3f} | |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
