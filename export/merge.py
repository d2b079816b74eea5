"""Fold a LoRA adapter into the weights it adapts: W + s·B·A, streamed tensor by tensor."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from corda_surgery.checkpoint.experts import FusedExperts
from corda_surgery.checkpoint.reader import CheckpointError
from corda_surgery.checkpoint.rewrite import rewrite_checkpoint
from corda_surgery.checkpoint.view import ModelView
from corda_surgery.checkpoint.writer import DEFAULT_MAX_SHARD_SIZE
from corda_surgery.export.peft_adapter import AdapterError, LoraAdapter, expert_factors, read_adapter
from corda_surgery.outputs import check_disjoint, staged_folder
from corda_surgery.paths import read_json, resolved

log = logging.getLogger(__name__)


def merge_adapter(
    model_dir: str | Path,
    adapter_dir: str | Path,
    out: str | Path,
    *,
    overwrite: bool = False,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    progress: bool = True,
) -> Path:
    """Write ``out``: ``model_dir``'s checkpoint with every adapted weight replaced by W + s·B·A. A 4-bit residual
    (``--residual nf4/int4``) is merged into its dequantised weights, the only residual the surgery kept: the
    merged model is the trained one exactly, in plain weights, and says so."""
    model_dir, adapter_dir = Path(model_dir), Path(adapter_dir)
    check_disjoint(Path(out), [model_dir, adapter_dir])
    quantised = "quantization_config" in read_json(model_dir / "config.json", CheckpointError)
    # module names (the adapter's) → stored keys, whatever the checkpoint's layout
    view = ModelView(model_dir, dequantise=quantised)
    if quantised:
        form = view.reader.form.value  # type: ignore[attr-defined]  # a DequantisingReader
        log.warning(
            "%s stores its residual in %s (the float residual was not kept): merging into the dequantised weights, "
            "which are what the adapter trained on; the output is a plain checkpoint",
            model_dir,
            form,
        )
    adapter: LoraAdapter = read_adapter(adapter_dir, view.fused_parameters())
    key_of, fused = _adapted_keys(view, adapter, adapter_dir, model_dir)
    layouts = view.fused_weights()

    def merged_fused(parameter: str) -> torch.Tensor:
        """W + s·B·A expert by expert, in place on the fused weight (never a float32 copy of all experts)."""
        weight = view.writable(parameter)
        scaling = adapter.scaling(parameter)
        lora_a, lora_b = expert_factors(
            adapter.lora_A[parameter], adapter.lora_B[parameter], adapter.rank_of(parameter)
        )
        for expert, (a, b) in enumerate(zip(lora_a, lora_b)):
            delta = scaling * (b.float() @ a.float())
            merged = weight[expert].float() + (delta.T if layouts[parameter].transposed else delta)
            weight[expert] = merged.to(weight.dtype)
        return weight

    def merged(key: str) -> torch.Tensor | None:
        module = key_of.get(key)
        if module is None:
            return None
        weight = view.reader.copy(key)
        delta = adapter.delta(module)
        return (weight.float() + (delta.T if adapter.fan_in_fan_out else delta)).to(weight.dtype)

    with staged_folder(out, overwrite=overwrite, inputs=[model_dir, adapter_dir]) as staging:
        rewrite_checkpoint(
            view,
            staging,
            merged,
            fused=fused,
            transform_fused=merged_fused,
            max_shard_size=max_shard_size,
            desc="merging",
            progress=progress,
        )
        if quantised:
            _drop_quantization_config(staging / "config.json")
    return resolved(out)


def _drop_quantization_config(config_path: Path) -> None:
    """The merged weights are plain: their config must not tell transformers to load them in 4 bits."""
    config = json.loads(config_path.read_text())
    config.pop("quantization_config")
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def _adapted_keys(
    view: ModelView, adapter: LoraAdapter, adapter_dir: Path, model_dir: Path
) -> tuple[dict[str, str], list[str]]:
    """Stored key → adapted module for the linears, and the adapted fused parameters, each checked to fit."""
    reader, layouts = view.reader, view.fused_weights()
    key_of, fused = {}, []
    for module in adapter.lora_A:
        if module in adapter.parameter_paths:
            _check_fused(view, adapter, module, layouts[module], adapter_dir, model_dir)
            view.check_stored_pieces(module)
            fused.append(module)
            continue
        try:
            key = view.stored_key(f"{module}.weight")
        except CheckpointError as exc:
            raise AdapterError(f"{adapter_dir}: adapts {module}, which {model_dir} does not have") from exc
        out_dim, in_dim = adapter.lora_B[module].shape[0], adapter.lora_A[module].shape[1]
        expected = (in_dim, out_dim) if adapter.fan_in_fan_out else (out_dim, in_dim)
        if reader.spec(key)[0] != expected:
            raise AdapterError(
                f"{adapter_dir}: {module} adapts a {expected[0]}×{expected[1]} weight, but {model_dir} stores "
                f"{key} as {'×'.join(map(str, reader.spec(key)[0]))}"
            )
        key_of[key] = module
    return key_of, fused


def _check_fused(
    view: ModelView, adapter: LoraAdapter, parameter: str, experts: FusedExperts, adapter_dir: Path, model_dir: Path
) -> None:
    """The factors of a fused parameter fit its experts and their (out, in) shape."""
    module, _, name = parameter.rpartition(".")
    out_dim, in_dim = experts.shape(view.model.get_submodule(module), name)
    lora_a, lora_b = adapter.lora_A[parameter], adapter.lora_B[parameter]
    found = (lora_a.shape[0] // adapter.rank_of(parameter), lora_b.shape[0], lora_a.shape[1])
    if found != (experts.num_experts, out_dim, in_dim):
        raise AdapterError(
            f"{adapter_dir}: {parameter} adapts {found[0]} experts of {found[1]}×{found[2]}, but {model_dir} has "
            f"{experts.num_experts} of {out_dim}×{in_dim}"
        )
