"""The generative benchmark end to end on tiny stand-ins (``run --quick``): a random tiny Llama,
three synthetic domains, experts trained on each, real ``mergekit-yaml`` merges of all experts
and of a subset, per-document scoring, retention and the report files. Plus the retention
statistic and the document split, checked by hand."""

import math
import shutil

import pytest

pytest.importorskip("transformers")
import torch  # noqa: E402

from benchmarks.generative.corpora import split_docs  # noqa: E402
from benchmarks.generative.lm import doc_scores, encode_docs  # noqa: E402
from benchmarks.generative.report import expert_row, retention, summarize  # noqa: E402
from benchmarks.generative.run import quick_set, row_key, run_quick  # noqa: E402
from benchmarks.real_llama.model import load_model, load_tokenizer  # noqa: E402


def test_retention_by_hand():
    # base - expert = [2, 1], base - merged = [1, 0]: R = 0.5 / 1.5; residuals g - R t =
    # [1/3, -1/3], sample variance 2/9, SE = sqrt(2/9 / 2) / 1.5 = 2/9
    r = retention([3.0, 1.0], [1.0, 0.0], [2.0, 1.0])
    assert r["r"] == pytest.approx(1 / 3) and r["se"] == pytest.approx(2 / 9)
    expert = retention([3.0, 2.5, 4.0], [1.0, 2.0, 1.5], [1.0, 2.0, 1.5])
    assert expert["r"] == pytest.approx(1.0) and expert["se"] == pytest.approx(0.0, abs=1e-12)
    assert retention([3.0, 2.5], [1.0, 2.0], [3.0, 2.5])["r"] == pytest.approx(0.0)


def test_split_keeps_groups_apart():
    docs = [(f"file{i // 3}", f"text {i}") for i in range(30)]
    train, held = split_docs(docs, 7, seed=0)
    assert len(held) == 7 and len(train) + len(held) <= 30
    assert not set(train) & set(held)
    group = {t: g for g, t in docs}
    held_groups = {group[t] for t in held}
    assert not held_groups & {group[t] for t in train}  # no file on both sides
    assert split_docs(docs, 7, seed=0) == (train, held)


@pytest.mark.skipif(shutil.which("mergekit-yaml") is None, reason="mergekit-yaml not on PATH")
def test_quick_run_end_to_end(tmp_path):
    results = run_quick(tmp_path, log=lambda *_: None)
    gs = quick_set()
    rows = results["rows"]
    names = list(gs.domains)
    base = rows["base"]["scores"]
    for seed in gs.train_seeds:
        for d in names:
            ex = expert_row(results, seed, d)
            own = sum(ex["scores"][d]["loss"]) / len(ex["scores"][d]["loss"])
            before = sum(base[d]["loss"]) / len(base[d]["loss"])
            assert own < 0.7 * before, (seed, d, own, before)
            # an expert "merged" alone keeps exactly its own domain
            s = summarize(results, {"scores": {d: ex["scores"][d]}}, seed)
            assert s["per"][d]["r"] == pytest.approx(1.0)

    full = [row_key(0, names, label, names) for label in ("ace", "task_arithmetic (lambda=1)")]
    full.append(row_key(1, names, "ace", names))
    subset = results["subsets"]["2"][0]
    swept = [row_key(0, subset, label, names) for label in ("ace", "ties")]
    for key in full + swept:
        row = rows[key]
        assert "error" not in row, row.get("error")
        assert row["merge_seconds"] > 0 and row["checkpoint"]["head_is_embedding"]
        assert sorted(row["scores"]) == sorted(row["subset"])
        s = summarize(results, row, row["seed"])
        assert all(math.isfinite(v["r"]) and math.isfinite(v["se"]) for v in s["per"].values())
    assert len(subset) == 2 and sorted(rows[swept[0]]["scores"]) == sorted(subset)
    assert not any((tmp_path / "cache" / "merged").rglob("model.safetensors"))

    # per-document loss equals transformers' own mean next-token loss on that document
    tok = load_tokenizer(tmp_path / "base")
    model = load_model(tmp_path / "base")
    text = "red fox runs blue fox sleeps"
    ids = torch.tensor(encode_docs(tok, [text], gs.seq))
    with torch.no_grad():
        ref = float(model(input_ids=ids, labels=ids).loss)
    assert doc_scores(model, tok, [text, "one two"], gs.seq)["loss"][0] == pytest.approx(
        ref, rel=1e-5
    )

    table = (tmp_path / f"{gs.name}.md").read_text()
    for label in ("| ace |", "| task_arithmetic (lambda=1) |", "| ties |", "| alpha |"):
        assert label in table
    assert (tmp_path / f"benchmark_{gs.name}.png").stat().st_size > 10_000
    # a rerun reuses every scored model
    again = run_quick(tmp_path, report=False, log=lambda *_: None)
    assert again["runs"][-1]["seconds"] < results["runs"][-1]["seconds"]
    assert {k: v.get("scores") for k, v in again["rows"].items()} == {
        k: v.get("scores") for k, v in rows.items()
    }
