"""A symmetric float64 matrix held as its upper triangle in row panels: every covariance a run sums, stores and
factorises, in half a square's memory.

Panel k holds rows ``start:end`` of the matrix from column ``start`` on, so row i of the upper triangle (what the
store's packed form writes, ``calib.packing``) is one contiguous slice, and the rows of the upper Cholesky factor
R (C = RᵀR) overwrite them in place. Every operation the decomposition needs works a panel at a time: the sums
(from the same tiles as a square's, so they are bit for bit the same), damping on the diagonal, W·C, the
factorisation and the solves; none forms a temporary near the matrix's size.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TypeVar

import torch

from corda_surgery.numerics import all_finite

PANEL_ROWS = 1024  # rows per panel: the factorisation's update is a (PANEL_ROWS × width) float64 temporary


def panels_bytes(width: int) -> int:
    """Bytes of a ``width``-wide ``SymmetricPanels``: each panel's rows from its first column on."""
    return sum(min(PANEL_ROWS, width - start) * (width - start) for start in range(0, width, PANEL_ROWS)) * 8


class SymmetricPanels:
    """The upper triangle of a ``width``-wide symmetric matrix, PANEL_ROWS rows at a time (float64)."""

    def __init__(self, panels: list[torch.Tensor], width: int):
        self.panels, self.width = panels, width
        self.height = panels[0].shape[0]  # rows per panel (the last may have fewer)
        self.starts = list(range(0, width, self.height))

    @classmethod
    def zeros(cls, width: int, device: torch.device | str = "cpu") -> SymmetricPanels:
        panels = [
            torch.zeros(min(PANEL_ROWS, width - start), width - start, dtype=torch.float64, device=device)
            for start in range(0, width, PANEL_ROWS)
        ]
        return cls(panels, width)

    @property
    def shape(self) -> tuple[int, int]:
        return self.width, self.width

    @property
    def device(self) -> torch.device:
        return self.panels[0].device

    def _spans(self, rows: slice) -> Iterator[tuple[torch.Tensor, int, slice]]:
        """(panel, its first row, the part of ``rows`` it holds) for each panel that ``rows`` overlaps."""
        for panel, start in zip(self.panels, self.starts, strict=True):
            low, high = max(rows.start, start), min(rows.stop, start + panel.shape[0])
            if low < high:
                yield panel, start, slice(low, high)

    def add_tile(self, rows: slice, columns: slice, tile: torch.Tensor) -> None:
        """Add the block ``tile`` at (``rows``, ``columns``) of the upper triangle (columns ≥ each row's panel
        start; a diagonal tile's part left of a panel's start is the mirror of what an earlier panel holds)."""
        for panel, start, part in self._spans(rows):
            first = max(columns.start, start)
            panel[part.start - start : part.stop - start, first - start : columns.stop - start] += tile[
                part.start - rows.start : part.stop - rows.start, first - columns.start :
            ]

    def row(self, index: int) -> torch.Tensor:
        """Row ``index`` of the upper triangle from the diagonal on: ``C[index, index:]`` (a view)."""
        panel, start = self.panels[index // self.height], index // self.height * self.height
        return panel[index - start, index - start :]

    def diagonal(self) -> torch.Tensor:
        """A copy of the diagonal."""
        return torch.cat([panel[:, : panel.shape[0]].diagonal() for panel in self.panels])

    def add_to_diagonal(self, value: float) -> None:
        for panel in self.panels:
            panel[:, : panel.shape[0]].diagonal().add_(value)

    def copy_(self, other: SymmetricPanels) -> SymmetricPanels:
        for panel, source in zip(self.panels, other.panels, strict=True):
            panel.copy_(source)
        return self

    def clone(self) -> SymmetricPanels:
        return SymmetricPanels([panel.clone() for panel in self.panels], self.width)

    def to(self, device: torch.device | str) -> SymmetricPanels:
        return SymmetricPanels([panel.to(device) for panel in self.panels], self.width)

    def cpu(self) -> SymmetricPanels:
        return self.to("cpu")

    def add_(self, other: SymmetricPanels) -> SymmetricPanels:
        for panel, more in zip(self.panels, other.panels, strict=True):
            panel.add_(more)
        return self

    def div_(self, divisor: float) -> SymmetricPanels:
        for panel in self.panels:
            panel.div_(divisor)
        return self

    def _diagonal_block(self, panel: torch.Tensor) -> torch.Tensor:
        """The panel's square on the diagonal, both triangles filled from its upper one."""
        square = panel[:, : panel.shape[0]]
        return torch.triu(square) + torch.triu(square, 1).T

    def dense(self) -> torch.Tensor:
        """The whole square (a width² float64 matrix: for tests and for narrow inputs only)."""
        full = torch.empty(self.width, self.width, dtype=torch.float64, device=self.device)
        for panel, start in zip(self.panels, self.starts, strict=True):
            end = start + panel.shape[0]
            full[start:end, start:end] = self._diagonal_block(panel)
            full[start:end, end:] = panel[:, end - start :]
            full[end:, start:end] = panel[:, end - start :].T
        return full

    def left_product(self, rows: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """``rows · C`` for float64 ``rows`` (m × width), into ``out`` where given, a panel at a time: each panel
        gives its own rows of C (right of its square) and, transposed, the column block below its square."""
        product = rows.new_zeros(rows.shape[0], self.width) if out is None else out.zero_()
        for panel, start in zip(self.panels, self.starts, strict=True):
            end = start + panel.shape[0]
            right = panel[:, end - start :]
            product[:, start:end] += rows[:, start:end] @ self._diagonal_block(panel)
            product[:, end:] += rows[:, start:end] @ right
            product[:, start:end] += rows[:, end:] @ right.T
        return product

    def cholesky_(self) -> bool:
        """Overwrite the panels with the rows of the upper Cholesky factor R (C = RᵀR), left-looking a panel at a
        time; False, with the panels spoiled, where C is not positive definite."""
        for k, (panel, start) in enumerate(zip(self.panels, self.starts, strict=True)):
            height = panel.shape[0]
            for earlier, earlier_start in zip(self.panels[:k], self.starts, strict=False):
                offset = start - earlier_start
                panel.sub_(earlier[:, offset : offset + height].T @ earlier[:, offset:])
            square, info = torch.linalg.cholesky_ex(panel[:, :height], upper=True)
            if int(info):
                return False
            panel[:, :height] = square
            if height < panel.shape[1]:
                right = panel[:, height:]
                right.copy_(torch.linalg.solve_triangular(square.T, right, upper=False))
        return True

    def cholesky_solve(self, rhs: torch.Tensor) -> torch.Tensor:
        """``C⁻¹·rhs`` from the factor ``cholesky_`` left in the panels: Rᵀy = rhs forward, then R·x = y backward."""
        solution = rhs.to(torch.float64, copy=True)
        pairs = list(zip(self.panels, self.starts, strict=True))
        for panel, start in pairs:
            end = start + panel.shape[0]
            part = solution[start:end]
            part.copy_(torch.linalg.solve_triangular(panel[:, : end - start].T, part, upper=False))
            solution[end:] -= panel[:, end - start :].T @ part
        for panel, start in reversed(pairs):
            end = start + panel.shape[0]
            part = solution[start:end]
            part.sub_(panel[:, end - start :] @ solution[end:])
            part.copy_(torch.linalg.solve_triangular(panel[:, : end - start], part, upper=True))
        return solution


Covariance = torch.Tensor | SymmetricPanels  # a square float64 matrix, or the upper triangle of one
Summed = TypeVar("Summed", torch.Tensor, SymmetricPanels)


def total_of(parts: Sequence[Summed]) -> Summed:
    """The sum of ``parts`` (all of one form): the one part itself, else a new matrix."""
    if len(parts) == 1:
        return parts[0]
    total = parts[0].clone()
    for part in parts[1:]:
        total.add_(part)
    return total


def square(matrix: Covariance) -> torch.Tensor:
    """The whole square of either form."""
    return matrix.dense() if isinstance(matrix, SymmetricPanels) else matrix


def tensors(matrix: Covariance) -> list[torch.Tensor]:
    """The tensors that hold ``matrix``: what an elementwise operation over ranks (a sum) works on."""
    return matrix.panels if isinstance(matrix, SymmetricPanels) else [matrix]


def finite(matrix: Covariance) -> bool:
    """No NaN or Inf in either form (``numerics.all_finite`` on each tensor that holds it)."""
    return all(all_finite(tensor) for tensor in tensors(matrix))


def accumulate_tiles(panels: SymmetricPanels, rows: torch.Tensor, tiles: list[tuple[slice, slice]]) -> None:
    """``panels += rowsᵀ·rows`` from the upper-triangle ``tiles`` (``numerics.symmetric_tiles``): the products a
    square sum makes, added where the square would hold them, so both give the same bits."""
    for tile_rows, tile_columns in tiles:
        panels.add_tile(tile_rows, tile_columns, rows[:, tile_rows].T @ rows[:, tile_columns])
