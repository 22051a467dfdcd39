"""The kernels' reports to the log: each kind warns once per key (a model, an ``eps``) and logs
later occurrences at debug level, counting all of them; every merge starts them afresh.

Kernels run once per tensor and cannot know where a merge begins or ends, so the reports are
module-level objects in a registry that the merge hooks reset (``registration``:
:func:`reset_reports` when a merge starts, the counts when it ends).
"""

from __future__ import annotations

import logging
from typing import Dict, Hashable, List

logger = logging.getLogger(__name__)


class OncePerKey:
    """A kernel report that goes to the log as a warning the first time for each key and at
    debug level after that (``later`` is appended to the warning to say so), counting every
    report."""

    def __init__(self, later: str):
        self.later = later
        self.counts: Dict[Hashable, int] = {}
        _REGISTRY.append(self)

    def log(self, key: Hashable, message: str) -> None:
        first = key not in self.counts
        self.counts[key] = self.counts.get(key, 0) + 1
        if first:
            logger.warning("%s%s", message, self.later)
        else:
            logger.debug("%s", message)

    def total(self) -> int:
        return sum(self.counts.values())

    def reset(self) -> None:
        self.counts = {}


# The reports of this module and any other per-merge record with a ``reset()`` method.
_REGISTRY: List = []


def reset_reports() -> None:
    """Start every report afresh (a new merge)."""
    for report in _REGISTRY:
        report.reset()
