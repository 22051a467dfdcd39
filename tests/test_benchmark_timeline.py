"""The CPU-runnable parts of the end-to-end benchmark (benchmarks.perf_e2e, benchmarks.perf_report,
which perf_gpu.sh's overlap step drives): the tracer on a real mergekit-yaml run, the page-cache
eviction, method specs with parameters and environment, output digests, and the report."""

from __future__ import annotations

import json
import mmap
import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from benchmarks import perf_e2e, perf_report
from tests.tiny_models import EXPERT_SCALES, model_list, write_config

ROOT = Path(__file__).resolve().parents[1]


def resident_pages(path: Path) -> float:
    """Share of a file's pages in the page cache (mincore)."""
    import ctypes

    import numpy as np

    libc = ctypes.CDLL(None, use_errno=True)
    size = path.stat().st_size
    with open(path, "rb") as f, mmap.mmap(f.fileno(), size, prot=mmap.PROT_READ) as m:
        view = np.frombuffer(m, dtype=np.uint8)
        pages = (size + 4095) // 4096
        vector = (ctypes.c_ubyte * pages)()
        assert libc.mincore(ctypes.c_void_p(view.ctypes.data), ctypes.c_size_t(size), vector) == 0
        share = sum(v & 1 for v in vector) / pages
        del view
    return share


def test_evict_and_warm_drop_and_fill_the_page_cache(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    save_file({"w": torch.randn(2**20)}, model / "model.safetensors")
    (model / "config.json").write_text("{}")
    (model / "model.safetensors").read_bytes()
    os.sync()  # written pages must be clean to be dropped
    assert perf_e2e.evict([model]) == (model / "model.safetensors").stat().st_size
    assert resident_pages(model / "model.safetensors") < 0.05
    assert perf_e2e.warm([model]) == (model / "model.safetensors").stat().st_size
    assert resident_pages(model / "model.safetensors") > 0.95


def test_method_specs_and_digests(tmp_path):
    assert perf_e2e.parse_spec("ace") == ("ace", "", {})
    assert perf_e2e.parse_spec("ace/gate=off,k_frac=0.2:MERGEKIT_ACE_OVERLAP=0,X=1") == (
        "ace",
        "{gate: off, k_frac: 0.2}",
        {"MERGEKIT_ACE_OVERLAP": "0", "X": "1"},
    )
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        save_file({"w": torch.arange(10.0)}, tmp_path / name / "model.safetensors")
        (tmp_path / name / "README.md").write_text(name)  # not a weight file
    assert perf_e2e.digest(tmp_path / "a") == perf_e2e.digest(tmp_path / "b")
    save_file({"w": torch.arange(10.0) + 1}, tmp_path / "b" / "model.safetensors")
    assert perf_e2e.digest(tmp_path / "a") != perf_e2e.digest(tmp_path / "b")


def test_traced_merge_shows_reads_merges_and_writes_per_thread(tiny_family, tmp_path):
    """One real mergekit-yaml run under the tracer, on the overlapped executor: every tensor
    is read on the reader thread, merged on the main one and written on the writer; ACE's
    phases are counted per branch; the report tabulates and draws it."""
    cfg = write_config(
        tmp_path / "ace.yml",
        {
            "merge_method": "ace",
            "base_model": str(tiny_family["base"]),
            "dtype": "float32",
            "models": model_list(tiny_family, list(EXPERT_SCALES)),
        },
    )
    trace = tmp_path / "trace.jsonl"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks.perf_e2e",
            "--trace-run",
            str(trace),
            "--",
            str(cfg),
            str(tmp_path / "out"),
            "--quiet",
            "--out-shard-size",
            "20K",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "MERGEKIT_ACE_OVERLAP": "1"},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    events = [json.loads(line) for line in trace.read_text().splitlines()]
    threads = {}
    for e in events:
        threads.setdefault(e["phase"], set()).add(e["thread"])
    assert threads["stage"] == {"mergekit-ace-reader"} and threads["merge"] == {"MainThread"}
    assert threads["write"] == {"mergekit-ace-writer"} and threads["finalize"] == {"MainThread"}
    merged = {e["tensor"] for e in events if e["phase"] == "merge"}
    assert merged == {e["tensor"] for e in events if e["phase"] == "write"}
    assert len(merged) == 21
    summary = perf_e2e.summarize_trace(trace)
    kernel = summary["kernel"]
    assert kernel["heterogeneous"]["merge"]["tensors"] > 0
    assert kernel["homogeneous"]["merge"]["tensors"] > 0
    assert "solve_and_refine" in kernel["heterogeneous"]
    assert "solve_and_refine" not in kernel["homogeneous"]
    assert summary["before_first_read"] > 0 and summary["merge_loop"] > 0
    row = {
        "method": "ace",
        "spec": "ace",
        "seconds": 9.0,
        "cold": False,
        "load": 1.0,
        "trace": str(trace),
        "timeline": summary,
    }
    table = perf_report.timeline_table([row])
    assert "| ace | hot |" in table and "(reader)" in table and "(writer)" in table
    assert "| heterogeneous |" in perf_report.kernel_phase_table([row])
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return
    perf_report.plot_timelines([row], tmp_path / "timeline.png")
    assert (tmp_path / "timeline.png").stat().st_size > 5000
