"""docs/python-api.md's examples, run as written (only the two paths are the tiny checkpoints'),
give the ACE kernel's merge."""

import re
from pathlib import Path

import torch

from mergekit_ace.kernels.ace import ace_merge
from tests.tiny_models import load_state

DOC = Path(__file__).resolve().parents[1] / "docs" / "python-api.md"


def code_blocks():
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)
    assert len(blocks) == 3 and blocks[0].startswith("base = ")
    return blocks[1:]  # the first block only names the paths


def test_python_api_examples(tiny_family, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    names = ["expert_math", "expert_code"]
    scope = {"base": str(tiny_family["base"]), "experts": [str(tiny_family[n]) for n in names]}
    in_memory, from_config = code_blocks()
    exec(compile(in_memory, f"{DOC}:in-memory", "exec"), scope)
    exec(compile(from_config, f"{DOC}:run_merge", "exec"), scope)

    base = load_state(tiny_family["base"])
    experts = [load_state(tiny_family[n]) for n in names]
    written = load_state(tmp_path / "merged")
    assert set(scope["merged"]) == set(base) == set(written)
    for key, w0 in base.items():
        expected, _ = ace_merge(
            w0.float(),
            [e[key].float() for e in experts],
            weights=[1.0, 0.5],
            eps="auto",
            k_frac=0.3,
        )
        assert torch.allclose(scope["merged"][key], expected, rtol=0, atol=1e-6), key
        assert torch.allclose(written[key], expected, rtol=0, atol=1e-6), key
    name = scope["name"]
    assert torch.allclose(scope["one"], scope["merged"][name], rtol=0, atol=1e-6)
    assert not torch.equal(scope["one"], base[name])
    assert (tmp_path / "merged" / "tokenizer.json").exists()
