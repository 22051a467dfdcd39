"""The mergekit internals that mergekit_ace.compat relies on still exist and behave as used.

mergekit has no plugin API; if a release within the supported range (``>=0.1.5,<0.2``)
renames or reshapes one of these, this file fails first and names it.
"""

import importlib
import inspect
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import mergekit_ace  # noqa: F401  (registers the methods, installs the hooks)
from mergekit_ace import compat
from tests.tiny_models import EXPERT_SCALES, model_list

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("module, names", sorted(compat.INTERNALS.items()))
def test_every_internal_name_exists(module, names):
    loaded = importlib.import_module(module)
    for dotted in names:
        owner = loaded
        for part in dotted.split("."):
            assert hasattr(owner, part) or part in getattr(owner, "__annotations__", {}), (
                f"mergekit {module} no longer has {dotted}: update mergekit_ace/compat.py"
            )
            owner = getattr(owner, part, None)


def test_registry_dict_is_what_the_public_functions_read():
    from mergekit.merge_methods import registry

    assert isinstance(registry._METHODS, dict)
    assert tuple(registry._METHODS.values()) == registry.registered_methods()
    assert compat.registered_method("ace") is registry.get("ace") is registry._METHODS["ace"]
    assert compat.registered_method("no_such_method") is None


def test_method_registered_as_swaps_and_restores():
    from mergekit.merge_methods import registry
    from mergekit_ace.methods.ace import ace_method

    original = registry.get("ace")
    replacement = ace_method()
    with compat.method_registered_as(replacement):
        assert registry.get("ace") is replacement
    assert registry.get("ace") is original
    fresh = ace_method()
    fresh.spec = type(fresh.spec)(**{**fresh.spec.__dict__, "name": "ace_compat_test"})
    with compat.method_registered_as(fresh):
        assert registry.get("ace_compat_test") is fresh
    assert compat.registered_method("ace_compat_test") is None
    # unregister_method removes and returns; register_method puts back
    assert compat.unregister_method("ace") is original
    with pytest.raises(RuntimeError):
        registry.get("ace")
    compat.register_method(original)
    assert registry.get("ace") is original


def test_signatures_used_by_compat():
    from mergekit import merge, plan

    assert list(inspect.signature(plan.MergePlanner._plan).parameters) == ["self"]
    assert list(inspect.signature(merge._model_out_config).parameters) == [
        "config",
        "arch_info",
        "trust_remote_code",
    ]
    run_params = list(inspect.signature(merge.run_merge).parameters)
    assert run_params[:3] == ["merge_config", "out_path", "options"]
    assert list(inspect.signature(merge.generate_card).parameters)[:3] == [
        "config",
        "config_yaml",
        "name",
    ]
    # run_merge looks generate_card up in its module's globals (what the card hook replaces)
    source = inspect.getsource(inspect.unwrap(merge.run_merge))
    assert "generate_card(" in source and "MergePlanner(" in source


def test_plan_tensors_yields_one_merge_task_per_output_tensor(tiny_family):
    from mergekit.architecture import get_architecture_info
    from mergekit.config import MergeConfiguration
    from mergekit.io.tasks import LoaderCache
    from mergekit.merge_methods.task_adapter import ExecuteMergeMethodTask
    from mergekit.options import MergeOptions
    from mergekit.plan import MergePlanner
    from tests.tiny_models import load_state

    config = MergeConfiguration.model_validate(
        {
            "merge_method": "ace",
            "base_model": str(tiny_family["base"]),
            "models": model_list(tiny_family, list(EXPERT_SCALES)),
        }
    )
    options = MergeOptions()
    arch = get_architecture_info(config, options)
    LoaderCache().setup(options=options)
    out_config = compat.model_out_config(config, arch)
    assert out_config.num_hidden_layers == 2
    planned = compat.plan_tensors(
        MergePlanner(config, arch, options=options, out_model_config=out_config)
    )
    names = [weight.name for weight, _ in planned]
    assert sorted(names) == sorted(load_state(tiny_family["base"]))
    assert all(
        isinstance(task, ExecuteMergeMethodTask) and task.method_name == "ace"
        for _, task in planned
    )


def test_fresh_process_has_the_hooks_without_importing_mergekit_ace():
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            textwrap.dedent("""
        import sys
        import mergekit.merge, mergekit.plan
        from mergekit.scripts import run_yaml, multimerge
        from mergekit_ace import compat
        print(all(getattr(f, "_mergekit_ace", False) for f in (
            mergekit.merge.run_merge, mergekit.plan.MergePlanner._plan,
            run_yaml.run_merge, multimerge.run_merge)))
        """),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip() == "True"


def test_pyproject_accepts_the_installed_mergekit_range():
    from importlib.metadata import version

    text = (ROOT / "pyproject.toml").read_text()
    assert '"mergekit>=0.1.5,<0.2"' in text
    major, minor, patch = (
        int(x) for x in re.match(r"(\d+)\.(\d+)\.(\d+)", version("mergekit")).groups()
    )
    assert (0, 1, 5) <= (major, minor, patch) < (0, 2, 0)


def test_only_compat_touches_mergekit_internals():
    """Private names, and the fields of the task graph (merge tasks, gather tasks, the loaders'
    index, the executor), are read in compat.py only."""
    internal = re.compile(
        r"(\b_METHODS\b|\._plan\(|\._tensors\b|\b_model_out_config\b|\bgather_tensors\b"
        r"|\bweight_info\b|\btensor_paths\b|\bbase_path\b|\bmodel_order\b"
        r"|\binput_parameters\b|\boutput_weight\b|\bmethod_name\b|\bLoaderCache\(\)\.get"
        r"|\bExecutor\()"
    )
    offenders = {
        p.relative_to(ROOT).as_posix(): internal.findall(p.read_text())
        for p in (ROOT / "mergekit_ace").rglob("*.py")
        if p.name != "compat.py"
    }
    assert {path: found for path, found in offenders.items() if found} == {}


def test_planned_tensor_reads_the_task_graph(tiny_family):
    """What inspect and the shape check read of a planned merge task, through compat."""
    from mergekit.architecture import get_architecture_info
    from mergekit.config import MergeConfiguration
    from mergekit.io.tasks import LoaderCache
    from mergekit.options import MergeOptions
    from mergekit.plan import MergePlanner

    config = MergeConfiguration.model_validate(
        {
            "merge_method": "ace",
            "base_model": str(tiny_family["base"]),
            "dtype": "float32",
            "parameters": {"k_frac": 0.5},
            "models": model_list(tiny_family, list(EXPERT_SCALES), {"expert_code": {"weight": 2}}),
        }
    )
    options = MergeOptions()
    arch = get_architecture_info(config, options)
    LoaderCache().setup(options=options)
    planner = MergePlanner(
        config, arch, options=options, out_model_config=compat.model_out_config(config, arch)
    )
    tasks = [task for _, task in compat.plan_tensors(planner)]
    name = "model.layers.1.mlp.up_proj.weight"
    (task,) = [t for t in tasks if compat.planned_tensor(t).name == name]
    planned = compat.planned_tensor(task)
    assert planned.method == "ace" and planned.task is task
    assert str(planned.base.model.path) == str(tiny_family["base"])
    assert [str(m.model.path) for m in planned.experts] == [
        str(tiny_family[n]) for n in EXPERT_SCALES
    ]
    assert planned.parameters["k_frac"] == 0.5
    weights = {str(m.model.path): v.get("weight") for m, v in planned.model_parameters.items()}
    assert weights[str(tiny_family["expert_code"])] == 2
    assert not compat.rows_aligned(task) and compat.load_dtype(task) == "float32"
    inputs = compat.input_weights(task)
    assert set(inputs) == set(planned.models)
    path, stored = compat.tensor_file(planned.base, inputs[planned.base])
    assert stored == name and path == str(tiny_family["base"] / "model.safetensors")
    results = dict(
        compat.execute([task], math_device="cpu", storage_device="cpu", quiet=True, desc="test")
    )
    assert tuple(results[task].shape) == (64, 32)


def test_run_merge_builds_its_executor_through_the_module_global():
    """run_merge looks ``Executor`` up in its module (what the executor choice replaces) and
    iterates ``run(quiet=...)``; the replacement keeps mergekit's class at hand."""
    from mergekit import graph, merge

    source = inspect.getsource(inspect.unwrap(merge.run_merge))
    assert "exec = Executor(" in source and "exec.run(quiet=options.quiet)" in source
    assert "math_device=options.device" in source
    assert merge.Executor.mergekit_executor is graph.Executor
    assert list(inspect.signature(graph.Executor._run).parameters) == ["self", "quiet", "desc"]
    assert list(inspect.signature(graph.Executor._move_tensors).parameters)[:3] == [
        "self",
        "value",
        "device",
    ]


def test_executor_choice_lasts_one_run_merge(tiny_family, tmp_path, monkeypatch, caplog):
    from mergekit.config import MergeConfiguration
    from mergekit.graph import Executor
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    built = []

    def choose(config, options):
        if config.merge_method == "ace":
            return lambda *args, **kwargs: built.append(options.device) or Executor(*args, **kwargs)
        return None

    def broken(config, options):
        raise RuntimeError("cannot decide")

    monkeypatch.setattr(compat, "_executor_choices", [broken, choose])
    config = {
        "merge_method": "ace",
        "base_model": str(tiny_family["base"]),
        "models": model_list(tiny_family, list(EXPERT_SCALES)),
    }
    run_merge(
        MergeConfiguration.model_validate(config),
        str(tmp_path / "a"),
        options=MergeOptions(quiet=True),
    )
    assert built == ["cpu"] and compat._chosen_executor.get() is None
    assert "could not choose an executor (RuntimeError('cannot decide'))" in caplog.text
    ta = {
        **config,
        "merge_method": "task_arithmetic",
        "models": model_list(
            tiny_family, list(EXPERT_SCALES), {n: {"weight": 1.0} for n in EXPERT_SCALES}
        ),
    }
    run_merge(
        MergeConfiguration.model_validate(ta), str(tmp_path / "b"), options=MergeOptions(quiet=True)
    )
    assert built == ["cpu"]
    assert (tmp_path / "b" / "model.safetensors").exists()


def test_worker_threads_get_the_loader_cache_settings():
    import threading

    from mergekit.io.tasks import LoaderCache
    from mergekit.options import MergeOptions

    LoaderCache().setup(MergeOptions(lazy_unpickle=True, lora_merge_cache="/tmp/lora-cache"))
    install = compat.share_loader_cache()
    seen = {}

    def worker():
        seen["before"] = LoaderCache().lora_cache_dir
        install()
        cache = LoaderCache()
        seen["after"] = (
            cache.lora_cache_dir,
            cache.lazy_unpickle,
            cache.loaders is LoaderCache.loaders,
        )

    thread = threading.Thread(target=worker)
    thread.start()
    thread.join()
    LoaderCache().setup(MergeOptions())
    assert seen == {"before": None, "after": ("/tmp/lora-cache", True, True)}


@pytest.mark.parametrize("use_async", [False, True])
def test_unfinished_shards_are_the_writers_temporary_files(tmp_path, use_async):
    import torch
    from mergekit.io.tensor_writer import TensorWriter

    writer = TensorWriter(str(tmp_path), max_shard_size=1000, use_async=use_async)
    for i in range(3):
        writer.save_tensor(f"t{i}", torch.zeros(200))  # 800 bytes: one shard each
    paths = compat.unfinished_shards(writer)
    assert [Path(p).name for p in paths] == ["model-1.safetensors", "model-2.safetensors"]
    assert all(Path(p).exists() for p in paths)
