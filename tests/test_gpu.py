"""``--cuda`` end to end and the kernel on a GPU; skipped cleanly where there is none."""

import pytest
import torch

from mergekit_ace.kernels.ace import ace_merge
from tests.reference import reference_ace, rel_err
from tests.test_kernel_ace import make_experts
from tests.tiny_models import EXPERT_SCALES, load_state, mergekit_yaml, model_list, write_config

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


PAPER = {"eps": 1e-5, "gate_statistic": "gamma"}
DEFAULTS = {"eps": "auto", "gate_statistic": "log_spread"}


@pytest.mark.parametrize("kwargs", [PAPER, {**PAPER, "gate": "off"}, DEFAULTS,
                                    {**DEFAULTS, "gate": "off"}])
def test_kernel_on_cuda_matches_float64_reference(kwargs):
    base, experts = make_experts((96, 64), (0.01, 1.0, 0.1))
    out, diag = ace_merge(base.cuda(), [e.cuda() for e in experts], **kwargs)
    assert out.device.type == "cuda"
    ref, branch = reference_ace(base, experts, **kwargs)
    assert diag.branch == branch
    assert rel_err(out.cpu() - base, ref - base.double()) < 1e-3


def test_mergekit_yaml_cuda_matches_cpu_kernel(tiny_family, tmp_path):
    names = list(EXPERT_SCALES)
    cfg = write_config(tmp_path / "ace.yml", {
        "merge_method": "ace",
        "base_model": str(tiny_family["base"]),
        "dtype": "float32",
        "models": model_list(tiny_family, names),
    })
    out = tmp_path / "out"
    mergekit_yaml(cfg, out, "--cuda")
    merged = load_state(out)
    base = load_state(tiny_family["base"])
    experts = [load_state(tiny_family[n]) for n in names]
    for key, w0 in base.items():
        expected, _ = ace_merge(w0, [e[key] for e in experts])
        assert rel_err(merged[key] - w0, expected - w0) < 1e-3, key
