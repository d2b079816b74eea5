"""Writing checkpoint folders: staged atomically, weights streamed tensor by tensor into sharded safetensors.

huggingface_hub plans the shards from sizes alone; each shard is then written by a streaming writer (the
header is known from shapes and dtypes, so each tensor is written as soon as it is computed and freed),
which keeps peak memory near one tensor instead of one shard. The index is written last.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
from huggingface_hub import split_torch_state_dict_into_shards

from corda_surgery.outputs import OutputError

INDEX_NAME = "model.safetensors.index.json"
DEFAULT_MAX_SHARD_SIZE = "2GB"
# Non-weight files of a checkpoint folder that travel with the weights.
MODEL_FILE_PATTERNS = (
    "config.json",
    "generation_config.json",
    "tokenizer*",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.*",
    "merges.txt",
    "chat_template.*",
    "*.model",
    "preprocessor_config.json",
)
_DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2",
}


def copy_model_files(source: Path, target: Path) -> None:
    """Copy config, generation config and tokenizer files (never weights) from ``source`` to ``target``."""
    for pattern in MODEL_FILE_PATTERNS:
        for path in source.glob(pattern):
            if path.is_file():
                shutil.copy2(path, target / path.name)


def _write_safetensors(
    path: Path, specs: dict[str, tuple[tuple[int, ...], torch.dtype]], produce: Callable[[str], torch.Tensor]
) -> None:
    """Write one safetensors file whose tensors are produced one at a time, in ``specs`` order."""
    header, offset = {}, 0
    for name, (shape, dtype) in specs.items():
        size = torch.Size(shape).numel() * dtype.itemsize
        header[name] = {"dtype": _DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    header["__metadata__"] = {"format": "pt"}
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    try:
        _stream_tensors(path, encoded, specs, produce)
    except OSError as exc:
        raise OutputError(f"{path}: cannot write ({exc.strerror or exc})") from exc


def _stream_tensors(path: Path, encoded_header: bytes, specs, produce) -> None:
    with path.open("wb") as handle:
        handle.write(len(encoded_header).to_bytes(8, "little"))
        handle.write(encoded_header)
        for name, (shape, dtype) in specs.items():
            tensor = produce(name)
            if tuple(tensor.shape) != tuple(shape) or tensor.dtype != dtype:
                raise ValueError(f"{name}: produced {tuple(tensor.shape)} {tensor.dtype}, planned {shape} {dtype}")
            handle.write(memoryview(tensor.contiguous().reshape(-1).view(torch.uint8).numpy()))
        handle.flush()
        os.fsync(handle.fileno())


def _shard_plan(specs: dict[str, tuple[tuple[int, ...], torch.dtype]], max_shard_size: int | str):
    meta = {name: torch.empty(shape, dtype=dtype, device="meta") for name, (shape, dtype) in specs.items()}
    return split_torch_state_dict_into_shards(meta, max_shard_size=max_shard_size)


def write_order(
    specs: dict[str, tuple[tuple[int, ...], torch.dtype]], max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE
) -> list[str]:
    """The order ``write_sharded_weights`` asks for tensors in (shards may reorder them: a tensor larger than
    a shard gets its own, placed before the shard being filled)."""
    return [name for names in _shard_plan(specs, max_shard_size).filename_to_tensors.values() for name in names]


def write_sharded_weights(
    folder: Path,
    specs: dict[str, tuple[tuple[int, ...], torch.dtype]],
    produce: Callable[[str], torch.Tensor],
    *,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
) -> list[str]:
    """Write ``specs`` (name → shape, dtype) as sharded safetensors plus index; returns the shard names."""
    plan = _shard_plan(specs, max_shard_size)
    for filename, names in plan.filename_to_tensors.items():
        _write_safetensors(folder / filename, {name: specs[name] for name in names}, produce)
    if plan.is_sharded:
        index = {"metadata": plan.metadata, "weight_map": plan.tensor_to_filename}
        (folder / INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True))
    return list(plan.filename_to_tensors)
