"""End to end run of the quality benchmark's pipeline on tiny stand-ins: a random tiny Llama,
two synthetic keyword tasks, a few training steps, real ``mergekit-yaml`` merges, scoring and
the report files."""

import json
import shutil

import pytest

pytest.importorskip("transformers")
from benchmarks.real_llama.config import ExpertSet  # noqa: E402
from benchmarks.real_llama.data import synthetic_tasks  # noqa: E402
from benchmarks.real_llama.model import TrainConfig, load_model, load_tokenizer, score  # noqa
from benchmarks.real_llama.report import write_report  # noqa: E402
from benchmarks.real_llama.run import run  # noqa: E402
from benchmarks.real_llama.tiny import make_tiny_base  # noqa: E402

METHODS = ["ace", "task_arithmetic (lambda=1)"]


@pytest.mark.skipif(shutil.which("mergekit-yaml") is None, reason="mergekit-yaml not on PATH")
def test_pipeline_end_to_end(tmp_path):
    tasks = synthetic_tasks(seed=0, n=48)
    base_dir = make_tiny_base(tmp_path / "base", tasks)
    cfg = TrainConfig(steps=30, batch_size=8, lr=1e-2, warmup=2, max_text_tokens=16)
    es = ExpertSet("tiny", {t.name: cfg for t in tasks}, heldout=24, train_pool=24)
    results = run(
        es,
        only=METHODS,
        cache=tmp_path / "cache",
        results_path=tmp_path / "r.json",
        base_dir=base_dir,
        tasks=tasks,
        report=False,
    )

    rows = results["rows"]
    tok = load_tokenizer(base_dir)
    base = load_model(base_dir)
    for t in tasks:
        expert_dir = next((tmp_path / "cache" / "experts" / "tiny").glob(f"{t.name}_*"))
        expert = load_model(expert_dir)
        trained = score(expert, tok, t, t.train, max_text_tokens=16)["acc"]
        untrained = score(base, tok, t, t.train, max_text_tokens=16)["acc"]
        assert trained >= 0.9 and trained > untrained, (t.name, trained, untrained)
        assert rows[f"expert {t.name}"]["scores"][t.name]["n"] == 24

    for label in METHODS:
        row = rows[label]
        assert "error" not in row, row.get("error")
        assert row["merge_seconds"] > 0
        assert row["checkpoint"]["tie_word_embeddings"]
        assert row["checkpoint"]["head_is_embedding"]
        for t in tasks:
            acc = row["scores"][t.name]["acc"]
            assert 0.0 <= acc <= 1.0
    # merged checkpoints are scored then removed; the scores are cached for reruns
    assert not any((tmp_path / "cache" / "merged" / "tiny").glob("*/model.safetensors"))
    saved = json.loads((tmp_path / "r.json").read_text())
    assert set(METHODS) <= set(saved["rows"])

    doc = tmp_path / "doc.md"
    doc.write_text("intro\n<!-- results-tiny:start -->\nold\n<!-- results-tiny:end -->\nend\n")
    paths = write_report(
        results, "tiny", doc=doc, img_dir=tmp_path / "img", out_dir=tmp_path / "out"
    )
    table = paths["markdown"].read_text()
    assert "| **ace** |" in table and "task_arithmetic (lambda=1)" in table
    text = doc.read_text()
    assert "old" not in text and "| **ace** |" in text and text.endswith("end\n")
    if "chart" in paths:
        assert paths["chart"].stat().st_size > 10_000
