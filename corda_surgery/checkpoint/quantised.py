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

import json
import math
from enum import Enum
from typing import Any

import torch
from compressed_tensors.compressors import pack_to_int32, unpack_from_int32

Spec = tuple[tuple[int, ...], torch.dtype]
NF4_BLOCK = 64
NF4_STATE = "quant_state.bitsandbytes__nf4"
PACKED_PER_INT32 = 8  # compressed-tensors packs 4-bit codes (+8) eight to an int32, along the inputs


class ResidualFormat(str, Enum):
    FLOAT = "float"  # the input's dtype, as today
    NF4 = "nf4"  # bitsandbytes NF4: what QLoRA trains on
    INT4 = "int4"  # GPTQ on the stored covariance, compressed-tensors pack-quantized


def nf4_state(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """The JSON quant state bitsandbytes writes beside a packed weight (``QuantState.as_dict(packed=True)``)."""
    state = {"quant_type": "nf4", "blocksize": NF4_BLOCK, "dtype": str(dtype).removeprefix("torch."), "shape": shape}
    return torch.tensor(list(json.dumps(state).encode()), dtype=torch.uint8)


def quantised_specs(key: str, shape: tuple[int, ...], dtype: torch.dtype, form: ResidualFormat, group: int) -> dict:
    """The stored tensors (name → shape, dtype) that replace the weight ``key`` of ``shape`` and ``dtype``."""
    out_dim, in_dim = shape
    if form is ResidualFormat.NF4:
        count = out_dim * in_dim
        return {
            key: ((math.ceil(count / 2), 1), torch.uint8),
            f"{key}.absmax": ((math.ceil(count / NF4_BLOCK),), torch.float32),
            f"{key}.quant_map": ((16,), torch.float32),
            f"{key}.{NF4_STATE}": (tuple(nf4_state(list(shape), torch.float32).shape), torch.uint8),
        }
    module = key.removesuffix(".weight")
    return {
        f"{module}.weight_packed": ((out_dim, math.ceil(in_dim / PACKED_PER_INT32)), torch.int32),
        f"{module}.weight_scale": ((out_dim, in_dim // group), dtype),
        f"{module}.weight_shape": ((2,), torch.int64),
    }


def unpacked_int4(packed: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """The signed 4-bit codes (int8, ``shape``) of a ``weight_packed`` tensor."""
    return unpack_from_int32(packed, 4, torch.Size(shape))


def int4_tensors(key: str, codes: torch.Tensor, scales: torch.Tensor) -> dict[str, torch.Tensor]:
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
