"""Method parameters described once: name, default, check and meaning.

Pure Python. Every method has a :class:`ParameterTable`; its kernel takes its defaults from it
and checks its keyword arguments with it, and its mergekit adapter (``mergekit_ace/methods``)
builds its ``ParameterSpec``s from it, so a value is refused with the same message (naming the
parameter) on either path, and ``inspect``, ``mergekit-ace check`` and the documentation's
tables read the same entries.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, Optional, Sequence, Tuple

SHARED = "shared"  # one value for all models (global, module or slice parameters)
PER_MODEL = "per_model"  # one value per model other than the base


@dataclass(frozen=True)
class Parameter:
    """One parameter: ``check(value)`` returns the value in canonical form (``"AUTO"`` ->
    ``"auto"``, ``"yes"`` -> ``True``) or raises ``ValueError`` naming the parameter.
    ``keyword``: the kernel's name for it where the YAML name is a Python keyword
    (``lambda`` -> ``lam``)."""

    name: str
    default: Any
    check: Callable[[Any], Any]
    description: str
    scope: str = SHARED
    keyword: Optional[str] = None

    @property
    def kernel_name(self) -> str:
        return self.keyword or self.name


@dataclass(frozen=True)
class ParameterTable:
    """The parameters of one method, in the order mergekit lists them."""

    method: str
    parameters: Tuple[Parameter, ...]

    def __iter__(self) -> Iterator[Parameter]:
        return iter(self.parameters)

    def __getitem__(self, name: str) -> Parameter:
        for parameter in self.parameters:
            if name in (parameter.name, parameter.kernel_name):
                return parameter
        raise KeyError(name)

    def default(self, name: str) -> Any:
        """The default of ``name`` (YAML or kernel name)."""
        return self[name].default

    def check(self, **values: Any) -> Dict[str, Any]:
        """The kernel's keyword arguments in canonical form, or ``ValueError`` naming the first
        bad one."""
        return {name: self[name].check(value) for name, value in values.items()}


def number(
    name: str,
    low: float = -math.inf,
    high: float = math.inf,
    what: str = "a finite number",
    *,
    below_high: bool = False,
) -> Callable[[Any], float]:
    """A finite number in ``[low, high]`` (``[low, high)`` with ``below_high``); ``what`` says
    so in the error message."""

    def check(value: Any) -> float:
        if isinstance(value, bool):
            raise ValueError(f"parameter `{name}` must be a number, got {value!r}")
        try:
            result = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"parameter `{name}` must be a number, got {value!r}") from None
        in_range = low <= result <= high and not (below_high and result == high)
        if not in_range or math.isnan(result) or math.isinf(result):
            raise ValueError(f"parameter `{name}` must be {what}, got {value!r}")
        return result

    return check


def number_or_word(
    name: str,
    word: str,
    low: float = -math.inf,
    what: str = "a finite number",
    high: float = math.inf,
    *,
    below_high: bool = False,
) -> Callable[[Any], Any]:
    """A number as in :func:`number`, or the literal ``word`` (any case)."""
    as_number = number(name, low, high, what, below_high=below_high)

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
    words = {
        "true": True,
        "yes": True,
        "on": True,
        "1": True,
        "false": False,
        "no": False,
        "off": False,
        "0": False,
    }

    def check(value: Any) -> bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in words:
            return words[value.strip().lower()]
        if isinstance(value, (int, float)) and value in (0, 1):
            return bool(value)
        raise ValueError(f"parameter `{name}` must be true or false, got {value!r}")

    return check


def choice(
    name: str, choices: Sequence[str], booleans: Optional[Dict[bool, str]] = None
) -> Callable[[Any], str]:
    """One of ``choices`` (any case); ``booleans`` maps YAML ``true``/``false`` to a choice."""

    def check(value: Any) -> str:
        if isinstance(value, bool) and booleans:
            return booleans[value]
        if isinstance(value, str) and value.strip().lower() in choices:
            return value.strip().lower()
        raise ValueError(f"parameter `{name}` must be one of {', '.join(choices)}, got {value!r}")

    return check


LAMBDA = Parameter(
    "lambda", 1.0, number("lambda"), "scale of the merged task vector", keyword="lam"
)
WEIGHT = Parameter(
    "weight",
    1.0,
    number("weight", 0.0, math.inf, ">= 0 (0 leaves the model out)"),
    "task weight in the merge objective; only ratios matter",
    scope=PER_MODEL,
)
DROP_NOISE = Parameter(
    "drop_noise",
    True,
    boolean("drop_noise"),
    "leave out experts whose task vector for a tensor is storage noise (the "
    "expert equals the base rounded to its storage precision)",
)
NOISE_FLOOR = Parameter(
    "noise_floor",
    True,
    boolean("noise_floor"),
    "keep out of rank and cut-off decisions (not boosted, not kept) the singular directions "
    "at or below the rounding noise of the experts' storage precision",
)
