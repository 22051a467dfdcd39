"""Behaviour hashes: the SHA-256 of every tensor that the test suite's tiny-Llama merges write,
for all five methods under a grid of parameters, so that a change meant to keep behaviour
(a refactoring, another executor) can show it merges bit for bit as before.

    python -m tests.behaviour_hash --out before.json            # in this process (run_merge)
    python -m tests.behaviour_hash --out after.json --compare before.json
    python -m tests.behaviour_hash --cli --env NAME=VALUE --out x.json -- --cuda
    python -m tests.behaviour_hash --list                       # the cases

Every case is a ``mergekit-yaml`` configuration merged by the real mergekit: by default with
``run_merge`` in this process (``--option NAME=VALUE`` sets a ``MergeOptions`` field), with
``--cli`` by the ``mergekit-yaml`` command in a fresh process per case, which gets this
environment plus ``--env`` and the arguments after ``--``. A few cases call the ACE kernel
directly, for what a configuration cannot reach on a CPU (the CUDA-to-CPU fallback, driven by
tensors that report a CUDA device). From Python, :func:`hash_cases` takes any ``merge(config,
out_dir)`` callable, e.g. one that runs mergekit's graph with another executor.

Hashes are exact: they are equal only on the same machine, library versions and thread count
(``--threads``, default 1), because a different CPU or BLAS may round differently. Compare
files made on one machine; the file records where it was made. The vocabulary case uses
``tokenizer: {source: base}``: a union numbers its new tokens in the iteration order of the
tokenizers library's hash map, which changes from one process to the next.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import os
import platform
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch

from tests.tiny_models import (
    EXPERT_SCALES,
    TINY,
    build_tiny_family,
    load_state,
    run_cli,
    save_model,
    write_config,
)

EXPERTS = list(EXPERT_SCALES)
NOISE = "base_as_bf16"  # the base saved as bfloat16 and read back: a storage-noise expert
Merge = Callable[[dict, Path], None]


def _config(
    method: str,
    parameters: Optional[dict] = None,
    *,
    models: Sequence[str] = EXPERTS,
    per_model: Optional[Dict[str, dict]] = None,
    dtype: str = "float32",
    **extra: Any,
) -> dict:
    """A configuration with model names in place of paths (:func:`resolve` fills them in)."""
    config = {
        "merge_method": method,
        "base_model": "base",
        "dtype": dtype,
        "models": [
            {
                "model": name,
                **({"parameters": per_model[name]} if per_model and name in per_model else {}),
            }
            for name in models
        ],
    }
    if parameters:
        config["parameters"] = parameters
    config.update(extra)
    return config


def ace_cases() -> Dict[str, dict]:
    filters = {
        "eps": [{"filter": "mlp", "value": 1.0e-4}, {"value": "auto"}],
        "gate": [{"filter": "self_attn", "value": "on"}, {"value": "auto"}],
        "k_frac": [{"filter": "down_proj", "value": 0.5}, {"value": 0.3}],
        "prior": [{"filter": "up_proj", "value": False}, {"value": True}],
    }
    return {
        "ace/defaults": _config("ace"),
        "ace/gate-on": _config("ace", {"gate": "on"}),
        "ace/gate-off": _config("ace", {"gate": "off"}),
        "ace/paper": _config("ace", {"eps": 1.0e-5, "gate_statistic": "gamma"}),
        "ace/gamma-tau": _config("ace", {"gate_statistic": "gamma", "tau": 0.05}),
        "ace/eps-number": _config("ace", {"eps": 1.0e-3}),
        "ace/eps-number-gate-on": _config("ace", {"eps": 1.0e-2, "gate": "on"}),
        "ace/eps-tiny": _config("ace", {"eps": 1.0e-8}, models=["expert_math", "expert_chat"]),
        "ace/eps-zero": _config(
            "ace", {"eps": 0.0, "gate": "off"}, models=["expert_math", "expert_chat"]
        ),
        "ace/prior-false": _config("ace", {"prior": False}),
        "ace/refine-false": _config("ace", {"refine": False}),
        "ace/ablation-e1": _config("ace", {"gate": "off", "prior": False, "refine": False}),
        "ace/ablation-e2": _config("ace", {"prior": False, "refine": False, "gate": "on"}),
        "ace/k-frac-0": _config("ace", {"k_frac": 0.0, "gate": "on"}),
        "ace/k-frac-1": _config("ace", {"k_frac": 1.0, "gate": "on"}),
        "ace/tau-0": _config("ace", {"tau": 0.0}),
        "ace/filters": _config("ace", filters),
        "ace/weights": _config(
            "ace", per_model={"expert_math": {"weight": 2.0}, "expert_code": {"weight": 0.5}}
        ),
        "ace/weight-zero": _config("ace", per_model={"expert_code": {"weight": 0.0}}),
        "ace/lambda": _config("ace", {"lambda": 0.7}),
        "ace/noise-dropped": _config("ace", models=EXPERTS + [NOISE]),
        "ace/noise-kept": _config("ace", {"drop_noise": False}, models=EXPERTS + [NOISE]),
        "ace/noise-kept-gate-off": _config(
            "ace", {"drop_noise": False, "gate": "off"}, models=EXPERTS + [NOISE]
        ),
        "ace/float64": _config("ace", dtype="float64"),
        "ace/float64-gate-on-paper": _config(
            "ace", {"gate": "on", "eps": 1.0e-5, "gate_statistic": "gamma"}, dtype="float64"
        ),
        "ace/bfloat16": _config("ace", dtype="bfloat16"),
        "ace/cpu-options": _config("ace", {"matmul_precision": "tf32", "oom_fallback": "error"}),
        "ace/one-expert": _config("ace", models=["expert_code"]),
        "ace/tokenizer-base": _config(
            "ace", models=EXPERTS + ["expert_tokens"], tokenizer={"source": "base"}
        ),
    }


def family_cases() -> Dict[str, dict]:
    weights = {"expert_math": {"weight": 2.0}, "expert_code": {"weight": 0.5}}
    cases = {
        "actmat/rtol-number": _config("actmat", {"rtol": 1.0e-3}),
        "actmat/rtol-zero-float64": _config("actmat", {"rtol": 0.0}, dtype="float64"),
        "actmat/weights": _config("actmat", per_model=weights),
        "actmat/two-experts": _config("actmat", models=["expert_math", "expert_chat"]),
        "iso_cts/fraction-0.5": _config("iso_cts", {"common_space_fraction": 0.5}),
        "iso_cts/fraction-1": _config("iso_cts", {"common_space_fraction": 1.0}),
        "iso_cts/fraction-0": _config("iso_cts", {"common_space_fraction": 0.0}),
    }
    for method in ("actmat", "tsv", "iso_c", "iso_cts"):
        cases.update(
            {
                f"{method}/defaults": _config(method),
                f"{method}/lambda": _config(method, {"lambda": 0.8}),
                f"{method}/float64": _config(method, dtype="float64"),
                f"{method}/bfloat16": _config(method, dtype="bfloat16"),
                f"{method}/noise-dropped": _config(method, models=EXPERTS + [NOISE]),
                f"{method}/noise-kept": _config(
                    method, {"drop_noise": False}, models=EXPERTS + [NOISE]
                ),
            }
        )
    return dict(sorted(cases.items()))


KERNEL_CASES = ("kernel/ace-cpu-fallback", "kernel/ace-cpu-fallback-gate-on")


def all_cases() -> Dict[str, dict]:
    return {**ace_cases(), **family_cases()}


def build_family(root: Path) -> Dict[str, Path]:
    """The suite's tiny family (base, three experts, one with two more tokens) and a
    storage-noise expert."""
    paths = build_tiny_family(root, extra_token_expert=True)
    base = load_state(paths["base"])
    paths[NOISE] = root / NOISE
    save_model(paths[NOISE], {k: v.to(torch.bfloat16).float() for k, v in base.items()}, TINY)
    return paths


def resolve(config: dict, paths: Dict[str, Path]) -> dict:
    """``config`` with every model name replaced by its path."""
    out = json.loads(json.dumps(config))
    out["base_model"] = str(paths[out["base_model"]])
    for entry in out["models"]:
        entry["model"] = str(paths[entry["model"]])
    return out


def tensor_digest(tensor: torch.Tensor) -> str:
    """SHA-256 of a tensor's dtype, shape and bytes."""
    digest = hashlib.sha256(f"{tensor.dtype}{tuple(tensor.shape)}".encode())
    digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def state_digests(state: Dict[str, torch.Tensor]) -> Dict[str, str]:
    return {name: tensor_digest(state[name]) for name in sorted(state)}


def merge_in_process(options: Optional[dict] = None) -> Merge:
    """``run_merge`` in this process with ``MergeOptions(quiet=True, **options)``."""

    def merge(config: dict, out: Path) -> None:
        from mergekit.config import MergeConfiguration
        from mergekit.merge import run_merge
        from mergekit.options import MergeOptions

        run_merge(
            MergeConfiguration.model_validate(config),
            str(out),
            options=MergeOptions(**{"quiet": True, **(options or {})}),
        )

    return merge


def merge_with_cli(arguments: Sequence[str] = (), env: Optional[dict] = None) -> Merge:
    """The ``mergekit-yaml`` command in a fresh process per case."""

    def merge(config: dict, out: Path) -> None:
        path = write_config(out.parent / f"{out.name}.yml", config)
        result = run_cli("mergekit-yaml", [path, out, *arguments], check=False, env=env)
        if result.returncode != 0:
            raise RuntimeError(f"mergekit-yaml failed:\n{result.stderr[-4000:]}")

    return merge


def hash_cases(
    names: Sequence[str], paths: Dict[str, Path], merge: Merge, workdir: Path
) -> Dict[str, dict]:
    """``{case: {"config": ..., "tensors": {name: sha256}}}`` for the configuration cases
    ``names`` (of :func:`all_cases`) merged by ``merge``, and for the kernel cases among them."""
    cases = all_cases()
    results = {}
    for name in names:
        if name in KERNEL_CASES:
            results[name] = {
                "config": {"kernel": "ace_merge", "case": name},
                "tensors": kernel_case(name, paths),
            }
            continue
        out = workdir / name.replace("/", "__")
        merge(resolve(cases[name], paths), out)
        results[name] = {"config": cases[name], "tensors": state_digests(load_state(out))}
    return results


class _ReportsCuda(torch.Tensor):
    """A CPU tensor that reports a CUDA device: drives ``ace_merge``'s out-of-memory fallback
    on a machine without a GPU."""

    @property
    def device(self):
        return torch.device("cuda", 0)

    def cpu(self):
        return self.as_subclass(torch.Tensor)


@contextlib.contextmanager
def _pretend_cuda():
    """``Tensor.to(a CUDA device)`` returns the tensor itself (the fallback's return trip) and
    the pretended device is an NVIDIA Ampere GPU (compute capability 8.0)."""
    original_to, original_capability = torch.Tensor.to, torch.cuda.get_device_capability

    def to(self, *args, **kwargs):
        target = kwargs.get("device", args[0] if args else None)
        if isinstance(target, (str, torch.device)) and torch.device(target).type == "cuda":
            return self
        return original_to(self, *args, **kwargs)

    torch.Tensor.to = to
    torch.cuda.get_device_capability = lambda device=None: (8, 0)
    try:
        yield
    finally:
        torch.Tensor.to, torch.cuda.get_device_capability = original_to, original_capability


def kernel_case(name: str, paths: Dict[str, Path]) -> Dict[str, str]:
    """ACE's CUDA-to-CPU fallback (``free_device_bytes=0``) on every 2-D tensor of the family,
    the experts' tensors upcast to float32 as ``dtype: float32`` loads them."""
    from mergekit_ace.kernels.ace import ace_merge

    gate = {"kernel/ace-cpu-fallback": "auto", "kernel/ace-cpu-fallback-gate-on": "on"}[name]
    base = load_state(paths["base"])
    experts = [load_state(paths[n]) for n in EXPERTS]
    out = {}
    for key in sorted(base):
        if base[key].dim() != 2:
            continue
        fake = base[key].float().clone().as_subclass(_ReportsCuda)
        fakes = [e[key].float().clone().as_subclass(_ReportsCuda) for e in experts]
        with _pretend_cuda():
            merged, diag = ace_merge(fake, fakes, gate=gate, free_device_bytes=0, tensor_name=key)
        if diag.device != "cpu (fallback)":
            raise RuntimeError(f"{name}: {key} was not merged by the CPU fallback")
        out[key] = tensor_digest(merged.as_subclass(torch.Tensor))
    return out


def compare(new: dict, old: dict) -> List[str]:
    """Differences between two hash files' cases, one line each (empty: identical)."""
    lines = []
    for case in sorted(set(new["cases"]) | set(old["cases"])):
        a, b = new["cases"].get(case), old["cases"].get(case)
        if a is None or b is None:
            lines.append(f"{case}: only in {'the old' if a is None else 'the new'} file")
            continue
        for tensor in sorted(set(a["tensors"]) | set(b["tensors"])):
            if a["tensors"].get(tensor) != b["tensors"].get(tensor):
                lines.append(f"{case}: {tensor} differs")
    return lines


def environment(threads: int, mode: str, env: Dict[str, str], extra: Any) -> dict:
    from importlib.metadata import version

    cpu = platform.processor()
    if Path("/proc/cpuinfo").exists():
        names = [
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ]
        cpu = names[0] if names else cpu
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "mergekit": version("mergekit"),
        "cpu": cpu,
        "threads": threads,
        "mode": mode,
        "env": env,
        "merge_arguments": extra,
    }


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tests.behaviour_hash",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--out", type=Path, help="write the hashes here (JSON)")
    parser.add_argument(
        "--compare", type=Path, help="a previous file: list what differs, exit 1 if anything does"
    )
    parser.add_argument(
        "--only", action="append", default=[], help="cases whose name contains this (repeatable)"
    )
    parser.add_argument("--list", action="store_true", help="list the cases and exit")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument(
        "--cli",
        action="store_true",
        help="merge with the mergekit-yaml command, one process per case",
    )
    parser.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="environment of the merges (repeatable)",
    )
    parser.add_argument(
        "--option",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a MergeOptions field for run_merge (in-process mode; YAML value)",
    )
    parser.add_argument(
        "--workdir", type=Path, help="build the checkpoints here (default: a temporary directory)"
    )
    parser.add_argument(
        "merge_arguments", nargs="*", help="after --: arguments for mergekit-yaml (with --cli)"
    )
    args = parser.parse_args(argv)
    names = [
        n
        for n in [*all_cases(), *KERNEL_CASES]
        if not args.only or any(part in n for part in args.only)
    ]
    if args.list:
        print("\n".join(names))
        return 0
    if args.out is None and args.compare is None:
        parser.error("give --out, --compare or both")
    if args.merge_arguments and not args.cli:
        parser.error("arguments after -- are for mergekit-yaml: add --cli")
    env = dict(item.split("=", 1) for item in args.env)
    threads = {"OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    os.environ.update({**threads, **env})
    torch.set_num_threads(args.threads)
    logging.getLogger("mergekit_ace").setLevel(logging.ERROR)
    if args.cli:
        merge, mode = merge_with_cli(args.merge_arguments, {**threads, **env}), "mergekit-yaml"
    else:
        import yaml

        options = {k: yaml.safe_load(v) for k, v in (o.split("=", 1) for o in args.option)}
        merge, mode = merge_in_process(options), "run_merge"
    with tempfile.TemporaryDirectory() as tmp:
        root = args.workdir or Path(tmp)
        paths = build_family(root / "models")
        (root / "merges").mkdir(parents=True, exist_ok=True)
        cases = hash_cases(names, paths, merge, root / "merges")
    result = {
        "about": "SHA-256 of every merged tensor: python -m tests.behaviour_hash",
        "environment": environment(args.threads, mode, env, args.merge_arguments or args.option),
        "cases": cases,
    }
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1, sort_keys=True) + "\n")
    tensors = sum(len(c["tensors"]) for c in cases.values())
    print(f"{len(cases)} cases, {tensors} tensors hashed", file=sys.stderr)
    if args.compare is not None:
        old = json.loads(args.compare.read_text())
        old["cases"] = {k: v for k, v in old["cases"].items() if k in cases}
        differences = compare(result, old)
        for line in differences:
            print(line)
        print(f"{len(differences)} difference(s) from {args.compare}", file=sys.stderr)
        return 1 if differences else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
