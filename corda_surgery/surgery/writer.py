"""The surgery's output folder: residual shards streamed in writing order, the adapter gathered as the
targets come, then surgery.json. Rank 0 alone runs this; where each result comes from is the work source's
business."""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from corda_surgery import __version__
from corda_surgery.calib.store import Covariances
from corda_surgery.checkpoint.reader import CheckpointReader
from corda_surgery.checkpoint.rewrite import rewrite_checkpoint
from corda_surgery.checkpoint.view import ModelView
from corda_surgery.compute import ComputeOptions
from corda_surgery.decomposition.diagnostics import DampingLimit
from corda_surgery.decomposition.kinds import DEFAULT_DAMPING_RULE, Mode
from corda_surgery.export.peft_adapter import LoraAdapter, fused_factors, parameter_paths, write_adapter
from corda_surgery.surgery.options import SurgeryOptions
from corda_surgery.surgery.quantise import ResidualQuantiser
from corda_surgery.surgery.report import (
    ADAPTER_DIR,
    STORE_NAME,
    ExpertsRecord,
    LayerRecord,
    StoreRecord,
    SurgeryReport,
)
from corda_surgery.surgery.targets import Target, TargetPlan
from corda_surgery.surgery.work import WorkSource

log = logging.getLogger(__name__)


@dataclass
class SurgeryOutput:
    """What the writer needs beyond the targets: where the output goes and what it records."""

    staging: Path
    out: Path
    fingerprint: str
    bundle_store: bool  # the one store linked into the output as covariances.h5
    compute: ComputeOptions
    progress: bool
    stores_kept: bool = True  # False: no store is kept (convert's default), so the report names no path


def write_surgery(
    view: ModelView,
    chosen: TargetPlan,
    stores: Sequence[Covariances],
    options: SurgeryOptions,
    work: WorkSource,
    output: SurgeryOutput,
) -> None:
    """Residual shards, ``adapter/`` and surgery.json into ``output.staging``."""
    targets = chosen.targets
    slices: dict[str, list[Target]] = {}
    for target in targets:
        if target.parameter is not None:
            slices.setdefault(target.parameter, []).append(target)
    adapter = _empty_adapter(view, options, slices, output.out)
    layers: dict[str, LayerRecord | ExpertsRecord] = {}
    linears = {t.key: t for t in targets if t.key is not None}
    quantiser = _quantiser(options, work, view)

    def residual(key: str) -> torch.Tensor | dict[str, torch.Tensor] | None:
        target = linears.get(key)
        if target is None:
            return None
        result = work.take(target)
        stored = None
        if quantiser is not None:
            stored, result = quantiser(target, result)
        layers[target.name] = result.record
        _add_factors(adapter, target.name, result.lora_a, result.lora_b, result.record.rank, options)
        return stored if stored is not None else result.residual

    def fused_residual(parameter: str) -> torch.Tensor:
        fused, records = _fused_residual(view, parameter, slices[parameter], work, adapter, options)
        layers[parameter] = ExpertsRecord(options.rank, records)
        return fused

    rewrite_checkpoint(
        view,
        output.staging,
        residual,
        fused=slices,
        transform_fused=fused_residual,
        layout={key: quantiser.specs(target) for key, target in linears.items()} if quantiser else None,
        max_shard_size=options.output.max_shard_size,
        desc="tensors",
        progress=output.progress,
    )
    if quantiser is not None:
        quantiser.configure(output.staging / "config.json", view, {t.name for t in targets})
    _warn_damping_decided(layers, options, len(targets))
    report = _report(view, chosen, stores, options, adapter, layers, output)
    adapter.provenance = {
        "model_fingerprint": output.fingerprint,
        "residual_fingerprint": report.residual_fingerprint,
        "base_name": report.base_name,
        "ranks": {name: layer.rank for name, layer in layers.items()},
        "corda_surgery": __version__,
    }
    write_adapter(output.staging / ADAPTER_DIR, adapter)
    report.write(output.staging)
    if output.bundle_store:
        _link_or_copy(stores[0].path, output.staging / STORE_NAME)


def _quantiser(options: SurgeryOptions, work: WorkSource, view: ModelView) -> ResidualQuantiser | None:
    """The quantiser of a 4-bit residual (None: float); ``plan_targets`` refused what it cannot store."""
    if not options.quantisation.quantised:
        return None
    return ResidualQuantiser(work.initialise.stores, work.initialise.plan, options, view.reader, work.initialise.shared)


def _empty_adapter(
    view: ModelView, options: SurgeryOptions, slices: Mapping[str, list[Target]], out: Path
) -> LoraAdapter:
    """The adapter's configuration, its factors to be gathered as the targets come."""
    return LoraAdapter(
        rank=options.rank,
        alpha=options.ranks.alpha or options.rank,
        lora_A={},
        lora_B={},
        fan_in_fan_out=view.transposed,
        parameter_paths=parameter_paths(view.fused_parameters(), slices),
        task_type="CAUSAL_LM" if view.model.can_generate() else None,
        base_model_name_or_path=options.output.base_name or str(out),
    )


def _add_factors(
    adapter: LoraAdapter, name: str, lora_a: torch.Tensor, lora_b: torch.Tensor, rank: int, options: SurgeryOptions
) -> None:
    adapter.lora_A[name], adapter.lora_B[name] = lora_a, lora_b
    if rank != options.rank:
        adapter.rank_pattern[name] = rank
        adapter.alpha_pattern[name] = options.scaling * rank


def _fused_residual(
    view: ModelView,
    parameter: str,
    slices: list[Target],
    work: WorkSource,
    adapter: LoraAdapter,
    options: SurgeryOptions,
) -> tuple[torch.Tensor, list[LayerRecord]]:
    """All experts of one fused parameter, residual in place; their factors side by side in PEFT's layout."""
    fused = view.writable(parameter)
    factors_a, factors_b, records = [], [], []
    for target in slices:
        result = work.take(target, fused[target.expert])
        fused[target.expert] = result.residual
        factors_a.append(result.lora_a)
        factors_b.append(result.lora_b)
        records.append(result.record)
    adapter.lora_A[parameter], adapter.lora_B[parameter] = fused_factors(factors_a, factors_b)
    starved = [t.expert for t, record in zip(slices, records, strict=True) if record.covariance is not None]
    if starved:
        log.warning(
            "%s: experts %s saw fewer routed tokens than rank %d; initialised from their weights alone (plain SVD)",
            parameter,
            starved,
            options.rank,
        )
    return fused, records


# What a KPM target whose adapter directions the damping chooses means for the user, by what limits it.
_DAMPING_ADVICE = {
    DampingLimit.SAMPLE: "more tokens would lift enough of them above it (limited by the sample): calibrate on more "
    "tokens (raise --samples or --seq-len; where the data runs out first, a larger --data set)",
    DampingLimit.SPECTRUM: "more tokens barely move the count (limited by the spectrum: a few massive input "
    "dimensions raise the level above that many eigenvalues, whatever the tokens). This is PEFT's and the papers' "
    "rule at work; the fidelity study found that a rule that follows the spectrum (--damping-rule median-diagonal) "
    "made KPM forget more, not less (docs/fidelity.md), so there is nothing to change",
    None: "whether more tokens would help is unknown: the store has no count on part of its tokens (calibrated "
    "in one batch, or by an older corda-surgery), or counts samples (--covariance-norm peft)",
}


def _warn_damping_decided(
    layers: Mapping[str, LayerRecord | ExpertsRecord], options: SurgeryOptions, total: int
) -> None:
    """KPM targets whose r smallest covariance directions all lie below the damping level: one message for each
    limit (``DampingLimit``) with what it means. A warning where the user can act (more tokens), a note (-v)
    where the measurement says there is nothing to do (the spectrum); surgery.json and inspect keep all."""
    if options.mode is not Mode.KPM:
        return
    decided: dict[DampingLimit | None, list[tuple[str, LayerRecord]]] = {}
    for name, record in layers.items():
        below = record.covariance_eigenvalues_below_damping if isinstance(record, LayerRecord) else None
        if isinstance(record, LayerRecord) and below is not None and below >= record.rank:
            limit = DampingLimit(record.damping_limit) if record.damping_limit is not None else None
            decided.setdefault(limit, []).append((name, record))
    for limit, found in decided.items():
        name, record = found[0]
        half = record.covariance_eigenvalues_below_damping_half
        example = f"{name}: {record.covariance_eigenvalues_below_damping} at rank {record.rank}" + (
            f"; {half} on its first {record.half_tokens:,} tokens" if half is not None else ""
        )
        log.log(
            logging.INFO if limit is DampingLimit.SPECTRUM else logging.WARNING,
            "%d of %d KPM targets have at least as many covariance eigenvalues below the damping level as their rank "
            "(e.g. %s): their adapter's directions are chosen by the damping, not the data; %s",
            len(found),
            total,
            example,
            _DAMPING_ADVICE[limit],
        )


def _report(
    view: ModelView,
    chosen: TargetPlan,
    stores: Sequence[Covariances],
    options: SurgeryOptions,
    adapter: LoraAdapter,
    layers: dict[str, LayerRecord | ExpertsRecord],
    output: SurgeryOutput,
) -> SurgeryReport:
    store_paths = [
        output.out / STORE_NAME if output.bundle_store else store.path if output.stores_kept else None
        for store in stores
    ]
    return SurgeryReport(
        options=options.record(),
        compute=output.compute.record(),
        base_name=adapter.base_model_name_or_path or str(output.out),
        model_fingerprint=output.fingerprint,
        residual_fingerprint=CheckpointReader(output.staging).fingerprint(),
        covariance_stores=[_store_record(store, path) for store, path in zip(stores, store_paths)],
        layers=layers,
        input_groups=sorted({entry.linears for store in stores for entry in store.entries.values()}),
        left_out=chosen.left_out,
        adapter_parameters=adapter.parameter_paths,
        unadapted_weights=_unadapted_weights(view, layers, chosen.left_out),
    )


def _store_record(store: Covariances, path: Path | None) -> StoreRecord:
    """What surgery.json says of a store: where (None: not kept), whose, how calibrated, and at what damping it
    was counted."""
    counted = store.counted
    rule = counted.rule if counted is not None and counted.rule != DEFAULT_DAMPING_RULE.value else None
    level = counted.damping if counted is not None else None
    return StoreRecord(str(path) if path is not None else None, store.fingerprint, store.calibration, level, rule)


def _unadapted_weights(view: ModelView, adapted: Mapping[str, object], left_out: Mapping[str, str]) -> list[str]:
    """Weight matrices of the blocks (2-D or more; stacked experts' biases aside) that stay frozen: left-out
    linears, and whatever is neither a linear PEFT adapts nor fused experts built by transformers' experts
    interface (packed experts, custom routers, convolutions). Those beyond the left-out linears are announced."""
    frozen = []
    for index in range(view.num_blocks):
        for name, parameter in view.blocks[index].named_parameters():
            full = f"{view.block_name(index)}.{name}"
            if parameter.dim() < 2 or name.endswith("bias"):
                continue
            if full not in adapted and full.removesuffix(".weight") not in adapted:
                frozen.append(full)
    unexplained = [name for name in frozen if name.removesuffix(".weight") not in left_out]
    if unexplained:
        log.warning(
            "%d weight matri(ces) of the blocks stay frozen (e.g. %s): no linear PEFT adapts and no fused experts of "
            "transformers' experts interface, or not chosen by --targets",
            len(unexplained),
            unexplained[0],
        )
    return frozen


def _link_or_copy(source: Path, target: Path) -> None:
    """A second name for ``source`` (no copy of a store that may be gigabytes), or a copy where links fail."""
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)
