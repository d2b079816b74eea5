"""Read-only, tensor-by-tensor access to a safetensors checkpoint folder.

Only safetensors and JSON are ever read: pickle-based ``*.bin`` checkpoints are refused, since loading
them can run arbitrary code.
"""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

import torch
from safetensors import safe_open

INDEX_NAME = "model.safetensors.index.json"
_FINGERPRINT_SAMPLE = 1 << 20  # bytes hashed at each end of every shard
_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}


class CheckpointError(ValueError):
    """The checkpoint folder is missing, incomplete or not readable; the message names the file."""


def _check_safetensors_file(path: Path) -> list[str]:
    """Validate the header and the file length (a truncated shard is caught here); return tensor names."""
    try:
        size = path.stat().st_size
        with path.open("rb") as handle:
            (header_len,) = struct.unpack("<Q", handle.read(8))
            if header_len > size - 8:
                raise CheckpointError(f"{path}: truncated safetensors file (header runs past the end)")
            header = json.loads(handle.read(header_len))
    except (OSError, struct.error, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path}: not a readable safetensors file ({exc})") from None
    tensors = {k: v for k, v in header.items() if k != "__metadata__"}
    data_end = max((v["data_offsets"][1] for v in tensors.values()), default=0)
    if 8 + header_len + data_end > size:
        raise CheckpointError(
            f"{path}: truncated safetensors file ({size} bytes, header promises {8 + header_len + data_end})"
        )
    return list(tensors)


class CheckpointReader:
    """Maps tensor names to shards and reads tensors lazily, never the whole model at once."""

    def __init__(self, model_dir: str | Path):
        self.model_dir = Path(model_dir)
        if not (self.model_dir / "config.json").is_file():
            raise CheckpointError(f"{self.model_dir}: no config.json (not a transformers checkpoint folder)")
        weight_map = self._weight_map()
        self.shards = self._shard_files(weight_map)
        self.locations: dict[str, Path] = {}
        for shard in self.shards:
            for name in _check_safetensors_file(shard):
                self.locations[name] = shard
        for name, shard in (weight_map or {}).items():
            if self.locations.get(name) != self.model_dir / shard:
                raise CheckpointError(
                    f"{self.model_dir / INDEX_NAME}: tensor {name} is listed in {shard} but not stored there"
                )
        self._handles: dict[Path, object] = {}

    def _weight_map(self) -> dict[str, str] | None:
        """The index's tensor → shard map, or None for an unsharded checkpoint."""
        index = self.model_dir / INDEX_NAME
        if not index.is_file():
            return None
        try:
            return json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as exc:
            raise CheckpointError(f"{index}: not a valid safetensors index ({exc})") from None

    def _shard_files(self, weight_map: dict[str, str] | None) -> list[Path]:
        if weight_map is not None:
            index = self.model_dir / INDEX_NAME
            shards = sorted({self.model_dir / name for name in weight_map.values()})
            missing = [s.name for s in shards if not s.is_file()]
            if missing:
                raise CheckpointError(f"{index}: names shard(s) that are missing: {', '.join(missing)}")
            return shards
        shards = sorted(self.model_dir.glob("*.safetensors"))
        if shards:
            return shards
        if any(self.model_dir.glob("*.bin")) or any(self.model_dir.glob("*.pt")):
            raise CheckpointError(
                f"{self.model_dir}: only pickle weights (*.bin/*.pt) found; they are never loaded here because "
                "unpickling can run code. Convert once with transformers: "
                "AutoModelForCausalLM.from_pretrained(dir).save_pretrained(dir, safe_serialization=True)"
            )
        raise CheckpointError(f"{self.model_dir}: no *.safetensors weights found")

    def resolve(self, name: str, base_prefix: str = "") -> str:
        """The stored key for a module-path tensor name (older checkpoints drop the base-model prefix)."""
        if name in self.locations:
            return name
        if base_prefix and name.startswith(base_prefix + "."):
            short = name[len(base_prefix) + 1 :]
            if short in self.locations:
                return short
        raise CheckpointError(f"{self.model_dir}: tensor {name} not found in the checkpoint")

    def _handle(self, shard: Path):
        if shard not in self._handles:
            self._handles[shard] = safe_open(str(shard), framework="pt", device="cpu")
        return self._handles[shard]

    def get(self, key: str) -> torch.Tensor:
        """Read one stored tensor by its exact key."""
        return self._handle(self.locations[key]).get_tensor(key)

    def release(self) -> None:
        """Unmap the shards: pages read so far stop counting towards this process's resident memory."""
        self._handles.clear()

    def spec(self, key: str) -> tuple[tuple[int, ...], torch.dtype]:
        """Shape and dtype of a stored tensor, read from the header only."""
        view = self._handle(self.locations[key]).get_slice(key)
        return tuple(view.get_shape()), _DTYPES[view.get_dtype()]

    def fingerprint(self) -> str:
        """Cheap identity of config + weights: config bytes, and size and end bytes of every shard."""
        digest = hashlib.sha256((self.model_dir / "config.json").read_bytes())
        for shard in self.shards:
            size = shard.stat().st_size
            digest.update(f"{shard.name}:{size}".encode())
            with shard.open("rb") as handle:
                digest.update(handle.read(_FINGERPRINT_SAMPLE))
                handle.seek(max(0, size - _FINGERPRINT_SAMPLE))
                digest.update(handle.read())
        return digest.hexdigest()
