"""Method parameters described once: name, default, check and meaning.

Pure Python. A kernel validates its keyword arguments with these checks, and the mergekit
adapters (``mergekit_ace/methods``) build their ``ParameterSpec``s from the same entries, so
a value is refused with the same message (naming the parameter) on either path.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional, Sequence


@dataclass(frozen=True)
class Parameter:
    """One parameter: ``check(value)`` returns the value in canonical form (``"AUTO"`` ->
    ``"auto"``, ``"yes"`` -> ``True``) or raises ``ValueError`` naming the parameter."""

    name: str
    default: Any
    check: Callable[[Any], Any]
    description: str


def number(name: str, low: float = -math.inf, high: float = math.inf,
           what: str = "a finite number") -> Callable[[Any], float]:
    """A finite number in ``[low, high]``; ``what`` says so in the error message."""

    def check(value: Any) -> float:
        if isinstance(value, bool):
            raise ValueError(f"parameter `{name}` must be a number, got {value!r}")
        try:
            result = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"parameter `{name}` must be a number, got {value!r}") from None
        if not (low <= result <= high) or math.isnan(result) or math.isinf(result):
            raise ValueError(f"parameter `{name}` must be {what}, got {value!r}")
        return result

    return check


def number_or_word(name: str, word: str, low: float = -math.inf, what: str = "a finite number",
                   high: float = math.inf) -> Callable[[Any], Any]:
    """A number as in :func:`number`, or the literal ``word`` (any case)."""
    as_number = number(name, low, high, what)

    def check(value: Any) -> Any:
        if isinstance(value, str) and value.strip().lower() == word:
            return word
        try:
            return as_number(value)
        except ValueError:
            raise ValueError(
                f"parameter `{name}` must be {what} or {word!r}, got {value!r}"
            ) from None

    return check


def boolean(name: str) -> Callable[[Any], bool]:
    """``true``/``false`` and the usual YAML spellings (``yes``, ``on``, ``1``, ...)."""
    words = {"true": True, "yes": True, "on": True, "1": True,
             "false": False, "no": False, "off": False, "0": False}

    def check(value: Any) -> bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in words:
            return words[value.strip().lower()]
        if isinstance(value, (int, float)) and value in (0, 1):
            return bool(value)
        raise ValueError(f"parameter `{name}` must be true or false, got {value!r}")

    return check


def choice(name: str, choices: Sequence[str],
           booleans: Optional[Dict[bool, str]] = None) -> Callable[[Any], str]:
    """One of ``choices`` (any case); ``booleans`` maps YAML ``true``/``false`` to a choice."""

    def check(value: Any) -> str:
        if isinstance(value, bool) and booleans:
            return booleans[value]
        if isinstance(value, str) and value.strip().lower() in choices:
            return value.strip().lower()
        raise ValueError(f"parameter `{name}` must be one of {', '.join(choices)}, got {value!r}")

    return check


LAMBDA = Parameter("lambda", 1.0, number("lambda"), "scale of the merged task vector")
WEIGHT = Parameter("weight", 1.0, number("weight", 0.0, math.inf, ">= 0 (0 leaves the model out)"),
                   "task weight in the merge objective; only ratios matter")
# Every method of this package takes it (KernelMergeMethod adds it to each spec).
DROP_NOISE = Parameter("drop_noise", True, boolean("drop_noise"),
                       "leave out experts whose task vector for a tensor is storage noise (the "
                       "expert equals the base rounded to its storage precision)")
