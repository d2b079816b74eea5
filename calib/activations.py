"""Hidden states between blocks, one tensor per calibration batch, within a memory budget.

Calibration holds every batch's hidden states while a block runs over all batches. Up to the budget they
stay in memory (on the compute device); past it a batch lives in a file of a temporary folder, memory-mapped
when read, so only the batch being run is resident. Each update is written to a new file and renamed over
the old one: a mapping still open on the old file keeps its data. The folder is removed on close, success
or failure; one a killed run left behind carries the output's staging mark and goes with the next run.
"""

from __future__ import annotations

import math
import shutil
import tempfile
from pathlib import Path

import torch

from corda_surgery.compute import ComputeOptions
from corda_surgery.distributed import local_world
from corda_surgery.outputs import OutputError


def rank_activation_budget(compute: ComputeOptions) -> int:
    """Bytes of hidden states this process keeps in memory: ``compute``'s budget, shared by the ranks on this
    machine where that is RAM. Take it once per run: its default depends on the memory free at the time."""
    budget = compute.activation_budget()
    if compute.torch_device.type == "cpu":
        budget //= local_world()
    return budget


class Activations:
    """A list of per-batch tensors: the first ones in memory while they fit ``budget`` bytes, the rest on disk."""

    def __init__(self, budget: int, spill_dir: Path, spill_prefix: str, device: torch.device):
        self.budget, self.device = budget, device
        self._spill_dir, self._spill_prefix = spill_dir, spill_prefix
        self._folder: Path | None = None
        self._in_memory: dict[int, torch.Tensor] = {}
        self._on_disk: dict[int, tuple[tuple[int, ...], torch.dtype]] = {}
        self.resident_bytes = 0
        self.spilled_bytes = 0

    def __len__(self) -> int:
        return len(self._in_memory) + len(self._on_disk)

    def append(self, tensor: torch.Tensor) -> None:
        index = len(self)
        size = tensor.numel() * tensor.element_size()
        if self.resident_bytes + size <= self.budget:
            self._in_memory[index] = tensor.to(self.device)
            self.resident_bytes += size
        else:
            self._write(index, tensor)
            self.spilled_bytes += size

    def __getitem__(self, index: int) -> torch.Tensor:
        if index in self._in_memory:
            return self._in_memory[index]
        shape, dtype = self._on_disk[index]
        mapped = torch.from_file(str(self._path(index)), shared=False, size=math.prod(shape), dtype=dtype)
        return mapped.view(shape).to(self.device)

    def __setitem__(self, index: int, tensor: torch.Tensor) -> None:
        """Replace batch ``index`` (same shape: a block's output for its input)."""
        if index in self._in_memory:
            self._in_memory[index] = tensor
        else:
            self._write(index, tensor)

    def _path(self, index: int) -> Path:
        assert self._folder is not None
        return self._folder / f"batch-{index}.bin"

    def _write(self, index: int, tensor: torch.Tensor) -> None:
        try:
            self._spill(index, tensor)
        except OSError as exc:
            where = self._folder or self._spill_dir
            raise OutputError(f"{where}: cannot spill hidden states ({exc.strerror or exc})") from exc

    def _spill(self, index: int, tensor: torch.Tensor) -> None:
        if self._folder is None:
            self._folder = Path(tempfile.mkdtemp(prefix=self._spill_prefix, dir=self._spill_dir))
        data = tensor.detach().to("cpu").contiguous()
        fresh = self._path(index).with_suffix(".new")
        data.view(torch.uint8).numpy().tofile(fresh)
        fresh.replace(self._path(index))
        self._on_disk[index] = (tuple(data.shape), data.dtype)

    def close(self) -> None:
        """Drop everything and remove the spill folder."""
        self._in_memory.clear()
        self._on_disk.clear()
        if self._folder is not None:
            shutil.rmtree(self._folder, ignore_errors=True)
            self._folder = None
