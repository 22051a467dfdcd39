"""What every mergekit adapter of this package shares: parameter types that validate with
messages naming the parameter, the base-model contract, and the call into a pure kernel."""

from __future__ import annotations

import math
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from pydantic import PlainValidator
from typing_extensions import Annotated

from mergekit.merge_methods.base import (
    BasePolicy,
    GroupMergeMethod,
    InputContract,
    MergeMethodSpec,
    ParameterScope,
    ParameterSpec,
    TensorGroup,
)


def _number_check(name: str, low: float, high: float, what: str) -> Callable[[Any], float]:
    def validate(value: Any) -> float:
        if isinstance(value, bool):
            raise ValueError(f"parameter `{name}` must be a number, got {value!r}")
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"parameter `{name}` must be a number, got {value!r}") from None
        if not (low <= number <= high) or math.isnan(number) or math.isinf(number):
            raise ValueError(f"parameter `{name}` must be {what}, got {value!r}")
        return number

    return validate


def _number(name: str, low: float = -math.inf, high: float = math.inf, what: str = "") -> Any:
    return Annotated[float, PlainValidator(_number_check(name, low, high, what))]


def _number_or_word(
    name: str, word: str, low: float = -math.inf, what: str = "", high: float = math.inf
) -> Any:
    number = _number_check(name, low, high, what)

    def validate(value: Any) -> Any:
        if isinstance(value, str) and value.strip().lower() == word:
            return word
        try:
            return number(value)
        except ValueError:
            raise ValueError(
                f"parameter `{name}` must be {what} or {word!r}, got {value!r}"
            ) from None

    return Annotated[Any, PlainValidator(validate)]


def _boolean(name: str) -> Any:
    words = {"true": True, "yes": True, "on": True, "1": True,
             "false": False, "no": False, "off": False, "0": False}

    def validate(value: Any) -> bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in words:
            return words[value.strip().lower()]
        if isinstance(value, (int, float)) and value in (0, 1):
            return bool(value)
        raise ValueError(f"parameter `{name}` must be true or false, got {value!r}")

    return Annotated[bool, PlainValidator(validate)]


def _choice(name: str, choices: Sequence[str], booleans: Optional[Dict[bool, str]] = None) -> Any:
    def validate(value: Any) -> str:
        if isinstance(value, bool) and booleans:
            return booleans[value]
        if isinstance(value, str) and value.strip().lower() in choices:
            return value.strip().lower()
        raise ValueError(
            f"parameter `{name}` must be one of {', '.join(choices)}, got {value!r}"
        )

    return Annotated[str, PlainValidator(validate)]


def shared(name: str, value_type: Any, default: Any, description: str) -> ParameterSpec:
    return ParameterSpec(name, value_type, ParameterScope.SHARED, default=default, description=description)


def lambda_parameter() -> ParameterSpec:
    return shared("lambda", _number("lambda", what="a finite number"), 1.0,
                  "scale of the merged task vector")


def drop_noise_parameter() -> ParameterSpec:
    """Shared by every method of this package (``KernelMergeMethod`` adds it)."""
    return shared("drop_noise", _boolean("drop_noise"), True,
                  "leave out experts whose task vector for a tensor is storage noise (the "
                  "expert equals the base rounded to its storage precision)")


def weight_parameter() -> ParameterSpec:
    return ParameterSpec(
        "weight",
        _number("weight", 0.0, math.inf, ">= 0 (0 leaves the model out)"),
        ParameterScope.NON_BASE,
        default=1.0,
        description="task weight in the merge objective; only ratios matter",
    )


def base_required_contract() -> InputContract:
    return InputContract(base=BasePolicy.REQUIRED, min_inputs=2, min_non_base=1)


class KernelMergeMethod(GroupMergeMethod):
    """A mergekit method whose work is one pure kernel call per output tensor.

    ``kernel(base, experts, weights=..., tensor_name=..., expert_names=..., **params)`` must
    return ``(tensor, diagnostics)``. ``parameter_map`` renames mergekit parameter names to
    kernel keyword names (``lambda`` is a Python keyword). Every such method also takes
    ``drop_noise`` (:func:`drop_noise_parameter`), which every kernel accepts.
    """

    def __init__(
        self,
        *,
        name: str,
        pretty_name: str,
        reference_url: str,
        parameters: Sequence[ParameterSpec],
        kernel: Callable[..., Tuple[torch.Tensor, Any]],
        parameter_map: Optional[Dict[str, str]] = None,
    ):
        self.spec = MergeMethodSpec(
            name=name,
            pretty_name=pretty_name,
            reference_url=reference_url,
            parameters=tuple(parameters) + (drop_noise_parameter(),),
            contract=base_required_contract(),
        )
        self.kernel = kernel
        self.parameter_map = {"lambda": "lam", **(parameter_map or {})}
        self.on_diagnostics: Optional[Callable[[Any], None]] = None

    def validate_inputs(self, input_ids, base_id=None, *, group_name=None) -> None:
        if base_id is None or base_id not in list(input_ids):
            where = f" ({group_name})" if group_name else ""
            raise ValueError(
                f"merge_method: {self.spec.name} needs a base model{where}: it merges the "
                "experts' task vectors (expert minus base). Add `base_model: <the model the "
                "experts were fine-tuned from>` to the config."
            )
        super().validate_inputs(input_ids, base_id, group_name=group_name)

    def merge_group(self, group: TensorGroup, /, **parameters: Any) -> torch.Tensor:
        base = group.base
        experts = group.non_base
        weights = parameters.pop("weight", None)
        kwargs = {self.parameter_map.get(k, k): v for k, v in parameters.items()}
        name = group.metadata.name
        try:
            tensor, diagnostics = self.kernel(
                base.tensor,
                [entry.tensor for entry in experts],
                weights=[weights[entry.id] for entry in experts] if weights is not None else None,
                tensor_name=name,
                expert_names=[model_label(entry.id) for entry in experts],
                **kwargs,
            )
        except Exception as error:
            if name and name in str(error):
                raise
            # A numerical library's own error (e.g. an SVD that did not converge) says
            # nothing about where it happened.
            raise RuntimeError(
                f"merge_method {self.spec.name} failed on tensor {name!r} "
                f"(shape {tuple(base.tensor.shape)}, {len(experts)} experts): {error}"
            ) from error
        if self.on_diagnostics is not None:
            self.on_diagnostics(diagnostics)
        return tensor


def model_label(model_id: Any) -> str:
    """A readable name for a mergekit ``ModelReference`` (or any other input id)."""
    model = getattr(model_id, "model", None)
    path = getattr(model, "path", None)
    return str(path) if path is not None else str(model_id)

