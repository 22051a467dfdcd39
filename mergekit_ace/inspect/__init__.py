"""``mergekit-ace inspect``: what ACE will decide for every tensor of a merge, before running it.

The merge described by a ``mergekit-yaml`` config is planned with mergekit's own
:class:`~mergekit.plan.MergePlanner` (so per-tensor parameter filters, slices, tokenizer
alignment and dtype handling are exactly those of a real merge) and executed in memory with
mergekit's :class:`~mergekit.graph.Executor`, one tensor group at a time. The registered ``ace``
method is swapped, for the duration of the run, for an instance whose kernel also records the
singular spectra and its own run time; its ``on_diagnostics`` hook collects the diagnostics.
Each merged tensor is dropped as soon as it is produced and nothing but the report is written.

``estimate_only=True`` plans the same merge but reads only the checkpoints' safetensors headers
(shapes and dtypes): no tensor data, so an 8B config is costed in seconds.

Modules, each importing only those listed before it: :mod:`.report` (the rows and the report),
:mod:`.costs` (flop rate, per-tensor cost), :mod:`.summary` (terminal text), :mod:`.plots`
(matplotlib, optional), :mod:`.writers` (CSV/JSON, and the plots on request), :mod:`.planning`
(planning the merge and lending the instrumented method, through :mod:`mergekit_ace.compat`),
:mod:`.run` (:func:`inspect_config`).
"""

from mergekit_ace.inspect.costs import calibrate_flop_rate, tensor_cost
from mergekit_ace.inspect.report import CURVE_FRACTIONS, InspectError, InspectReport, TensorRow
from mergekit_ace.inspect.run import inspect_config
from mergekit_ace.inspect.summary import human_bytes, human_seconds, summary_text
from mergekit_ace.inspect.writers import csv_records, write_report

__all__ = [
    "CURVE_FRACTIONS",
    "InspectError",
    "InspectReport",
    "TensorRow",
    "calibrate_flop_rate",
    "csv_records",
    "human_bytes",
    "human_seconds",
    "inspect_config",
    "summary_text",
    "tensor_cost",
    "write_report",
]
