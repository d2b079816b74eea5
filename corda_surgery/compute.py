"""Where and in what precision the work runs: device, forward dtype, activation budget, memory budget.

One frozen object built at the edge (the CLI) like ``SurgeryOptions``; every choice that depends on the
machine (``auto``) is resolved here, once, with the reason logged.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from corda_surgery.errors import OptionsError
from corda_surgery.sizes import parse_size

log = logging.getLogger(__name__)

FORWARD_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# With no --max-memory, hidden states may take this share of the memory available when the run starts
# (RAM on the CPU, or the memory budget where that is less; free VRAM on a GPU) before they spill to disk.
DEFAULT_ACTIVATION_SHARE = 0.25
_DEVICE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")
_MEMINFO = Path("/proc/meminfo")


def resident_bytes() -> int:
    """This process's resident memory now (Linux ``/proc/self/statm``; 0 where it cannot be read)."""
    try:
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def available_host_memory() -> int:
    """Bytes of RAM a new allocation can get without swapping (MemAvailable), else the physical total."""
    if _MEMINFO.is_file():
        for line in _MEMINFO.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def available_memory(device: torch.device) -> int:
    """Free bytes on ``device``: VRAM for CUDA, RAM otherwise."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    return available_host_memory()


def native_half_matmul(dtype: torch.dtype) -> bool:
    """Whether this CPU multiplies ``dtype`` in hardware (AVX512-BF16 / AMX / AVX512-FP16 through oneDNN).

    Without it a bfloat16 ``nn.Linear`` runs several times slower than float32 (``bench/forward_dtype.py``),
    so ``auto`` keeps float32 there.
    """
    if dtype == torch.bfloat16:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    if dtype == torch.float16:
        return bool(torch.ops.mkldnn._is_mkldnn_fp16_supported())
    return True


@dataclass(frozen=True)
class ComputeOptions:
    """``device``: auto | cpu | cuda | cuda:i. ``forward_dtype``: auto (the checkpoint's) | float32 | bfloat16
    | float16. ``max_memory``: bytes of hidden states kept in memory before the rest spills to disk (None:
    DEFAULT_ACTIVATION_SHARE of what is available, or under ``memory_budget`` what its plan leaves them).
    ``memory_budget``: bytes of RAM the whole run may hold at its peak (None: whatever is free)."""

    device: str = "auto"
    forward_dtype: str = "auto"
    max_memory: int | str | None = None
    memory_budget: int | str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.device, str) or not _DEVICE.match(self.device):
            raise OptionsError(f"`device` {self.device!r}: must be auto, cpu, cuda or cuda:N")
        if self.device.startswith("cuda"):
            if not torch.cuda.is_available():
                raise OptionsError(f"`device` {self.device}: no CUDA device is available (torch {torch.__version__})")
            index = torch.device(self.device).index
            if index is not None and index >= torch.cuda.device_count():
                raise OptionsError(f"`device` {self.device}: this machine has {torch.cuda.device_count()} GPU(s)")
        if self.forward_dtype != "auto" and self.forward_dtype not in FORWARD_DTYPES:
            raise OptionsError(f"`forward_dtype` {self.forward_dtype!r}: must be auto, {', '.join(FORWARD_DTYPES)}")
        for name in ("max_memory", "memory_budget"):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, parse_size(getattr(self, name), name))

    @property
    def budget(self) -> int | None:
        """``memory_budget`` in bytes."""
        assert not isinstance(self.memory_budget, str)  # parsed in __post_init__
        return self.memory_budget

    @property
    def torch_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    def torch_forward_dtype(self, checkpoint_dtype: torch.dtype) -> torch.dtype:
        """The dtype blocks run in: the chosen one, or for ``auto`` the checkpoint's where the device
        computes it natively (float32 on CPUs without bfloat16/float16 units; float32 for float64)."""
        if self.forward_dtype != "auto":
            return FORWARD_DTYPES[self.forward_dtype]
        if checkpoint_dtype not in FORWARD_DTYPES.values():
            return torch.float32
        if self.torch_device.type == "cpu" and not native_half_matmul(checkpoint_dtype):
            log.info("forward in float32: this CPU has no native %s matrix units (auto)", checkpoint_dtype)
            return torch.float32
        return checkpoint_dtype

    def activation_budget(self) -> int:
        """Bytes of hidden states held in memory before spilling to disk."""
        if self.max_memory is not None:
            assert isinstance(self.max_memory, int)  # parsed in __post_init__
            return self.max_memory
        available = available_memory(self.torch_device)
        if self.budget is not None and self.torch_device.type == "cpu":
            available = min(available, self.budget)
        return int(DEFAULT_ACTIVATION_SHARE * available)

    def record(self) -> dict:
        """What surgery.json records of where decompositions ran (the forward dtype is the store's record)."""
        return {"device": str(self.torch_device)}


DEFAULT_COMPUTE = ComputeOptions()
