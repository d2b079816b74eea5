"""Work over large matrices in pieces: finiteness checks without temporaries near the tensor's size, symmetric
products from the tiles of their upper triangle, and a square's Cholesky factorisation in place."""

from __future__ import annotations

import itertools

import torch

CHECK_BLOCK_ELEMENTS = 1 << 23  # elements checked at a time: 64 MB of float64
CHOLESKY_PANEL = 1024  # columns factorised at a time by ``cholesky_in_place``: two panels of temporaries


def all_finite(tensor: torch.Tensor) -> bool:
    """No NaN or Inf in ``tensor``.

    A sum is NaN or Inf wherever an element is (IEEE arithmetic propagates both), and it reads the tensor once
    without writing anything, far faster than ``isfinite(...).all()``. Only a sum that overflowed on finite
    elements (huge half-precision tensors) needs the element check, then a slice at a time: ``torch.isfinite``
    on a whole tensor allocates its absolute value as well as the mask.
    """
    if not tensor.is_contiguous() and tensor.dim() == 2 and tensor.T.is_contiguous():
        tensor = tensor.T  # a transposed view (Conv1D weights): the same elements, without a copy
    flat = tensor.reshape(-1)
    wide = torch.float64 if flat.dtype == torch.float64 else torch.float32
    if bool(torch.isfinite(flat.sum(dtype=wide))):
        return True
    return all(
        bool(torch.isfinite(flat[start : start + CHECK_BLOCK_ELEMENTS]).all())
        for start in range(0, flat.numel(), CHECK_BLOCK_ELEMENTS)
    )


SYMMETRIC_LEAF = 256  # diagonal tiles of XᵀX at most this wide are multiplied whole
MAX_TILE_SIDE = 2048  # off-diagonal tiles are cut to this: a product's temporary ≤ 16 MB of float32, 32 MB of float64


def symmetric_tiles(width: int) -> list[tuple[slice, slice]]:
    """``(rows, columns)`` tiles that cover the upper triangle of a ``width``-wide XᵀX, diagonal included.

    The triangle is halved recursively: each level's off-diagonal square is one large, efficient product,
    and only the diagonal leaves (≤ SYMMETRIC_LEAF wide) are multiplied whole, so the FLOPs approach half a
    GEMM's (narrower leaves lose more to small products than they save).
    """

    def cuts(low: int, high: int) -> list[slice]:
        """``low:high`` in the fewest equal parts of at most MAX_TILE_SIDE (no thin remainder)."""
        parts = -(-(high - low) // MAX_TILE_SIDE)
        edges = [low + (high - low) * k // parts for k in range(parts + 1)]
        return [slice(start, stop) for start, stop in itertools.pairwise(edges)]

    def cover(low: int, high: int) -> list[tuple[slice, slice]]:
        if high - low <= SYMMETRIC_LEAF:
            return [(slice(low, high), slice(low, high))]
        middle = (low + high) // 2
        square = [(rows, columns) for rows in cuts(low, middle) for columns in cuts(middle, high)]
        return cover(low, middle) + square + cover(middle, high)

    return cover(0, width)


def symmetric_product(tall: torch.Tensor) -> torch.Tensor:
    """``tallᵀ·tall`` from the tiles on and above the diagonal (``symmetric_tiles``), mirrored below it: the
    Gram matrices of the decomposition at about half a full product's FLOPs."""
    width = tall.shape[1]
    product = torch.empty(width, width, dtype=tall.dtype, device=tall.device)
    tiles = symmetric_tiles(width)
    for rows, columns in tiles:
        product[rows, columns] = tall[:, rows].T @ tall[:, columns]
    mirror_tiles(product, tiles)
    return product


def mirror_tiles(matrix: torch.Tensor, tiles: list[tuple[slice, slice]]) -> None:
    """Fill the lower triangle of a symmetric ``matrix`` from its upper ``tiles`` (``symmetric_tiles``)."""
    for rows, columns in tiles:
        if rows != columns:
            matrix[columns, rows] = matrix[rows, columns].T


def cholesky_solve(factor: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
    """``(L·Lᵀ)⁻¹·rhs`` for a lower Cholesky ``factor`` L, by two triangular solves (faster than
    ``torch.cholesky_solve``, LAPACK's potrs, on the CPU)."""
    return torch.linalg.solve_triangular(factor.T, torch.linalg.solve_triangular(factor, rhs, upper=False), upper=True)


def cholesky_in_place(matrix: torch.Tensor) -> bool:
    """Overwrite a symmetric ``matrix`` with its lower Cholesky factor (strict upper triangle zeroed); False,
    with ``matrix`` spoiled, where it is not positive definite.

    ``torch.linalg.cholesky`` copies its input whatever ``out`` says (one more n² matrix). This left-looking
    blocked form reads only the lower triangle and needs one panel of CHOLESKY_PANEL columns at a time; its
    work is the same n³/3, in matrix products.
    """
    width = matrix.shape[0]
    for start in range(0, width, CHOLESKY_PANEL):
        end = min(start + CHOLESKY_PANEL, width)
        panel = matrix[start:, start:end]
        if start:
            panel.sub_(matrix[start:, :start] @ matrix[start:end, :start].T)
        diagonal, info = torch.linalg.cholesky_ex(panel[: end - start])
        if int(info):
            return False
        panel[: end - start] = diagonal
        if end < width:
            below = panel[end - start :]
            below.copy_(torch.linalg.solve_triangular(diagonal.T, below, upper=True, left=False))
            matrix[start:end, end:].zero_()
    return True
