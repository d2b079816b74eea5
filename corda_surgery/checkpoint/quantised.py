"""How a quantised residual lies on disk: the tensors each quantised linear becomes, and the
``quantization_config`` that tells transformers to load them in 4-bit.

- ``nf4``: bitsandbytes' own serialisation (the packed weight under the weight's key, then ``absmax``,
  ``quant_map`` and the JSON quant state beside it), blocks of 64, no double quantisation: QLoRA's base.
- ``int4``: compressed-tensors' ``pack-quantized`` (the format llm-compressor writes and vLLM serves): symmetric
  integers packed eight to an int32, one scale per row and group, no zero point and no act-order index
  (llm-compressor's W4A16 scheme; transformers 5.25 loads an asymmetric one only when told to dequantise).

Every linear that is not quantised is named in the config, so the loader keeps it as it is stored.
"""

from __future__ import annotations

import functools
import json
import logging
from enum import Enum
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

from corda_surgery.checkpoint.reader import CheckpointError, CheckpointReader, TensorLocation
from corda_surgery.paths import read_json

Spec = tuple[tuple[int, ...], torch.dtype]
NF4_BLOCK = 64
NF4_STATE = "quant_state.bitsandbytes__nf4"
PACKED_PER_INT32 = 8  # compressed-tensors packs 4-bit codes (+8) eight to an int32, along the inputs


class ResidualFormat(str, Enum):
    FLOAT = "float"  # the input's dtype, as today
    NF4 = "nf4"  # bitsandbytes NF4: what QLoRA trains on
    INT4 = "int4"  # GPTQ on the stored covariance, compressed-tensors pack-quantized


@functools.cache
def bitsandbytes_functional() -> ModuleType:
    """``bitsandbytes.functional``, imported without its note that no hub kernel was fetched (its CPU backend
    falls back to its own, and this tool never reaches the hub)."""
    quiet = logging.getLogger("bitsandbytes.backends.cpu.ops")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        import bitsandbytes.functional as functional
    finally:
        quiet.setLevel(level)
    return functional


def nf4_state(shape: list[int], dtype: torch.dtype) -> torch.Tensor:
    """The JSON quant state bitsandbytes writes beside a packed weight (``QuantState.as_dict(packed=True)``)."""
    state = {"quant_type": "nf4", "blocksize": NF4_BLOCK, "dtype": str(dtype).removeprefix("torch."), "shape": shape}
    return torch.tensor(list(json.dumps(state).encode()), dtype=torch.uint8)


def quantised_specs(
    key: str, shape: tuple[int, ...], dtype: torch.dtype, form: ResidualFormat, group: int
) -> dict[str, Spec]:
    """The stored tensors (name → shape, dtype) that replace the weight ``key`` of ``shape`` and ``dtype``."""
    out_dim, in_dim = shape
    if form is ResidualFormat.NF4:
        count = out_dim * in_dim
        return {
            key: ((-(-count // 2), 1), torch.uint8),
            f"{key}.absmax": ((-(-count // NF4_BLOCK),), torch.float32),
            f"{key}.quant_map": ((16,), torch.float32),
            f"{key}.{NF4_STATE}": (tuple(nf4_state(list(shape), dtype).shape), torch.uint8),
        }
    module = key.removesuffix(".weight")
    return {
        f"{module}.weight_packed": ((out_dim, -(-in_dim // PACKED_PER_INT32)), torch.int32),
        f"{module}.weight_scale": ((out_dim, in_dim // group), dtype),
        f"{module}.weight_shape": ((2,), torch.int64),
    }


def unpacked_int4(packed: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """The signed 4-bit codes (int8, ``shape``) of a ``weight_packed`` tensor."""
    from compressed_tensors.compressors import unpack_from_int32  # seconds to import: only where int4 is read

    return unpack_from_int32(packed, 4, torch.Size(shape))


def int4_tensors(key: str, codes: torch.Tensor, scales: torch.Tensor) -> dict[str, torch.Tensor]:
    from compressed_tensors.compressors import pack_to_int32  # seconds to import: only where int4 is written

    module = key.removesuffix(".weight")
    return {
        f"{module}.weight_packed": pack_to_int32(codes, 4),
        f"{module}.weight_scale": scales,
        f"{module}.weight_shape": torch.tensor(codes.shape, dtype=torch.int64),
    }


def quantization_config(
    form: ResidualFormat, kept: list[str], group: int, compute_dtype: torch.dtype
) -> dict[str, Any]:
    """config.json's ``quantization_config`` for a residual whose linears other than ``kept`` are quantised."""
    if form is ResidualFormat.NF4:
        return {
            "quant_method": "bitsandbytes",
            "load_in_4bit": True,
            "load_in_8bit": False,
            "bnb_4bit_quant_type": "nf4",
            "bnb_4bit_use_double_quant": False,
            "bnb_4bit_compute_dtype": str(compute_dtype).removeprefix("torch."),
            "bnb_4bit_quant_storage": "uint8",
            "llm_int8_skip_modules": kept,
        }
    weights = {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": group}
    weights |= {"actorder": None, "dynamic": False, "observer": "memoryless_minmax"}
    return {
        "quant_method": "compressed-tensors",
        "format": "pack-quantized",
        "quantization_status": "compressed",
        "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights, "format": "pack-quantized"}},
        "ignore": kept,
    }


def refuse_quantised(model_dir: Path, config: dict[str, Any]) -> None:
    """A checkpoint quantised for loading (its config.json has a ``quantization_config``) holds no float weights to
    calibrate, decompose or export: refused in one line that says what to do with one of this tool's residuals."""
    quantization = config.get("quantization_config")
    if quantization is not None:
        method = quantization.get("quant_method") if isinstance(quantization, dict) else quantization
        raise CheckpointError(
            f"{model_dir}/config.json: a quantised checkpoint ({method!r}); corda-surgery reads float weights. A 4-bit "
            "residual of corda-surgery's: `corda-surgery merge` it with its adapter first"
        )


def _ours(form: ResidualFormat, config: dict[str, Any]) -> bool:
    """Whether ``config`` is the ``quantization_config`` this tool writes for ``form`` (whatever it keeps and, for
    int4, whatever the group size): the only layouts ``DequantisingReader`` knows how to read."""
    if form is ResidualFormat.NF4:
        expected = quantization_config(form, config.get("llm_int8_skip_modules"), 1, torch.float32)  # type: ignore[arg-type]
        return {k: v for k, v in config.items() if k != "bnb_4bit_compute_dtype"} == {
            k: v for k, v in expected.items() if k != "bnb_4bit_compute_dtype"
        }
    groups = config.get("config_groups")
    if not isinstance(groups, dict) or len(groups) != 1:
        return False
    group = next(iter(groups.values()))
    weights = group.get("weights") if isinstance(group, dict) else None
    if not isinstance(weights, dict):
        return False
    expected = quantization_config(form, config.get("ignore"), weights.get("group_size"), torch.float32)  # type: ignore[arg-type]
    return config.get("format") == expected["format"] and group == expected["config_groups"]["group_0"]


def int4_dequantised(codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """Codes (int8, (out, in)) times their row's and group's scale, in float32: what the loader computes."""
    group = codes.shape[1] // scales.shape[1]
    return codes.float() * scales.float().repeat_interleave(group, dim=1)


class DequantisingReader(CheckpointReader):
    """A residual this tool quantised, read as the float weights it stands for (what ``merge`` folds an adapter
    into): each quantised weight is one logical tensor, its codes, scales and state checked against the layout this
    tool writes, read on demand. Anything else quantised (other schemes, integer weights, zero points, act-order
    indices) is refused naming it."""

    def __init__(self, model_dir: str | Path):
        super().__init__(model_dir)
        config = read_json(self.model_dir / "config.json", CheckpointError)
        quantization = config.get("quantization_config") if isinstance(config, dict) else None
        method = quantization.get("quant_method") if isinstance(quantization, dict) else None
        forms = {"bitsandbytes": ResidualFormat.NF4, "compressed-tensors": ResidualFormat.INT4}
        if method not in forms or not _ours(forms[method], quantization):  # type: ignore[arg-type]
            raise CheckpointError(
                f"{self.model_dir}/config.json: its quantization_config is no nf4 or int4 residual of corda-surgery's"
            )
        self.form, self.stored = forms[method], dict(self.layout)
        self.pieces: dict[str, dict[str, str]] = {}
        for key in list(self.stored):
            pieces = self._pieces_of(key)
            if pieces is not None:
                self._add_logical(key if self.form is ResidualFormat.NF4 else key[: -len("_packed")], pieces)
        for key, location in self.layout.items():
            if key.endswith((".weight_zero_point", ".weight_g_idx")) or not location.dtype.is_floating_point:
                raise CheckpointError(f"{self.model_dir}: {key} is quantised in a layout corda-surgery does not write")

    def _pieces_of(self, key: str) -> dict[str, str] | None:
        if self.form is ResidualFormat.NF4:
            names = {"codes": key, "absmax": f"{key}.absmax", "quant_map": f"{key}.quant_map"}
            names["state"] = f"{key}.{NF4_STATE}"
            return names if names["state"] in self.stored else None
        if not key.endswith(".weight_packed"):
            return None
        module = key.removesuffix(".weight_packed")
        return {"codes": key, "scales": f"{module}.weight_scale", "shape": f"{module}.weight_shape"}

    def _add_logical(self, logical: str, pieces: dict[str, str]) -> None:
        missing = [name for name in pieces.values() if name not in self.stored]
        if missing:
            raise CheckpointError(f"{self.model_dir}: {pieces['codes']} is quantised but {missing[0]} is missing")
        shape, dtype = self._logical_spec(pieces)
        for name in pieces.values():
            self.layout.pop(name)
            self.locations.pop(name)
        self.layout[logical] = TensorLocation(self.stored[pieces["codes"]].shard, 0, 0, dtype, shape)
        self.locations[logical] = self.stored[pieces["codes"]].shard
        self.pieces[logical] = pieces

    def _logical_spec(self, pieces: dict[str, str]) -> tuple[tuple[int, int], torch.dtype]:
        """The float weight's shape and dtype, each stored piece checked to fit them (a stranger's file): the small
        state is checked before it is read, every size is a positive whole number, every piece has the shape and
        dtype this tool writes for them."""
        weight_key, small = pieces["codes"].removesuffix("_packed"), pieces.get("state", pieces.get("shape"))
        location, group, expected = self.stored[small or ""], 1, {}
        if location.dtype in (torch.uint8, torch.int64) and len(location.shape) == 1 and location.shape[0] <= 4096:
            try:
                if self.form is ResidualFormat.NF4:
                    state = json.loads(bytes(self._stored(pieces["state"]).tolist()))
                    shape, dtype = tuple(state["shape"]), getattr(torch, str(state["dtype"]), None)
                    known = (state["quant_type"], state["blocksize"]) == ("nf4", NF4_BLOCK)
                else:
                    shape, dtype = tuple(self._stored(pieces["shape"]).tolist()), self.stored[pieces["scales"]].dtype
                    scales = self.stored[pieces["scales"]].shape
                    known = len(scales) == 2 and len(shape) == 2 and scales[1] > 0 and shape[1] % scales[1] == 0
                    group = shape[1] // scales[1] if known else 1
                sizes = len(shape) == 2 and all(isinstance(d, int) and 0 < d < 1 << 40 for d in shape)
                if known and sizes and isinstance(dtype, torch.dtype) and dtype.is_floating_point:
                    expected = quantised_specs(weight_key, shape, dtype, self.form, group)
            except (ValueError, KeyError, TypeError, ArithmeticError, UnicodeDecodeError):
                expected = {}
        found = {name: (self.stored[name].shape, self.stored[name].dtype) for name in pieces.values()}
        if not expected or found != expected:
            raise CheckpointError(f"{self.model_dir}: {pieces['codes']} is no {self.form.value} weight this tool wrote")
        assert isinstance(dtype, torch.dtype)  # expected is empty otherwise
        return (int(shape[0]), int(shape[1])), dtype

    def _stored(self, name: str) -> torch.Tensor:
        """A stored piece by its own key (the logical layout no longer lists it)."""
        return self._handle(self.stored[name].shard).get_tensor(name)

    def get(self, key: str) -> torch.Tensor:
        pieces = self.pieces.get(key)
        if pieces is None:
            return super().get(key)
        stored = {role: self._stored(name) for role, name in pieces.items()}
        if self.form is ResidualFormat.NF4:
            functional = bitsandbytes_functional()
            state = functional.QuantState.from_dict(
                {"absmax": stored["absmax"], "quant_map": stored["quant_map"], NF4_STATE: stored["state"]}, "cpu"
            )
            return functional.dequantize_4bit(stored["codes"], state)
        shape = self.layout[key].shape
        codes = unpacked_int4(stored["codes"], (shape[0], shape[1]))
        return int4_dequantised(codes, stored["scales"]).to(stored["scales"].dtype)

    def fingerprint(self) -> str:
        """The stored bytes' fingerprint (the surgery's), not the logical tensors'."""
        logical, self.layout = self.layout, self.stored
        try:
            return super().fingerprint()
        finally:
            self.layout = logical
