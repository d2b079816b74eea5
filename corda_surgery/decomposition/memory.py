"""The decomposition's workspace: the sizes that bound it, and the peak it adds to the memory plan.

The plan counts the path a run takes (the solver it asked for); the SVD a Gram route falls back to where it
cannot resolve a cut is a rarer path, planned apart (``fallback_memory``) and chosen at run time to fit what
is free (``solvers._fallback``): the SVD, or the blocked SVD, which holds neither a copy of W·C nor U.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from corda_surgery.decomposition.kinds import Solver
from corda_surgery.numerics import CHOLESKY_PANEL
from corda_surgery.panels import panels_bytes

ROW_BLOCK_ELEMENTS = 1 << 24  # rows of W at a time in the product and the residual: 128 MB in float64
F64 = 8  # bytes of a float64: the decomposition's arithmetic, whatever the weight's dtype


def svd_workspace(rows: int, columns: int) -> int:
    """Bytes LAPACK's thin SVD of a float64 matrix holds besides it: its copy, U and Vᵀ (3 m·n, n the smaller
    side) and gesdd's workspace (measured: 2 n² on a 4:1 matrix, 3.2 n² on a square one)."""
    small = min(rows, columns)
    return (6 * rows * columns + 7 * small * small) * F64 // 2


def blocked_svd_workspace(rows: int, columns: int) -> int:
    """Bytes of the blocked SVD (``solvers.blocked_svd_pairs``): the R factor, a stacked block of rows and its QR
    copy (2 n² each), then the SVD of R (its copy, U, Vᵀ and workspace: 4 n²)."""
    small = min(rows, columns)
    return 9 * small * small * F64


def gram_workspace(rows: int, columns: int) -> int:
    """Bytes of the Gram route: the Gram matrix of the tall orientation, and either the full eigen-decomposition's
    vectors and syevd's workspace (2 n²) or subspace iteration's Cholesky factor and blocks (less)."""
    small = min(rows, columns)
    return 4 * small * small * F64


def solver_workspace(rows: int, columns: int, solver: Solver) -> int:
    """Bytes the ``solver`` holds besides W·C on its own path (not its fallback), or the Cholesky's two panels
    of temporaries before it where those are more."""
    own = svd_workspace(rows, columns) if Solver(solver) is Solver.SVD else gram_workspace(rows, columns)
    return max(own, 2 * columns * min(columns, CHOLESKY_PANEL) * F64)


@dataclass(frozen=True)
class WeightShape:
    """A target as the plan sees it: its (out, in), whether it is decomposed with a covariance, and the widest
    shared input (damped covariance and factor) held while it is decomposed (``shared`` wide, 0: none;
    ``surgery.targets.shapes``)."""

    out_dim: int
    in_dim: int
    shared: int = 0
    covariance: bool = True


def _parts(shape: WeightShape, stored_size: int, workspace: int) -> dict[str, int]:
    """Alive at the peak: the covariance (its Cholesky factor by then), W·C, the weight, and the larger of the
    product's two float64 row blocks (while W·C is formed) and the solver's ``workspace`` (while the pairs are
    found); the residual is formed after W·C and the factor are freed, from row blocks as well."""
    out_dim, in_dim = shape.out_dim, shape.in_dim
    row_blocks = 2 * min(ROW_BLOCK_ELEMENTS, out_dim * in_dim) * F64
    return {
        "covariance": panels_bytes(in_dim) if shape.covariance else 0,  # its upper triangle, damped, factorised
        "W·C": out_dim * in_dim * F64,
        "solver": max(workspace, row_blocks),
        "weight": out_dim * in_dim * stored_size,
        "shared input (damped + factor)": 2 * panels_bytes(shape.shared) if shape.shared else 0,
    }


Workspace = Callable[[int, int], int]


def _largest(shapes: Sequence[WeightShape], stored_size: int, workspace: Workspace) -> dict[str, int]:
    parts = (_parts(shape, stored_size, workspace(shape.out_dim, shape.in_dim)) for shape in shapes)
    return max(parts, key=lambda p: sum(p.values()))


def decomposition_memory(
    shapes: Sequence[WeightShape], stored_size: int, solver: Solver = Solver.SUBSPACE
) -> dict[str, int]:
    """The decomposition's peak parts (bytes) on ``solver``'s own path for its most demanding target of
    ``shapes``, stored ``stored_size`` bytes an element."""
    return _largest(shapes, stored_size, lambda o, i: solver_workspace(o, i, solver))


def fallback_memory(
    shapes: Sequence[WeightShape], stored_size: int, solver: Solver
) -> tuple[dict[str, int], dict[str, int]] | None:
    """The peak parts where the most demanding weight falls back from the Gram route: with the SVD, and with the
    blocked SVD taken where the SVD does not fit (the SVD where that is smaller); None for the SVD solver (it has
    no fallback)."""
    if Solver(solver) is Solver.SVD:
        return None

    def with_svd(out_dim: int, in_dim: int) -> int:
        return max(svd_workspace(out_dim, in_dim), solver_workspace(out_dim, in_dim, solver))

    def with_smaller(out_dim: int, in_dim: int) -> int:
        smaller = min(svd_workspace(out_dim, in_dim), blocked_svd_workspace(out_dim, in_dim))
        return max(smaller, solver_workspace(out_dim, in_dim, solver))

    return _largest(shapes, stored_size, with_svd), _largest(shapes, stored_size, with_smaller)
