"""NF4, QLoRA's 4-bit format, by bitsandbytes itself: blocks of 64 weights scaled by their largest magnitude and
rounded to the 16 quantiles of a normal distribution. Nothing here is tuned to the data; the refit is what
makes the adapter know the rounding (``refit``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from corda_surgery.checkpoint.quantised import NF4_BLOCK, bitsandbytes_functional


@dataclass(frozen=True)
class NF4Quantised:
    packed: torch.Tensor  # uint8, two codes a byte
    state: Any  # bitsandbytes' QuantState: absmax per block, the code, the shape

    @property
    def dequantised(self) -> torch.Tensor:
        return bitsandbytes_functional().dequantize_4bit(self.packed, self.state)

    def tensors(self, key: str) -> dict[str, torch.Tensor]:
        """The stored tensors, under the weight's ``key``, as bitsandbytes serialises them."""
        stats = self.state.as_dict(packed=True)
        return {key: self.packed, **{f"{key}.{name}": value for name, value in stats.items()}}


def nf4_quantise(weight: torch.Tensor, dtype: torch.dtype = torch.float32) -> NF4Quantised:
    """``weight`` in NF4 from ``dtype`` (the checkpoint's: the state records it, so dequantising and merging give
    that dtype back), no double quantisation (absmax stays float32: exact on reload)."""
    packed, state = bitsandbytes_functional().quantize_4bit(
        weight.to(dtype).contiguous(),
        blocksize=NF4_BLOCK,
        quant_type="nf4",
        compress_statistics=False,
        quant_storage=torch.uint8,
    )
    return NF4Quantised(packed, state)
