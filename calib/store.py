"""HDF5 covariance store: one dataset per distinct linear input, holding the raw sum XᵀX.

The raw float64 sum and its count are stored (normalised only when read), so partial runs merge exactly.
A run writes ``<name>.partial`` next to the target, flushes after each layer, and renames when complete;
``layers_done`` says how far a stopped run got, so it can resume there.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import torch

from corda_surgery import __version__
from corda_surgery.errors import CordaSurgeryError
from corda_surgery.numerics import all_finite

# 2: the model fingerprint covers every tensor (headers + a strided sample of each tensor's bytes).
FORMAT_VERSION = 2
ROUND_SEPARATOR = "@round"  # dataset "<input>@round<k>" holds sampling round k of "<input>"
# |C − Cᵀ| allowed, relative to max |C|: the writer stores exactly symmetric sums; a store made elsewhere
# may carry rounding of this order, anything larger is not a covariance.
SYMMETRY_TOLERANCE = 1e-6
SYMMETRY_TILE = 256  # the symmetry check compares this-wide tiles with their mirror images
# The rule that the legacy ``below_damping_level`` attribute means (λ·mean(diag C)); counts at any other rule
# are described by ``damping_counted`` alone, so that an older reader sees them as no counts at all.
LEGACY_COUNT_RULE = "mean-diagonal"


class StoreError(CordaSurgeryError):
    """The covariance store is missing, incomplete, corrupt or from another model; names the file."""


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


def check_format(path: Path, attrs) -> None:
    """Refuse a store this version cannot read correctly, saying which side to upgrade."""
    version = attrs.get("format_version")
    if version is None:
        raise StoreError(f"{path}: not a corda-surgery covariance store (no format_version attribute)")
    if int(version) > FORMAT_VERSION:
        raise StoreError(
            f"{path}: store format {int(version)} was written by a newer corda-surgery "
            f"({attrs.get('tool_version', '?')}); this version {__version__} reads format {FORMAT_VERSION}: upgrade"
        )
    if int(version) < FORMAT_VERSION:
        raise StoreError(
            f"{path}: store format {int(version)} (corda-surgery {attrs.get('tool_version', '?')}) identifies the "
            f"model by a weaker fingerprint than format {FORMAT_VERSION}; calibrate again"
        )


def partial_path(path: Path) -> Path:
    return path.with_name(path.name + ".partial")


def _check_covariance(data: torch.Tensor, what: str) -> None:
    """Finite, symmetric within SYMMETRY_TOLERANCE of its largest entry, non-negative diagonal. Reductions over
    the whole matrix and mirrored pairs of SYMMETRY_TILE-wide tiles (both fit in cache), so no temporary
    approaches the covariance's size."""
    if not all_finite(data):
        raise StoreError(f"{what} contains NaN or Inf")
    low, high = torch.aminmax(data)
    scale, asymmetry, width = max(-float(low), float(high)), 0.0, data.shape[0]
    for start in range(0, width, SYMMETRY_TILE):
        rows = slice(start, start + SYMMETRY_TILE)
        for column in range(start, width, SYMMETRY_TILE):
            columns = slice(column, column + SYMMETRY_TILE)
            low, high = torch.aminmax(data[rows, columns] - data[columns, rows].T)
            asymmetry = max(asymmetry, -float(low), float(high))
    if asymmetry > SYMMETRY_TOLERANCE * scale:
        raise StoreError(f"{what} is not symmetric (tolerance {SYMMETRY_TOLERANCE:g})")
    if bool((data.diagonal() < 0).any()):
        raise StoreError(f"{what} has negative entries on its diagonal")


def round_total(round_sums: Sequence[torch.Tensor]) -> torch.Tensor:
    """The sum over the sampling rounds, as the store holds it (the one sum itself when there is one round)."""
    if len(round_sums) == 1:
        return round_sums[0]
    total = round_sums[0].clone()
    for round_sum in round_sums[1:]:
        total.add_(round_sum)
    return total


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
        reopened = self._reopen(counted) if resume and self.partial.exists() else None
        self.file: h5py.File = reopened if reopened is not None else h5py.File(self.partial, "w")
        if reopened is None:
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

    def _reopen(self, counted: CountedLevel | None) -> h5py.File | None:
        try:
            handle = h5py.File(self.partial, "a")
        except OSError:
            return None  # the crash left an unreadable file: start the run again
        try:
            check_format(self.partial, handle.attrs)
        except StoreError:
            handle.close()
            raise
        if handle.attrs.get("model_fingerprint") != self.fingerprint:
            handle.close()
            raise StoreError(f"{self.partial}: partial store is from another model; remove it or drop --resume")
        if json.loads(handle.attrs["calibration"]) != self.calibration:
            handle.close()
            raise StoreError(
                f"{self.partial}: partial store used other calibration settings; remove it or drop --resume"
            )
        if counted_level(handle.attrs) != counted:
            handle.close()
            raise StoreError(
                f"{self.partial}: partial store counted its eigenvalues at another damping; remove it or drop --resume"
            )
        done = int(handle.attrs["layers_done"])
        for name in list(handle):  # drop datasets (sums and rounds) of the layer that was in progress
            if int(handle[name].attrs.get("layer", done)) >= done:  # no attribute: killed mid-write
                del handle[name]
        return handle

    @property
    def layers_done(self) -> int:
        return int(self.file.attrs["layers_done"])

    def write_layer(self, layer: int, entries: Iterable[tuple[CovarianceEntry, list[torch.Tensor]]]) -> None:
        """Write every input of one layer (its sum, each round's when there are several, and the entry's
        attributes), then mark the layer done and flush."""
        for entry, round_sums in entries:
            data = self.file.create_dataset(entry.name, data=round_total(round_sums).numpy())
            data.attrs["layer"] = entry.layer
            data.attrs["linears"] = json.dumps(list(entry.linears))
            data.attrs["count"] = entry.count
            data.attrs["round_counts"] = json.dumps(list(entry.round_counts))
            for name in ("below_damping", "below_damping_half", "half_count"):
                if getattr(entry, name) is not None:
                    data.attrs[name] = getattr(entry, name)
            for index, round_sum in enumerate(round_sums if entry.round_counts else []):
                part = self.file.create_dataset(entry.round_name(index), data=round_sum.numpy())
                part.attrs["layer"] = entry.layer
        self.file.attrs["layers_done"] = layer + 1
        self.file.flush()

    def finish(self) -> Path:
        """Mark complete and rename into place (atomic on one file system)."""
        self.file.attrs["complete"] = True
        self.file.close()
        os.replace(self.partial, self.path)
        return self.path

    def close(self) -> None:
        if self.file.id.valid:
            self.file.close()


class CovarianceStore:
    """Read access to a complete store: covariances by linear name, normalised on read."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if self.path.exists() and not self.path.is_file():
            raise StoreError(f"{self.path}: not a regular file")
        if not self.path.is_file():
            hint = (
                " (an interrupted run left .partial: rerun with --resume)" if partial_path(self.path).exists() else ""
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
            self.fingerprint = str(attrs["model_fingerprint"])
            self.calibration = json.loads(attrs["calibration"])
            self.below_damping_level = float(attrs["below_damping_level"]) if "below_damping_level" in attrs else None
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
                shape = self.file[name].shape
                if len(shape) != 2 or shape[0] != shape[1]:
                    raise StoreError(f"{self.path}: covariance {name} has shape {shape}, not square")
                if entry.count < 0 or (entry.round_counts and sum(entry.round_counts) != entry.count):
                    raise StoreError(
                        f"{self.path}: counts of {name} do not add up (total {entry.count}, rounds "
                        f"{list(entry.round_counts)})"
                    )
                self.entries[name] = entry
        except (StoreError, OSError, KeyError, ValueError, TypeError) as exc:
            self.file.close()
            if isinstance(exc, StoreError):
                raise
            raise StoreError(f"{self.path}: corrupt or unreadable covariance store ({exc})") from exc
        self.by_linear = {linear: entry for entry in self.entries.values() for linear in entry.linears}

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
        return int(self.file[self._entry(linear).name].shape[0])

    def _entry(self, linear: str) -> CovarianceEntry:
        entry = self.by_linear.get(linear)
        if entry is None:
            raise StoreError(f"{self.path}: no covariance for layer {linear}")
        return entry

    def covariance(self, linear: str, round_index: int | None = None) -> torch.Tensor:
        """The normalised float64 covariance (sum / count) of the input ``linear`` reads, or of one round;
        refused unless finite, symmetric (within SYMMETRY_TOLERANCE of its largest entry) and non-negative
        on the diagonal."""
        entry = self._entry(linear)
        name, count = entry.name, entry.count
        if round_index is not None:
            if not 0 <= round_index < len(entry.round_counts):
                raise StoreError(f"{self.path}: {entry.name} has no sampling round {round_index}")
            name, count = entry.round_name(round_index), entry.round_counts[round_index]
        try:
            data = torch.from_numpy(np.asarray(self.file[name][()], dtype=np.float64))
        except (OSError, KeyError, ValueError) as exc:
            raise StoreError(f"{self.path}: cannot read covariance {name} ({exc})") from exc
        if count <= 0:
            raise StoreError(f"{self.path}: covariance {name} saw no tokens")
        _check_covariance(data, f"{self.path}: covariance {name}")
        return data.div_(count)

    def close(self) -> None:
        self.file.close()

    def __enter__(self) -> CovarianceStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
