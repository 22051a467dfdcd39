"""Overlapped execution of a merge: while one tensor merges, the next tensors' inputs are read
and finished tensors are written.

mergekit's ``Executor`` loads a tensor's inputs, merges, moves the result back and hands it to
the writer, one task after another, so a merge method's compute adds to the time spent reading
and writing checkpoints. :class:`OverlappedExecutor` runs the same schedule
(``mergekit.graph.build_schedule``) with the same tasks (mergekit's ``LoadTensor``,
``SaveTensor``, its ``TensorWriter`` and loaders) on three threads:

- a **reader** runs every ``LoadTensor`` in schedule order, ahead of the merges: it touches the
  pages of memory-mapped inputs (so the disk read happens there, not inside the merge) and,
  when the merge runs on a GPU, stages the tensor through a ring of pinned host buffers and
  copies it to the GPU on a CUDA stream of its own;
- the **main thread** runs everything else in schedule order (the merges among it), exactly as
  mergekit's executor does, and hands each finished tensor to the writer;
- a **writer** runs every ``SaveTensor`` in schedule order (mergekit's ``TensorWriter`` groups
  tensors into the same shards as the serial executor, so the files are byte-identical); on a
  GPU it first copies the result back through pinned buffers of its own, on its own stream.

What the reader holds ahead of the merges and the results not yet written are bounded by one
look-ahead in bytes (``MERGEKIT_ACE_LOOKAHEAD``; default: a quarter of the largest tensor's
inputs, which task arithmetic holds at once too, so peak host and GPU memory stay within 1.25x
of its). An error in the reader or the writer is raised on the main thread, naming the tensor;
then the writer's unfinished shards are removed, so nothing of a failed merge is left that
looks complete. mergekit's merges keep mergekit's executor. So do merges on a CPU whose every
core the merge's own threads use (the reader's and writer's work would come out of the merge's
time there; docs/performance.md); ``MERGEKIT_ACE_OVERLAP=1`` overlaps them anyway, ``=0`` keeps
mergekit's executor for this package's methods everywhere.
"""

from __future__ import annotations

import collections
import logging
import math
import os
import re
import threading
import types
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Optional, Set, Tuple

import torch
import tqdm
from mergekit.graph import Executor, TaskHandle
from mergekit.io.tasks import (
    FinalizeModel,
    GatherTensors,
    LoadTensor,
    SaveTensor,
    TensorWriterTask,
)

from mergekit_ace import compat

LOG = logging.getLogger("mergekit_ace")

# unset or auto: overlap where it gains (see choose_executor); 1 / on: always; 0 / off: never
SWITCH_VARIABLE = "MERGEKIT_ACE_OVERLAP"
LOOKAHEAD_VARIABLE = "MERGEKIT_ACE_LOOKAHEAD"  # bytes: 0, 512M, 2G, 1.5GiB, ...
LOOKAHEAD_SHARE = 0.25  # of the largest tensor's inputs
LOOKAHEAD_UNKNOWN = 256 * 2**20  # when the checkpoints' headers do not give the sizes
STAGING_CHUNK_BYTES = 32 * 2**20
STAGING_SLOTS = 4
PAGE_BYTES = 4096
READ, WRITE = "read", "write"
_OFF = {"0", "off", "false", "no"}
_ON = {"1", "on", "true", "yes"}
_UNITS = {
    "": 1,
    "k": 10**3,
    "m": 10**6,
    "g": 10**9,
    "t": 10**12,
    "ki": 2**10,
    "mi": 2**20,
    "gi": 2**30,
    "ti": 2**40,
}
_ELEMENT_BYTES = {
    "F64": 8,
    "I64": 8,
    "U64": 8,
    "F32": 4,
    "I32": 4,
    "U32": 4,
    "F16": 2,
    "BF16": 2,
    "I16": 2,
    "U16": 2,
    "I8": 1,
    "U8": 1,
    "BOOL": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
}


def parse_bytes(text: str) -> int:
    """``"512M"``, ``"2G"``, ``"1.5GiB"``, ``"0"`` -> bytes (K/M/G/T are powers of 1000,
    Ki/Mi/Gi/Ti of 1024; a trailing B is optional)."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kmgt]i?)?b?\s*", str(text), re.IGNORECASE)
    if not match:
        raise ValueError(
            f"{LOOKAHEAD_VARIABLE}={text!r} is not a size in bytes (e.g. 0, 512M, 2G, 1.5GiB)"
        )
    return int(float(match.group(1)) * _UNITS[(match.group(2) or "").lower()])


def overlap_setting() -> str:
    """``"off"``, ``"on"`` or ``"auto"`` (also when unset or empty) from
    :data:`SWITCH_VARIABLE`; any other value is refused."""
    value = os.environ.get(SWITCH_VARIABLE, "").strip().lower()
    if value in _OFF:
        return "off"
    if value in _ON:
        return "on"
    if value in ("", "auto"):
        return "auto"
    raise ValueError(
        f"{SWITCH_VARIABLE}={os.environ[SWITCH_VARIABLE]!r} is not a setting: use 1 (overlap "
        "every merge of mergekit-ace's methods), 0 (none), or auto / unset (on a GPU, and on a "
        "CPU with a core left beside the merge's threads)."
    )


def available_cpus() -> int:
    """The logical CPUs this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def choose_executor(config: Any, options: Any) -> Optional[Any]:
    """The executor of a ``run_merge`` (:func:`mergekit_ace.compat.on_executor`): overlapped
    for merges with this package's methods on one CUDA device, or on the CPU where a CPU is
    left beside the merge's threads (or :data:`SWITCH_VARIABLE` is on); else mergekit's."""
    from mergekit_ace.methods import is_ours

    if not is_ours(str(getattr(config, "merge_method", ""))):
        return None
    if getattr(options, "multi_gpu", False):
        return None
    switch = overlap_setting()
    if switch == "off":
        LOG.info(
            "mergekit-ace: %s=%s, so mergekit's serial executor runs this merge.",
            SWITCH_VARIABLE,
            os.environ[SWITCH_VARIABLE],
        )
        return None
    device = torch.device(getattr(options, "device", None) or "cpu")
    if device.type not in ("cpu", "cuda"):
        return None
    cpus, threads = available_cpus(), torch.get_num_threads()
    if device.type == "cpu" and switch == "auto" and threads >= cpus:
        LOG.info(
            "mergekit-ace: the merge's %d threads use all %d CPUs, so mergekit's serial "
            "executor runs this merge (reading ahead on another thread would take CPU time "
            "from the merge; %s=1 overlaps anyway).",
            threads,
            cpus,
            SWITCH_VARIABLE,
        )
        return None
    setting = os.environ.get(LOOKAHEAD_VARIABLE)
    lookahead = parse_bytes(setting) if setting is not None and setting.strip() else None

    def build(targets, math_device=None, storage_device=None, **kwargs):
        return OverlappedExecutor(
            targets,
            math_device=math_device or "cpu",
            storage_device=storage_device or "cpu",
            lookahead_bytes=lookahead,
            **kwargs,
        )

    return build


class MergeIOError(RuntimeError):
    """Reading an input tensor or writing a merged one failed on the reader's or the writer's
    thread; raised on the main thread, naming the tensor."""


class _Aborted(Exception):
    """A worker thread stops because the merge failed elsewhere."""


@dataclass
class _Read:
    value: Any
    nbytes: int
    event: Any = None  # the staging copy's end on the copy stream
    finish: Optional[Tuple[torch.device, Optional[torch.dtype]]] = None  # left to the main thread
    staged: bool = False


@dataclass
class _Write:
    handle: TaskHandle
    arguments: Dict[str, Any]
    nbytes: int
    event: Any = None  # the result's end on the main thread's stream


@dataclass
class _Progress:
    """The main thread's state through one run: values alive, the targets and those yielded,
    writes handed to the writer and not yet ended, the writers started and finalized."""

    values: Dict[TaskHandle, Any]
    targets: Set[TaskHandle]
    yielded: Set[TaskHandle] = field(default_factory=set)
    pending: Set[TaskHandle] = field(default_factory=set)
    writers: List[Any] = field(default_factory=list)
    finalized: Set[int] = field(default_factory=set)


class Budget:
    """Bytes the reader holds ahead of the merges plus results not yet written, against one
    limit, and everything the three threads wait for, under one condition variable.

    A read is admitted while the total stays within the limit, or when nothing is held at all
    (one input larger than the limit still passes); a hand-off to the writer while the total
    stays within the limit, or when no write is pending (the main thread must never wait for
    itself to consume reads). So the total exceeds the limit by at most one tensor.
    """

    def __init__(self, limit: int):
        self.limit = max(0, int(limit))
        self.held = {READ: 0, WRITE: 0}
        self.peak = 0
        self.cv = threading.Condition()
        self.failure: Optional[BaseException] = None
        self.abort = False

    def fits(self, nbytes: int, kind: str) -> bool:
        total = self.held[READ] + self.held[WRITE]
        if total + nbytes <= self.limit:
            return True
        return total == 0 if kind == READ else self.held[WRITE] == 0

    def acquire(self, nbytes: int, kind: str) -> None:
        """Reads are acquired by the reader, writes by the main thread (see :meth:`wait_for`)."""
        with self.cv:
            self.wait_for(lambda: self.fits(nbytes, kind), main=kind == WRITE)
            self.held[kind] += nbytes
            self.peak = max(self.peak, self.held[READ] + self.held[WRITE])

    def release(self, nbytes: int, kind: str) -> None:
        with self.cv:
            self.held[kind] -= nbytes
            self.cv.notify_all()

    def wait_for(self, ready, main: bool = False) -> None:
        """Wait (holding ``cv``) until ``ready()``. Once a worker has failed, the main thread
        (``main``) raises its error; a worker thread, like every thread once the merge is
        aborted, raises :class:`_Aborted`."""
        self.cv.wait_for(lambda: self.failure is not None or self.abort or ready())
        if self.failure is not None and main:
            raise self.failure
        if self.failure is not None or self.abort:
            raise _Aborted()

    @property
    def stopped(self) -> bool:
        return self.failure is not None or self.abort

    def fail(self, error: BaseException) -> None:
        with self.cv:
            if self.failure is None:
                self.failure = error
            self.cv.notify_all()


class Staging:
    """Copies between the host and ``device`` through ``slots`` pinned host buffers of
    ``chunk_bytes`` on a stream of its own, one chunk on the DMA engine while the CPU copies
    another into or out of its buffer. To the device (:meth:`copy`, the reader): the CPU reads
    a chunk of the memory-mapped checkpoint into a free buffer, and the main thread's stream
    only waits for the returned event. Back to the host (:meth:`to_host`, the writer): pinned
    buffers let the DMA engine write the result at full speed, where a copy into pageable
    memory runs at a fraction of it and holds up the other threads' CUDA calls while it runs.
    A buffer is reused once the copy out of it has ended. On a CPU ``device`` the same code
    runs with plain buffers and no events (tests)."""

    def __init__(self, device, chunk_bytes: int = STAGING_CHUNK_BYTES, slots: int = STAGING_SLOTS):
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.stream = torch.cuda.Stream(self.device) if self.cuda else None
        self.chunk = chunk_bytes
        self.buffers = [
            torch.empty(chunk_bytes, dtype=torch.uint8, pin_memory=self.cuda) for _ in range(slots)
        ]
        self.pending: List[Any] = [None] * slots
        self.slot = 0

    def record(self) -> Any:
        if not self.cuda:
            return None
        event = torch.cuda.Event()
        event.record(self.stream)
        return event

    def copy(
        self, tensor: torch.Tensor, dtype: Optional[torch.dtype] = None
    ) -> Tuple[torch.Tensor, Any]:
        """``tensor`` on the device (then cast to ``dtype``, there); the event marks the end
        of the copy on the staging stream."""
        with torch.cuda.stream(self.stream) if self.cuda else _nothing():
            source = tensor.contiguous()
            out = torch.empty(source.shape, dtype=source.dtype, device=self.device)
            for slot, buffer, piece, target in self._ring(as_bytes(source), as_bytes(out)):
                buffer.copy_(piece)
                target.copy_(buffer, non_blocking=self.cuda)
                self.pending[slot] = self.record()
            if dtype is not None and dtype != out.dtype:
                out = out.to(dtype)
            return out, self.record()

    def to_host(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor``, on the device, in a new contiguous host tensor; returns once every byte
        has arrived. The copies run on this object's stream, which must already wait for
        whatever computes ``tensor``."""
        with torch.cuda.stream(self.stream) if self.cuda else _nothing():
            source = tensor.contiguous()
            out = torch.empty(source.shape, dtype=source.dtype)
            arriving: collections.deque = collections.deque()
            for _slot, buffer, piece, target in self._ring(as_bytes(source), as_bytes(out)):
                buffer.copy_(piece, non_blocking=self.cuda)
                arriving.append((buffer, target, self.record()))
                if len(arriving) == len(self.buffers):
                    _unload(*arriving.popleft())
            while arriving:
                _unload(*arriving.popleft())
        return out

    def _ring(self, src: torch.Tensor, dst: torch.Tensor):
        """``(slot, buffer, src chunk, dst chunk)`` for each chunk of the byte views ``src``
        and ``dst``, the buffers taken in turn, each once the copy pending out of it ended."""
        for start in range(0, src.numel(), self.chunk):
            stop = min(start + self.chunk, src.numel())
            slot, self.slot = self.slot, (self.slot + 1) % len(self.buffers)
            if self.pending[slot] is not None:
                self.pending[slot].synchronize()
                self.pending[slot] = None
            yield slot, self.buffers[slot][: stop - start], src[start:stop], dst[start:stop]


def _unload(buffer: torch.Tensor, destination: torch.Tensor, event: Any) -> None:
    """Copy a chunk out of its pinned buffer once it has arrived there."""
    if event is not None:
        event.synchronize()
    destination.copy_(buffer)


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def as_bytes(tensor: torch.Tensor) -> torch.Tensor:
    """A contiguous tensor's storage as a flat ``uint8`` view."""
    return tensor.reshape(-1).view(torch.uint8)


def touch_pages(tensor: torch.Tensor) -> None:
    """Read one byte per page of a host tensor, so that a memory-mapped checkpoint is read from
    the disk (or mapped from the page cache) here rather than inside the merge."""
    if tensor.device.type == "cpu" and tensor.numel() and tensor.is_contiguous():
        as_bytes(tensor)[::PAGE_BYTES].max()


def tensor_bytes(value: Any) -> int:
    return sum(t.numel() * t.element_size() for t in tensors_in(value))


def _map_tensors(value: Any, move: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """``value`` with ``move`` applied to every tensor in it (the nesting of mergekit's
    ``Executor._move_tensors``)."""
    if isinstance(value, torch.Tensor):
        return move(value)
    if isinstance(value, dict):
        return {k: _map_tensors(v, move) for k, v in value.items()}
    if isinstance(value, list):
        return [_map_tensors(v, move) for v in value]
    if isinstance(value, tuple):
        return tuple(_map_tensors(v, move) for v in value)
    return value


def tensors_in(value: Any) -> Iterator[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from tensors_in(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from tensors_in(v)


def _dtype(name: Optional[str]) -> Optional[torch.dtype]:
    from mergekit.common import dtype_from_name

    return dtype_from_name(name) if name else None


def input_bytes(task: LoadTensor) -> Optional[int]:
    """Bytes of one ``LoadTensor``'s result, from the safetensors header (0 when the model
    lacks the tensor); ``None`` when the header cannot tell."""
    from mergekit_ace.shapes import header_entry

    info = types.SimpleNamespace(name=task.tensor, aliases=task.aliases, tied_names=task.tied_names)
    try:
        entry = header_entry(task.model, info, required=False)
    except Exception:
        return None
    if entry is None:
        return None
    shape, stored = entry
    element = _dtype(task.dtype).itemsize if task.dtype else _ELEMENT_BYTES.get(stored)
    return None if element is None else math.prod(shape) * element


def _ace_workspace(planned: compat.PlannedTensor) -> Optional[int]:
    """The workspace ACE's out-of-memory check estimates for one merge task on a GPU, from
    the base tensor's header and the task's parameters; ``None`` when the header does not
    tell or the tensor is not a matrix."""
    from mergekit_ace.kernels.ace.cost import estimate_ace_cost
    from mergekit_ace.kernels.ace.parameters import ACE_PARAMETERS
    from mergekit_ace.shapes import header_entry

    base = planned.base
    try:
        shape, _stored = header_entry(base, compat.input_weights(planned.task)[base])
    except Exception:
        return None
    if len(shape) != 2:
        return None
    dtype = compat.load_dtype(planned.task)
    try:
        given = ACE_PARAMETERS.check(
            **{
                name: value
                for name, value in planned.parameters.items()
                if name in ("refine", "k_frac", "matmul_precision")
            }
        )
    except ValueError:  # the kernel refuses the value itself, naming it
        return None
    params = {
        name: given.get(name, ACE_PARAMETERS.default(name))
        for name in ("refine", "k_frac", "matmul_precision")
    }
    matmul = "float32" if params["matmul_precision"] in ("float32", "tf32") else "tf32x3"
    return estimate_ace_cost(
        shape,
        max(1, len(planned.experts)),
        8 if dtype == "float64" else 4,
        k_frac=params["k_frac"] if params["refine"] else 0.0,
        matmul=matmul,
    )["bytes"]


class OverlappedExecutor(Executor):
    """mergekit's ``Executor`` with its schedule run on three threads (the module's docstring);
    ``lookahead_bytes`` bounds what the reader and the writer hold beyond the serial
    executor (``None``: :data:`LOOKAHEAD_SHARE` of the largest tensor's inputs)."""

    def __init__(
        self,
        targets,
        math_device="cpu",
        storage_device="cpu",
        cached_values=None,
        lookahead_bytes: Optional[int] = None,
    ):
        super().__init__(
            targets,
            math_device=math_device,
            storage_device=storage_device,
            cached_values=cached_values,
        )
        self.reads = [h for h in self.schedule.tasks if isinstance(h.task(), LoadTensor)]
        self.writes = {h for h in self.schedule.tasks if isinstance(h.task(), SaveTensor)}
        self.dependents: Dict[TaskHandle, List[TaskHandle]] = collections.defaultdict(list)
        for handle in self.schedule.tasks:
            for dep in handle.arguments().values():
                self.dependents[dep].append(handle)
        self.lookahead_bytes = (
            self.default_lookahead() if lookahead_bytes is None else int(lookahead_bytes)
        )
        self.placement = {h: self._placement(h) for h in self.reads}
        self.device_reserve = self._device_reserve() if self._on_cuda(self.math_device) else 0
        self.staging: Optional[Staging] = None  # the reader's copies to the GPU
        self.unstaging: Optional[Staging] = None  # the writer's copies back
        LOG.info(
            "mergekit-ace: reading up to %s ahead of the merges and writing behind them on "
            "threads of their own (%s=0 runs mergekit's serial executor; %s sets the "
            "look-ahead).",
            f"{self.lookahead_bytes / 2**20:.1f} MiB",
            SWITCH_VARIABLE,
            LOOKAHEAD_VARIABLE,
        )

    # --- planning -------------------------------------------------------------------------

    @staticmethod
    def _on_cuda(device) -> bool:
        return device is not None and torch.device(device).type == "cuda"

    def default_lookahead(self) -> int:
        """:data:`LOOKAHEAD_SHARE` of the largest tensor's inputs (a ``GatherTensors``' reads),
        from the checkpoints' headers; :data:`LOOKAHEAD_UNKNOWN` where they do not tell."""
        groups: Dict[TaskHandle, int] = collections.defaultdict(int)
        for handle in self.reads:
            size = input_bytes(handle.task())
            if size is None:
                return LOOKAHEAD_UNKNOWN
            for consumer in self.dependents.get(handle) or [handle]:
                groups[consumer] += size
        return int(LOOKAHEAD_SHARE * max(groups.values(), default=0))

    def _placement(self, handle: TaskHandle) -> Optional[torch.device]:
        """Where the reader leaves a read: the device of ``--read-to-gpu`` or of
        ``--low-cpu-memory`` (mergekit keeps it there), else the GPU when every consumer is a
        ``GatherTensors`` that feeds only GPU tasks, else the host."""
        task = handle.task()
        if task.device and self._on_cuda(task.device):
            return torch.device(task.device)
        if self._on_cuda(self.storage_device):
            return torch.device(self.storage_device)
        if not self._on_cuda(self.math_device):
            return None
        consumers = self.dependents.get(handle, [])
        feeds_gpu = consumers and all(
            isinstance(c.task(), GatherTensors)
            and self.dependents.get(c)
            and all(d.task().uses_accelerator() for d in self.dependents[c])
            for c in consumers
        )
        return torch.device(self.math_device) if feeds_gpu else None

    def _device_reserve(self) -> int:
        """GPU memory the look-ahead leaves free: the most any ACE tensor's out-of-memory
        check asks for (``needs_cpu_fallback``), so that a tensor merged on the GPU by
        mergekit's executor is merged there by this one too. ``matmul_precision: auto`` is
        counted as ``tf32x3``, the larger workspace of the two it can resolve to."""
        from mergekit_ace.kernels.ace.fallback import CUDA_HEADROOM

        needs = [
            _ace_workspace(planned)
            for planned in compat.merge_tasks(self.universe.tasks)
            if planned.method == "ace"
        ]
        return max((int(need / CUDA_HEADROOM) for need in needs if need), default=0)

    def _device_room(self, device: torch.device, nbytes: int) -> bool:
        """Whether ``nbytes`` more on ``device`` leave the reserve free."""
        if not self._on_cuda(device):
            return True
        from mergekit_ace.kernels.ace.fallback import cuda_free_bytes

        return cuda_free_bytes(device) - nbytes >= self.device_reserve

    # --- the worker threads ---------------------------------------------------------------

    def _worker(self, body, install_loaders, stream, threads: int) -> None:
        # One intra-op thread here: the merge on the main thread keeps the cores. PyTorch
        # stores the count process-wide too (threads that start using it later read it), so
        # the process's count is put back at the end.
        torch.set_num_threads(1)
        install_loaders()
        try:
            with torch.cuda.stream(stream) if stream is not None else _nothing():
                body()
        except _Aborted:
            pass
        finally:
            torch.set_num_threads(threads)

    def _read(self, handle: TaskHandle) -> _Read:
        """Run one ``LoadTensor`` and place its result (:meth:`_placement`)."""
        task = handle.task()
        device = self.placement[handle]
        if task.device and torch.device(task.device).type != "cpu":
            # --read-to-gpu: read on the host, copy and cast on the device (mergekit: safetensors
            # copies to the device, then LoadTensor casts there)
            value = task.model_copy(update={"device": None, "dtype": None}).execute()
            dtype = _dtype(task.dtype)
        else:
            value, dtype = task.execute(), None
        if value is None:
            return _Read(None, 0)
        nbytes = tensor_bytes(value) if dtype is None else value.numel() * dtype.itemsize
        self.budget.acquire(nbytes, READ)
        moves = device is not None and value.device != device
        if moves and self.staging is not None and self._device_room(device, nbytes):
            value, event = self.staging.copy(value, dtype)  # reads the pages itself
            return _Read(value, nbytes, event=event, staged=True)
        touch_pages(value)
        if not moves:
            return _Read(value, nbytes)
        return _Read(value, nbytes, finish=(device, dtype) if task.device else None)

    def _read_all(self) -> None:
        for handle in self.reads:
            if self.budget.stopped:
                return
            try:
                item = self._read(handle)
            except _Aborted:
                raise
            except BaseException as error:
                task = handle.task()
                failure = MergeIOError(
                    f"mergekit-ace: reading tensor {task.tensor!r} of model "
                    f"{task.model} failed: {error}"
                )
                failure.__cause__ = error
                self.budget.fail(failure)
                return
            with self.budget.cv:
                self.ready[handle] = item
                self.budget.cv.notify_all()

    def _write(self, item: _Write) -> None:
        """Run one ``SaveTensor`` (after moving its tensor to the storage device, as mergekit's
        executor does as soon as the tensor is computed)."""
        if item.event is not None:
            torch.cuda.current_stream().wait_event(item.event)
        arguments = {k: self._to_storage(v) for k, v in item.arguments.items()}
        item.handle.task().execute(**arguments)
        if self.staging is not None:
            torch.cuda.current_stream().synchronize()

    def _to_storage(self, value: Any) -> Any:
        """``value`` on the storage device, as mergekit's executor moves it; GPU tensors come
        back to the host through the writer's pinned buffers."""
        if self.unstaging is None or self._on_cuda(self.storage_device):
            return self._move_tensors(value, self.storage_device)
        return _map_tensors(value, lambda t: self.unstaging.to_host(t) if t.is_cuda else t)

    def _write_all(self) -> None:
        budget = self.budget
        while True:
            with budget.cv:
                budget.wait_for(lambda: self.queue or self.closed)
                if not self.queue:
                    return
                item = self.queue.popleft()
            try:
                self._write(item)
            except BaseException as error:
                task = item.handle.task()
                failure = MergeIOError(
                    f"mergekit-ace: writing tensor {task.tensor_name!r} to "
                    f"{task.writer_task.out_path} failed: {error}"
                )
                failure.__cause__ = error
                budget.fail(failure)
                return
            finally:
                del item.arguments
            with budget.cv:
                self.done.add(item.handle)
                budget.held[WRITE] -= item.nbytes
                budget.cv.notify_all()

    # --- the main thread ------------------------------------------------------------------

    def _take(self, handle: TaskHandle) -> Any:
        """The reader's result for ``handle``, usable by the main thread's stream."""
        with self.budget.cv:
            self.budget.wait_for(lambda: handle in self.ready, main=True)
            item = self.ready.pop(handle)
        value = item.value
        if item.finish is not None:
            device, dtype = item.finish
            value = value.to(device)
            if dtype is not None and dtype != value.dtype:
                value = value.to(dtype)
        if item.event is not None:
            stream = torch.cuda.current_stream(self.staging.device)
            stream.wait_event(item.event)
            for tensor in tensors_in(value):
                tensor.record_stream(stream)
        self.budget.release(item.nbytes, READ)
        if not item.staged and item.finish is None:
            value = self._move_tensors(value, self.storage_device)
        return value

    def _hand_off(self, handle: TaskHandle, arguments: Dict[str, Any]) -> None:
        event = None
        if self.staging is not None and any(t.is_cuda for t in tensors_in(arguments)):
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(self.staging.device))
        item = _Write(handle, arguments, tensor_bytes(arguments), event)
        self.budget.acquire(item.nbytes, WRITE)
        with self.budget.cv:
            self.queue.append(item)
            self.budget.cv.notify_all()

    def _wait_written(self, handles) -> None:
        with self.budget.cv:
            self.budget.wait_for(lambda: all(h in self.done for h in handles), main=True)

    def _stays_on_device(self, handle: TaskHandle) -> bool:
        """A ``GatherTensors`` of placed reads that feeds only GPU tasks keeps them on the
        GPU (mergekit's executor would move them to the host and back)."""
        consumers = self.dependents.get(handle, [])
        return (
            isinstance(handle.task(), GatherTensors)
            and bool(consumers)
            and all(c.task().uses_accelerator() for c in consumers)
            and all(self.placement.get(dep) is not None for dep in handle.arguments().values())
        )

    def _hands_result_on(self, handle: TaskHandle, result: Any) -> bool:
        """A GPU result read only by writes goes to the writer as it is: the writer copies it
        back, on its own stream, while the next tensor merges (unless the GPU is short of the
        memory the look-ahead must leave free)."""
        consumers = self.dependents.get(handle, [])
        return (
            self.staging is not None
            and not self._on_cuda(self.storage_device)
            and bool(consumers)
            and all(c in self.writes for c in consumers)
            and any(t.is_cuda for t in tensors_in(result))
            and self._device_room(torch.device(self.math_device), 0)
        )

    def _run(
        self, quiet: bool = False, desc: Optional[str] = None
    ) -> Iterator[Tuple[TaskHandle, Any]]:
        threads = self._start_workers()
        run = _Progress(values=dict(self.cached_values or {}), targets=set(self.targets))
        last_use = self.schedule.last_use_index
        succeeded = False
        try:
            with tqdm.tqdm(
                total=len(self.schedule.tasks), disable=quiet, desc=desc or "Executing graph"
            ) as bar:
                for idx, handle in enumerate(self.schedule.tasks):
                    self._step(handle, run)
                    bar.update()
                    yield from self._finished(handle, run)
                    for key in [k for k in run.values if idx >= last_use[k]]:
                        del run.values[key]
            with self.budget.cv:
                self.closed = True
                self.budget.cv.notify_all()
            self._wait_written(run.pending)
            for done in run.pending:
                if done in run.targets and done not in run.yielded:
                    yield done, None
            succeeded = True
        finally:
            self._stop(threads, succeeded, run)

    def _start_workers(self) -> List[threading.Thread]:
        """Start the reader and the writer (one torch thread each, mergekit's loader settings,
        a CUDA stream each when a GPU takes part)."""
        if self._on_cuda(self.math_device) or self._on_cuda(self.storage_device):
            device = self.math_device if self._on_cuda(self.math_device) else self.storage_device
            self.staging, self.unstaging = Staging(device), Staging(device)
        self.budget = Budget(self.lookahead_bytes)
        self.ready: Dict[TaskHandle, _Read] = {}
        self.queue: collections.deque = collections.deque()
        self.done: Set[TaskHandle] = set()
        self.closed = False
        install_loaders = compat.share_loader_cache()
        threads_here = torch.get_num_threads()  # also fixes this thread's count before the workers'
        streams = (
            (self.staging.stream, self.unstaging.stream)
            if self.staging is not None
            else (None, None)
        )
        threads = [
            threading.Thread(
                target=self._worker,
                args=(body, install_loaders, stream, threads_here),
                name=f"mergekit-ace-{name}",
                daemon=True,
            )
            for name, body, stream in (
                ("reader", self._read_all, streams[0]),
                ("writer", self._write_all, streams[1]),
            )
        ]
        for thread in threads:
            thread.start()
        return threads

    def _step(self, handle: TaskHandle, run: "_Progress") -> None:
        """Run one task of the schedule: a read is taken from the reader, a write handed to the
        writer, anything else (the merges among it) run here, as mergekit's executor does."""
        task = handle.task()
        if handle in self.writes:
            self._hand_off(
                handle, {name: run.values[dep] for name, dep in handle.arguments().items()}
            )
            run.pending.add(handle)
            run.values[handle] = None
        elif isinstance(task, LoadTensor):
            run.values[handle] = self._take(handle)
        else:
            run.values[handle] = self._compute(handle, run)

    def _compute(self, handle: TaskHandle, run: "_Progress") -> Any:
        task = handle.task()
        arguments = handle.arguments()
        waiting = [dep for dep in arguments.values() if dep in run.pending]
        if waiting:
            self._wait_written(waiting)
            run.pending.difference_update(waiting)
        use_device = task.uses_accelerator()
        kwargs = {
            name: (
                self._move_tensors(run.values[dep], self.math_device)
                if use_device
                else run.values[dep]
            )
            for name, dep in arguments.items()
        }
        result = task.execute(**kwargs)
        del kwargs
        if not (self._stays_on_device(handle) or self._hands_result_on(handle, result)):
            result = self._move_tensors(result, self.storage_device)
        if isinstance(task, TensorWriterTask):
            run.writers.append(result)
        elif isinstance(task, FinalizeModel):
            run.finalized.add(id(run.values[arguments["writer"]]))
        return result

    def _finished(self, handle: TaskHandle, run: "_Progress") -> Iterator[Tuple[TaskHandle, Any]]:
        """The targets finished by this step: ``handle`` itself unless the writer has it, and
        every write the writer has ended since the last step."""
        if handle in run.targets and handle not in run.pending:
            run.yielded.add(handle)
            yield handle, run.values[handle]
        with self.budget.cv:
            written = [h for h in run.pending if h in self.done]
        for done in written:
            run.pending.discard(done)
            if done in run.targets:
                run.yielded.add(done)
                yield done, None

    def _stop(self, threads: List[threading.Thread], succeeded: bool, run: "_Progress") -> None:
        """Stop the workers (aborting them unless the run ``succeeded``) and, after a failure,
        remove the shards of every writer not finalized."""
        with self.budget.cv:
            self.closed = True
            self.budget.abort = not succeeded
            self.budget.cv.notify_all()
        for thread in threads:
            thread.join()
        if not succeeded:
            self._remove_unfinished(w for w in run.writers if id(w) not in run.finalized)

    @staticmethod
    def _remove_unfinished(writers) -> None:
        for writer in writers:
            removed = []
            for path in compat.unfinished_shards(writer):
                if os.path.exists(path):
                    os.remove(path)
                    removed.append(os.path.basename(path))
            if removed:
                LOG.warning(
                    "mergekit-ace: the merge failed; removed its unfinished shards %s from %s.",
                    ", ".join(removed),
                    writer.out_path,
                )
