"""The decomposition's workspace: the sizes that bound it, and the peak it adds to the memory plan."""

from __future__ import annotations

from collections.abc import Sequence

CHOLESKY_PANEL = 1024  # columns factorised at a time by ``cholesky_in_place``: two panels of temporaries
ROW_BLOCK_ELEMENTS = 1 << 24  # rows of W at a time in the product and the residual: 128 MB in float64
F64 = 8  # bytes of a float64: the decomposition's arithmetic, whatever the weight's dtype


def decomposition_memory(shapes: Sequence[tuple[int, int]], stored_size: int, shared_width: int) -> dict[str, int]:
    """The decomposition's peak parts (bytes) for its most demanding weight (out, in) of ``shapes``, stored
    ``stored_size`` bytes an element.

    While the singular pairs are found, the covariance (its Cholesky factor by then), W·C, and the SVD's (the
    fallback of every solver) or the Cholesky's temporaries are alive; the residual is formed after W·C and the
    factor are freed. A shared input's damped covariance and factor (``shared_width`` wide, 0: none) may be
    held meanwhile, for the rest of its readers.
    """

    def parts(out_dim: int, in_dim: int) -> dict[str, int]:
        small = min(out_dim, in_dim)
        return {
            "covariance": in_dim * in_dim * F64,
            "W·C": out_dim * in_dim * F64 + 2 * min(ROW_BLOCK_ELEMENTS, out_dim * in_dim) * F64,  # + a row block
            # The SVD's copy of W·C, U, Vᵀ and gesdd's workspace (up to ~4 n² besides the 3 out·in), or two
            # Cholesky panels. Not less for gram or subspace: where they cannot resolve the cut they free their
            # Gram matrix (4 n² with syevd's workspace) and take the SVD.
            "solver": max(3 * out_dim * in_dim + 5 * small * small, 2 * in_dim * CHOLESKY_PANEL) * F64,
            "weight": out_dim * in_dim * stored_size,
        }

    peak = max((parts(*shape) for shape in shapes), key=lambda p: sum(p.values()))
    return peak | ({"shared input (damped + factor)": 2 * shared_width * shared_width * F64} if shared_width else {})
