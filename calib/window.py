"""The covariances of a calibration that keeps no store: every input's entry as it is summed, and the sums of
the block just summed, read back exactly as a store in the run's format would give them.

``convert``'s one pass decomposes each block from these before the next block is summed, so the covariances
never reach the disk; the entries (counts, eigenvalue counts: a few numbers per input) stay for the report and
for a resumed run, which reads them back with ``entry_from_json``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from corda_surgery.calib.checks import StoreError, check_covariance
from corda_surgery.calib.store import CountedLevel, CovarianceEntry, round_total


class StreamedCovariances:
    """What ``CovarianceStore`` answers (entries, widths, covariances), for a store that is never written:
    ``path`` names the run in messages, not a file."""

    def __init__(self, path: Path, fingerprint: str, calibration: dict[str, Any], counted: CountedLevel | None):
        self.path, self.fingerprint, self.calibration, self.counted = path, fingerprint, calibration, counted
        self.normalised = calibration.get("store_dtype", "float64") == "float32"
        self.entries: dict[str, CovarianceEntry] = {}
        self.by_linear: dict[str, CovarianceEntry] = {}
        self._widths: dict[str, int] = {}
        self._held: dict[str, torch.Tensor] = {}

    def add(self, entry: CovarianceEntry, width: int) -> None:
        """An input's entry (from this run's calibration, or saved by the run a resume continues)."""
        self.entries[entry.name] = entry
        self.by_linear.update(dict.fromkeys(entry.linears, entry))
        self._widths[entry.name] = width

    def hold(self, entries: Iterable[tuple[CovarianceEntry, list[torch.Tensor]]]) -> None:
        """One block's inputs with their sums (one per sampling round), held until ``release``."""
        for entry, round_sums in entries:
            total = round_total(round_sums)
            self.add(entry, total.shape[0])
            self._held[entry.name] = total

    def release(self) -> None:
        self._held.clear()

    @property
    def rounds(self) -> int:
        return max((len(e.round_counts) for e in self.entries.values()), default=0) or 1

    def check_model(self, fingerprint: str, model_dir: Path) -> None:
        if fingerprint != self.fingerprint:
            raise StoreError(f"{self.path}: covariances were collected on another model than {model_dir}")

    def dimension(self, linear: str) -> int:
        return self._widths[self._entry(linear).name]

    def _entry(self, linear: str) -> CovarianceEntry:
        entry = self.by_linear.get(linear)
        if entry is None:
            raise StoreError(f"{self.path}: no covariance for layer {linear}")
        return entry

    def covariance(self, linear: str, round_index: int | None = None) -> torch.Tensor:
        """The normalised float64 covariance, rounded through float32 where the run stores float32, as
        ``CovarianceStore.covariance`` reads it (the sums are exactly symmetric, as a packed store's are)."""
        entry = self._entry(linear)
        total = self._held.get(entry.name)
        if total is None or round_index is not None:
            which = f"sampling round {round_index} of {entry.name}" if round_index is not None else entry.name
            raise StoreError(f"{self.path}: the covariance of {which} is not held (one pass keeps only its block's)")
        if entry.count <= 0:
            raise StoreError(f"{self.path}: covariance {entry.name} saw no tokens")
        data = total / entry.count
        if self.normalised:
            data = data.to(torch.float32).to(torch.float64)
        check_covariance(data, f"{self.path}: covariance {entry.name}", symmetric=True)
        return data


def entry_to_json(entry: CovarianceEntry, width: int) -> dict[str, Any]:
    return {**asdict(entry), "width": width}


def entry_from_json(data: dict[str, Any]) -> tuple[CovarianceEntry, int]:
    """An entry ``entry_to_json`` wrote, and its input's width."""
    fields = dict(data)
    width = int(fields.pop("width"))
    fields["linears"], fields["round_counts"] = tuple(fields["linears"]), tuple(fields["round_counts"])
    return CovarianceEntry(**fields), width
