"""``mergekit-ace inspect``: the reported numbers against the kernel's own diagnostics and an
independent gamma, per-tensor filters, the plots, estimate-only mode on an 8B-sized config
(header-only checkpoints), and that no merged model is ever written."""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mergekit_ace.kernels.ace import ace_merge, estimate_ace_cost
from tests.tiny_models import model_list, run_cli, write_config

EXPERTS = ["expert_math", "expert_code", "expert_chat"]
LABELS = ["math", "code", "chat"]  # report columns: the shared "expert_" is dropped
MLP_TAU = 5.0  # between the tiny family's mlp gammas (about 3.5 .. 5.6): some flip branch
TABLE_FILES = {"inspect.csv", "inspect.json"}
PLOT_FILES = {"gate.png", "energy.png", "branches.png", "concentration.png", "cost.png"}
FLOP_RATE = 1e9  # in-process runs skip the calibration


def ace_config(paths, tau_filter: bool) -> dict:
    tau = [{"filter": "mlp", "value": MLP_TAU}, {"value": 0.3}] if tau_filter else 0.3
    return {
        "merge_method": "ace",
        "base_model": str(paths["base"]),
        "models": model_list(paths, EXPERTS),
        "parameters": {"tau": tau, "eps": 1e-5, "gate_statistic": "gamma"},
        "dtype": "float32",
    }


def tree(root: Path) -> dict:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def inspected(tiny_family, tmp_path_factory):
    """One real `mergekit-ace inspect` run (a fresh process) on a config with an mlp filter."""
    work = tmp_path_factory.mktemp("inspect")
    config = write_config(work / "ace.yml", ace_config(tiny_family, tau_filter=True))
    models_root = tiny_family["base"].parent
    before = tree(models_root)
    result = run_cli("mergekit-ace", ["inspect", config, "--out", work / "report", "--quiet"])
    report = json.loads((work / "report" / "inspect.json").read_text())
    return {
        "work": work,
        "result": result,
        "report": report,
        "rows": {r["name"]: r for r in report["rows"]},
        "models_before": before,
        "models_root": models_root,
    }


def independent_gamma(energies):
    logs = [math.log(e + 1e-12) for e in energies]
    mean = sum(logs) / len(logs)
    var = sum((x - mean) ** 2 for x in logs) / (len(logs) - 1)
    return var / (mean * mean + 1e-12)


def test_numbers_match_kernel_and_independent_gamma(inspected, tiny_family):
    states = {
        name: load_file(tiny_family[name] / "model.safetensors") for name in ["base"] + EXPERTS
    }
    rows = inspected["rows"]
    assert len(rows) == len(states["base"])
    assert inspected["report"]["experts"] == LABELS
    matrices = 0
    for name, row in rows.items():
        base = states["base"][name]
        experts = [states[e][name] for e in EXPERTS]
        energies = [float((e.double() - base.double()).square().sum()) for e in experts]
        assert row["energies"] == pytest.approx(energies, rel=1e-4)
        tau = MLP_TAU if ".mlp." in name else 0.3
        assert row["parameters"]["tau"] == tau
        _, diag = ace_merge(
            base, experts, tau=tau, eps=1e-5, gate_statistic="gamma", spectra=True, tensor_name=name
        )
        assert row["branch"] == diag.branch
        assert tuple(row["shape"]) == tuple(base.shape)
        if base.dim() != 2:
            assert row["branch"] == "mean" and row["gamma"] is None
            continue
        matrices += 1
        gamma = independent_gamma(energies)
        assert row["gamma"] == pytest.approx(gamma, rel=1e-4)
        assert row["branch"] == ("heterogeneous" if gamma > tau else "homogeneous")
        assert row["gamma"] == pytest.approx(diag.gamma, rel=1e-9)
        assert row["k"] == diag.k and row["solver"] == diag.solver
        assert row["matmul"] == diag.matmul == "float32"  # CPU
        assert row["rcond"] == pytest.approx(diag.rcond, rel=1e-3)
        assert row["condition"] == pytest.approx(diag.condition, rel=1e-3)
        assert row["boost_ratio"] == (
            None if diag.boost_ratio is None else pytest.approx(diag.boost_ratio, rel=1e-3)
        )
        assert row["cut_gap"] == (
            None if diag.cut_gap is None else pytest.approx(diag.cut_gap, rel=1e-2, abs=1e-9)
        )
        for key in ("concentration_pre", "concentration_post"):
            assert row[key] == pytest.approx(getattr(diag, key), rel=1e-4, abs=1e-6)
        if diag.sigma_iso is None:
            assert row["sigma_iso"] is None
        else:
            assert row["sigma_iso"] == pytest.approx(diag.sigma_iso, rel=1e-4)
        if diag.noise_floor is None:
            assert row["noise_floor"] is None
        else:
            assert row["noise_floor"] == pytest.approx(diag.noise_floor, rel=1e-4)
        cost = estimate_ace_cost(
            tuple(base.shape), len(experts), 4, out_bytes=4, refine=diag.branch == "heterogeneous"
        )
        assert row["flops"] == pytest.approx(cost["flops"])
        assert row["flops_float64"] == pytest.approx(cost["flops_float64"])
        assert (row["flops_float64"] > 0) == (diag.branch == "heterogeneous")
        assert row["workspace_bytes"] == cost["bytes"]
        assert row["peak_bytes"] == cost["bytes"] + (len(experts) + 1) * base.numel() * 4
        assert row["est_seconds"] == pytest.approx(cost["flops"] / inspected["report"]["flop_rate"])
    assert matrices == 16
    branches = {r["branch"] for r in rows.values()}
    assert {"heterogeneous", "homogeneous", "mean"} <= branches


def test_csv_has_one_row_per_tensor_with_energy_columns(inspected):
    import csv

    with open(inspected["work"] / "report" / "inspect.csv", newline="") as fp:
        records = list(csv.DictReader(fp))
    assert [r["name"] for r in records] == list(inspected["rows"])
    for rec in records:
        row = inspected["rows"][rec["name"]]
        assert rec["branch"] == row["branch"]
        assert float(rec["flops_float64"]) == pytest.approx(row["flops_float64"])
        for label, energy in zip(LABELS, row["energies"]):
            assert float(rec[f"energy[{label}]"]) == pytest.approx(energy)
        if row["gamma"] is not None:
            assert float(rec["gamma"]) == pytest.approx(row["gamma"])
            assert float(rec["tau"]) == row["parameters"]["tau"]


def test_filter_changes_exactly_the_mlp_rows(inspected, tiny_family, tmp_path):
    from mergekit.merge_methods import registry

    from mergekit_ace.inspect import inspect_config

    registered = registry.get("ace")
    config = write_config(tmp_path / "plain.yml", ace_config(tiny_family, tau_filter=False))
    plain = {r.name: r for r in inspect_config(str(config), quiet=True, flop_rate=FLOP_RATE).rows}
    assert registry.get("ace") is registered  # the instrumented method was only borrowed
    filtered = inspected["rows"]
    assert set(plain) == set(filtered)
    changed = {n for n in plain if plain[n].parameters["tau"] != filtered[n]["parameters"]["tau"]}
    assert changed == {n for n in plain if ".mlp." in n}
    flipped = {n for n in plain if plain[n].branch != filtered[n]["branch"]}
    assert flipped and flipped <= changed
    for name in plain:  # the data-dependent numbers do not depend on the filter
        assert plain[name].gamma == filtered[name]["gamma"]
        if name not in flipped:
            assert plain[name].k == filtered[name]["k"]


def independent_log_spread(energies):
    logs = [math.log10(e) for e in energies]
    mean = sum(logs) / len(logs)
    return math.sqrt(sum((x - mean) ** 2 for x in logs) / (len(logs) - 1))


def test_default_gate_is_log_spread_in_report_and_summary(tiny_family, tmp_path):
    from mergekit_ace.inspect import inspect_config, summary_text

    config = {
        "merge_method": "ace",
        "base_model": str(tiny_family["base"]),
        "models": model_list(tiny_family, EXPERTS),
        "dtype": "float32",
        "parameters": {"tau": 0.1},
    }
    path = write_config(tmp_path / "ace.yml", config)
    report = inspect_config(str(path), quiet=True, flop_rate=FLOP_RATE)
    states = {n: load_file(tiny_family[n] / "model.safetensors") for n in ["base"] + EXPERTS}
    decided = set()
    for row in report.rows:
        if len(row.shape) != 2:
            continue
        base = states["base"][row.name].double()
        energies = [float((states[e][row.name].double() - base).square().sum()) for e in EXPERTS]
        assert row.parameters["gate_statistic"] == "log_spread"
        assert row.parameters["eps"] == "auto"
        assert row.gate_value == pytest.approx(independent_log_spread(energies), rel=1e-4)
        assert row.branch == ("heterogeneous" if row.gate_value > 0.1 else "homogeneous")
        decided.add(row.branch)
    assert decided == {"heterogeneous", "homogeneous"}  # tau 0.1 splits the tiny family
    text = summary_text(report)
    assert "gate statistic by module type" in text and "log_spread" in text


def test_storage_noise_expert_is_reported(tiny_family, tmp_path):
    """An expert that is the base saved as bf16: every tensor's row names it, the CSV has it,
    the summary says it was left out."""
    from mergekit_ace.inspect import csv_records, inspect_config, summary_text
    from tests.tiny_models import TINY, save_model

    base = load_file(tiny_family["base"] / "model.safetensors")
    save_model(
        tmp_path / "base_as_bf16", {k: v.to(torch.bfloat16).float() for k, v in base.items()}, TINY
    )
    paths = dict(tiny_family, base_as_bf16=tmp_path / "base_as_bf16")
    config = {
        "merge_method": "ace",
        "base_model": str(paths["base"]),
        "dtype": "float32",
        "models": model_list(paths, EXPERTS + ["base_as_bf16"]),
    }
    report = inspect_config(
        str(write_config(tmp_path / "ace.yml", config)), quiet=True, flop_rate=FLOP_RATE
    )
    assert report.experts[3] == "base_as_bf16"
    # the norms' weights are all 1.0, which bf16 holds exactly: that task vector is zero
    noisy = [
        row
        for row in report.rows
        if not torch.equal(base[row.name], base[row.name].bfloat16().float())
    ]
    assert len(noisy) == sum(len(row.shape) == 2 for row in report.rows)
    assert all(row.noise == [3] for row in noisy)
    assert all(row.noise == [] for row in report.rows if row not in noisy)
    fields, records = csv_records(report)
    assert "noise" in fields and {r["noise"] for r in records} == {"base_as_bf16", ""}
    assert f"base_as_bf16 in {len(noisy)} tensors" in summary_text(report)


def test_tensors_computed_twice_for_round_off_are_reported(tiny_family, tmp_path):
    """A fixed ``eps: 1e-6`` with ``gate: on``: the tensors whose round-off bound passes 1 %
    carry the change the kernel measures for them (the same as the kernel's own on that
    tensor), and the summary says how many were computed twice and the largest change."""
    from mergekit_ace.inspect import csv_records, inspect_config, summary_text
    from tests.helpers import config_of

    params = {"eps": 1e-6, "gate": "on"}
    config = config_of(tiny_family, parameters=params)
    report = inspect_config(
        str(write_config(tmp_path / "ace.yml", config)), quiet=True, flop_rate=FLOP_RATE
    )
    twice = [row for row in report.rows if row.roundoff_change is not None]
    assert twice and len(twice) < len(report.rows)
    base = load_file(tiny_family["base"] / "model.safetensors")
    experts = [load_file(tiny_family[n] / "model.safetensors") for n in EXPERTS]
    for row in report.rows:
        if len(row.shape) != 2:
            continue
        _, diag = ace_merge(base[row.name], [e[row.name] for e in experts], spectra=True, **params)
        assert row.roundoff_change == diag.roundoff_change, row.name
    largest = max(twice, key=lambda r: r.roundoff_change)
    assert (
        f"round-off measured on {len(twice)} of {len(report.rows)} tensors (each computed "
        "twice," in summary_text(report)
    )
    assert f"at most {largest.roundoff_change:.2%} of the merged update ({largest.name};" in (
        summary_text(report)
    )
    fields, records = csv_records(report)
    assert "roundoff_change" in fields
    assert sum(r["roundoff_change"] not in ("", None) for r in records) == len(twice)


def test_plots_are_real_pngs(inspected):
    pytest.importorskip("matplotlib")
    from matplotlib.image import imread

    out = inspected["work"] / "report"
    for name in ("gate.png", "energy.png", "branches.png", "concentration.png", "cost.png"):
        path = out / name
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert path.stat().st_size > 10_000
        pixels = imread(path)
        assert pixels.ndim == 3 and min(pixels.shape[:2]) > 200
        assert float(pixels[..., :3].std()) > 0.05


def test_summary_and_no_model_written(inspected):
    out = inspected["result"].stdout
    assert "heterogeneous" in out and "homogeneous" in out
    assert "heaviest tensor:" in out and "predicted peak memory:" in out
    counts = inspected["report"]["summary"]["branches"]
    assert f"{counts['heterogeneous']} heterogeneous" in out
    work = inspected["work"]
    from mergekit_ace.inspect.plots import plots_available

    expected = TABLE_FILES | (PLOT_FILES if plots_available() else set())
    assert {p.name for p in (work / "report").iterdir()} == expected
    assert {p.name for p in work.iterdir()} == {"ace.yml", "report"}
    assert tree(inspected["models_root"]) == inspected["models_before"]


def test_estimate_only_reads_no_tensor_data(inspected, tiny_family, tmp_path, monkeypatch):
    from mergekit.io.lazy_tensor_loader import LazyTensorLoader

    from mergekit_ace.inspect import inspect_config

    def refuse(*_args, **_kwargs):
        raise AssertionError("estimate-only mode read tensor data")

    monkeypatch.setattr(LazyTensorLoader, "get_tensor", refuse)
    config = write_config(tmp_path / "ace.yml", ace_config(tiny_family, tau_filter=True))
    report = inspect_config(
        str(config), estimate_only=True, quiet=True, flop_rate=inspected["report"]["flop_rate"]
    )
    full = inspected["rows"]
    assert [r.name for r in report.rows] == list(full)
    for row in report.rows:
        measured = full[row.name]
        assert list(row.shape) == measured["shape"]
        assert row.branch == ("mean" if len(row.shape) != 2 else "auto")
        assert row.gamma is None and row.energies is None
        # an undecided branch is costed as the heterogeneous one (the dearer, with refinement)
        if measured["branch"] in ("heterogeneous", "mean"):
            assert row.flops == pytest.approx(measured["flops"])
            assert row.peak_bytes == measured["peak_bytes"]
        else:
            assert row.flops > measured["flops"] and row.peak_bytes >= measured["peak_bytes"]


LLAMA3_8B = dict(hidden=4096, intermediate=14336, layers=32, vocab=128256, heads=32, kv_heads=8)


def header_only_llama(path: Path, spec: dict) -> None:
    """A Llama checkpoint whose safetensors file is a header plus a sparse (unwritten) data
    region: its shapes are real, its size on disk is a few KB."""
    h, i, v = spec["hidden"], spec["intermediate"], spec["vocab"]
    kv = h // spec["heads"] * spec["kv_heads"]
    shapes = {
        "model.embed_tokens.weight": [v, h],
        "model.norm.weight": [h],
        "lm_head.weight": [v, h],
    }
    for layer in range(spec["layers"]):
        p = f"model.layers.{layer}."
        shapes.update(
            {
                p + "self_attn.q_proj.weight": [h, h],
                p + "self_attn.k_proj.weight": [kv, h],
                p + "self_attn.v_proj.weight": [kv, h],
                p + "self_attn.o_proj.weight": [h, h],
                p + "mlp.gate_proj.weight": [i, h],
                p + "mlp.up_proj.weight": [i, h],
                p + "mlp.down_proj.weight": [h, i],
                p + "input_layernorm.weight": [h],
                p + "post_attention_layernorm.weight": [h],
            }
        )
    header, offset = {}, 0
    for name, shape in shapes.items():
        size = math.prod(shape) * 2
        header[name] = {"dtype": "BF16", "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    path.mkdir(parents=True)
    with open(path / "model.safetensors", "wb") as fp:
        fp.write(struct.pack("<Q", len(blob)))
        fp.write(blob)
        fp.truncate(8 + len(blob) + offset)
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": h,
        "intermediate_size": i,
        "num_hidden_layers": spec["layers"],
        "num_attention_heads": spec["heads"],
        "num_key_value_heads": spec["kv_heads"],
        "vocab_size": v,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "max_position_embeddings": 8192,
    }
    (path / "config.json").write_text(json.dumps(config))


def test_estimate_only_on_an_8b_config(tmp_path, monkeypatch):
    from mergekit.io.lazy_tensor_loader import LazyTensorLoader

    from mergekit_ace.inspect import inspect_config, summary_text

    monkeypatch.setattr(LazyTensorLoader, "get_tensor", lambda *a, **k: pytest.fail("data read"))
    names = ["base", "math", "code", "chat"]
    for name in names:
        header_only_llama(tmp_path / name, LLAMA3_8B)
    config = write_config(
        tmp_path / "ace.yml",
        {
            "merge_method": "ace",
            "base_model": str(tmp_path / "base"),
            "models": [{"model": str(tmp_path / n)} for n in names[1:]],
            "parameters": {"gate": [{"filter": "mlp", "value": "on"}, {"value": "auto"}]},
            "dtype": "bfloat16",
        },
    )
    report = inspect_config(str(config), estimate_only=True, quiet=True, flop_rate=1e12)
    assert len(report.rows) == 3 + 32 * 9
    down = next(r for r in report.rows if r.name == "model.layers.0.mlp.down_proj.weight")
    assert down.shape == (4096, 14336) and down.branch == "heterogeneous"
    assert down.workspace_bytes == estimate_ace_cost((4096, 14336), 3, 4, out_bytes=2)["bytes"]
    # the 4 bf16 inputs; the output is part of the kernel's workspace
    assert down.peak_bytes == down.workspace_bytes + 4 * 4096 * 14336 * 2
    q = next(r for r in report.rows if r.name == "model.layers.0.self_attn.q_proj.weight")
    assert q.branch == "auto"
    heaviest = report.heaviest()
    assert heaviest.name in ("lm_head.weight", "model.embed_tokens.weight")
    embed = estimate_ace_cost((128256, 4096), 3, 4, out_bytes=2)["bytes"] + 4 * 128256 * 4096 * 2
    assert report.peak_bytes() == heaviest.peak_bytes == embed
    text = summary_text(report)
    assert "estimate only" in text and "GB" in text
    # float64 work: the refinement's Gram of F and its eigh, wherever the refinement may run
    assert down.flops_float64 == estimate_ace_cost((4096, 14336), 3, 4)["flops_float64"] > 0
    total = sum(r.flops for r in report.rows)
    float64 = sum(r.flops_float64 for r in report.rows)
    assert 0.05 < float64 / total < 0.15
    assert f"float64 work: {float64 / 1e12:.3g} of {total / 1e12:.3g} TFLOP" in text
    assert "not in the estimate: a merge computes a tensor a second time" in text
    summary = report.as_dict()["summary"]
    assert summary["flops_float64"] == pytest.approx(float64)


def test_cuda_flag_without_a_gpu_fails_cleanly(tmp_path, tiny_family):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU; see test_cuda_matches_cpu")
    from click.testing import CliRunner

    from mergekit_ace.cli import main

    config = write_config(tmp_path / "ace.yml", ace_config(tiny_family, tau_filter=False))
    result = CliRunner().invoke(
        main, ["inspect", str(config), "--cuda", "--out", str(tmp_path / "r")]
    )
    assert result.exit_code != 0
    assert "CUDA" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "r").exists()


@pytest.mark.gpu
def test_cuda_matches_cpu(inspected, tiny_family, tmp_path):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    from mergekit_ace.inspect import inspect_config

    config = write_config(tmp_path / "ace.yml", ace_config(tiny_family, tau_filter=True))
    report = inspect_config(str(config), device="cuda", quiet=True)
    for row in report.rows:
        cpu = inspected["rows"][row.name]
        assert row.branch == cpu["branch"]
        if row.gamma is not None:
            assert row.gamma == pytest.approx(cpu["gamma"], rel=1e-4)


def test_missing_matplotlib_is_explained(monkeypatch):
    import sys

    from mergekit_ace.inspect.plots import MissingPlotDependency, require_matplotlib

    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(MissingPlotDependency, match=r"mergekit-ace\[plots\]"):
        require_matplotlib()


@pytest.mark.parametrize(
    "change,message",
    [
        ({"base_model": None}, "base_model"),
        ({"merge_method": "task_arithmetic"}, "ACE merges only"),
    ],
)
def test_config_errors_are_explained(tiny_family, tmp_path, change, message):
    from click.testing import CliRunner

    from mergekit_ace.cli import main

    config = {**ace_config(tiny_family, tau_filter=False), **change}
    config = write_config(tmp_path / "bad.yml", {k: v for k, v in config.items() if v is not None})
    result = CliRunner().invoke(main, ["inspect", str(config), "--out", str(tmp_path / "r"), "-q"])
    assert result.exit_code != 0 and message in result.output
    assert "Traceback" not in result.output and not (tmp_path / "r").exists()


def test_tokenizer_alignment_goes_through_mergekit(tiny_family, tmp_path):
    """With `tokenizer: {source: union}` the embedding rows are aligned by mergekit first:
    the expert that added two tokens makes the merged vocabulary 130 rows."""
    from mergekit_ace.inspect import inspect_config

    names = EXPERTS + ["expert_tokens"]
    config = write_config(
        tmp_path / "ace.yml",
        {
            "merge_method": "ace",
            "base_model": str(tiny_family["base"]),
            "models": model_list(tiny_family, names),
            "tokenizer": {"source": "union"},
            "dtype": "float32",
        },
    )
    report = inspect_config(str(config), quiet=True, flop_rate=FLOP_RATE)
    assert report.experts == ["math", "code", "chat", "tokens"]
    rows = {r.name: r for r in report.rows}
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        assert rows[name].shape == (130, 32)
        assert len(rows[name].energies) == 4 and all(e > 0 for e in rows[name].energies)
        assert rows[name].gamma == pytest.approx(independent_gamma(rows[name].energies), rel=1e-9)
    assert [p.name for p in tmp_path.iterdir()] == ["ace.yml"]
