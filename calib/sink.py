"""Where a calibration's covariances go, behind one interface on every rank, so that the engine reads the
same in one process and under torch.distributed.

Rank 0 (or the only process) claims the output and writes the store; every other rank claims nothing and
discards each layer it is given, since its sums already reached rank 0 through the all-reduce.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterable, Iterator, Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Protocol

from corda_surgery.calib.store import (
    CountedLevel,
    CovarianceEntry,
    Covariances,
    CovarianceStore,
    StoreError,
    StoreWriter,
)
from corda_surgery.checkpoint.view import ModelView
from corda_surgery.distributed import Ranks
from corda_surgery.outputs import claimed, refuse_existing
from corda_surgery.panels import Covariance
from corda_surgery.paths import resolved

log = logging.getLogger(__name__)

Entries = Iterable[tuple[CovarianceEntry, Sequence[Covariance]]]


class CovarianceSink(Protocol):
    """Takes a run's layers in order; ``layers_done``: how many a resumed store already holds (all of them
    where ``resume`` found the store finished)."""

    @property
    def layers_done(self) -> int: ...

    @property
    def finished(self) -> bool: ...

    def write_layer(self, layer: int, entries: Entries) -> None: ...

    def finish(self) -> None: ...

    def close(self) -> None: ...

    def discard(self) -> None:
        """After an error: close, and remove what this run wrote."""
        ...


class RankOutput(Protocol):
    """This rank's part in the output: claiming it before the run, and the sink of its covariances."""

    def claim(
        self, out: str | Path, inputs: Sequence[Path], overwrite: bool, resume: bool
    ) -> AbstractContextManager[Path]:
        """Hold ``out`` for the run; yields its resolved path."""
        ...

    def sink(
        self, out: Path, view: ModelView, calibration: dict, *, resume: bool, counted: CountedLevel | None
    ) -> CovarianceSink: ...


def rank_output(ranks: Ranks) -> RankOutput:
    """This process's part: the writer's on rank 0 (or alone), the others' elsewhere."""
    return _Writer() if ranks.writer else _OtherRank()


class _Writer:
    """Rank 0: claims ``out`` (disjoint from the inputs, locked, refused if it exists without ``overwrite`` or
    ``resume``) and writes the store there."""

    @contextlib.contextmanager
    def claim(self, out: str | Path, inputs: Sequence[Path], overwrite: bool, resume: bool) -> Iterator[Path]:
        with claimed(out, inputs) as path:
            refuse_existing(path, overwrite or resume)
            yield path

    def sink(
        self, out: Path, view: ModelView, calibration: dict, *, resume: bool, counted: CountedLevel | None
    ) -> CovarianceSink:
        if resume and out.exists():
            return _Finished(out, view, calibration)
        writer = StoreWriter(
            out,
            fingerprint=view.reader.fingerprint(),
            calibration=calibration,
            num_layers=view.num_blocks,
            resume=resume,
            counted=counted,
        )
        return _Store(writer)


class _Store:
    """The store being written; finishing it renames it into place and names its rank-deficient inputs."""

    finished = False

    def __init__(self, writer: StoreWriter):
        self.writer = writer

    @property
    def layers_done(self) -> int:
        return self.writer.layers_done

    def write_layer(self, layer: int, entries: Entries) -> None:
        self.writer.write_layer(layer, entries)

    def finish(self) -> None:
        with CovarianceStore(self.writer.finish()) as store:
            warn_rank_deficient(store)

    def close(self) -> None:
        self.writer.close()

    def discard(self) -> None:
        self.writer.discard()


class _Finished:
    """A store that ``resume`` finds already written: checked to be this model's and these settings', then kept
    as it is, so rerunning a command with ``resume`` until it succeeds succeeds once the work is done."""

    def __init__(self, out: Path, view: ModelView, calibration: dict):
        with CovarianceStore(out) as store:
            if store.fingerprint != view.reader.fingerprint():
                raise StoreError(f"{out}: a finished store of another model; remove it or drop `resume`")
            if store.calibration != calibration:
                keys = calibration.keys() | store.calibration.keys()
                differing = sorted(key for key in keys if calibration.get(key) != store.calibration.get(key))
                raise StoreError(
                    f"{out}: a finished store with other calibration settings ({', '.join(differing)}); "
                    "remove it or drop `resume`"
                )
        self.layers_done, self.finished = view.num_blocks, True
        log.warning("%s: already complete; nothing to do (resume)", out)

    def write_layer(self, layer: int, entries: Entries) -> None:
        raise AssertionError("a finished store takes no layers")

    def finish(self) -> None:
        pass

    def close(self) -> None:
        pass

    def discard(self) -> None:
        pass  # a finished store is the user's, never this run's to remove


class _OtherRank:
    """A rank other than 0: writes nothing under ``out`` (rank 0 holds it, and its lock)."""

    def claim(
        self, out: str | Path, inputs: Sequence[Path], overwrite: bool, resume: bool
    ) -> AbstractContextManager[Path]:
        return contextlib.nullcontext(resolved(out))

    def sink(
        self, out: Path, view: ModelView, calibration: dict, *, resume: bool, counted: CountedLevel | None
    ) -> CovarianceSink:
        return _Discard()


class _Discard:
    """Takes each layer's entries without reading them, so none is computed on this rank."""

    layers_done, finished = 0, False  # rank 0's reach the other ranks by broadcast

    def write_layer(self, layer: int, entries: Entries) -> None:
        pass

    def finish(self) -> None:
        pass

    def close(self) -> None:
        pass

    def discard(self) -> None:
        pass


def warn_rank_deficient(store: Covariances) -> None:
    """Name the inputs that saw fewer tokens than they are wide: their covariances are rank-deficient, so the
    smallest directions (KPM's cut) are set by damping there, not by data."""
    short = [
        (name, entry.count, store.dimension(entry.linears[0]))
        for name, entry in store.entries.items()
        if entry.count < store.dimension(entry.linears[0])
    ]
    total = len(store.entries)
    if short:
        name, count, width = short[0]
        log.warning(
            "%d of %d inputs saw fewer calibration tokens than they are wide (e.g. %s: %d tokens for %d inputs): "
            "their smallest covariance directions come from damping, not data; calibrate on more tokens "
            "(--samples, --seq-len, --pack)",
            len(short),
            total,
            name,
            count,
            width,
        )
