"""Every place where mergekit-ace reaches into mergekit beyond its public API.

mergekit (``>=0.1.5,<0.2``) has no plugin interface: methods are registered in a module-level
registry, the merge is planned by :class:`mergekit.plan.MergePlanner` and written by
:func:`mergekit.merge.run_merge`, which also writes the model card. This module is the only
one that touches private names of those modules; ``tests/test_compat.py`` checks that each of
them still exists and behaves as used here, so a mergekit release that changes one fails
there, loudly, instead of silently somewhere else.

Public functions are used where mergekit has them (``registry.get``, ``register``,
``registered_methods``). Nothing here imports ``mergekit.plan`` or ``mergekit.merge`` at
module level: the start-up hook calls :func:`patch_loaded` right after each of them has loaded.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import logging
import os
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Dict, Iterable, Iterator, List, Optional, Tuple

if TYPE_CHECKING:
    from mergekit.merge_methods.base import MergeMethod

PLANNER_MODULE = "mergekit.plan"
MERGE_MODULE = "mergekit.merge"
REGISTRY_MODULE = "mergekit.merge_methods.registry"
MERGE_TASK_MODULE = "mergekit.merge_methods.task_adapter"
IO_TASKS_MODULE = "mergekit.io.tasks"
LOADER_MODULE = "mergekit.io.lazy_tensor_loader"
GRAPH_MODULE = "mergekit.graph"
WRITER_MODULE = "mergekit.io.tensor_writer"
RUN_YAML_MODULE = "mergekit.scripts.run_yaml"
MULTIMERGE_MODULE = "mergekit.scripts.multimerge"

# The private names used below, and the fields of mergekit's task graph read below, per module
# (tests/test_compat.py checks each one). mergekit_ace.overlap subclasses
# mergekit.graph.Executor: it overrides ``_run`` (the generator ``run`` wraps) and reuses
# ``_move_tensors``.
INTERNALS = {
    REGISTRY_MODULE: ("_METHODS",),
    PLANNER_MODULE: ("MergePlanner._plan", "MergePlanner._tensors"),
    MERGE_MODULE: ("_model_out_config", "generate_card", "run_merge", "Executor"),
    MERGE_TASK_MODULE: (
        "ExecuteMergeMethodTask.method_name",
        "ExecuteMergeMethodTask.gather_tensors",
        "ExecuteMergeMethodTask.model_order",
        "ExecuteMergeMethodTask.base_model",
        "ExecuteMergeMethodTask.output_weight",
        "ExecuteMergeMethodTask.parameters",
        "ExecuteMergeMethodTask.input_parameters",
    ),
    IO_TASKS_MODULE: (
        "GatherTensors.weight_info",
        "GatherTensors.dtype",
        "LoaderCache.get",
        "LoaderCache._instance",
    ),
    LOADER_MODULE: (
        "LazyTensorLoader.index",
        "ShardedTensorIndex.tensor_paths",
        "ShardedTensorIndex.base_path",
    ),
    GRAPH_MODULE: ("Executor.run", "Executor._run", "Executor._move_tensors"),
    RUN_YAML_MODULE: ("main.callback",),
    MULTIMERGE_MODULE: ("main.callback", "load_config"),
    WRITER_MODULE: (
        "TensorWriter._get_name_components",
        "TensorWriter._write_futures",
        "TensorWriter._executor",
        "TensorWriter.shards_written",
    ),
}


# --- the method registry ---------------------------------------------------------------


def registered_method(name: str) -> Optional["MergeMethod"]:
    """The method registered under ``name``, or None."""
    from mergekit.merge_methods import registry

    return next((m for m in registry.registered_methods() if m.spec.name == name), None)


def register_method(method: "MergeMethod") -> None:
    from mergekit.merge_methods import registry

    registry.register(method)


def unregister_method(name: str) -> Optional["MergeMethod"]:
    """Remove ``name`` from the registry (mergekit has no public way); returns what was there."""
    from mergekit.merge_methods import registry

    return registry._METHODS.pop(name, None)


@contextlib.contextmanager
def method_registered_as(method: "MergeMethod") -> Iterator["MergeMethod"]:
    """Register ``method`` under its name for the duration of the block, replacing whatever is
    registered there, and restore the previous state afterwards."""
    from mergekit.merge_methods import registry

    name = method.spec.name
    previous = registry._METHODS.get(name)
    registry._METHODS[name] = method
    try:
        yield method
    finally:
        if previous is None:
            registry._METHODS.pop(name, None)
        else:
            registry._METHODS[name] = previous


# --- planning without executing --------------------------------------------------------


def model_out_config(config: Any, arch_info: Any, trust_remote_code: bool = False) -> Any:
    """The output model's ``transformers`` config, as ``run_merge`` builds it."""
    from mergekit.merge import _model_out_config

    return _model_out_config(config, arch_info, trust_remote_code=trust_remote_code)


def plan_tensors(planner: Any) -> List[Tuple[Any, Any]]:
    """Plan the merge (normalize the config, one merge task per output tensor) without the
    writer or ``ReturnTensor`` wrappers; returns ``[(WeightInfo, merge task), ...]``."""
    planner._plan()
    return planned_tensors(planner)


def planned_tensors(planner: Any) -> List[Tuple[Any, Any]]:
    """``[(WeightInfo, merge task), ...]`` of a planner whose ``_plan`` has run."""
    return list(planner._tensors)


# --- hooks: checks before planning and after it, and the model card ---------------------

_config_checks: List[Callable[[Any, Optional[str]], None]] = []
_source_checks: List[Callable[[str], None]] = []
_plan_checks: List[Callable[[Any], None]] = []
_card_extensions: List[Callable[[Any, str], str]] = []
_merge_ends: List[Callable[[Any], None]] = []
_executor_choices: List[Callable[[Any, Any], Optional[Callable[..., Any]]]] = []
# The executor factory chosen for the run_merge in progress (None: mergekit's own Executor).
_chosen_executor = contextvars.ContextVar("mergekit_ace_executor", default=None)
# Set while run_merge runs, so the planner does not check the same config a second time.
_checked = contextvars.ContextVar("mergekit_ace_config_checked", default=False)
# Set while mergekit-ace plans a merge for its own checks: no hook runs.
_suppressed = contextvars.ContextVar("mergekit_ace_checks_suppressed", default=False)
# Configurations (their YAML) whose source text was checked as a whole before the merge
# (mergekit-multi, inspect), so the merge does not check them again from the configuration.
_source_checked: set = set()
_run_merge_calls = [0]


def on_config(check: Callable[[Any, Optional[str]], None]) -> None:
    """Call ``check(merge_configuration, source)`` at the start of every ``run_merge`` and
    every ``MergePlanner`` planning (once per merge), before any model is read. ``source`` is
    the YAML text the configuration was read from, where the caller gave it (``mergekit-yaml``
    does), else ``None``."""
    if check not in _config_checks:
        _config_checks.append(check)


def on_source(check: Callable[[str], None]) -> None:
    """Call ``check(yaml_text)`` with the text of the config file ``mergekit-multi`` is about
    to read (before it validates any document), and with the file ``mergekit-yaml`` read when
    mergekit refuses it before ``run_merge`` starts (an invalid config: the check can say
    what to write instead)."""
    if check not in _source_checks:
        _source_checks.append(check)


def _run_source_checks(source: str) -> None:
    for check in _source_checks:
        try:
            check(source)
        except Exception as error:  # a failing check must not change what mergekit does
            logging.getLogger("mergekit_ace").warning(
                "mergekit-ace could not check this configuration (%r)", error
            )


def mark_source_checked(config: Any) -> None:
    """Record that ``config`` (a ``MergeConfiguration``) was checked from its source text,
    so its merge's :func:`source_checked` says so (once)."""
    _source_checked.add(config.to_yaml())


def source_checked(config: Any) -> bool:
    """Whether ``config`` was checked from its source text before this merge (forgotten
    once asked: a later merge of the same configuration is checked again)."""
    text = config.to_yaml()
    if text in _source_checked:
        _source_checked.discard(text)
        return True
    return False


@contextlib.contextmanager
def checks_suppressed() -> Iterator[None]:
    """Plan without any hook (mergekit-ace's own checks plan merges to read them)."""
    token = _suppressed.set(True)
    try:
        yield
    finally:
        _suppressed.reset(token)


def config_as_written(planner: Any) -> Any:
    """The configuration of a ``MergePlanner`` as it was before planning rewrote it (the
    planner turns ``models:`` and ``slices:`` into ``modules:``)."""
    return getattr(planner, "_mergekit_ace_written", None) or planner.config


def on_plan(check: Callable[[Any], None]) -> None:
    """Call ``check(planner)`` after every ``MergePlanner`` planning, before any tensor is
    loaded; what it raises stops the merge."""
    if check not in _plan_checks:
        _plan_checks.append(check)


def on_merge_end(report: Callable[[Any], None]) -> None:
    """Call ``report(merge_configuration)`` when a ``run_merge`` has finished writing the
    merged model."""
    if report not in _merge_ends:
        _merge_ends.append(report)


def on_executor(choose: Callable[[Any, Any], Optional[Callable[..., Any]]]) -> None:
    """Let ``choose(merge_configuration, options)`` pick the executor of each ``run_merge``:
    a callable taking mergekit's ``Executor`` arguments (``targets, math_device,
    storage_device``) and returning an object with its ``run(quiet=...)``, or ``None`` to keep
    mergekit's own. The first choice that is not ``None`` wins; ``--multi-gpu`` merges keep
    mergekit's ``MultiGPUExecutor`` whatever is chosen (``run_merge`` does not build an
    ``Executor`` for them)."""
    if choose not in _executor_choices:
        _executor_choices.append(choose)


def _choose_executor(config: Any, options: Any) -> Optional[Callable[..., Any]]:
    for choose in _executor_choices:
        try:
            factory = choose(config, options)
        except Exception as error:  # a failing choice must not stop a merge mergekit accepts
            logging.getLogger("mergekit_ace").warning(
                "mergekit-ace could not choose an executor (%r); using mergekit's.", error
            )
            continue
        if factory is not None:
            return factory
    return None


def on_card(extend: Callable[[Any, str], str]) -> None:
    """Let ``extend(merge_configuration, card_markdown)`` rewrite the card that ``run_merge``
    writes as README.md."""
    if extend not in _card_extensions:
        _card_extensions.append(extend)


def _run_checks(config: Any, source: Optional[str] = None) -> None:
    for check in _config_checks:
        try:
            check(config, source)
        except Exception as error:  # a failing check must not stop a merge mergekit accepts
            logging.getLogger("mergekit_ace").warning(
                "mergekit-ace could not check this configuration (%r); run "
                "`mergekit-ace check CONFIG` for details.",
                error,
            )


def _patch_planner(module: Any) -> None:
    planner = module.MergePlanner
    original = planner._plan
    if getattr(original, "_mergekit_ace", False):
        return

    @functools.wraps(original)
    def _plan(self, *args, **kwargs):
        if _suppressed.get():
            return original(self, *args, **kwargs)
        if not _checked.get():
            _run_checks(self.config)
        self._mergekit_ace_written = self.config.model_copy(deep=True)
        result = original(self, *args, **kwargs)
        for check in _plan_checks:
            check(self)
        return result

    _plan._mergekit_ace = True
    planner._plan = _plan


def _patch_merge(module: Any) -> None:
    original_run = module.run_merge
    if getattr(original_run, "_mergekit_ace", False):
        return

    @functools.wraps(original_run)
    def run_merge(merge_config, *args, **kwargs):
        # run_merge(merge_config, out_path, options, config_source=None)
        source = kwargs.get("config_source", args[2] if len(args) > 2 else None)
        options = kwargs.get("options", args[1] if len(args) > 1 else None)
        _run_merge_calls[0] += 1
        _run_checks(merge_config, source if isinstance(source, str) else None)
        token = _checked.set(True)
        executor = _chosen_executor.set(_choose_executor(merge_config, options))
        try:
            result = original_run(merge_config, *args, **kwargs)
        finally:
            _chosen_executor.reset(executor)
            _checked.reset(token)
        for report in _merge_ends:
            report(merge_config)
        return result

    original_card = module.generate_card

    @functools.wraps(original_card)
    def generate_card(config, *args, **kwargs):
        card = original_card(config, *args, **kwargs)
        for extend in _card_extensions:
            card = extend(config, card)
        return card

    # run_merge builds its (single-device) executor by looking ``Executor`` up in its module
    original_executor = module.Executor

    def Executor(*args, **kwargs):
        return (_chosen_executor.get() or original_executor)(*args, **kwargs)

    Executor.mergekit_executor = original_executor
    run_merge._mergekit_ace = True
    module.run_merge = run_merge
    module.generate_card = generate_card
    module.Executor = Executor


# --- what the overlapped executor's worker threads need -------------------------------


def share_loader_cache() -> Callable[[], None]:
    """mergekit's ``LoaderCache`` is one instance per thread whose settings (LoRA cache,
    ``--lazy-unpickle``, ``--trust-remote-code``) ``run_merge`` sets on its own thread only.
    Called on that thread, returns a function that gives the calling (worker) thread's
    instance the same settings; the loaders themselves are shared by every instance."""
    from mergekit.io.tasks import LoaderCache

    settings = dict(vars(LoaderCache()))

    def install() -> None:
        vars(LoaderCache()).update(settings)

    return install


def unfinished_shards(writer: Any) -> List[str]:
    """Paths of the shard files a mergekit ``TensorWriter`` has started (under the temporary
    names ``model-N.safetensors`` that ``finalize`` renames), after waiting for its
    ``--async-write`` threads; the writer takes no more work."""
    for future in list(getattr(writer, "_write_futures", [])):
        try:
            future.result()
        except Exception:  # the error that matters was raised elsewhere
            pass
    pool = getattr(writer, "_executor", None)
    if pool is not None:
        pool.shutdown(wait=True, cancel_futures=True)
    prefix, extension = writer._get_name_components()
    return [
        os.path.join(writer.out_path, f"{prefix}-{index + 1}.{extension}")
        for index in range(writer.shards_written)
    ]


def _patch_run_yaml(module: Any) -> None:
    """mergekit-yaml: when mergekit refuses the file before ``run_merge`` starts, the source
    checks say what to write instead, then mergekit's own error follows."""
    command = module.main
    original = command.callback
    if getattr(original, "_mergekit_ace", False):
        return

    @functools.wraps(original)
    def callback(*args, **kwargs):
        calls = _run_merge_calls[0]
        try:
            return original(*args, **kwargs)
        except Exception:
            path = kwargs.get("config_file")
            if _run_merge_calls[0] == calls and path is not None:
                try:
                    with open(path, "r", encoding="utf-8") as file:
                        _run_source_checks(file.read())
                except OSError:
                    pass
            raise

    callback._mergekit_ace = True
    command.callback = callback


def _patch_multimerge(module: Any) -> None:
    """mergekit-multi: the whole recipe is checked before mergekit reads it (its stages'
    ``run_merge`` gets no source text)."""
    original = module.load_config
    if getattr(original, "_mergekit_ace", False):
        return

    @functools.wraps(original)
    def load_config(config_source, *args, **kwargs):
        _run_source_checks(config_source)
        configs, dependencies = original(config_source, *args, **kwargs)
        for config in configs.values():
            mark_source_checked(config)
        return configs, dependencies

    load_config._mergekit_ace = True
    module.load_config = load_config


_PATCHES = {
    PLANNER_MODULE: _patch_planner,
    MERGE_MODULE: _patch_merge,
    RUN_YAML_MODULE: _patch_run_yaml,
    MULTIMERGE_MODULE: _patch_multimerge,
}
PATCHED_MODULES = tuple(_PATCHES)


def patch_loaded(name: str) -> bool:
    """Install the hooks into module ``name`` if it has finished loading; returns whether it
    is patched. Idempotent."""
    module = sys.modules.get(name)
    # the last name each module defines: present once its import has finished
    last = {
        PLANNER_MODULE: "MergePlanner",
        MERGE_MODULE: "__all__",
        RUN_YAML_MODULE: "main",
        MULTIMERGE_MODULE: "load_config",
    }[name]
    if module is None or not hasattr(module, last):
        return False  # not imported yet, or being imported: the start-up hook patches it
    _PATCHES[name](module)
    return True


# --- the task graph of a planned merge -------------------------------------------------


@dataclass(frozen=True)
class PlannedTensor:
    """What one merge task of a planned merge (``ExecuteMergeMethodTask``) says: the output
    tensor's ``name``, the ``method``, the ``base`` model and the ``models`` in mergekit's
    order (base included), the resolved shared ``parameters`` and per-model
    ``model_parameters``, and the ``task`` itself (what an executor runs)."""

    name: str
    method: str
    base: Any
    models: Tuple[Any, ...]
    parameters: Dict[str, Any]
    model_parameters: Dict[Any, Dict[str, Any]]
    task: Any

    @property
    def experts(self) -> List[Any]:
        return [model for model in self.models if model != self.base]


def planned_tensor(merge_task: Any) -> PlannedTensor:
    return PlannedTensor(
        name=merge_task.output_weight.name,
        method=str(merge_task.method_name),
        base=merge_task.base_model,
        models=tuple(merge_task.model_order),
        parameters=dict(merge_task.parameters.items()),
        model_parameters={m: dict(v.items()) for m, v in merge_task.input_parameters.items()},
        task=merge_task,
    )


def merge_tasks(tasks: Iterable[Any]) -> List[PlannedTensor]:
    """The merge tasks (``ExecuteMergeMethodTask``) among the tasks of a task graph, read."""
    from mergekit.merge_methods.task_adapter import ExecuteMergeMethodTask

    return [planned_tensor(task) for task in tasks if isinstance(task, ExecuteMergeMethodTask)]


def gather_of(merge_task: Any) -> Any:
    """The ``GatherTensors`` task under a merge task (through any vocabulary alignment)."""
    inner = merge_task.gather_tensors
    while not hasattr(inner, "weight_info") and hasattr(inner, "gather_tensors"):
        inner = inner.gather_tensors
    return inner


def rows_aligned(merge_task: Any) -> bool:
    """Whether mergekit aligns the inputs' rows (a ``tokenizer:`` section) before merging."""
    return not hasattr(merge_task.gather_tensors, "weight_info")


def input_weights(merge_task: Any) -> Dict[Any, Any]:
    """``{model: WeightInfo}`` of the tensors a merge task loads."""
    return dict(gather_of(merge_task).weight_info.items())


def load_dtype(merge_task: Any) -> Optional[str]:
    """The dtype the configuration asks mergekit to load a merge task's inputs in (``None``:
    as stored)."""
    return gather_of(merge_task).dtype


def tensor_file(model: Any, weight_info: Any) -> Optional[Tuple[str, str]]:
    """``(path of the file that holds it, name in that file)`` of one input tensor, from the
    model's index (mergekit's loader cache, as configured for the merge), looking through
    the tensor's aliases and tied names; ``None`` if the model has no such tensor."""
    from mergekit.io.tasks import LoaderCache

    index = LoaderCache().get(model).index
    names = [weight_info.name, *(weight_info.aliases or ()), *(weight_info.tied_names or ())]
    for name in names:
        path = index.tensor_paths.get(name)
        if path is not None:
            return os.path.join(index.base_path, path), name
    return None


def execute(
    tasks: List[Any], *, math_device: Any, storage_device: Any, quiet: bool, desc: str
) -> Iterator[Tuple[Any, Any]]:
    """Run merge ``tasks`` with mergekit's executor; yields ``(task, merged tensor)``."""
    from mergekit.graph import Executor

    executor = Executor(targets=tasks, math_device=math_device, storage_device=storage_device)
    yield from executor.run(quiet=quiet, desc=desc)
