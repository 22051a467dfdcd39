"""What every mergekit adapter of this package shares: parameter types that validate with
messages naming the parameter, the base-model contract, and the call into a pure kernel."""

from __future__ import annotations

import math
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

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

from mergekit_ace.kernels.parameters import (
    DROP_NOISE,
    LAMBDA,
    WEIGHT,
    Parameter,
    number,
    number_or_word,
)


def _number(name: str, low: float = -math.inf, high: float = math.inf, what: str = "") -> Any:
    return Annotated[float, PlainValidator(number(name, low, high, what))]


def _number_or_word(name: str, word: str, low: float = -math.inf, what: str = "",
                    high: float = math.inf) -> Any:
    return Annotated[Any, PlainValidator(number_or_word(name, word, low, what, high))]


def shared(name: str, value_type: Any, default: Any, description: str) -> ParameterSpec:
    return ParameterSpec(name, value_type, ParameterScope.SHARED, default=default, description=description)


def parameter_spec(parameter: Parameter, scope: ParameterScope = ParameterScope.SHARED) -> ParameterSpec:
    """The mergekit ``ParameterSpec`` of a kernel-layer :class:`Parameter`: same default,
    same check (so the same error message), same description."""
    return ParameterSpec(parameter.name, Annotated[Any, PlainValidator(parameter.check)], scope,
                         default=parameter.default, description=parameter.description)


def lambda_parameter() -> ParameterSpec:
    return parameter_spec(LAMBDA)


def drop_noise_parameter() -> ParameterSpec:
    """Shared by every method of this package (``KernelMergeMethod`` adds it)."""
    return parameter_spec(DROP_NOISE)


def weight_parameter() -> ParameterSpec:
    return parameter_spec(WEIGHT, ParameterScope.NON_BASE)


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
        citation: str = "",
    ):
        self.citation = citation  # BibTeX entry of the method's paper, for the model card
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

