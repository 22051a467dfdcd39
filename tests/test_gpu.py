"""``--cuda`` end to end and the kernel on a GPU; skipped cleanly where there is none."""

import pytest
import torch

import mergekit_ace.kernels.ace.workspace as workspace
from mergekit_ace.kernels.ace import ace_merge
from mergekit_ace.kernels.ace.fallback import cuda_free_bytes
from tests.reference import reference_ace, rel_err
from tests.helpers import (
    SMALL_SHARDS,
    assert_same_files,
    config_of,
    low_rank_experts,
    rank_deficient_experts,
    serial_and_overlapped,
)
from tests.tiny_models import EXPERT_SCALES, load_state, mergekit_yaml, model_list, write_config

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


PAPER = {"eps": 1e-5, "gate_statistic": "gamma"}
DEFAULTS = {"eps": "auto", "gate_statistic": "log_spread"}


@pytest.mark.parametrize(
    "kwargs", [PAPER, {**PAPER, "gate": "off"}, DEFAULTS, {**DEFAULTS, "gate": "off"}]
)
def test_kernel_on_cuda_matches_float64_reference(kwargs):
    base, experts = low_rank_experts((96, 64), (0.01, 1.0, 0.1))
    out, diag = ace_merge(base.cuda(), [e.cuda() for e in experts], **kwargs)
    assert out.device.type == "cuda"
    ref, branch = reference_ace(base, experts, **kwargs)
    assert diag.branch == branch
    assert rel_err(out.cpu() - base, ref - base.double()) < 1e-3


TF32_GPU = torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 8


@pytest.mark.parametrize("gate", ["auto", "off"])
@pytest.mark.parametrize("shape", [(512, 384), (160, 512), (1200, 256)])
def test_tensor_core_products_keep_float32_accuracy(shape, gate):
    """The accuracy guard of ``matmul_precision: auto``: against the float64 reference, three
    TF32 products per product lose no more than round-off beside plain float32; one TF32
    product (the opt-in ``tf32``) does lose accuracy."""
    g = torch.Generator().manual_seed(7)
    m, n = shape
    base = torch.randn(m, n, generator=g)
    experts = [
        base
        + s
        * (
            torch.randn(m, 8, generator=g) @ torch.randn(8, n, generator=g) / 8
            + 0.3 * torch.randn(m, n, generator=g)
        )
        for s in (0.002, 0.02, 0.006)
    ]
    ref, branch = reference_ace(base, experts, eps="auto", gate_statistic="log_spread", gate=gate)
    errors = {}
    for precision in ("float32", "auto", "tf32"):
        out, diag = ace_merge(
            base.cuda(), [e.cuda() for e in experts], gate=gate, matmul_precision=precision
        )
        assert diag.branch == branch
        errors[precision] = rel_err(out.cpu() - base, ref - base.double())
        if precision == "auto":
            assert diag.matmul == ("tf32x3" if TF32_GPU else "float32")
    assert errors["float32"] < 1e-4
    assert errors["auto"] < max(3 * errors["float32"], 1e-5), errors
    if TF32_GPU:
        assert errors["tf32"] > errors["auto"], errors


@pytest.mark.parametrize("gate", ["on", "off"])
def test_streaming_plan_on_cuda_matches_reference(gate, monkeypatch):
    monkeypatch.setattr(workspace, "KEEP_F_BYTES", 0)
    monkeypatch.setattr(workspace, "STREAM_BLOCK_BYTES", 64 * 48 * 4)
    monkeypatch.setattr(workspace, "BLOCK_BYTES", 64 * 48 * 4)
    base, experts = low_rank_experts((300, 48), (0.01, 1.0, 0.1))
    out, diag = ace_merge(base.cuda(), [e.cuda() for e in experts], gate=gate)
    ref, _ = reference_ace(base, experts, eps="auto", gate_statistic="log_spread", gate=gate)
    assert rel_err(out.cpu() - base, ref - base.double()) < 2e-4


def test_mergekit_yaml_cuda_matches_cpu_kernel(tiny_family, tmp_path):
    names = list(EXPERT_SCALES)
    cfg = write_config(
        tmp_path / "ace.yml",
        {
            "merge_method": "ace",
            "base_model": str(tiny_family["base"]),
            "dtype": "float32",
            "models": model_list(tiny_family, names),
        },
    )
    out = tmp_path / "out"
    mergekit_yaml(cfg, out, "--cuda")
    merged = load_state(out)
    base = load_state(tiny_family["base"])
    experts = [load_state(tiny_family[n]) for n in names]
    for key, w0 in base.items():
        expected, _ = ace_merge(w0, [e[key] for e in experts])
        assert rel_err(merged[key] - w0, expected - w0) < 1e-3, key


def test_condition_number_on_cuda_matches_cpu():
    """The condition estimate (power and inverse iteration on the Cholesky factor) on the GPU
    gives the CPU's value for a rank-deficient system with a tiny fixed eps."""
    base, experts = rank_deficient_experts(torch.float32)
    _, cpu = ace_merge(base, experts, eps=1e-8, gate="off")
    _, gpu = ace_merge(
        base.cuda(), [e.cuda() for e in experts], eps=1e-8, gate="off", matmul_precision="float32"
    )
    assert gpu.solver == cpu.solver == "cholesky"
    assert gpu.condition == pytest.approx(cpu.condition, rel=0.05)


def test_free_memory_of_a_device_without_an_index_is_the_current_devices():
    """mergekit names the GPU ``torch.device("cuda")``, without an index; the free memory the
    overlapped executor's look-ahead and the out-of-memory check read is then the current
    device's (the per-process cap's query refuses a device without an index)."""
    current = torch.device("cuda", torch.cuda.current_device())
    held = torch.empty(256 << 20, dtype=torch.uint8, device=current)
    unnamed, named = cuda_free_bytes(torch.device("cuda")), cuda_free_bytes(current)
    assert abs(unnamed - named) < 16 << 20
    assert named <= torch.cuda.mem_get_info(current)[1] - held.numel()


# --- the overlapped executor on a GPU (mergekit_ace.overlap) ------------------------------


def test_staging_copies_every_byte_through_pinned_buffers():
    from mergekit_ace.overlap import Staging

    staging = Staging("cuda", chunk_bytes=1000, slots=2)
    assert all(buffer.is_pinned() for buffer in staging.buffers)
    assert staging.stream != torch.cuda.current_stream()
    for tensor in (
        torch.randn(1000, 37),
        torch.randn(64, 8).to(torch.bfloat16).t(),
        torch.arange(5001),
        torch.rand(999) > 0.5,
        torch.empty(0, 3),
    ):
        out, event = staging.copy(tensor)
        torch.cuda.current_stream().wait_event(event)
        assert out.is_cuda and out.dtype == tensor.dtype and torch.equal(out.cpu(), tensor)
    half = torch.randn(300, 7).to(torch.bfloat16)
    out, event = staging.copy(half, torch.float32)
    event.synchronize()
    assert out.dtype == torch.float32 and torch.equal(out.cpu(), half.float())
    for tensor in (torch.randn(1000, 37), torch.randn(64, 8).to(torch.bfloat16).t()):
        on_gpu = tensor.cuda()
        torch.cuda.synchronize()
        host = staging.to_host(on_gpu)
        assert host.device.type == "cpu" and host.dtype == tensor.dtype
        assert torch.equal(host, tensor)


def test_staging_and_the_writers_copy_do_not_wait_for_the_merge():
    """The point of the copy streams: a copy to the GPU (reader) and one back (writer) end
    while a long kernel still runs on the main thread's stream."""
    import threading

    from mergekit_ace.overlap import Staging

    staging, unstaging = Staging("cuda"), Staging("cuda")
    source = torch.randn(16 * 2**20)  # 64 MiB
    result = torch.randn(16 * 2**20, device="cuda")
    expected = result.cpu()
    torch.cuda.synchronize()
    torch.cuda._sleep(int(3e9))  # ~1.5 s of spinning on the default stream
    done = {}

    def reader():
        with torch.cuda.stream(staging.stream):
            out, event = staging.copy(source)
            event.synchronize()
            done["read"] = torch.equal(out.cpu(), source)

    def writer():
        with torch.cuda.stream(unstaging.stream):
            done["write"] = torch.equal(unstaging.to_host(result), expected)

    threads = [threading.Thread(target=reader), threading.Thread(target=writer)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert done == {"read": True, "write": True}
    assert not torch.cuda.current_stream().query()  # the kernel is still running
    torch.cuda.synchronize()


@pytest.mark.parametrize(
    "case", ["cuda", "low_cpu_memory", "read_to_gpu", "tokenizer", "tsv", "bfloat16"]
)
def test_overlapped_gpu_merge_writes_what_the_serial_one_writes(
    tiny_family, more_inputs, tmp_path, monkeypatch, case
):
    family = {**tiny_family, **more_inputs}
    flags = ["--cuda", *SMALL_SHARDS]
    config = config_of(family)
    if case == "low_cpu_memory":
        flags.append("--low-cpu-memory")
    elif case == "read_to_gpu":
        flags.append("--read-to-gpu")
    elif case == "tokenizer":
        config = config_of(
            family, names=list(EXPERT_SCALES) + ["expert_token"], tokenizer={"source": "union"}
        )
    elif case == "tsv":
        config = config_of(family, "tsv")
    elif case == "bfloat16":
        config.update(dtype="bfloat16", out_dtype="float16")
        flags.append("--read-to-gpu")
    serial, overlapped = serial_and_overlapped(monkeypatch, tmp_path, config, *flags)
    assert_same_files(serial, overlapped)
