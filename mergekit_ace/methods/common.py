"""What every mergekit adapter of this package shares: its parameters, built from the
kernel's table (:class:`~mergekit_ace.kernels.parameters.ParameterTable`, so they validate with
the kernel's messages), the base-model contract, and the call into a pure kernel."""

from __future__ import annotations

from typing import Any, Callable, Optional, Tuple

import torch
from mergekit.merge_methods.base import (
    BasePolicy,
    GroupMergeMethod,
    InputContract,
    MergeMethodSpec,
    ParameterScope,
    ParameterSpec,
    TensorGroup,
)
from pydantic import PlainValidator
from typing_extensions import Annotated

from mergekit_ace.kernels.parameters import PER_MODEL, Parameter, ParameterTable
from mergekit_ace.methods import model_label


def parameter_spec(parameter: Parameter) -> ParameterSpec:
    """The mergekit ``ParameterSpec`` of a kernel-layer :class:`Parameter`: same default,
    same check (so the same error message), same description."""
    scope = ParameterScope.NON_BASE if parameter.scope == PER_MODEL else ParameterScope.SHARED
    return ParameterSpec(
        parameter.name,
        Annotated[Any, PlainValidator(parameter.check)],
        scope,
        default=parameter.default,
        description=parameter.description,
    )


def base_required_contract() -> InputContract:
    return InputContract(base=BasePolicy.REQUIRED, min_inputs=2, min_non_base=1)


class KernelMergeMethod(GroupMergeMethod):
    """A mergekit method whose work is one pure kernel call per output tensor.

    ``kernel(base, experts, weights=..., tensor_name=..., expert_names=..., **params)`` must
    return ``(tensor, diagnostics)``; ``parameters`` is the kernel's table: the adapter declares
    exactly its entries and passes each under the kernel's name (``lambda`` -> ``lam``).
    """

    def __init__(
        self,
        *,
        name: str,
        pretty_name: str,
        reference_url: str,
        parameters: ParameterTable,
        kernel: Callable[..., Tuple[torch.Tensor, Any]],
        citation: str = "",
    ):
        self.citation = citation  # BibTeX entry of the method's paper, for the model card
        self.spec = MergeMethodSpec(
            name=name,
            pretty_name=pretty_name,
            reference_url=reference_url,
            parameters=tuple(parameter_spec(p) for p in parameters),
            contract=base_required_contract(),
        )
        self.kernel = kernel
        self.kernel_names = {p.name: p.kernel_name for p in parameters}
        self.on_diagnostics: Optional[Callable[[Any], None]] = None

    def validate_inputs(self, input_ids, base_id=None, *, group_name=None) -> None:
        where = f" ({group_name})" if group_name else ""
        if base_id is not None and base_id not in list(input_ids):
            raise ValueError(
                f"merge_method: {self.spec.name}: the base model `{model_label(base_id)}` is "
                f"not among the inputs{where}; add `- model: {model_label(base_id)}` (with the "
                "same `layer_range` as the other sources) to the slice's `sources:`."
            )
        if base_id is None:
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
        kwargs = {self.kernel_names.get(k, k): v for k, v in parameters.items()}
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
