"""The LoRA benchmark end to end on tiny stand-ins (``benchmarks.lora.run --quick``): rank-2
adapters of a tiny bf16 Llama trained with peft on three synthetic domains, each saved as an
adapter and as a bf16 checkpoint with the adapter folded in, merged through the real
``mergekit-yaml`` in both forms (``base+adapter`` and the folded checkpoints), scored and
reported. The folds are checked against ``W + (alpha / r) B A`` computed from the saved
factors, and the code fingerprint against a rerun."""

import json
import math
import shutil
from pathlib import Path

import pytest

pytest.importorskip("peft")
import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

import benchmarks.lora.config as lora_config  # noqa: E402
from benchmarks.generative.report import expert_row, summarize  # noqa: E402
from benchmarks.generative.run import row_key  # noqa: E402
from benchmarks.lora.config import code_fingerprint  # noqa: E402
from benchmarks.lora.run import quick_sets, redo_rule, run_quick  # noqa: E402
from benchmarks.real_llama.methods import method_specs  # noqa: E402

PROJ = "model.layers.0.self_attn.q_proj"


def test_fingerprint_covers_kernels_and_methods_only(tmp_path):
    for sub, name in (("kernels", "a.py"), ("methods", "b.py"), ("inspect", "c.py")):
        (tmp_path / sub).mkdir()
        (tmp_path / sub / name).write_text("x = 1\n")
    fp = code_fingerprint(tmp_path)
    (tmp_path / "inspect" / "c.py").write_text("x = 2\n")
    assert code_fingerprint(tmp_path) == fp
    (tmp_path / "kernels" / "a.py").write_text("x = 2\n")
    assert code_fingerprint(tmp_path) != fp
    assert len(fp) == 12 and code_fingerprint() == code_fingerprint()


def test_redo_rule():
    specs = {s.label: s for s in method_specs(3)}
    ours = redo_rule(["ours"])
    assert ours(specs["ace"]) and ours(specs["tsv"]) and ours(specs["iso_cts"])
    assert not ours(specs["ties"]) and not ours(specs["linear"])
    assert redo_rule(["ties"])(specs["ties"]) and not redo_rule(["ties"])(specs["ace"])
    assert redo_rule(["all"])(specs["dare_ties"]) and redo_rule(None) is None


def test_fingerprint_note_names_stale_rows(monkeypatch):
    from benchmarks.lora import report

    monkeypatch.setattr(report, "code_fingerprint", lambda: "new")

    def row(method, code=None):
        key = f"{method} | spec" + (f" | code {code}" if code else "")
        return {"kind": "merge", "method": method, "key": key}

    results = {
        "lora-r8-bf16": {"rows": {"seed 0 | all | ace": row("ace", "new")}},
        "lora-r8-adapter": {
            "rows": {
                "seed 0 | all | ace": row("ace", "old"),
                "seed 0 | a+b | tsv": row("tsv", "old"),
                "seed 0 | all | ties": row("ties"),
            }
        },
    }
    note = report.fingerprint_note(results)
    assert "`new` (1 rows), `old` (2 rows)" in note
    assert note.endswith("current `new`: `lora-r8-adapter`: all 2 rows.")
    results["lora-r8-adapter"]["rows"]["seed 0 | all | iso_c"] = row("iso_c", "new")
    note = report.fingerprint_note(results)
    assert note.endswith("current `new`: `lora-r8-adapter`: all | ace, a+b | tsv.")
    results["lora-r8-bf16"]["rows"]["seed 0 | all | ace"] = row("ace", "old")
    assert "`lora-r8-bf16`: all | ace; `lora-r8-adapter`" in report.fingerprint_note(results)
    del results["lora-r8-adapter"], results["lora-r8-bf16"]
    assert "earlier" not in report.fingerprint_note(results)


def _delta_from_factors(adapter_dir: Path) -> torch.Tensor:
    cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    f = load_file(str(adapter_dir / "adapter_model.safetensors"))
    a = f[f"base_model.model.{PROJ}.lora_A.weight"].double()
    b = f[f"base_model.model.{PROJ}.lora_B.weight"].double()
    assert a.shape[0] == cfg["r"] == 2 and b.shape[1] == 2
    return cfg["lora_alpha"] / cfg["r"] * (b @ a)


def _rank(x: torch.Tensor) -> int:
    """Singular values above 1e-6 of the largest: float32 round-off (2^-24 of the weights)
    stays below, bf16's (2^-9) does not."""
    s = torch.linalg.svdvals(x.double())
    return int((s > 1e-6 * s[0]).sum())


def _check_folds(root: Path) -> None:
    base = load_file(str(root / "base-bf16" / "model.safetensors"))
    assert all(t.dtype == torch.bfloat16 for t in base.values())
    w = base[f"{PROJ}.weight"].double()
    experts = sorted((root / "cache" / "experts" / "lora-quick").iterdir())
    assert len(experts) == 3
    for ex in experts:
        cfg = json.loads((ex / "adapter" / "adapter_config.json").read_text())
        assert set(cfg["target_modules"]) == set(lora_config.TARGETS)
        delta = _delta_from_factors(ex / "adapter")
        assert _rank(delta) == 2
        folded = load_file(str(ex / "bf16" / "model.safetensors"))
        assert all(t.dtype == torch.bfloat16 for t in folded.values())
        stored = folded[f"{PROJ}.weight"].double()
        # bf16 keeps 8 significant bits: the fold is W + delta to half a unit in the last place
        assert torch.allclose(stored, w + delta, rtol=2**-8, atol=1e-12)
        assert _rank(stored - w) > 2  # the stored task vector carries rounding noise: full rank
    # mergekit's own fold of base+adapter (--lora-merge-dtype float32): exactly rank 2
    cache = root / "cache" / "merged" / "gen-lora-quick-adapter" / "lora-merge-cache"
    folds = sorted(cache.iterdir())
    assert len(folds) == 3
    by_fold = {}
    for d in folds:
        t = load_file(str(d / "model.safetensors"))[f"{PROJ}.weight"]
        assert t.dtype == torch.float32
        by_fold[d.name] = t.double() - w
    for ex in experts:
        delta = _delta_from_factors(ex / "adapter")
        match = [n for n, v in by_fold.items() if torch.allclose(v, delta, atol=1e-6)]
        assert len(match) == 1, ex.name
        assert _rank(by_fold[match[0]]) == 2


@pytest.mark.skipif(shutil.which("mergekit-yaml") is None, reason="mergekit-yaml not on PATH")
def test_quick_run_end_to_end(tmp_path, monkeypatch):
    results = run_quick(tmp_path, log=lambda *_: None)
    sets = quick_sets()
    assert sorted(results) == sorted(s.name for s in sets)
    _check_folds(tmp_path)
    for gs in sets:
        res = results[gs.name]
        rows = res["rows"]
        names = list(gs.domains)
        base = rows["base"]["scores"]
        for d in names:
            ex = expert_row(res, 0, d)
            own = sum(ex["scores"][d]["loss"]) / len(ex["scores"][d]["loss"])
            before = sum(base[d]["loss"]) / len(base[d]["loss"])
            assert own < 0.95 * before, (gs.name, d, own, before)
        subset = res["subsets"]["2"][0]
        keys = [row_key(0, names, lb, names) for lb in ("ace", "task_arithmetic (lambda=1)")]
        keys += [row_key(0, subset, lb, names) for lb in ("ace", "ties")]
        for key in keys:
            row = rows[key]
            assert "error" not in row, row.get("error")
            assert row["merge_seconds"] > 0 and row["checkpoint"]["head_is_embedding"]
            s = summarize(res, row, 0)
            assert sorted(s["per"]) == sorted(row["subset"])
            assert all(math.isfinite(v["r"]) and math.isfinite(v["se"]) for v in s["per"].values())
            assert ("| code " + code_fingerprint() in row["key"]) == (row["method"] == "ace")
    # the two forms' experts differ only by bf16 storage of the fold
    a, b = (expert_row(results[s.name], 0, "alpha")["scores"]["alpha"]["loss"] for s in sets)
    assert a == pytest.approx(b, rel=0.02) and a != b
    config = tmp_path / "cache" / "merged" / "gen-lora-quick-adapter" / "seed0_all_ace.yml"
    assert "base-bf16+" in config.read_text()
    md = (tmp_path / "lora-quick.md").read_text()
    for text in ("| ace |", "| ties |", "quick adapters: avg", "quick bf16 folded: avg"):
        assert text in md
    assert (tmp_path / "benchmark_lora-quick.png").stat().st_size > 10_000
    for gs in sets:  # merged checkpoints are deleted once scored
        assert not (tmp_path / "cache" / "merged" / f"gen-{gs.name}" / "seed0_all_ace").exists()

    # a changed merge code reruns this package's rows only
    merged = []
    monkeypatch.setattr(lora_config, "code_fingerprint", lambda: "changed")
    again = run_quick(tmp_path, report=False, log=merged.append)
    redone = [m for m in merged if "s merge" in m]
    assert len(redone) == 4 and all("| ace:" in m for m in redone), redone
    for gs in sets:
        rows = again[gs.name]["rows"]
        assert rows[row_key(0, gs.domains, "ace", gs.domains)]["key"].endswith("code changed")
        ta = row_key(0, gs.domains, "task_arithmetic (lambda=1)", gs.domains)
        assert rows[ta] == results[gs.name]["rows"][ta]
