"""How the singular pairs of the float64 product W·C are found: the kept ones (``kept_pairs``) or all the
singular values (``singular_values``), by the full SVD or from the Gram matrix of the tall orientation; where
the Gram route cannot resolve the cut, by the SVD, or by the blocked SVD where the SVD would not fit in memory."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from corda_surgery.compute import available_host_memory, resident_bytes
from corda_surgery.decomposition.eigenpairs import extreme_eigenpairs, largest_eigenvalue
from corda_surgery.decomposition.kinds import Mode, Solver
from corda_surgery.decomposition.memory import blocked_svd_workspace, svd_workspace
from corda_surgery.errors import CordaSurgeryError
from corda_surgery.numerics import symmetric_product

# The Gram route resolves a singular pair only to about ε·(σ₁/σ)² over the relative gap at the cut, so KPM's
# smallest pairs can come out wrong; a layer whose estimate (``_gram_error``) exceeds this takes the SVD of the
# product instead. The estimate over-states the error by two to three orders of magnitude, hence so loose a bound.
GRAM_RESOLUTION = 1e-3


class MemoryShortfall(CordaSurgeryError):
    """Not even the blocked SVD a fallback needs fits in the free memory: this target fails before anything is
    written for it, and the work finished before it is kept for --resume."""


@dataclass(frozen=True)
class KeptPairs:
    """The r kept singular pairs of a matrix M: M·vᵢ = σᵢ·uᵢ."""

    u: torch.Tensor  # (rows, r)
    s: torch.Tensor  # (r,)
    vh: torch.Tensor  # (r, columns)
    total_energy: float  # ‖M‖²_F = Σ over all σ²
    spectrum: torch.Tensor | None  # all σ descending, where the solver found them
    solver: Solver
    fell_back: bool = False  # the SVD, taken because the Gram route could not resolve the cut
    blocked: bool = False  # that SVD blocked (``blocked_svd_pairs``): the SVD would not fit in the free memory


def singular_values(matrix: torch.Tensor, *, solver: Solver = Solver.GRAM) -> torch.Tensor:
    """All singular values of a float64 ``matrix``, descending.

    ``SVD``: LAPACK's SVD. Otherwise square roots of the eigenvalues of the Gram matrix of the tall
    orientation: faster, with errors ε₆₄·σ₁²/σ — below float32 SVD's ε₃₂·σ₁ for every σ > 1e-8·σ₁.
    """
    if Solver(solver) is Solver.SVD:
        return torch.linalg.svdvals(matrix)
    tall = matrix if matrix.shape[0] >= matrix.shape[1] else matrix.T
    return torch.linalg.eigvalsh(symmetric_product(tall)).clamp_min(0).sqrt().flip(0)


def kept_pairs(
    matrix: torch.Tensor,
    rank: int,
    mode: Mode,
    *,
    solver: Solver,
    memory_budget: int | None = None,
) -> KeptPairs:
    """The ``rank`` largest (IPM) or smallest (KPM) singular pairs of a float64 ``matrix``.

    ``SVD``: the full thin SVD (the reference path). Otherwise from the Gram matrix of the tall orientation,
    faster and closer to the float64 SVD than a float32 SVD is: ``SUBSPACE`` finds only the kept eigenvectors
    (``eigenpairs.extreme_eigenpairs``), ``GRAM`` (and ``SUBSPACE`` where iteration does not pay) all of them
    with LAPACK's ``syevd``; the other side's vectors follow as ``u = M·v / ‖M·v‖`` (``σ = ‖M·v‖`` avoids the
    square root of a tiny eigenvalue). Where the Gram matrix cannot resolve the cut: the SVD, ``fell_back``
    (the blocked one where the SVD's workspace exceeds the free memory, or what ``memory_budget`` leaves).
    """
    mode, solver = Mode(mode), Solver(solver)
    if matrix.shape[0] < matrix.shape[1]:  # the tall orientation: LAPACK's gesdd is also slower on wide ones
        pairs = kept_pairs(matrix.T, rank, mode, solver=solver, memory_budget=memory_budget)
        return dataclasses.replace(pairs, u=pairs.vh.T, vh=pairs.u.T)
    if solver is Solver.SVD:
        return _svd_pairs(matrix, rank, mode, fell_back=False)
    found = _gram_pairs(matrix, rank, mode, solver)  # its Gram matrix is freed before an SVD is needed
    return _fallback(matrix, rank, mode, memory_budget) if found is None else found


def _fallback(matrix: torch.Tensor, rank: int, mode: Mode, memory_budget: int | None) -> KeptPairs:
    """The SVD where the Gram route cannot resolve the cut: LAPACK's where its workspace fits the free memory
    (on a GPU, where it is tried and a failure moves the work to the CPU), else the blocked one, else a
    MemoryShortfall with the arithmetic."""
    svd, blocked = svd_workspace(*matrix.shape), blocked_svd_workspace(*matrix.shape)
    free = available_host_memory()
    if memory_budget is not None:  # what the budget leaves beside what the process holds (W·C among it)
        free = min(free, max(0, memory_budget - resident_bytes()))
    if matrix.device.type != "cpu" or svd <= free:
        return _svd_pairs(matrix, rank, mode, fell_back=True)
    if blocked <= free:
        return blocked_svd_pairs(matrix, rank, mode)
    gib = 1 << 30
    raise MemoryShortfall(
        f"the Gram route cannot resolve this {mode.value.upper()} cut, and its SVD needs {svd / gib:.2f} GiB "
        f"(blocked: {blocked / gib:.2f}) besides W·C while {free / gib:.2f} GiB are free; free memory and resume, "
        "or leave it out with `targets`"
    )


def _gram_pairs(matrix: torch.Tensor, rank: int, mode: Mode, solver: Solver) -> KeptPairs | None:
    """The kept pairs of a tall ``matrix`` from its Gram matrix; None where the cut lies below what the Gram
    matrix resolves.

    ``SUBSPACE`` results are kept where their own bounds (λ₁ by power iteration, the gap by the next Ritz
    value less its residual) show the cut resolved; otherwise the full eigen-decomposition measures the gap.
    """
    n, ipm = matrix.shape[1], mode is Mode.IPM
    gram = symmetric_product(matrix)
    total_energy = float(gram.diagonal().sum())
    found = extreme_eigenpairs(gram, rank, largest=ipm) if solver is Solver.SUBSPACE else None
    if found is not None:
        at_cut = float(found.values[-1] if ipm else found.values[0])  # the next lies ≥ neighbour away
        beyond = max(at_cut - found.neighbour, 0.0) ** 0.5 if ipm else (at_cut + found.neighbour) ** 0.5
        first = float(found.values[0] if ipm else largest_eigenvalue(gram)) ** 0.5
        image = matrix @ found.vectors
        s_r = image.norm(dim=0)
        if _gram_error(_at_cut(s_r, mode), first, beyond) <= GRAM_RESOLUTION:
            return _pairs(image, s_r, found.vectors, total_energy, None, Solver.SUBSPACE)
    eigenvalues, eigenvectors = torch.linalg.eigh(gram)
    del gram
    spectrum = eigenvalues.clamp_min(0).sqrt().flip(0)
    chosen = torch.arange(n - 1, n - 1 - rank, -1) if ipm else torch.arange(rank - 1, -1, -1)
    v_r = eigenvectors[:, chosen]  # descending σ order: no flipped copy of all vectors
    image = matrix @ v_r
    s_r = image.norm(dim=0)
    beyond = float(spectrum[min(rank, n - 1)] if ipm else spectrum[max(n - rank - 1, 0)])
    if rank < n and _gram_error(_at_cut(s_r, mode), float(spectrum[0]), beyond) > GRAM_RESOLUTION:
        return None
    return _pairs(image, s_r, v_r, total_energy, spectrum, Solver.GRAM)


def _at_cut(s_r: torch.Tensor, mode: Mode) -> float:
    """The kept singular value next to the cut (σ = ‖M·v‖, descending order: no root of a tiny eigenvalue)."""
    return float(s_r[-1] if mode is Mode.IPM else s_r[0])


def _pairs(
    image: torch.Tensor,
    s_r: torch.Tensor,
    v_r: torch.Tensor,
    energy: float,
    spectrum: torch.Tensor | None,
    used: Solver,
) -> KeptPairs:
    u_r = image / torch.where(s_r > 0, s_r, 1)  # σ = 0: u is arbitrary, B = u·√σ is zero anyway
    return KeptPairs(u_r, s_r, v_r.T, energy, spectrum, used)


def _gram_error(cut: float, first: float, beyond: float) -> float:
    """The Gram route's error estimate on the kept subspace, ε·(σ₁/σ_cut)²/gap, from the singular values at the
    cut, the first one (or a bound on it) and the next one beyond the cut (or a bound closer to the cut)."""
    if cut <= 0:
        return float("inf")
    eps = torch.finfo(torch.float64).eps
    return eps * (first / cut) ** 2 / max(abs(cut - beyond) / cut, eps)


def _svd_pairs(matrix: torch.Tensor, rank: int, mode: Mode, *, fell_back: bool) -> KeptPairs:
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    cut = _cut(s.numel(), rank, mode)
    return KeptPairs(u[:, cut], s[cut], vh[cut], float(s.square().sum()), s, Solver.SVD, fell_back)


def _cut(n: int, rank: int, mode: Mode) -> slice:
    return slice(0, rank) if mode is Mode.IPM else slice(n - rank, n)


def blocked_svd_pairs(matrix: torch.Tensor, rank: int, mode: Mode) -> KeptPairs:
    """The kept pairs of a tall float64 ``matrix`` (m × n) from the SVD of its R factor, which has its singular
    values and right vectors: R is formed by Householder QRs of itself stacked on the next n rows, so the peak
    is about 9 n² (``blocked_svd_workspace``) instead of the SVD's copy of the matrix, U and Vᵀ (3 m·n + 3.5 n²).
    The left vectors follow as u = M·v / σ, as on the Gram route, and to the same accuracy as the SVD's Vᵀ."""
    rows, n = matrix.shape
    r = matrix.new_zeros(0, n)
    for start in range(0, rows, n):
        r = torch.linalg.qr(torch.cat([r, matrix[start : start + n]]), mode="r").R
    _, s, vh = torch.linalg.svd(r, full_matrices=False)
    del r
    cut = _cut(s.numel(), rank, mode)
    image = matrix @ vh[cut].T
    u = image / torch.where(s[cut] > 0, s[cut], 1)
    return KeptPairs(u, s[cut], vh[cut], float(s.square().sum()), s, Solver.SVD, fell_back=True, blocked=True)
