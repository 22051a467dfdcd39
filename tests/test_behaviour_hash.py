"""The behaviour-hash tool (tests/behaviour_hash.py) hashes every merged tensor, repeats itself
exactly within one process, sees a changed merge, and drives ACE's CUDA-to-CPU fallback."""

from tests.behaviour_hash import all_cases, compare, hash_cases, merge_in_process
from tests.tiny_models import load_state

CASES = ["ace/defaults", "ace/lambda", "tsv/defaults", "kernel/ace-cpu-fallback"]


def test_hashes_cover_every_tensor_and_repeat_exactly(tiny_family, tmp_path):
    merge = merge_in_process()
    first = hash_cases(CASES, tiny_family, merge, tmp_path / "first")
    second = hash_cases(CASES, tiny_family, merge, tmp_path / "second")
    assert first == second
    assert compare({"cases": second}, {"cases": first}) == []
    base = load_state(tiny_family["base"])
    for name in CASES[:3]:
        assert set(first[name]["tensors"]) == set(base)
        assert first[name]["config"] == all_cases()[name]
    # lambda 0.7 moves every tensor some expert changed; the difference is listed per tensor
    lines = compare(
        {"cases": {"ace": first["ace/lambda"]}}, {"cases": {"ace": first["ace/defaults"]}}
    )
    assert len(lines) == len(base) and all(line.endswith(" differs") for line in lines)
    # the fallback merges every 2-D tensor on the CPU, bit for bit as the direct merge
    fallback = first["kernel/ace-cpu-fallback"]["tensors"]
    assert set(fallback) == {k for k, v in base.items() if v.dim() == 2}
    assert all(first["ace/defaults"]["tensors"][k] == v for k, v in fallback.items())
