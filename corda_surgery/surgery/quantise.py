"""The residual in 4 bits, target by target, as the writer takes each result: quantised (NF4, or GPTQ on the
stored covariance) and, where there is a covariance, the adapter's B refit to the quantised residual
(``refit_adapter``), each layer's output error before and after recorded.

It runs where the output is written, after the decomposition, so a resumed run (whose residuals are rebuilt bit
for bit) quantises exactly as an uninterrupted one.
"""

from __future__ import annotations

import functools
import json
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path

import torch

from corda_surgery.calib.store import Covariances
from corda_surgery.checkpoint.quantised import ResidualFormat, quantised_specs, quantization_config
from corda_surgery.checkpoint.reader import CheckpointReader
from corda_surgery.checkpoint.view import ModelView, is_linear
from corda_surgery.decomposition.gptq import (
    GroupQuantised,
    HessianFactor,
    check_group_size,
    gptq_quantise,
    hessian_factor,
)
from corda_surgery.decomposition.nf4 import NF4Quantised, nf4_quantise
from corda_surgery.decomposition.refit import refit_adapter
from corda_surgery.surgery.initialise import Initialised, SharedInputs
from corda_surgery.surgery.options import SurgeryOptions
from corda_surgery.surgery.targets import LayerPlan, Target

KEPT_COVARIANCES = 2  # the readers of one input (q/k/v, gate/up) need not be written one after another


def quantisation_memory(targets: Sequence[tuple[int, int]]) -> int:
    """Bytes the quantiser holds beside the decomposition at its largest target (out, in): the covariances it
    keeps (float64) and the metric's float32 copy, GPTQ's float32 Hessian, its factor, the inverse and the
    inverse's factor, and the refit's float64 weight, residual and error with the float32 residual and its
    rounding."""
    if not targets:
        return 0
    widest = max(in_dim for _, in_dim in targets)
    largest = max(out_dim * in_dim for out_dim, in_dim in targets)
    return (8 * KEPT_COVARIANCES + 4 + 4 * 4) * widest**2 + (3 * 8 + 2 * 4) * largest


class ResidualQuantiser:
    """Callable on (target, result): the residual's stored tensors and the result with its refit B."""

    def __init__(
        self,
        stores: Sequence[Covariances],
        plan: Mapping[str, LayerPlan],
        options: SurgeryOptions,
        reader: CheckpointReader,
        shared: SharedInputs,
    ):
        self.stores, self.plan, self.options, self.reader, self.shared = stores, plan, options, reader, shared
        self.settings = options.quantisation
        self.covariances: OrderedDict[tuple, torch.Tensor] = OrderedDict()
        self.factor: tuple[tuple, HessianFactor] | None = None  # the last input's key and its GPTQ factor

    def specs(self, target: Target) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """The stored tensors (name → shape, dtype) that replace ``target``'s weight."""
        assert target.key is not None
        shape, dtype = self.reader.spec(target.key)
        if self.settings.residual is ResidualFormat.INT4:
            check_group_size(target.in_dim, self.settings.group_size, target.name)
        return quantised_specs(target.key, shape, dtype, self.settings.residual, self.settings.group_size)

    def configure(self, config_path: Path, view: ModelView, quantised: set[str]) -> None:
        """Add the ``quantization_config`` that loads the quantised linears in 4 bits and keeps every other
        linear (the output head included) as it is stored."""
        config = json.loads(config_path.read_text())
        linears = (name for name, module in view.model.named_modules() if is_linear(module))
        kept = sorted(name for name in linears if name not in quantised)
        config["quantization_config"] = quantization_config(
            self.settings.residual, kept, self.settings.group_size, view.stored_dtype
        )
        config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")

    def __call__(self, target: Target, result: Initialised) -> tuple[dict[str, torch.Tensor], Initialised]:
        assert target.key is not None
        covariance = self._covariance(target)
        quantise = self._quantiser(target, covariance)
        if covariance is None:  # LoRA, PiSSA, MiLoRA: nothing to weigh the error by
            return quantise(result.residual).tensors(target.key), result
        weight = self.reader.copy(target.key)
        refit = refit_adapter(
            weight,
            result.lora_a,
            result.lora_b,
            self.options.scaling,
            covariance,
            quantise,
            rounds=self.settings.refit_rounds or 0,
            name=target.name,
        )
        record = replace(result.record, quantisation_error=refit.error_before)
        if refit.rounds:
            record.quantisation_error_refit = refit.error_after
        return refit.quantised.tensors(target.key), replace(result, lora_b=refit.lora_b, record=record)

    def _quantiser(
        self, target: Target, covariance: torch.Tensor | None
    ) -> Callable[[torch.Tensor], NF4Quantised | GroupQuantised]:
        assert target.key is not None
        if self.settings.residual is ResidualFormat.NF4:  # in the checkpoint's dtype: the state says what it was
            return functools.partial(nf4_quantise, dtype=self.reader.spec(target.key)[1])
        assert covariance is not None  # the options refuse int4 without a covariance
        key = self.shared.key(target.name)
        if self.factor is None or self.factor[0] != key:  # one factorisation for every reader and refit round
            self.factor = key, hessian_factor(covariance, self.settings.gptq_damping, target.name)
        return functools.partial(
            gptq_quantise,
            hessian=self.factor[1],
            group_size=self.settings.group_size,
            damping=self.settings.gptq_damping,
            scale_dtype=self.reader.spec(target.key)[1],
            name=target.name,
        )

    def _covariance(self, target: Target) -> torch.Tensor | None:
        """The normalised covariance ``target`` was decomposed with (dense float64), or None without one."""
        layer = self.plan[target.name]
        if layer.store is None:
            return None
        key = self.shared.key(target.name)
        if key not in self.covariances:
            while len(self.covariances) >= KEPT_COVARIANCES:  # evicted before the next is read
                self.covariances.popitem(last=False)
            self.covariances[key] = self.stores[layer.store].covariance(target.name, layer.round)
        return self.covariances[key]
