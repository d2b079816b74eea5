"""HDF5 covariance store: one dataset per distinct linear input, holding XᵀX once (its upper triangle).

The raw float64 sum and its count are stored (normalised only when read), so partial runs merge exactly; or,
for the disk's sake, the normalised covariance in float32 (``CalibrationSpec.store_dtype``). Format 2 stores (full
squares of raw float64 sums) are read as they are.
A run writes ``<name>.partial`` next to the target, flushes after each layer, and renames when complete;
``layers_done`` says how far a stopped run got, so it can resume there.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import h5py
import numpy as np
import torch

from corda_surgery import __version__
from corda_surgery.calib.checks import (
    FORMAT_VERSION,
    StoreError,
    check_contained,
    check_covariance,
    check_format,
)
from corda_surgery.calib.packing import packed_width, read_packed, read_packed_panels, write_packed
from corda_surgery.panels import Covariance, total_of

# 2: the model fingerprint covers every tensor (headers + a strided sample of each tensor's bytes).
# 3: each covariance packed (its upper triangle), float64 sums or float32 normalised covariances.
ROUND_SEPARATOR = "@round"  # dataset "<input>@round<k>" holds sampling round k of "<input>"
# The rule that the legacy ``below_damping_level`` attribute means (λ·mean(diag C)); counts at any other rule
# are described by ``damping_counted`` alone, so that an older reader sees them as no counts at all.
LEGACY_COUNT_RULE = "mean-diagonal"


@dataclass(frozen=True)
class CovarianceEntry:
    """One distinct input: the linears that read it and the count its sum is divided by."""

    name: str
    layer: int
    linears: tuple[str, ...]
    count: int
    round_counts: tuple[int, ...] = ()  # one count per sampling round, when the run had several
    below_damping: int | None = None  # eigenvalues of C under the store's counted level; None: not counted
    below_damping_half: int | None = None  # the same count at part of the tokens (the first half of the batches)
    half_count: int | None = None  # the count that part's sum is divided by

    def round_name(self, index: int) -> str:
        return f"{self.name}{ROUND_SEPARATOR}{index}"


def partial_path(path: Path) -> Path:
    return path.with_name(path.name + ".partial")


@dataclass(frozen=True)
class CountedLevel:
    """The damping rule (its name) and λ at which a store's ``below_damping`` counts were taken by its caller."""

    rule: str
    damping: float

    def to_json(self) -> str:
        return json.dumps({"rule": self.rule, "damping": self.damping})


def counted_level(attrs) -> CountedLevel | None:
    """A store's counted level: ``damping_counted``, else the legacy ``below_damping_level`` (λ·mean(diag C))."""
    if "damping_counted" in attrs:
        described = json.loads(attrs["damping_counted"])
        return CountedLevel(str(described["rule"]), float(described["damping"]))
    if "below_damping_level" in attrs:
        return CountedLevel(LEGACY_COUNT_RULE, float(attrs["below_damping_level"]))
    return None


class Covariances(Protocol):
    """What a surgery reads of a store: a ``CovarianceStore``, or the ``StreamedCovariances`` of a run that keeps
    none (``corda_surgery.calib.window``)."""

    path: Path
    fingerprint: str
    calibration: dict[str, Any]
    counted: CountedLevel | None
    entries: dict[str, CovarianceEntry]
    by_linear: dict[str, CovarianceEntry]

    @property
    def rounds(self) -> int: ...

    def check_model(self, fingerprint: str, model_dir: Path) -> None: ...

    def dimension(self, linear: str) -> int: ...

    def covariance(self, linear: str, round_index: int | None = None) -> torch.Tensor: ...

    def triangle(self, linear: str, round_index: int | None = None) -> Covariance: ...


def entry_of(store: Covariances, linear: str) -> CovarianceEntry:
    """The entry of the input ``linear`` reads, or an error naming the store and the layer."""
    entry = store.by_linear.get(linear)
    if entry is None:
        raise StoreError(f"{store.path}: no covariance for layer {linear}")
    return entry


class StoreWriter:
    """Writes one calibration run; reopens a ``.partial`` file of the same run to resume it.

    ``counted``: the rule and level its entries' ``below_damping`` counts were taken at (recorded; None: no
    counts), by whoever computed them, since the store does no linear algebra.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        fingerprint: str,
        calibration: dict,
        num_layers: int,
        resume: bool,
        counted: CountedLevel | None = None,
    ):
        self.path = Path(path)
        self.partial = partial_path(self.path)
        self.fingerprint = fingerprint
        self.calibration = calibration
        self.storage_dtype = str(calibration.get("store_dtype", "float64"))
        reopened = self._reopen(counted) if resume and self.partial.exists() else None
        self.created = reopened is None  # this run made the partial file: an error removes it (see discard)
        if reopened is not None:
            self.file: h5py.File = reopened
            return
        try:
            self.file = h5py.File(self.partial, "w")
            attrs = self.file.attrs
            attrs["format_version"] = FORMAT_VERSION
            attrs["tool_version"] = __version__
            attrs["model_fingerprint"] = fingerprint
            attrs["calibration"] = json.dumps(calibration, sort_keys=True)
            attrs["num_layers"] = num_layers
            attrs["layers_done"] = 0
            if counted is not None:
                attrs["damping_counted"] = counted.to_json()
                if counted.rule == LEGACY_COUNT_RULE:
                    attrs["below_damping_level"] = counted.damping
            attrs["complete"] = False
            self.file.flush()
        except BaseException:
            self.discard()
            raise

    def _reopen(self, counted: CountedLevel | None) -> h5py.File | None:
        try:
            handle = h5py.File(self.partial, "a")
        except OSError:
            return None  # the crash left an unreadable file: start the run again
        try:
            check_format(self.partial, handle.attrs)
            if int(handle.attrs["format_version"]) != FORMAT_VERSION:
                raise StoreError(
                    f"{self.partial}: a partial store in format {int(handle.attrs['format_version'])}; finish it with "
                    "the version that started it, or drop --resume"
                )
        except StoreError:
            handle.close()
            raise
        if handle.attrs.get("model_fingerprint") != self.fingerprint:
            handle.close()
            raise StoreError(f"{self.partial}: partial store is from another model; remove it or drop `resume`")
        if json.loads(handle.attrs["calibration"]) != self.calibration:
            handle.close()
            raise StoreError(
                f"{self.partial}: partial store used other calibration settings; remove it or drop `resume`"
            )
        if counted_level(handle.attrs) != counted:
            handle.close()
            raise StoreError(
                f"{self.partial}: partial store counted its eigenvalues at another damping; remove it or drop `resume`"
            )
        done = int(handle.attrs["layers_done"])
        for name in list(handle):  # drop what the layer in progress wrote (its own hard links: nothing else read)
            own = isinstance(handle.get(name, getlink=True), h5py.HardLink)
            if own and int(handle[name].attrs.get("layer", done)) >= done:  # no attribute: killed mid-write
                del handle[name]
        try:
            check_contained(handle, self.partial)
        except StoreError:
            handle.close()
            raise
        return handle

    @property
    def layers_done(self) -> int:
        return int(self.file.attrs["layers_done"])

    def write_layer(self, layer: int, entries: Iterable[tuple[CovarianceEntry, Sequence[Covariance]]]) -> None:
        """Write every input of one layer (its sum, each round's when there are several, and the entry's
        attributes), then mark the layer done and flush; a write that fails (a full disk) names the file."""
        try:
            self._write_layer(layer, entries)
        except OSError as exc:
            raise StoreError(f"{self.partial}: cannot write layer {layer} ({exc.strerror or exc})") from exc

    def _write_layer(self, layer: int, entries: Iterable[tuple[CovarianceEntry, Sequence[Covariance]]]) -> None:
        for entry, round_sums in entries:
            data = self._write_sum(entry.name, total_of(round_sums), entry.count)  # type: ignore[type-var]  # one form per entry
            data.attrs["layer"] = entry.layer
            data.attrs["linears"] = json.dumps(list(entry.linears))
            data.attrs["count"] = entry.count
            data.attrs["round_counts"] = json.dumps(list(entry.round_counts))
            for name in ("below_damping", "below_damping_half", "half_count"):
                if getattr(entry, name) is not None:
                    data.attrs[name] = getattr(entry, name)
            for index, round_sum in enumerate(round_sums if entry.round_counts else []):
                part = self._write_sum(entry.round_name(index), round_sum, entry.round_counts[index])
                part.attrs["layer"] = entry.layer
        self.file.attrs["layers_done"] = layer + 1
        self.file.flush()

    def _write_sum(self, name: str, total: Covariance, count: int) -> h5py.Dataset:
        """The raw float64 sum, or in float32 the normalised covariance (a sum's large values would cost it
        digits there), packed."""
        if self.storage_dtype == "float64":
            return write_packed(self.file, name, total, np.float64)
        return write_packed(self.file, name, total, np.float32, divisor=max(count, 1))

    def finish(self) -> Path:
        """Mark complete and rename into place (atomic on one file system)."""
        self.file.attrs["complete"] = True
        self.file.close()
        os.replace(self.partial, self.path)
        return self.path

    def close(self) -> None:
        if getattr(self, "file", None) is not None and self.file.id.valid:
            self.file.close()

    def discard(self) -> None:
        """Close and remove the partial store if this run created it: a failed run leaves nothing behind. A
        resumed run's partial predates it and stays, as does any partial a kill or a signal leaves (resumable)."""
        self.close()
        if self.created:
            self.partial.unlink(missing_ok=True)


class CovarianceStore:
    """Read access to a complete store: covariances by linear name, normalised on read."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if self.path.exists() and not self.path.is_file():
            raise StoreError(f"{self.path}: not a regular file")
        if not self.path.is_file():
            hint = (
                " (an interrupted run left .partial: rerun with `resume`)" if partial_path(self.path).exists() else ""
            )
            raise StoreError(f"{self.path}: covariance store not found{hint}")
        try:
            self.file = h5py.File(self.path, "r")
        except OSError as exc:
            raise StoreError(f"{self.path}: corrupt or unreadable covariance store ({exc})") from exc
        try:
            attrs = self.file.attrs
            check_format(self.path, attrs)
            if not attrs.get("complete", False):
                raise StoreError(f"{self.path}: covariance store is incomplete")
            check_contained(self.file, self.path)
            self.fingerprint = str(attrs["model_fingerprint"])
            self.calibration = json.loads(attrs["calibration"])
            self.packed = int(attrs["format_version"]) >= 3
            self.normalised = self.packed and self.calibration.get("store_dtype", "float64") == "float32"
            self.counted = counted_level(attrs)
            self.entries: dict[str, CovarianceEntry] = {}
            for name in self.file:
                if ROUND_SEPARATOR in name:
                    continue
                dataset_attrs = self.file[name].attrs
                entry = CovarianceEntry(
                    name=name,
                    layer=int(dataset_attrs["layer"]),
                    linears=tuple(json.loads(dataset_attrs["linears"])),
                    count=int(dataset_attrs["count"]),
                    round_counts=tuple(json.loads(dataset_attrs.get("round_counts", "[]"))),
                    **{
                        field: int(dataset_attrs[field])
                        for field in ("below_damping", "below_damping_half", "half_count")
                        if field in dataset_attrs
                    },
                )
                if entry.count < 0 or (entry.round_counts and sum(entry.round_counts) != entry.count):
                    raise StoreError(
                        f"{self.path}: counts of {name} do not add up (total {entry.count}, rounds "
                        f"{list(entry.round_counts)})"
                    )
                self._check_rounds(entry)
                self.entries[name] = entry
        except (StoreError, OSError, KeyError, ValueError, TypeError, RuntimeError) as exc:
            self.file.close()
            if isinstance(exc, StoreError):
                raise
            raise StoreError(f"{self.path}: corrupt or unreadable covariance store ({exc})") from exc
        self.by_linear = {linear: entry for entry in self.entries.values() for linear in entry.linears}

    def _check_rounds(self, entry: CovarianceEntry) -> None:
        """Each sampling round the entry counts is stored, with the sum's shape (read before any data)."""
        shape = self.file[entry.name].shape
        for index in range(len(entry.round_counts)):
            part = self.file.get(entry.round_name(index))
            if part is None or part.shape != shape:
                found = "missing" if part is None else f"{part.shape}, not {shape}"
                raise StoreError(f"{self.path}: sampling round {entry.round_name(index)} is {found}")

    def check_model(self, fingerprint: str, model_dir: Path) -> None:
        if fingerprint != self.fingerprint:
            raise StoreError(
                f"{self.path}: covariances were collected on another model than {model_dir} (fingerprint mismatch)"
            )

    @property
    def rounds(self) -> int:
        """Number of sampling rounds stored separately (1: only the sum)."""
        return max((len(e.round_counts) for e in self.entries.values()), default=0) or 1

    def dimension(self, linear: str) -> int:
        """Width of the input ``linear`` reads, from the dataset's shape (no data read)."""
        length = int(self.file[self._entry(linear).name].shape[0])
        return packed_width(length) or 0 if self.packed else length

    def _entry(self, linear: str) -> CovarianceEntry:
        return entry_of(self, linear)

    def covariance(self, linear: str, round_index: int | None = None) -> torch.Tensor:
        """The normalised float64 covariance (sum / count) of the input ``linear`` reads, or of one round;
        refused unless finite, symmetric (within SYMMETRY_TOLERANCE of its largest entry) and non-negative
        on the diagonal."""
        data = self._read(linear, round_index, panels=False)
        assert isinstance(data, torch.Tensor)
        return data

    def triangle(self, linear: str, round_index: int | None = None) -> Covariance:
        """``covariance`` as its upper triangle (``SymmetricPanels``: half the memory) where the store is packed."""
        return self._read(linear, round_index, panels=True)

    def _read(self, linear: str, round_index: int | None, *, panels: bool) -> Covariance:
        entry = self._entry(linear)
        name, count = entry.name, entry.count
        if round_index is not None:
            if not 0 <= round_index < len(entry.round_counts):
                raise StoreError(f"{self.path}: {entry.name} has no sampling round {round_index}")
            name, count = entry.round_name(round_index), entry.round_counts[round_index]
        if count <= 0:
            raise StoreError(f"{self.path}: covariance {name} saw no tokens")
        try:
            dataset = self.file[name]
            data: Covariance
            if self.packed:
                width = packed_width(dataset.shape[0]) or 0
                data = read_packed_panels(dataset, width) if panels else read_packed(dataset, width)
            else:
                data = torch.from_numpy(np.asarray(dataset[()], dtype=np.float64))
        except (OSError, KeyError, ValueError, RuntimeError) as exc:
            raise StoreError(f"{self.path}: cannot read covariance {name} ({exc})") from exc
        check_covariance(data, f"{self.path}: covariance {name}", symmetric=self.packed)
        return data if self.normalised else data.div_(count)

    def close(self) -> None:
        self.file.close()

    def __enter__(self) -> CovarianceStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
