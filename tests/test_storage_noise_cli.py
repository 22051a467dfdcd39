"""Storage noise through the real ``mergekit-yaml`` on tiny checkpoints: every tensor of a model
is judged by one rule (entries changed, ulps, the share of the base's rounding), the log names
the right dtypes, the merge equals the merge without the noise, and the end of the merge shows
each model whole, with the tensors where it carries a real change."""

import torch

from tests.tiny_models import (
    EXPERT_SCALES,
    TINY,
    load_state,
    mergekit_yaml,
    model_list,
    save_model,
    write_config,
)

EXPERTS = list(EXPERT_SCALES)
TENSOR = "model.layers.1.mlp.up_proj.weight"


def _moved(tensor: torch.Tensor, entries: int, ulps: int) -> torch.Tensor:
    """``tensor`` with its first ``entries`` entries (flat order) moved up by ``ulps``."""
    out = tensor.clone()
    flat = out.view(-1)
    up = torch.full_like(flat[:entries], float("inf"))
    for _ in range(ulps):
        flat[:entries] = torch.nextafter(flat[:entries], up)
    return out


def _merge(tmp_path, paths, base, names, tag, **parameters):
    config = {
        "merge_method": "ace",
        "base_model": str(paths[base]),
        "dtype": "float32",
        "models": model_list(paths, names),
    }
    if parameters:
        config["parameters"] = parameters
    result = mergekit_yaml(write_config(tmp_path / f"{tag}.yml", config), tmp_path / tag)
    return load_state(tmp_path / tag), result.stderr


def _summary(stderr: str, model) -> str:
    """The end-of-merge line on ``model`` (its path, as mergekit names it)."""
    (line,) = [s for s in stderr.splitlines() if f"storage noise: model {model} " in s]
    return line[line.index("storage noise: ") :]


def test_bf16_copies_with_entries_moved_by_ulps_are_left_out_everywhere(tiny_family, tmp_path):
    """A bf16 base and two bf16 copies of it, one with one entry moved by 1 ulp in every
    tensor, one with 8 entries moved by 3 ulp: both are storage noise in all tensors, the
    merge equals the merge without them, and the log says "stored as bfloat16" (not "rounded
    to": the base already is bfloat16)."""
    base = {k: v.to(torch.bfloat16) for k, v in load_state(tiny_family["base"]).items()}
    paths = dict(tiny_family)
    for name, state in (
        ("base_bf16", base),
        ("one_ulp", {k: _moved(v, 1, 1) for k, v in base.items()}),
        ("eight_at_3", {k: _moved(v, 8, 3) for k, v in base.items()}),
    ):
        paths[name] = tmp_path / name
        save_model(paths[name], state, TINY)
    merged, stderr = _merge(tmp_path, paths, "base_bf16", EXPERTS + ["one_ulp", "eight_at_3"], "a")
    expected, _ = _merge(tmp_path, paths, "base_bf16", EXPERTS, "b")
    assert merged.keys() == expected.keys()
    assert all(torch.equal(merged[k], expected[k]) for k in expected)
    n = len(base)
    for model, entries, ulps in (("one_ulp", 1, 1), ("eight_at_3", 8, 3)):
        assert f"model {paths[model]}: its tensor " in stderr
        assert _summary(stderr, paths[model]) == (
            f"storage noise: model {paths[model]} (stored as bfloat16) is the base re-stored, "
            f"not a fine-tune, in {n} of the {n} tensors compared; left out there. Remove it from "
            "`models:`: it changes nothing the merge should keep."
        )
        assert f"equals the base (stored as bfloat16), except for {entries} of its" in stderr
        assert f"each moved by at most {ulps} ulp of bfloat16" in stderr
    assert "rounded to" not in stderr


def test_each_model_is_shown_whole_and_the_user_decides(tiny_family, tmp_path):
    """An fp32 base; a float16 copy of it that carries a real change in one tensor; a 1e-4
    fine-tune saved in bf16 (most of its task vector the base's rounding to bf16). The log
    names float16 and bfloat16 beside the base's float32; the summary lists the tensor where
    the float16 copy is a real expert; left out elsewhere, the merge equals the three experts'
    merge there; kept (``drop_noise: false``), the light fine-tune moves the merge by more
    than half."""
    base = load_state(tiny_family["base"])
    g = torch.Generator().manual_seed(5)
    half = {k: v.to(torch.float16) for k, v in base.items()}
    real = 0.01 * torch.randn(base[TENSOR].shape, generator=g)
    half[TENSOR] = (base[TENSOR] + real).to(torch.float16)
    light = {
        k: (v * (1 + 1e-4 * torch.randn(v.shape, generator=g))).to(torch.bfloat16)
        for k, v in base.items()
    }
    paths = dict(tiny_family)
    for name, state in (("half", half), ("light", light)):
        paths[name] = tmp_path / name
        save_model(paths[name], state, TINY)
    merged, stderr = _merge(tmp_path, paths, "base", EXPERTS + ["half", "light"], "a")
    expected, _ = _merge(tmp_path, paths, "base", EXPERTS, "b")
    assert "equals the base (float32) rounded to float16, the expert's storage" in stderr
    assert "equals the base (float32) rounded to bfloat16, the expert's storage" in stderr
    # the norms' ones are exact in float16: their task vector is zero, not compared
    n = sum(not torch.equal(half[k].float(), v) for k, v in base.items())
    assert n == len(base) - 5
    assert _summary(stderr, paths["half"]) == (
        f"storage noise: model {paths['half']} (stored as float16, the base as float32) is the "
        f"base re-stored, not a fine-tune, in {n - 1} of the {n} tensors compared; left out there. "
        f"It carries a real change in 1: '{TENSOR}', merged there. To leave it out everywhere "
        "remove it from `models:`; to keep it everywhere set `drop_noise: false`."
    )
    matrices = [k for k, v in base.items() if v.dim() == 2]
    assert f"model {paths['light']} (stored as bfloat16, the base as float32)" in stderr
    assert all(torch.equal(merged[k], expected[k]) for k in expected if k != TENSOR)
    assert not torch.equal(merged[TENSOR], expected[TENSOR])
    kept, stderr = _merge(tmp_path, paths, "base", EXPERTS + ["light"], "c", drop_noise=False)
    assert "kept (`drop_noise: false`) there" in _summary(stderr, paths["light"])
    moved = [
        float((kept[k] - expected[k]).norm() / (expected[k] - base[k]).norm()) for k in matrices
    ]
    assert max(moved) > 0.5
