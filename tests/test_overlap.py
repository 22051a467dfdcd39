"""The overlapped executor (mergekit_ace.overlap): byte-identical outputs to mergekit's serial
executor through the real ``mergekit-yaml`` command in every mode it supports, errors of the
reader and the writer raised on the main thread with the tensor named and nothing unfinished
left behind, the look-ahead's bound, and the staging ring's logic on the CPU."""

from __future__ import annotations

import json
import logging
import os
import re
import resource
import signal
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import mergekit_ace  # noqa: F401  (hooks)
from mergekit_ace import overlap
from mergekit_ace.overlap import READ, WRITE, Budget, MergeIOError, Staging, parse_bytes
from tests.helpers import (
    EXPERTS,
    SMALL_SHARDS,
    assert_same_files,
    config_of,
    mergekit_yaml_here,
    serial_and_overlapped,
)
from tests.tiny_models import (
    load_state,
    model_list,
    run_cli,
    write_config,
)

# --- byte-identical to mergekit's executor, through mergekit-yaml -----------------------


@pytest.mark.parametrize("method", ["ace", "actmat", "tsv", "iso_c", "iso_cts"])
def test_every_method_writes_what_the_serial_executor_writes(
    tiny_family, tmp_path, monkeypatch, method
):
    serial, overlapped = serial_and_overlapped(
        monkeypatch, tmp_path, config_of(tiny_family, method), *SMALL_SHARDS
    )
    assert len(list(serial.glob("model-*.safetensors"))) >= 4  # shards written while merging
    assert_same_files(serial, overlapped)


@pytest.mark.parametrize(
    "case",
    [
        "gate_on",
        "gate_off",
        "bfloat16_out_float16",
        "low_cpu_memory",
        "async_write",
        "tokenizer",
        "slices",
        "lora",
        "lazy_unpickle",
    ],
)
def test_modes_write_what_the_serial_executor_writes(
    tiny_family, more_inputs, tmp_path, monkeypatch, case
):
    family = {**tiny_family, **more_inputs}
    flags = list(SMALL_SHARDS)
    config = config_of(family)
    if case == "gate_on":
        config["parameters"] = {"gate": "on"}  # heterogeneous branch everywhere
    elif case == "gate_off":
        config["parameters"] = {"gate": "off"}  # homogeneous
    elif case == "bfloat16_out_float16":
        config.update(dtype="bfloat16", out_dtype="float16")  # casts in the reader and writer
    elif case == "low_cpu_memory":
        flags.append("--low-cpu-memory")
    elif case == "async_write":
        flags.append("--async-write")
    elif case == "tokenizer":
        config = config_of(family, names=EXPERTS + ["expert_token"], tokenizer={"source": "union"})
    elif case == "slices":

        def sources(lo, hi):
            return [{"model": str(family[n]), "layer_range": [lo, hi]} for n in ["base"] + EXPERTS]

        config = {
            "merge_method": "ace",
            "base_model": str(family["base"]),
            "dtype": "float32",
            "slices": [
                {"sources": sources(0, 1)},
                {"sources": sources(1, 2)},
                {"sources": sources(1, 2)},
            ],
        }
    elif case == "lora":
        config["models"][0]["model"] = f"{family['base']}+{family['adapter']}"
        flags += ["--lora-merge-cache", str(tmp_path / "lora_cache")]
    elif case == "lazy_unpickle":
        config = config_of({n: family[f"{n}_bin"] for n in ["base"] + EXPERTS})
        flags.append("--lazy-unpickle")
    serial, overlapped = serial_and_overlapped(monkeypatch, tmp_path, config, *flags)
    assert_same_files(serial, overlapped)
    if case == "tokenizer":
        assert load_state(overlapped)["lm_head.weight"].shape[0] == 129
    if case == "slices":
        assert json.loads((overlapped / "config.json").read_text())["num_hidden_layers"] == 3


def executors_built(monkeypatch) -> list:
    """The overlapped executors built from now on, in order."""
    built = []
    original = overlap.OverlappedExecutor.__init__

    def spy(self, *args, **kwargs):
        built.append(self)
        original(self, *args, **kwargs)

    monkeypatch.setattr(overlap.OverlappedExecutor, "__init__", spy)
    return built


def test_said_once_for_our_methods_only(tiny_family, tmp_path, monkeypatch, caplog):
    built = executors_built(monkeypatch)
    monkeypatch.setenv(overlap.SWITCH_VARIABLE, "1")
    caplog.set_level(logging.INFO, logger="mergekit_ace")

    def said():
        return [r.getMessage() for r in caplog.records if "ahead of the merges" in r.getMessage()]

    mergekit_yaml_here(write_config(tmp_path / "ace.yml", config_of(tiny_family)), tmp_path / "a")
    assert len(built) == 1 and len(said()) == 1
    assert f"{overlap.SWITCH_VARIABLE}=0" in said()[0]
    ta = dict(
        config_of(tiny_family, "task_arithmetic"),
        models=model_list(tiny_family, EXPERTS, {n: {"weight": 0.5} for n in EXPERTS}),
    )
    mergekit_yaml_here(write_config(tmp_path / "ta.yml", ta), tmp_path / "b")
    assert len(built) == 1 and len(said()) == 1  # mergekit's own method: mergekit's executor
    monkeypatch.setenv(overlap.SWITCH_VARIABLE, "off")
    mergekit_yaml_here(tmp_path / "ace.yml", tmp_path / "c")
    assert len(built) == 1 and len(said()) == 1
    assert any("serial executor runs this merge" in r.getMessage() for r in caplog.records)


def test_on_a_cpu_it_overlaps_only_with_a_cpu_to_spare(tiny_family, tmp_path, monkeypatch, caplog):
    """Unset, the switch overlaps a CPU merge only where a CPU is left beside the merge's
    threads (says why not otherwise); ``1`` overlaps anyway; the files are the same."""
    built = executors_built(monkeypatch)
    monkeypatch.delenv(overlap.SWITCH_VARIABLE, raising=False)
    caplog.set_level(logging.INFO, logger="mergekit_ace")
    cfg = write_config(tmp_path / "ace.yml", config_of(tiny_family))
    threads = torch.get_num_threads()
    monkeypatch.setattr(overlap, "available_cpus", lambda: threads)
    mergekit_yaml_here(cfg, tmp_path / "busy" / "m")
    assert built == []
    assert f"threads use all {threads} CPUs" in caplog.text
    monkeypatch.setattr(overlap, "available_cpus", lambda: threads + 1)
    mergekit_yaml_here(cfg, tmp_path / "spare" / "m")
    assert len(built) == 1
    monkeypatch.setattr(overlap, "available_cpus", lambda: threads)
    monkeypatch.setenv(overlap.SWITCH_VARIABLE, "on")
    mergekit_yaml_here(cfg, tmp_path / "forced" / "m")
    assert len(built) == 2
    assert_same_files(tmp_path / "busy" / "m", tmp_path / "spare" / "m", skip=("README.md",))
    assert_same_files(tmp_path / "busy" / "m", tmp_path / "forced" / "m", skip=("README.md",))
    monkeypatch.setenv(overlap.SWITCH_VARIABLE, "sometimes")  # said, and mergekit's executor
    mergekit_yaml_here(cfg, tmp_path / "typo" / "m")
    assert len(built) == 2 and "OVERLAP='sometimes' is not a setting: use 1" in caplog.text


def test_a_fresh_mergekit_yaml_process_overlaps(tiny_family, tmp_path, monkeypatch):
    """The installed start-up hook alone (no import of this package) chooses the overlapped
    executor, says so at -v, and writes what mergekit's executor writes."""
    cfg = write_config(tmp_path / "ace.yml", config_of(tiny_family))
    overlapped = run_cli(
        "mergekit-yaml",
        [cfg, tmp_path / "o" / "m", "-v", *SMALL_SHARDS],
        env={overlap.SWITCH_VARIABLE: "1"},
    )
    assert overlapped.stderr.count("ahead of the merges") == 1
    monkeypatch.setenv(overlap.SWITCH_VARIABLE, "0")
    mergekit_yaml_here(cfg, tmp_path / "s" / "m", *SMALL_SHARDS)
    # the card lists the models in set order, which differs between processes
    assert_same_files(tmp_path / "s" / "m", tmp_path / "o" / "m", skip=("README.md",))


# --- errors of the reader and the writer ------------------------------------------------


def test_read_error_names_the_tensor_and_leaves_nothing(
    tiny_family, more_inputs, tmp_path, monkeypatch
):
    family = {**tiny_family, "expert_cut": more_inputs["expert_cut"]}
    cfg = write_config(tmp_path / "ace.yml", config_of(family, names=["expert_math", "expert_cut"]))
    monkeypatch.setenv(overlap.SWITCH_VARIABLE, "1")
    out = tmp_path / "out"
    with pytest.raises(MergeIOError) as caught:
        mergekit_yaml_here(cfg, out, *SMALL_SHARDS)
    message = str(caught.value)
    assert "'model.norm.weight'" in message and "expert_cut" in message
    assert caught.value.__cause__ is not None
    # the merge had written shards before reaching the tensor; none is left
    assert not list(out.glob("*.safetensors")) and not (out / "config.json").exists()


def test_write_error_mid_file_names_the_tensor_and_removes_unfinished_shards(
    tiny_family, tmp_path, monkeypatch
):
    """A real mergekit-yaml process whose files may not grow past the first shard's size, as
    on a disk that fills up: the second shard is cut off half-way (``torch.save`` leaves the
    part it wrote), on the writer's thread."""
    cfg = write_config(tmp_path / "ace.yml", config_of(tiny_family))
    flags = ["--no-copy-tokenizer", "--no-safe-serialization", *SMALL_SHARDS]
    monkeypatch.setenv(overlap.SWITCH_VARIABLE, "0")
    mergekit_yaml_here(cfg, tmp_path / "complete", *flags)
    sizes = [p.stat().st_size for p in sorted((tmp_path / "complete").glob("pytorch_model-*.bin"))]
    limit = sizes[0] + 16
    assert sizes[1] > limit

    def limit_file_size():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    out = tmp_path / "out"
    out.mkdir()
    result = run_cli(
        "mergekit-yaml",
        [cfg, out, *flags],
        check=False,
        preexec_fn=limit_file_size,
        env={overlap.SWITCH_VARIABLE: "1"},
    )
    assert result.returncode != 0
    assert re.search(
        r"MergeIOError: mergekit-ace: writing tensor '[\w.]+' to \S+ failed", result.stderr
    ), result.stderr[-3000:]
    assert "removed its unfinished shards pytorch_model-1.bin, pytorch_model-2.bin" in result.stderr
    assert list(out.iterdir()) == []


def test_error_in_a_merge_stops_the_threads_and_removes_unfinished_shards(
    tiny_family, tmp_path, monkeypatch
):
    from mergekit.merge_methods.task_adapter import ExecuteMergeMethodTask

    original = ExecuteMergeMethodTask.execute

    def failing(self, *args, **kwargs):
        if self.output_weight.name == "model.layers.1.mlp.up_proj.weight":
            raise ValueError("no convergence")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(ExecuteMergeMethodTask, "execute", failing)
    monkeypatch.setenv(overlap.SWITCH_VARIABLE, "1")
    before = set(threading.enumerate())
    out = tmp_path / "out"
    with pytest.raises(ValueError, match="no convergence"):
        mergekit_yaml_here(
            write_config(tmp_path / "a.yml", config_of(tiny_family)), out, *SMALL_SHARDS
        )
    assert not list(out.glob("*.safetensors"))
    assert set(threading.enumerate()) <= before


# --- the pieces -------------------------------------------------------------------------


def test_parse_bytes():
    assert parse_bytes("0") == 0
    assert parse_bytes("512M") == 512 * 10**6
    assert parse_bytes("1.5GiB") == int(1.5 * 2**30)
    assert parse_bytes("2g") == 2 * 10**9 and parse_bytes("300kB") == 300_000
    with pytest.raises(ValueError, match="MERGEKIT_ACE_LOOKAHEAD='lots'"):
        parse_bytes("lots")


def test_budget_bounds_what_is_held():
    budget = Budget(100)
    budget.acquire(60, READ)
    assert not budget.fits(50, READ) and budget.fits(40, READ)
    # a hand-off to the writer passes while no write is pending, or the main thread could wait
    # for itself (it consumes the reads)
    assert budget.fits(500, WRITE)
    budget.acquire(30, WRITE)
    assert not budget.fits(20, WRITE)
    budget.release(60, READ)
    budget.release(30, WRITE)
    assert budget.fits(500, READ)  # nothing held: one input larger than the limit passes
    budget.acquire(500, READ)
    assert budget.peak == 500 and not budget.fits(1, READ)

    released = []

    def release_later():
        time.sleep(0.2)
        released.append(time.monotonic())
        budget.release(500, READ)

    threading.Thread(target=release_later).start()
    budget.acquire(10, READ)  # blocks until the release
    assert released and time.monotonic() >= released[0]


def test_budget_failure_raises_on_the_main_thread_only():
    budget = Budget(10)
    budget.acquire(10, WRITE)
    error = MergeIOError("writing tensor 'x' failed")
    threading.Timer(0.1, budget.fail, args=(error,)).start()
    with pytest.raises(MergeIOError):
        budget.acquire(5, WRITE)  # the main thread's hand-off, waiting for the writer
    with pytest.raises(overlap._Aborted):
        budget.acquire(5, READ)  # the reader stops without an error of its own


class _Event:
    def __init__(self, log, slot_copies):
        self.log, self.copies = log, slot_copies

    def synchronize(self):
        self.log.append(self.copies)


RING_CASES = [
    torch.randn(37, 5),
    torch.randn(64, 8).to(torch.bfloat16).t(),  # not contiguous
    torch.arange(101, dtype=torch.int64),
    torch.rand(13) > 0.5,
    torch.tensor(2.5),
    torch.empty(0, 4),
]


@pytest.mark.parametrize("tensor", RING_CASES)
def test_staging_ring_copies_every_byte(tensor):
    staging = Staging("cpu", chunk_bytes=24, slots=3)
    copied, event = staging.copy(tensor)
    assert event is None and copied.shape == tensor.shape and copied.dtype == tensor.dtype
    assert copied.is_contiguous() and torch.equal(copied, tensor)
    if tensor.is_floating_point():
        cast, _ = staging.copy(tensor, torch.float64)
        assert cast.dtype == torch.float64 and torch.equal(cast, tensor.double())


def test_staging_reuses_a_buffer_only_after_its_copy_ended():
    log, copies = [], []

    class Recording(Staging):
        def record(self):
            copies.append(len(copies))
            return _Event(log, len(copies))

    staging = Recording("cpu", chunk_bytes=16, slots=3)
    source = torch.arange(40, dtype=torch.float32)  # 160 bytes: 10 chunks
    copied, _event = staging.copy(source)
    assert torch.equal(copied, source)
    # chunk i waits for the copy out of its buffer three chunks earlier (events after chunks
    # 1..7), never for a later one
    assert log == [1, 2, 3, 4, 5, 6, 7]


@pytest.mark.parametrize("tensor", RING_CASES)
def test_copies_back_to_the_host_carry_every_byte(tensor):
    staging = Staging("cpu", chunk_bytes=24, slots=3)
    host = staging.to_host(tensor)
    assert host.shape == tensor.shape and host.dtype == tensor.dtype
    assert host.is_contiguous() and torch.equal(host, tensor)
    assert host.data_ptr() != tensor.data_ptr() or tensor.numel() == 0


def test_copies_back_unload_a_buffer_before_reusing_it(monkeypatch):
    """Chunk n is copied out of its buffer only after its event (the transfer's end), and
    the buffer takes chunk n + 3 only after that; three chunks are in flight at once."""
    log = []

    class Recording(Staging):
        def record(self):
            n = sum(1 for entry in log if entry[0] == "copy") + 1
            log.append(("copy", n))
            return _Event(log, ("arrived", n))

    unload = overlap._unload

    def logged_unload(buffer, destination, event):
        unload(buffer, destination, event)
        log.append(("unloaded", event.copies[1]))

    monkeypatch.setattr(overlap, "_unload", logged_unload)
    staging = Recording("cpu", chunk_bytes=16, slots=3)
    source = torch.arange(40, dtype=torch.float32)  # 160 bytes: 10 chunks
    assert torch.equal(staging.to_host(source), source)
    at = {entry: i for i, entry in enumerate(log)}
    assert len(at) == 30
    for n in range(1, 11):
        assert at[("arrived", n)] < at[("unloaded", n)]
        if n > 3:
            assert at[("unloaded", n - 3)] < at[("copy", n)]
    assert at[("copy", 3)] < at[("unloaded", 1)]


def test_moving_a_result_keeps_its_nesting():
    value = {"a": [torch.ones(2), (torch.zeros(1), 3)], "b": None, "c": torch.ones(1)}
    moved = overlap._map_tensors(value, lambda t: t + 1)
    assert moved["b"] is None and moved["a"][1][1] == 3 and isinstance(moved["a"][1], tuple)
    assert torch.equal(moved["a"][0], torch.full((2,), 2.0))
    assert torch.equal(moved["a"][1][0], torch.ones(1)) and torch.equal(
        moved["c"], 2 * torch.ones(1)
    )


def test_touching_a_memory_mapped_tensor_reads_its_pages(tmp_path):
    from safetensors import safe_open

    path = tmp_path / "big.safetensors"
    save_file({"w": torch.randn(8 * 2**20)}, path)  # 32 MiB
    fd = os.open(path, os.O_RDONLY)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    os.close(fd)

    def resident_file_kb():
        status = Path("/proc/self/status").read_text()
        return int(status.split("RssFile:")[1].split()[0])

    with safe_open(path, "pt") as handle:
        tensor = handle.get_tensor("w")
        before = resident_file_kb()
        overlap.touch_pages(tensor)
        assert resident_file_kb() - before > 30 * 1024


def planned(family, config=None, **options):
    """mergekit's plan of a merge to disk (its targets), as run_merge builds it."""
    from mergekit.architecture import get_architecture_info
    from mergekit.config import MergeConfiguration
    from mergekit.io.tasks import LoaderCache
    from mergekit.options import MergeOptions
    from mergekit.plan import MergePlanner

    from mergekit_ace import compat

    config = MergeConfiguration.model_validate(config or config_of(family))
    options = MergeOptions(**options)
    arch = get_architecture_info(config, options)
    LoaderCache().setup(options=options)
    for model in config.referenced_models():
        LoaderCache().get(model)
    planner = MergePlanner(
        config, arch, options=options, out_model_config=compat.model_out_config(config, arch)
    )
    return planner.plan_to_disk(out_path="/nonexistent")


def test_default_lookahead_is_a_quarter_of_the_largest_tensors_inputs(tiny_family):
    targets = planned(tiny_family)
    executor = overlap.OverlappedExecutor(targets)
    # embed_tokens / lm_head: [128, 32] float32 in the base and three experts
    assert executor.lookahead_bytes == 4 * 128 * 32 * 4 // 4
    assert overlap.OverlappedExecutor(targets, lookahead_bytes=7).lookahead_bytes == 7
    assert executor.placement and all(p is None for p in executor.placement.values())


def test_where_a_gpu_merge_leaves_its_reads(tiny_family, more_inputs):
    """Planned for --cuda (no GPU needed to plan): the reader stages an input on the GPU when
    its tensor merges there, and leaves the embeddings the tokenizer section aligns on the
    CPU, where mergekit's executor aligns them; with --low-cpu-memory or --read-to-gpu every
    input goes where mergekit keeps it."""
    family = {**tiny_family, **more_inputs}
    cuda = torch.device("cuda")

    def placements(config=None, **options):
        device = "cuda"
        storage = "cuda" if options.get("low_cpu_memory") else "cpu"
        executor = overlap.OverlappedExecutor(
            planned(family, config, cuda=True, **options),
            math_device=device,
            storage_device=storage,
        )
        return {(h.task().tensor, str(h.task().model)): p for h, p in executor.placement.items()}

    assert set(placements().values()) == {cuda}
    aligned = placements(
        config_of(family, names=EXPERTS + ["expert_token"], tokenizer={"source": "union"})
    )
    vocabulary = {"model.embed_tokens.weight", "lm_head.weight"}
    assert {p for (t, _), p in aligned.items() if t in vocabulary} == {None}
    assert {p for (t, _), p in aligned.items() if t not in vocabulary} == {cuda}
    assert set(placements(low_cpu_memory=True).values()) == {cuda}
    assert set(placements(read_to_gpu=True).values()) == {cuda}


def test_the_look_ahead_leaves_free_what_aces_gpu_check_asks_for(tiny_family, monkeypatch):
    """So that no tensor is merged on the CPU (oom_fallback) because of the look-ahead where
    mergekit's executor merges it on the GPU: the reserve is the largest tensor's estimated
    workspace over the kernel's headroom."""
    from mergekit_ace.kernels.ace import estimate_ace_cost, fallback

    shapes = {tuple(v.shape) for v in load_state(tiny_family["base"]).values() if v.dim() == 2}
    need = max(
        estimate_ace_cost(shape, 3, 4, k_frac=0.3, matmul="tf32x3")["bytes"] for shape in shapes
    )
    executor = overlap.OverlappedExecutor(planned(tiny_family, cuda=True), math_device="cuda")
    assert executor.device_reserve == int(need / fallback.CUDA_HEADROOM) > 0
    monkeypatch.setattr(fallback, "cuda_free_bytes", lambda device: executor.device_reserve + 1000)
    assert executor._device_room(torch.device("cuda"), 1000)
    assert not executor._device_room(torch.device("cuda"), 1001)
    assert executor._device_room(torch.device("cpu"), 10**12)
    gate_off = dict(
        config_of(tiny_family), parameters={"refine": False, "matmul_precision": "float32"}
    )
    lighter = overlap.OverlappedExecutor(
        planned(tiny_family, gate_off, cuda=True), math_device="cuda"
    )
    assert 0 < lighter.device_reserve < executor.device_reserve
