"""What one target gets from its plan, store and options: LoRA factors, the frozen residual and its record.

The same on every rank, so a target decomposed elsewhere is what rank 0 would have made of it.
"""

from __future__ import annotations

import functools
import itertools
import logging
import math
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TypeVar

import torch

from corda_surgery.calib.store import CountedLevel, CovarianceEntry, Covariances
from corda_surgery.compute import ComputeOptions
from corda_surgery.decomposition.decompose import (
    CovarianceSource,
    DampedCovariance,
    damped_covariance,
    decompose_weight,
)
from corda_surgery.decomposition.diagnostics import DampingLimit, damping_limit
from corda_surgery.decomposition.kinds import DEFAULT_DAMPING_RULE
from corda_surgery.surgery.options import SurgeryOptions
from corda_surgery.surgery.report import LayerRecord
from corda_surgery.surgery.targets import LayerPlan, Target

log = logging.getLogger(__name__)
CPU = torch.device("cpu")
T = TypeVar("T")


@dataclass
class Initialised:
    """One target's LoRA A (r, in), B (out, r), residual weight (the input's layout and dtype) and record."""

    lora_a: torch.Tensor
    lora_b: torch.Tensor
    residual: torch.Tensor
    record: LayerRecord


def lora_default_init(weight_out: int, weight_in: int, rank: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """PEFT's default LoRA init: A Kaiming-uniform (a=√5), B zero."""
    generator = torch.Generator().manual_seed(seed)
    bound = 1 / math.sqrt(weight_in)  # kaiming_uniform_ with a=√5 on fan_in gives ±1/√fan_in
    lora_a = (torch.rand(rank, weight_in, generator=generator) * 2 - 1) * bound
    return lora_a, torch.zeros(weight_out, rank)


@dataclass(frozen=True)
class DampingDiagnosis:
    """An input's covariance eigenvalues below the damping level, on all its tokens and on part of them, and
    what limits the directions a rank-r KPM adapter takes where they reach r (None: they do not, or unknown)."""

    below: int
    below_half: int | None
    half_tokens: int | None
    limit: DampingLimit | None

    def record(self, record: LayerRecord) -> None:
        record.covariance_eigenvalues_below_damping = self.below
        record.covariance_eigenvalues_below_damping_half = self.below_half
        record.half_tokens = self.half_tokens
        record.damping_limit = self.limit.value if self.limit is not None else None


def damping_diagnosis(
    store: Covariances, entry: CovarianceEntry, options: SurgeryOptions, rank: int, round_index: int | None
) -> DampingDiagnosis | None:
    """The store's counts for ``entry`` where they were taken at the options' damping (on its whole sum: a
    sampling round has none), with ``damping_limit``'s verdict at ``rank``; None where there are none."""
    if entry.below_damping is None or round_index is not None:
        return None
    if store.counted != CountedLevel(options.decomposition.damping_rule.value, options.decomposition.damping):
        return None
    width = store.dimension(entry.linears[0])
    if store.calibration.get("normalisation") == "peft":  # its counts are samples, not tokens: no verdict
        return DampingDiagnosis(entry.below_damping, entry.below_damping_half, entry.half_count, None)
    limit = damping_limit(width, rank, entry.below_damping, entry.count, entry.below_damping_half, entry.half_count)
    return DampingDiagnosis(entry.below_damping, entry.below_damping_half, entry.half_count, limit)


def on_device_or_host(work: Callable[..., T], device: torch.device, name: str) -> T:
    """``work(device=device)``, run again in host memory where the accelerator runs out of memory for this weight."""
    if device.type == "cpu":
        return work(device=device)
    try:
        return work(device=device)
    except torch.OutOfMemoryError:
        pass  # retried outside the handler: its traceback would keep the failed attempt's tensors alive
    torch.cuda.empty_cache()
    log.warning("%s: out of memory on %s; decomposed on the CPU instead", name, device)
    return work(device=CPU)


class SharedInputs:
    """Inputs read by several targets (q/k/v, gate/up of one layer): their covariance is read, checked, damped
    and factorised once, kept until the last of them is decomposed, then freed. Whether an input is shared
    depends on all its readers, not on those left to decompose, so a resumed run decomposes as the first did."""

    def __init__(self, stores: Sequence[Covariances], targets: list[Target], plan: Mapping[str, LayerPlan]):
        self.stores, self.plan = stores, plan
        self.readers = Counter(self.key(t.name) for t in targets if plan[t.name].store is not None)
        self.remaining = Counter(self.readers)
        self.prepared: dict[tuple, DampedCovariance] = {}

    def skip(self, name: str) -> None:
        """``name`` was decomposed by an earlier run: one reader fewer to prepare for."""
        if self.plan[name].store is not None:
            key = self.key(name)
            self.remaining[key] -= 1
            if self.remaining[key] == 0:
                self.prepared.pop(key, None)

    def key(self, name: str) -> tuple:
        """(store, stored input, round): targets with the same key read the same covariance."""
        layer = self.plan[name]
        assert layer.store is not None
        return layer.store, self.stores[layer.store].by_linear[name].name, layer.round

    def source(
        self, target: Target, covariance: CovarianceSource, options: SurgeryOptions, device: torch.device
    ) -> CovarianceSource | DampedCovariance:
        """What ``target`` decomposes with: the prepared shared covariance, or ``covariance`` if it reads alone."""
        key = self.key(target.name)
        if self.readers[key] == 1:
            return covariance
        if key not in self.prepared:
            prepare = functools.partial(
                damped_covariance,
                covariance,
                options.decomposition.damping,
                target.in_dim,
                target.name,
                rule=options.decomposition.damping_rule,
            )
            self.prepared[key] = on_device_or_host(prepare, device, target.name)
        self.remaining[key] -= 1
        return self.prepared.pop(key) if self.remaining[key] == 0 else self.prepared[key]


class Initialiser:
    """Callable on (weight, target): the target's ``Initialised``, from its plan, its store and the options."""

    def __init__(
        self,
        stores: Sequence[Covariances],
        targets: list[Target],
        plan: Mapping[str, LayerPlan],
        plus_records: Mapping[str, LayerRecord],
        options: SurgeryOptions,
        compute: ComputeOptions,
    ):
        self.stores, self.plan, self.plus_records = stores, plan, plus_records
        self.options, self.compute, self.device = options, compute, compute.torch_device
        self.shared = SharedInputs(stores, targets, plan)
        self.seeds = itertools.count(options.seed)  # LoRA's random A: one seed per linear and expert, in writing order

    def __call__(self, weight: torch.Tensor, target: Target) -> Initialised:
        layer, options = self.plan[target.name], self.options
        record = LayerRecord(rank=layer.rank)
        covariance: CovarianceSource | DampedCovariance | None = None
        if layer.store is not None:
            store = self.stores[layer.store]
            entry = store.by_linear[target.name]
            read = functools.partial(store.triangle, target.name, layer.round)  # damped and factorised as read
            covariance = self.shared.source(target, read, options, self.device)
            diagnosis = damping_diagnosis(store, entry, options, layer.rank, layer.round)
            if diagnosis is not None:
                diagnosis.record(record)
            if target.is_expert:
                record.tokens = entry.count if layer.round is None else entry.round_counts[layer.round]
                if record.tokens < layer.rank:  # an expert (almost) no token was routed to cannot rank r directions
                    covariance = None
                    record.covariance = "none: fewer routed tokens than the rank, plain SVD of the weight"
        plus = self.plus_records.get(target.name)
        if plus is not None:
            record.candidate_compactness, record.compactness = plus.candidate_compactness, plus.compactness
        return self._initialise(weight, covariance, target, layer, record, seed=next(self.seeds))

    def _initialise(
        self,
        weight: torch.Tensor,
        covariance: CovarianceSource | DampedCovariance | None,
        target: Target,
        layer: LayerPlan,
        record: LayerRecord,
        *,
        seed: int,
    ) -> Initialised:
        options = self.options
        dtype = options.decomposition.torch_factor_dtype
        if options.mode is None:  # lora: PEFT's random init, the weight unchanged
            out_dim, in_dim = weight.T.shape if target.transposed else weight.shape
            lora_a, lora_b = lora_default_init(out_dim, in_dim, layer.rank, seed)
            return Initialised(lora_a.to(dtype), lora_b.to(dtype), weight, record)
        work = functools.partial(
            decompose_weight,
            weight,
            covariance,
            rank=layer.rank,
            mode=options.mode,
            alpha=options.scaling * layer.rank,
            damping=options.decomposition.damping,
            damping_rule=options.decomposition.damping_rule,
            solver=options.decomposition.solver,
            factor_dtype=dtype,
            transposed=target.transposed,
            name=target.name,
            balance=options.decomposition.balance,
            memory_budget=self.compute.budget,
        )
        result = on_device_or_host(work, self.device, target.name)
        record.damping, record.adapter_energy, record.solver = (
            result.damping,
            result.adapter_energy,
            result.solver_label,
        )
        record.store, record.round = layer.store, layer.round
        if result.damping_rule is not DEFAULT_DAMPING_RULE and covariance is not None:
            record.damping_rule, record.damping_level = result.damping_rule.value, result.damping_level
        return Initialised(result.lora_A, result.lora_B, result.residual, record)
