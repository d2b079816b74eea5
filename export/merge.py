"""Fold a LoRA adapter into the weights it adapts: W + s·B·A, streamed tensor by tensor."""

from __future__ import annotations

from pathlib import Path

import torch
from tqdm.auto import tqdm

from corda_surgery.calib.model_view import ModelView
from corda_surgery.calib.weights import CheckpointError
from corda_surgery.export.checkpoint_writer import copy_model_files, write_sharded_weights
from corda_surgery.export.peft_adapter import AdapterError, LoraAdapter, read_adapter
from corda_surgery.options import DEFAULT_MAX_SHARD_SIZE
from corda_surgery.outputs import check_disjoint, staged_folder


def merge_adapter(
    model_dir: str | Path,
    adapter_dir: str | Path,
    out: str | Path,
    *,
    overwrite: bool = False,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    progress: bool = True,
) -> Path:
    """Write ``out``: ``model_dir``'s checkpoint with every adapted weight replaced by W + s·B·A."""
    model_dir, adapter_dir = Path(model_dir), Path(adapter_dir)
    check_disjoint(Path(out), [model_dir, adapter_dir])
    view = ModelView(model_dir)  # module names (the adapter's) → stored keys, whatever the checkpoint's layout
    reader = view.reader
    adapter: LoraAdapter = read_adapter(adapter_dir)
    key_of = {}
    for module in adapter.lora_A:
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
    bar = tqdm(total=len(reader.locations), desc="merging", unit="tensor", disable=not progress)

    def produce(key: str) -> torch.Tensor:
        bar.update()
        weight = reader.get(key).clone()
        reader.release()  # unmap: pages read so far would otherwise stay resident
        module = key_of.get(key)
        if module is None:
            return weight
        delta = adapter.delta(module)
        return (weight.float() + (delta.T if adapter.fan_in_fan_out else delta)).to(weight.dtype)

    with staged_folder(out, overwrite=overwrite, inputs=[model_dir, adapter_dir]) as staging:
        specs = {key: reader.spec(key) for key in reader.locations}
        write_sharded_weights(staging, specs, produce, max_shard_size=max_shard_size)
        bar.close()
        copy_model_files(reader.model_dir, staging)
    return Path(out).resolve()
