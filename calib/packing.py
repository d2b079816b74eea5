"""Symmetric matrices stored once: the upper triangle, row after row, in a 1-D dataset.

A covariance sum is exactly symmetric (its lower triangle is the mirror of the upper, see
``numerics.mirror_tiles``), so the packed form loses nothing and holds n(n+1)/2 numbers instead of n².
Rows are written and read a segment of about SEGMENT_ELEMENTS at a time, so no temporary approaches the
matrix's size.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import h5py
import numpy as np
import torch

from corda_surgery.panels import Covariance, SymmetricPanels

SEGMENT_ELEMENTS = 1 << 22  # 32 MB of float64 read or written at a time
MIRROR_TILE = 512  # the lower triangle is filled from the upper this many rows at a time


def packed_length(width: int) -> int:
    return width * (width + 1) // 2


def packed_width(length: int) -> int | None:
    """The width n with n(n+1)/2 == length, or None where ``length`` is no triangular number."""
    width = (math.isqrt(8 * length + 1) - 1) // 2
    return width if packed_length(width) == length else None


def _segments(width: int) -> Iterator[tuple[int, int, int, int]]:
    """(first row, end row, start, stop) of consecutive row spans in the packed order."""
    row, start = 0, 0
    while row < width:
        end, stop = row, start
        while end < width and (end == row or stop - start + width - end <= SEGMENT_ELEMENTS):
            stop += width - end
            end += 1
        yield row, end, start, stop
        row, start = end, stop


def _upper_row(matrix: Covariance, index: int) -> torch.Tensor:
    return matrix.row(index) if isinstance(matrix, SymmetricPanels) else matrix[index, index:]


def write_packed(
    group: h5py.Group, name: str, matrix: Covariance, dtype: type[np.floating], divisor: float | None = None
) -> h5py.Dataset:
    """``matrix``'s upper triangle (divided by ``divisor``, a segment at a time) as the 1-D dataset ``name`` of
    ``dtype``; a square and its ``SymmetricPanels`` write the same bytes."""
    width = matrix.shape[0]
    dataset = group.create_dataset(name, shape=(packed_length(width),), dtype=dtype)
    for row, end, start, stop in _segments(width):
        segment = np.concatenate([_upper_row(matrix, i).numpy() for i in range(row, end)])
        if divisor is not None:
            segment = segment / divisor
        dataset[start:stop] = segment.astype(dtype, copy=False)
    return dataset


def _read_rows(dataset: h5py.Dataset, width: int, row_of: Callable[[int], torch.Tensor]) -> None:
    """Each upper-triangle row of a packed dataset into ``row_of(i)`` (a view of where row i goes)."""
    for row, end, start, stop in _segments(width):
        segment = torch.from_numpy(np.asarray(dataset[start:stop], dtype=np.float64))
        offset = 0
        for i in range(row, end):
            row_of(i).copy_(segment[offset : offset + width - i])
            offset += width - i


def read_packed_panels(dataset: h5py.Dataset, width: int) -> SymmetricPanels:
    """The upper triangle a packed dataset holds, as float64 panels (half the memory of ``read_packed``)."""
    panels = SymmetricPanels.zeros(width)
    _read_rows(dataset, width, panels.row)
    return panels


def read_packed(dataset: h5py.Dataset, width: int) -> torch.Tensor:
    """The full symmetric float64 matrix a packed dataset holds."""
    full = torch.empty(width, width, dtype=torch.float64)
    _read_rows(dataset, width, lambda i: full[i, i:])
    for start in range(0, width, MIRROR_TILE):
        end = min(start + MIRROR_TILE, width)
        block = full[start:end, start:end]
        block.copy_(torch.triu(block) + torch.triu(block, 1).T)
        full[end:, start:end] = full[start:end, end:].T
    return full
