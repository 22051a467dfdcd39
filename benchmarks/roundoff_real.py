"""ACE's round-off warnings on real experts, tensor by tensor through the kernel (CPU): each
2-D matrix of the transformer layers merged in float32 and in float64 from the same inputs,
the real relative change of the merged update beside what the float32 merge measured and
warned (docs/method.md, "Round-off: bound and measurement").

    python -m benchmarks.roundoff_real benchmarks/cache/experts/uneven \\
        --base benchmarks/cache/base --settings defaults gate=on --out roundoff-uneven.json

Each folder under the experts' folder holds ``model.safetensors``.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import time
from pathlib import Path
from typing import Dict, List, Sequence

import torch
from safetensors import safe_open

from mergekit_ace.kernels.ace import ace_merge
from mergekit_ace.kernels.reports import reset_reports


class Warnings(logging.Handler):
    """The package's warnings, kept instead of printed."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: List[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def parse_setting(text: str) -> Dict:
    """``defaults`` or ``name=value`` pairs joined by commas (``gate=on,k_frac=0.2``)."""
    if text == "defaults":
        return {}
    pairs = (item.split("=", 1) for item in text.split(","))
    return {key: _value(value) for key, value in pairs}


def _value(text: str):
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    try:
        return float(text)
    except ValueError:
        return text


def matrices(path: Path) -> List[str]:
    with safe_open(str(path), "pt") as handle:
        names = list(handle.keys())
        return [n for n in names if ".layers." in n and len(handle.get_slice(n).get_shape()) == 2]


def one_tensor(base: Path, experts: Sequence[Path], name: str, setting: Dict, caught: Warnings):
    """The float32 merge's diagnostics and warnings beside its real distance from float64."""
    with safe_open(str(base), "pt") as handle:
        W0 = handle.get_tensor(name).float()
    inputs = []
    for path in experts:
        with safe_open(str(path), "pt") as handle:
            inputs.append(handle.get_tensor(name).float())
    reset_reports()
    caught.messages.clear()
    start = time.perf_counter()
    out32, diag = ace_merge(W0, inputs, tensor_name=name, **setting)
    seconds = time.perf_counter() - start
    out64, _ = ace_merge(W0.double(), [x.double() for x in inputs], **setting)
    reference = out64 - W0.double()
    real = float((out32.double() - W0.double() - reference).norm() / reference.norm())
    return {
        "tensor": name,
        "branch": diag.branch,
        "k": diag.k,
        "condition": diag.condition,
        "boost_ratio": diag.boost_ratio,
        "cut_gap": diag.cut_gap,
        "measured": diag.roundoff_change,
        "real": real,
        "warned": list(caught.messages),
        "seconds": seconds,
    }


def summary(rows: Sequence[Dict]) -> Dict:
    real = sorted(r["real"] for r in rows)
    above = {r["tensor"] for r in rows if r["real"] > 0.01}
    warned = {r["tensor"] for r in rows if r["warned"]}
    return {
        "tensors": len(rows),
        "branches": sorted({r["branch"] for r in rows}),
        "measured": sum(r["measured"] is not None for r in rows),
        "real_above_1pct": sorted(above),
        "warned": sorted(warned),
        "warned_and_real_above_1pct": len(above & warned),
        "real_median": statistics.median(real),
        "real_max": real[-1],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("experts", type=Path, help="a folder of expert folders")
    parser.add_argument("--base", type=Path, required=True)
    parser.add_argument("--settings", nargs="*", default=["defaults"])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, help="write every row and the summaries as JSON")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    caught = Warnings()
    package = logging.getLogger("mergekit_ace")
    package.addHandler(caught)
    package.propagate = False
    base = args.base / "model.safetensors"
    experts = sorted(args.experts.glob("*/model.safetensors"))
    results = {}
    for text in args.settings:
        setting = parse_setting(text)
        rows = [one_tensor(base, experts, n, setting, caught) for n in matrices(base)]
        results[text] = {"summary": summary(rows), "rows": rows}
        print(text, json.dumps(results[text]["summary"], indent=1))
    if args.out:
        args.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
