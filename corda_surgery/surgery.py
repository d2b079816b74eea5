"""Checkpoint surgery: every target weight → frozen residual + initialised LoRA factors, streamed to disk.

Weights are read one tensor at a time from the input shards and written one tensor at a time into the
output shards, so peak memory stays near one weight matrix, its covariance and its factors.
"""

from __future__ import annotations

import json
import math
import platform
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from calib.store import CovarianceStore
from calib.stream import StreamingModel
from calib.weights import CheckpointReader
from corda_surgery import __version__
from corda_surgery.decompose import DEFAULT_DAMPING, decompose_weight
from export.checkpoint_writer import DEFAULT_MAX_SHARD_SIZE, copy_model_files, staged_output, write_sharded_weights
from export.peft_adapter import LoraAdapter, write_adapter

METHODS = ("corda", "corda++", "pissa", "milora", "lora")
ADAPTER_DIR = "adapter"
REPORT_NAME = "surgery.json"


class TargetError(ValueError):
    """A --targets pattern that matches no linear of the model."""


@dataclass(frozen=True)
class LayerPlan:
    """What one target linear gets: its rank and which covariance store feeds it."""

    rank: int
    store: int | None = 0  # index into the stores; None: no covariance (pissa, milora, lora)


@dataclass
class SurgeryReport:
    """What was done, written as surgery.json next to the residual model."""

    method: str
    mode: str | None
    rank: int
    alpha: float
    compute_dtype: str
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


def decompose_checkpoint(
    model_dir: str | Path,
    out: str | Path,
    *,
    method: str = "corda",
    mode: str | None = "kpm",
    rank: int = 16,
    alpha: float | None = None,
    stores: list[str | Path] = (),
    targets: str = "all-linear",
    plan: dict[str, LayerPlan] | None = None,
    compute_dtype: torch.dtype = torch.float32,
    damping: float = DEFAULT_DAMPING,
    overwrite: bool = False,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    progress: bool = True,
    seed: int = 0,
) -> Path:
    """Write ``out``: residual model (sharded safetensors + config + tokenizer), ``adapter/`` and surgery.json.

    ``plan`` gives per-layer ranks and covariance choices (CorDA++); without it every target gets
    ``rank`` and the first store.
    """
    if method not in METHODS:
        raise ValueError(f"--method must be one of {', '.join(METHODS)}, got {method!r}")
    mode = {"pissa": "ipm", "milora": "kpm", "lora": None}.get(method, mode)
    alpha = float(alpha if alpha is not None else rank)
    uses_covariance = method in ("corda", "corda++")
    if uses_covariance and not stores:
        raise ValueError(f"--method {method} needs a covariance store (--covariances)")
    streaming = StreamingModel(model_dir)
    reader = streaming.reader
    fingerprint = reader.fingerprint()
    opened = [CovarianceStore(path) for path in stores] if uses_covariance else []
    try:
        for store in opened:
            store.check_model(fingerprint, reader.model_dir)
        linears = target_linears(streaming, targets)
        if plan is None:
            plan = {name: LayerPlan(rank, 0 if uses_covariance else None) for name in linears}
        key_of = {reader.resolve(f"{name}.weight", streaming.base_prefix): name for name in linears}
        report = SurgeryReport(
            method=method, mode=mode, rank=rank, alpha=alpha, compute_dtype=str(compute_dtype).removeprefix("torch."),
            damping=damping, model_fingerprint=fingerprint,
            covariance_stores=[{"path": str(s.path), "calibration": s.calibration} for s in opened],
            versions={"corda_surgery": __version__, "torch": torch.__version__, "python": platform.python_version()},
        )
        adapter = LoraAdapter(
            rank=rank, alpha=alpha, lora_A={}, lora_B={}, fan_in_fan_out=streaming.family.transposed,
            task_type="CAUSAL_LM" if streaming.model.can_generate() else None,
        )
        bar = tqdm(total=len(reader.locations), desc="tensors", unit="tensor", disable=not progress)

        def produce(key: str) -> torch.Tensor:
            bar.update()
            weight = reader.get(key)
            name = key_of.get(key)
            if name is None:
                return weight
            layer = plan[name]
            scaling = alpha / rank
            if method == "lora":
                out_dim, in_dim = weight.T.shape if streaming.family.transposed else weight.shape
                lora_a, lora_b = _lora_default_init(out_dim, in_dim, layer.rank, seed + len(adapter.lora_A))
                residual, record = weight, {"rank": layer.rank}
            else:
                covariance = opened[layer.store].covariance(name, compute_dtype) if layer.store is not None else None
                result = decompose_weight(
                    weight, covariance, rank=layer.rank, mode=mode, alpha=scaling * layer.rank,
                    damping=damping, compute_dtype=compute_dtype, transposed=streaming.family.transposed, name=name,
                )
                lora_a, lora_b, residual = result.lora_A, result.lora_B, result.residual
                record = {"rank": layer.rank, "damping": result.damping, "adapter_energy": result.adapter_energy,
                          "store": layer.store}
            adapter.lora_A[name], adapter.lora_B[name] = lora_a.float(), lora_b.float()
            if layer.rank != rank:
                adapter.rank_pattern[name] = layer.rank
                adapter.alpha_pattern[name] = scaling * layer.rank
            report.layers[name] = record
            return residual

        with staged_output(out, overwrite=overwrite) as staging:
            adapter.base_model_name_or_path = str(Path(out).resolve())
            specs = {key: reader.spec(key) for key in reader.locations}
            write_sharded_weights(staging, specs, produce, max_shard_size=max_shard_size)
            bar.close()
            copy_model_files(reader.model_dir, staging)
            write_adapter(staging / ADAPTER_DIR, adapter)
            (staging / REPORT_NAME).write_text(json.dumps(asdict(report), indent=2))
        return Path(out).resolve()
    finally:
        for store in opened:
            store.close()
