"""Checkpoint surgery: every target weight → frozen residual + initialised LoRA factors, streamed to disk.

Weights are read one tensor at a time from the input shards and written one tensor at a time into the
output shards, so peak memory stays near one weight matrix, its covariance and its factors.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import shutil
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from corda_surgery import __version__
from corda_surgery.calib.store import CovarianceStore
from corda_surgery.calib.stream import StreamingModel
from corda_surgery.corda_plus import allocate_ranks, context_spectrum, energy_compactness, select_candidate
from corda_surgery.decompose import DEFAULT_DAMPING, decompose_weight
from corda_surgery.export.checkpoint_writer import DEFAULT_MAX_SHARD_SIZE, copy_model_files, write_sharded_weights
from corda_surgery.export.peft_adapter import LoraAdapter, write_adapter
from corda_surgery.outputs import staged_folder

METHODS = ("corda", "corda++", "pissa", "milora", "lora")
ADAPTER_DIR = "adapter"
REPORT_NAME = "surgery.json"
STORE_NAME = "covariances.h5"  # where `convert` keeps its store, inside the output


class TargetError(ValueError):
    """A --targets pattern that matches no linear of the model."""


@dataclass(frozen=True)
class LayerPlan:
    """What one target linear gets: its rank and which covariance feeds it."""

    rank: int
    store: int | None = 0  # index into the stores; None: no covariance (pissa, milora, lora)
    round: int | None = None  # a sampling round of that store instead of its sum (CorDA++ candidates)


@dataclass
class SurgeryReport:
    """What was done, written as surgery.json next to the residual model."""

    method: str
    mode: str | None
    rank: int
    alpha: float
    solver: str
    factor_dtype: str
    damping: float
    model_fingerprint: str
    covariance_stores: list[dict]
    layers: dict[str, dict] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=dict)


def target_linears(streaming: StreamingModel, targets: str) -> list[str]:
    """Module paths of the linears selected by ``targets`` ('all-linear' or comma-separated name suffixes)."""
    family_linears = streaming.family.linears
    if targets == "all-linear":
        chosen = family_linears
    else:
        patterns = [p.strip() for p in targets.split(",") if p.strip()]
        chosen = tuple(name for name in family_linears if any(name == p or name.endswith("." + p) for p in patterns))
        unmatched = [p for p in patterns if not any(n == p or n.endswith("." + p) for n in family_linears)]
        if unmatched or not chosen:
            raise TargetError(
                f"--targets {', '.join(unmatched) or targets} matches no linear of this model "
                f"(available: {', '.join(family_linears)}, or all-linear)"
            )
    return [f"{streaming.block_name(i)}.{name}" for i in range(streaming.num_blocks) for name in chosen]


def _lora_default_init(weight_out: int, weight_in: int, rank: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """PEFT's default LoRA init: A Kaiming-uniform (a=√5), B zero."""
    generator = torch.Generator().manual_seed(seed)
    bound = 1 / math.sqrt(weight_in)  # kaiming_uniform_ with a=√5 on fan_in gives ±1/√fan_in
    lora_a = (torch.rand(rank, weight_in, generator=generator) * 2 - 1) * bound
    return lora_a, torch.zeros(weight_out, rank)


def _initialise(
    weight: torch.Tensor,
    covariance: torch.Tensor | None,
    name: str,
    layer: LayerPlan,
    *,
    method: str,
    mode: str | None,
    scaling: float,
    damping: float,
    solver: str,
    factor_dtype: torch.dtype,
    transposed: bool,
    seed: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict]:
    """LoRA A, B, the residual weight and the surgery.json record for one target linear."""
    if method == "lora":
        out_dim, in_dim = weight.T.shape if transposed else weight.shape
        lora_a, lora_b = _lora_default_init(out_dim, in_dim, layer.rank, seed)
        return lora_a.to(factor_dtype), lora_b.to(factor_dtype), weight, {"rank": layer.rank}
    assert mode is not None, "every method but lora has a mode"
    result = decompose_weight(
        weight,
        covariance,
        rank=layer.rank,
        mode=mode,
        alpha=scaling * layer.rank,
        damping=damping,
        solver=solver,
        factor_dtype=factor_dtype,
        transposed=transposed,
        name=name,
    )
    record = {
        "rank": layer.rank,
        "damping": result.damping,
        "adapter_energy": result.adapter_energy,
        "store": layer.store,
        "round": layer.round,
    }
    return result.lora_A, result.lora_B, result.residual, record


def _link_or_copy(source: Path, target: Path) -> None:
    """A second name for ``source`` (no copy of a store that may be gigabytes), or a copy where links fail."""
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def _candidates(stores: list[CovarianceStore]) -> list[tuple[int, int | None]]:
    """CorDA++ candidates: each store's sampling rounds where it has several, else its sum."""
    return [(i, r) for i, store in enumerate(stores) for r in (range(store.rounds) if store.rounds > 1 else [None])]


def corda_plus_plan(
    streaming: StreamingModel,
    stores: list[CovarianceStore],
    weight_keys: dict[str, str],
    *,
    mode: str,
    rank: int,
    rank_budget: float | None,
    param_budget: int | None,
    min_rank: int,
    max_rank: int | None,
    damping: float,
    solver: str,
    progress: bool,
) -> tuple[dict[str, LayerPlan], dict[str, dict], dict[str, torch.Tensor]]:
    """Per layer: the most compact candidate covariance at ``rank``, then ranks from the budget.

    Returns the plan, per-layer records for surgery.json, and the chosen candidates' spectra.
    """
    reader, transposed = streaming.reader, streaming.family.transposed
    candidates = _candidates(stores)
    chosen: dict[str, tuple[int, int | None]] = {}
    spectra: dict[str, torch.Tensor] = {}
    dims: dict[str, tuple[int, int]] = {}
    records: dict[str, dict] = {}
    for name, key in tqdm(weight_keys.items(), desc="CorDA++ spectra", unit="layer", disable=not progress):
        weight = reader.get(key)
        out_dim, in_dim = weight.T.shape if transposed else weight.shape
        dims[name] = (out_dim, in_dim)
        candidate_spectra = [
            context_spectrum(
                weight,
                stores[i].covariance(name, round_index=r),
                damping=damping,
                transposed=transposed,
                name=name,
                solver=solver,
            )
            for i, r in candidates
        ]
        best = select_candidate(candidate_spectra, min(rank, min(dims[name])), mode)
        chosen[name], spectra[name] = candidates[best], candidate_spectra[best]
        records[name] = {
            "candidate_compactness": [
                energy_compactness(s, min(rank, min(dims[name])), mode) for s in candidate_spectra
            ]
        }
    if param_budget is None and rank_budget is not None:
        param_budget = round(rank_budget * sum(sum(d) for d in dims.values()))
    if param_budget is not None:
        ranks = allocate_ranks(spectra, dims, mode, param_budget=param_budget, min_rank=min_rank, max_rank=max_rank)
    else:
        ranks = {name: rank for name in weight_keys}
    for name in weight_keys:
        records[name]["compactness"] = energy_compactness(spectra[name], ranks[name], mode)
    plan = {name: LayerPlan(ranks[name], *chosen[name]) for name in weight_keys}
    return plan, records, spectra


def decompose_checkpoint(
    model_dir: str | Path,
    out: str | Path,
    *,
    method: str = "corda",
    mode: str | None = "kpm",
    rank: int = 16,
    alpha: float | None = None,
    stores: Sequence[str | Path] = (),
    targets: str = "all-linear",
    rank_budget: float | None = None,
    param_budget: int | None = None,
    min_rank: int = 1,
    max_rank: int | None = None,
    solver: str = "gram",
    factor_dtype: torch.dtype = torch.float32,
    damping: float = DEFAULT_DAMPING,
    overwrite: bool = False,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    base_name: str | None = None,
    bundle_store: bool = False,
    progress: bool = True,
    seed: int = 0,
) -> Path:
    """Write ``out``: residual model (sharded safetensors + config + tokenizer), ``adapter/`` and surgery.json.

    ``corda++`` picks each layer's most compact candidate covariance (every store, or every sampling
    round of a store that has several) and, with a rank or parameter budget, per-layer ranks.
    ``base_name`` is what the adapter names as its base model (where the residual will live: a path or a
    hub repo id; default ``out``). ``bundle_store`` places the one store in ``out/covariances.h5``.
    """
    if method not in METHODS:
        raise ValueError(f"--method must be one of {', '.join(METHODS)}, got {method!r}")
    mode = {"pissa": "ipm", "milora": "kpm", "lora": None}.get(method, mode)
    alpha = float(alpha if alpha is not None else rank)
    uses_covariance = method in ("corda", "corda++")
    if uses_covariance and not stores:
        raise ValueError(f"--method {method} needs a covariance store (--covariances)")
    if method == "corda" and len(stores) > 1:
        raise ValueError("several covariance stores are CorDA++'s covariance selection: use --method corda++")
    if method != "corda++" and (rank_budget or param_budget):
        raise ValueError("--rank-budget / --param-budget need --method corda++")
    if bundle_store and len(stores) != 1:
        raise ValueError("bundle_store needs exactly one covariance store")
    with staged_folder(out, overwrite=overwrite) as staging, contextlib.ExitStack() as closing:
        out = Path(out).resolve()
        streaming = StreamingModel(model_dir)
        reader = streaming.reader
        fingerprint = reader.fingerprint()
        opened = [closing.enter_context(CovarianceStore(path)) for path in stores] if uses_covariance else []
        for store in opened:
            store.check_model(fingerprint, reader.model_dir)
        linears = target_linears(streaming, targets)
        key_of = {reader.resolve(f"{name}.weight", streaming.base_prefix): name for name in linears}
        if method == "corda++":
            assert mode is not None, "corda++ always has a mode"
            plan, plus_records, _ = corda_plus_plan(
                streaming,
                opened,
                {n: k for k, n in key_of.items()},
                mode=mode,
                rank=rank,
                rank_budget=rank_budget,
                param_budget=param_budget,
                min_rank=min_rank,
                max_rank=max_rank,
                damping=damping,
                solver=solver,
                progress=progress,
            )
        else:
            plan = {name: LayerPlan(rank, 0 if uses_covariance else None) for name in linears}
            plus_records = {}
        report = SurgeryReport(
            method=method,
            mode=mode,
            rank=rank,
            alpha=alpha,
            solver=solver,
            factor_dtype=str(factor_dtype).removeprefix("torch."),
            damping=damping,
            model_fingerprint=fingerprint,
            covariance_stores=[
                {
                    "path": str(out / STORE_NAME if bundle_store else s.path),
                    "model_fingerprint": s.fingerprint,
                    "calibration": s.calibration,
                }
                for s in opened
            ],
            versions={"corda_surgery": __version__, "torch": torch.__version__, "python": platform.python_version()},
        )
        adapter = LoraAdapter(
            rank=rank,
            alpha=alpha,
            lora_A={},
            lora_B={},
            fan_in_fan_out=streaming.family.transposed,
            task_type="CAUSAL_LM" if streaming.model.can_generate() else None,
            base_model_name_or_path=base_name or str(out),
        )
        bar = closing.enter_context(
            tqdm(total=len(reader.locations), desc="tensors", unit="tensor", disable=not progress)
        )

        def produce(key: str) -> torch.Tensor:
            bar.update()
            weight = reader.get(key).clone()
            reader.release()  # read pages stay resident while mapped: unmap so memory stays one tensor
            name = key_of.get(key)
            if name is None:
                return weight
            layer = plan[name]
            covariance = (
                opened[layer.store].covariance(name, round_index=layer.round) if layer.store is not None else None
            )
            lora_a, lora_b, residual, record = _initialise(
                weight,
                covariance,
                name,
                layer,
                method=method,
                mode=mode,
                scaling=alpha / rank,
                damping=damping,
                solver=solver,
                factor_dtype=factor_dtype,
                transposed=streaming.family.transposed,
                seed=seed + len(adapter.lora_A),
            )
            adapter.lora_A[name], adapter.lora_B[name] = lora_a, lora_b
            if layer.rank != rank:
                adapter.rank_pattern[name] = layer.rank
                adapter.alpha_pattern[name] = alpha / rank * layer.rank
            report.layers[name] = record | plus_records.get(name, {})
            return residual

        specs = {key: reader.spec(key) for key in reader.locations}
        write_sharded_weights(staging, specs, produce, max_shard_size=max_shard_size)
        copy_model_files(reader.model_dir, staging)
        write_adapter(staging / ADAPTER_DIR, adapter)
        (staging / REPORT_NAME).write_text(json.dumps(asdict(report), indent=2))
        if bundle_store:
            _link_or_copy(opened[0].path, staging / STORE_NAME)
    return out
