"""What a covariance store must be before its data is read, and what its data must be once read: checks that
read metadata only (format, links, storage, filters, dtype, shape, chunks), then the covariance's own
(finite, symmetric, non-negative diagonal)."""

from __future__ import annotations

from pathlib import Path

import h5py
import torch

from corda_surgery import __version__
from corda_surgery.calib.packing import packed_width
from corda_surgery.errors import CordaSurgeryError
from corda_surgery.panels import Covariance, SymmetricPanels, finite

FORMAT_VERSION = 3
READABLE_FORMATS = (2, 3)
# |C − Cᵀ| allowed, relative to max |C|: the writer stores exactly symmetric sums; a store made elsewhere
# may carry rounding of this order, anything larger is not a covariance.
SYMMETRY_TOLERANCE = 1e-6
SYMMETRY_TILE = 256  # the symmetry check compares this-wide tiles with their mirror images


class StoreError(CordaSurgeryError):
    """The covariance store is missing, incomplete, corrupt or from another model; names the file."""


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
    if int(version) < min(READABLE_FORMATS):
        raise StoreError(
            f"{path}: store format {int(version)} (corda-surgery {attrs.get('tool_version', '?')}) identifies the "
            f"model by a weaker fingerprint than format {FORMAT_VERSION}; calibrate again"
        )


# A store reads only itself: its datasets are hard-linked, contiguous or chunked in the file, unfiltered floats.
_LAYOUTS = {h5py.h5d.CONTIGUOUS: "contiguous", h5py.h5d.CHUNKED: "chunked", h5py.h5d.COMPACT: "compact"}


def _foreign_storage(dataset: h5py.Dataset) -> str | None:
    """Why reading ``dataset`` would read outside the file or inflate data (None: it would not); metadata only."""
    plist = dataset.id.get_create_plist()
    if plist.get_layout() == h5py.h5d.VIRTUAL:
        return "is a virtual dataset (its data lives in other files)"
    if plist.get_external_count():
        return f"keeps its data in another file (HDF5 external storage: {plist.get_external(0)[0].decode()!r})"
    if plist.get_layout() not in _LAYOUTS:
        return f"has an unknown storage layout ({plist.get_layout()})"
    if plist.get_nfilters():
        names = ", ".join(plist.get_filter(i)[3].decode(errors="replace") for i in range(plist.get_nfilters()))
        return f"is stored through filters this tool does not write ({names})"
    return None


def check_contained(handle: h5py.File, path: Path) -> None:
    """Refuse, naming the entry, anything a store written by this tool never holds and that could make reading
    it read another file or expand data: links other than hard links (external or soft), groups, virtual
    datasets, external raw storage, filters (a compressed bomb), non-float or non-square data, chunks larger than
    the data. Only metadata is read here, so a refused store's data is never touched."""
    for name in handle:
        link = handle.get(name, getlink=True)
        if not isinstance(link, h5py.HardLink):
            target = f" to {link.filename}:{link.path}" if isinstance(link, h5py.ExternalLink) else ""
            raise StoreError(
                f"{path}: entry {name} is an HDF5 {type(link).__name__}{target}, not data of its own; refused before "
                "reading it"
            )
        dataset = handle[name]
        if not isinstance(dataset, h5py.Dataset):
            raise StoreError(f"{path}: entry {name} is not a dataset; refused before reading it")
        reason = _foreign_storage(dataset)
        if reason is None and (dataset.dtype.kind != "f" or dataset.dtype.itemsize not in (4, 8)):
            reason = f"has dtype {dataset.dtype}, not float32/float64"
        shape = dataset.shape
        packed = int(handle.attrs.get("format_version", 0)) >= 3
        if reason is None and packed and (len(shape) != 1 or packed_width(shape[0]) is None):
            reason = f"has shape {shape}, not a packed triangle"
        if reason is None and not packed and (len(shape) != 2 or shape[0] != shape[1]):
            reason = f"has shape {shape}, not square"
        if reason is None and dataset.chunks is not None and any(c > s for c, s in zip(dataset.chunks, shape)):
            reason = f"has chunks {dataset.chunks} larger than its shape {shape}"
        if reason is not None:
            raise StoreError(f"{path}: covariance {name} {reason}; refused before reading its data")


def check_covariance(data: Covariance, what: str, *, symmetric: bool = False) -> None:
    """Finite, symmetric within SYMMETRY_TOLERANCE of its largest entry (``symmetric``: known, as unpacked from a
    triangle; always for ``SymmetricPanels``), non-negative diagonal. Reductions over the whole matrix and
    mirrored pairs of SYMMETRY_TILE-wide tiles (both fit in cache), so no temporary approaches the covariance's
    size."""
    if not finite(data):
        raise StoreError(f"{what} contains NaN or Inf")
    if bool((data.diagonal() < 0).any()):
        raise StoreError(f"{what} has negative entries on its diagonal")
    if symmetric or isinstance(data, SymmetricPanels):
        return
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
