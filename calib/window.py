"""The covariances of a calibration that keeps no store: every input's entry as it is summed, and the block
just summed, spilled to a one-block store beside the output while it is decomposed.

``convert``'s one pass decomposes each block before the next is summed. The block's sums leave memory for a
store of that block alone (the run's format and dtype, so every covariance reads back as the whole store
would give it, bit for bit), which goes once the block is decomposed: memory holds the sums or the
decomposition, never both, and the disk at most one block's covariances. The entries (counts, eigenvalue
counts: a few numbers per input) stay for the report and for a resumed run (``entry_to_json``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from corda_surgery.calib.checks import StoreError
from corda_surgery.calib.store import (
    CountedLevel,
    CovarianceEntry,
    CovarianceStore,
    StoreWriter,
    entry_of,
    partial_path,
)
from corda_surgery.panels import Covariance


class StreamedCovariances:
    """What ``CovarianceStore`` answers (entries, widths, covariances) over a run whose blocks come one at a time:
    ``path`` names the run in messages, ``block_path`` is where the block being decomposed is spilled."""

    def __init__(
        self,
        path: Path,
        block_path: Path,
        fingerprint: str,
        calibration: dict[str, Any],
        counted: CountedLevel | None,
    ):
        self.path, self.block_path = path, block_path
        self.fingerprint, self.calibration, self.counted = fingerprint, calibration, counted
        self.entries: dict[str, CovarianceEntry] = {}
        self.by_linear: dict[str, CovarianceEntry] = {}
        self._widths: dict[str, int] = {}
        self._block: CovarianceStore | None = None

    def add(self, entry: CovarianceEntry, width: int) -> None:
        """An input's entry (from this run's calibration, or saved by the run a resume continues)."""
        self.entries[entry.name] = entry
        self.by_linear.update(dict.fromkeys(entry.linears, entry))
        self._widths[entry.name] = width

    def spill(self, layer: int, entries: Iterable[tuple[CovarianceEntry, Sequence[Covariance]]]) -> None:
        """Block ``layer``'s inputs with their sums (one per sampling round): their entries kept, the sums written
        to the one-block store and read from there until ``release``."""
        self.release()
        writer = StoreWriter(
            self.block_path,
            fingerprint=self.fingerprint,
            calibration=self.calibration,
            num_layers=layer + 1,
            resume=False,
            counted=self.counted,
        )

        def described() -> Iterator[tuple[CovarianceEntry, Sequence[Covariance]]]:
            for entry, round_sums in entries:
                self.add(entry, round_sums[0].shape[0])
                yield entry, round_sums

        try:
            writer.write_layer(layer, described())
            writer.finish()
        except BaseException:
            writer.discard()
            raise
        self._block = CovarianceStore(self.block_path)

    def release(self) -> None:
        """Remove the one-block store (and what a failed spill left)."""
        if self._block is not None:
            self._block.close()
            self._block = None
        for path in (self.block_path, partial_path(self.block_path)):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()

    @property
    def rounds(self) -> int:
        return max((len(e.round_counts) for e in self.entries.values()), default=0) or 1

    def check_model(self, fingerprint: str, model_dir: Path) -> None:
        if fingerprint != self.fingerprint:
            raise StoreError(f"{self.path}: covariances were collected on another model than {model_dir}")

    def dimension(self, linear: str) -> int:
        return self._widths[self._entry(linear).name]

    def _entry(self, linear: str) -> CovarianceEntry:
        return entry_of(self, linear)

    def covariance(self, linear: str, round_index: int | None = None) -> torch.Tensor:
        """The covariance as the one-block store reads it; only the block being decomposed has one."""
        return self._held(linear).covariance(linear, round_index)

    def triangle(self, linear: str, round_index: int | None = None) -> Covariance:
        return self._held(linear).triangle(linear, round_index)

    def _held(self, linear: str) -> CovarianceStore:
        entry = self._entry(linear)
        if self._block is None or linear not in self._block.by_linear:
            raise StoreError(
                f"{self.path}: the covariance of {entry.name} is not held (one pass keeps only its block's)"
            )
        return self._block

    def __getstate__(self) -> dict[str, Any]:
        """Sent to the other ranks without the block being decomposed (an open file)."""
        return {**self.__dict__, "_block": None}


def entry_to_json(entry: CovarianceEntry, width: int) -> dict[str, Any]:
    return {**asdict(entry), "width": width}


def entry_from_json(data: dict[str, Any]) -> tuple[CovarianceEntry, int]:
    """An entry ``entry_to_json`` wrote, and its input's width."""
    fields = dict(data)
    width = int(fields.pop("width"))
    fields["linears"], fields["round_counts"] = tuple(fields["linears"]), tuple(fields["round_counts"])
    return CovarianceEntry(**fields), width
