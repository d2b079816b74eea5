"""Read-only, tensor-by-tensor access to a safetensors checkpoint folder.

Only safetensors and JSON are ever read: pickle-based ``*.bin`` checkpoints are refused, since loading
them can run arbitrary code.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import torch
from safetensors import safe_open

from corda_surgery.errors import CordaSurgeryError

INDEX_NAME = "model.safetensors.index.json"
# Fingerprint sampling: tensors up to WINDOWS × WINDOW bytes are hashed whole, larger ones at WINDOWS
# evenly spaced windows (first and last included). A 70B checkpoint (~720 tensors) costs ~12k reads of 4 KiB.
_FINGERPRINT_WINDOWS = 16
_FINGERPRINT_WINDOW = 4096
_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}


class CheckpointError(CordaSurgeryError):
    """The checkpoint folder is missing, incomplete or not readable; the message names the file."""


@dataclass(frozen=True)
class TensorLocation:
    """Where one tensor's bytes are: shard file and absolute byte range; dtype and shape from the header."""

    shard: Path
    start: int
    end: int
    dtype: torch.dtype
    shape: tuple[int, ...]


def _header_entry(path: Path, name: str, entry, data_start: int) -> TensorLocation:
    """One validated header entry; a malformed one names the file and the tensor."""
    try:
        dtype = _DTYPES[entry["dtype"]]
        shape = tuple(int(d) for d in entry["shape"])
        begin, end = (int(o) for o in entry["data_offsets"])
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{path}: tensor {name} has a malformed header entry ({exc!r})") from exc
    if any(d < 0 for d in shape) or not 0 <= begin <= end:
        raise CheckpointError(f"{path}: tensor {name} has a negative shape or offsets in its header")
    if end - begin != math.prod(shape) * dtype.itemsize:
        raise CheckpointError(
            f"{path}: tensor {name} spans {end - begin} bytes but its shape {list(shape)} of {entry['dtype']} "
            f"needs {math.prod(shape) * dtype.itemsize}"
        )
    return TensorLocation(path, data_start + begin, data_start + end, dtype, shape)


def read_safetensors_header(path: Path) -> dict[str, TensorLocation]:
    """Validate the header (entries, overlaps, file length: a truncated shard is caught here)."""
    if not path.is_file():
        raise CheckpointError(f"{path}: not a regular file")
    try:
        size = path.stat().st_size
        with path.open("rb") as handle:
            (header_len,) = struct.unpack("<Q", handle.read(8))
            if header_len > size - 8:
                raise CheckpointError(f"{path}: truncated safetensors file (header runs past the end)")
            header = json.loads(handle.read(header_len))
    except (OSError, struct.error, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path}: not a readable safetensors file ({exc})") from exc
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: safetensors header is not a JSON object")
    data_start = 8 + header_len
    tensors = {
        name: _header_entry(path, name, entry, data_start) for name, entry in header.items() if name != "__metadata__"
    }
    previous_end, previous = data_start, None
    for name, location in sorted(tensors.items(), key=lambda item: (item[1].start, item[1].end)):
        if location.start < previous_end:
            raise CheckpointError(f"{path}: tensors {previous} and {name} overlap in the file")
        previous_end, previous = location.end, name
    if previous_end > size:
        raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes, header promises {previous_end})")
    return tensors


def _sampled_bytes(handle, location: TensorLocation) -> Iterator[bytes]:
    """The tensor's bytes, whole when small, else evenly spaced windows over its whole range."""
    length = location.end - location.start
    if length <= _FINGERPRINT_WINDOWS * _FINGERPRINT_WINDOW:
        yield os.pread(handle.fileno(), length, location.start)
        return
    last = length - _FINGERPRINT_WINDOW
    for i in range(_FINGERPRINT_WINDOWS):
        offset = location.start + last * i // (_FINGERPRINT_WINDOWS - 1)
        yield os.pread(handle.fileno(), _FINGERPRINT_WINDOW, offset)


class CheckpointReader:
    """Maps tensor names to shards and reads tensors lazily, never the whole model at once."""

    def __init__(self, model_dir: str | Path):
        self.model_dir = Path(model_dir)
        if not self.model_dir.is_dir():
            raise CheckpointError(f"{self.model_dir}: not a folder")
        for entry in self.model_dir.iterdir():  # a FIFO or device would make a reader wait forever
            if not entry.is_dir() and not entry.is_file():
                raise CheckpointError(f"{entry}: not a regular file (a FIFO, device or broken link)")
        if not (self.model_dir / "config.json").is_file():
            raise CheckpointError(f"{self.model_dir}: no config.json (not a transformers checkpoint folder)")
        weight_map = self._weight_map()
        self.shards = self._shard_files(weight_map)
        self.layout: dict[str, TensorLocation] = {}
        for shard in self.shards:
            self.layout.update(read_safetensors_header(shard))
        self.locations: dict[str, Path] = {name: location.shard for name, location in self.layout.items()}
        for name, shard_name in (weight_map or {}).items():
            if self.locations.get(name) != self.model_dir / shard_name:
                raise CheckpointError(
                    f"{self.model_dir / INDEX_NAME}: tensor {name} is listed in {shard_name} but not stored there"
                )
        self._handles: dict[Path, Any] = {}

    def _weight_map(self) -> dict[str, str] | None:
        """The index's tensor → shard map, or None for an unsharded checkpoint."""
        index = self.model_dir / INDEX_NAME
        if not index.is_file():
            return None
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as exc:
            raise CheckpointError(f"{index}: not a valid safetensors index ({exc})") from exc
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index}: weight_map is not a JSON object")
        return weight_map

    def _shard_files(self, weight_map: dict[str, str] | None) -> list[Path]:
        if weight_map is not None:
            index = self.model_dir / INDEX_NAME
            outside = [name for name in weight_map.values() if not isinstance(name, str) or Path(name).name != name]
            if outside:  # a shard is a file of the folder, never a path that leads out of it
                raise CheckpointError(f"{index}: names shard {outside[0]!r}, which is no file name of this folder")
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

    def _handle(self, shard: Path):
        if shard not in self._handles:
            self._handles[shard] = safe_open(str(shard), framework="pt", device="cpu")
        return self._handles[shard]

    def get(self, key: str) -> torch.Tensor:
        """Read one stored tensor by its exact key."""
        return self._handle(self.locations[key]).get_tensor(key)

    def copy(self, key: str) -> torch.Tensor:
        """A copy of the stored tensor, its file unmapped: pages read stay resident while mapped, so memory stays
        one tensor."""
        tensor = self.get(key).clone()
        self.release()
        return tensor

    def release(self) -> None:
        """Unmap the shards: pages read so far stop counting towards this process's resident memory."""
        self._handles.clear()

    def spec(self, key: str) -> tuple[tuple[int, ...], torch.dtype]:
        """Shape and dtype of a stored tensor, from the header."""
        return self.layout[key].shape, self.layout[key].dtype

    def fingerprint(self) -> str:
        """Identity of config + weights, whatever the sharding: a store or a surgery made from other weights
        does not match.

        Hashes the config (less ``transformers_version``, which re-saving rewrites) and, for every tensor in
        name order, its dtype, shape and a sample of its bytes (see ``_sampled_bytes``): two checkpoints that
        differ in any whole tensor, e.g. two merges of different adapters, differ here.
        """
        config_path = self.model_dir / "config.json"
        try:
            config = json.loads(config_path.read_text())
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise CheckpointError(f"{config_path}: not a readable JSON config ({exc})") from exc
        if not isinstance(config, dict):
            raise CheckpointError(f"{config_path}: not a JSON object")
        config.pop("transformers_version", None)
        digest = hashlib.sha256(json.dumps(config, sort_keys=True).encode())
        handles: dict[Path, BinaryIO] = {}
        try:
            for name in sorted(self.layout):
                location = self.layout[name]
                if location.shard not in handles:
                    handles[location.shard] = location.shard.open("rb")
                digest.update(f"{name}:{location.dtype}:{list(location.shape)}".encode())
                for chunk in _sampled_bytes(handles[location.shard], location):
                    digest.update(chunk)
        finally:
            for handle in handles.values():
                handle.close()
        return digest.hexdigest()
