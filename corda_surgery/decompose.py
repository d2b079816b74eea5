"""Context-oriented decomposition of one weight matrix (CorDA, arXiv 2406.05223).

``W·C = U S Vᵀ`` with ``C`` the damped input covariance, rebuilt as ``W = U S (Vᵀ C⁻¹)``. The ``r``
components that become the trainable adapter are the smallest (KPM) or the largest (IPM); the frozen
residual ``W − s·B·A`` keeps the layer's output unchanged before training.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from corda_surgery.eigenpairs import extreme_eigenpairs, largest_eigenvalue
from corda_surgery.errors import CordaSurgeryError
from corda_surgery.numerics import all_finite, cholesky_solve, symmetric_product
from corda_surgery.options import DEFAULT_DAMPING

log = logging.getLogger(__name__)

MODES = ("kpm", "ipm")
# How the singular pairs of the float64 product W·C are found (the factors' dtype is a separate choice):
# "subspace": only the r kept pairs, by block subspace iteration on the Gram matrix of the tall orientation
# (``corda_surgery.eigenpairs``), falling back to "gram" for a pair that does not converge;
# "gram": full eigen-decomposition of that Gram matrix ("svd" for a layer whose cut it cannot resolve);
# "svd": LAPACK's full float64 SVD (the reference).
SOLVERS = ("subspace", "gram", "svd")
# A covariance that is not positive definite at the requested damping gets it doubled, up to this factor
# (from ZERO_DAMPING_START when 0 was requested); one that needs more is unusable, not a warning.
MAX_DAMPING_RAISE = 1024
ZERO_DAMPING_START = 1e-8


class DecompositionError(CordaSurgeryError):
    """Bad weight, covariance or rank for one layer; the message names the layer."""


@dataclass(frozen=True)
class Decomposition:
    """Result for one linear: LoRA factors in PEFT's layout and the frozen residual weight."""

    lora_A: torch.Tensor  # (r, in), factor dtype
    lora_B: torch.Tensor  # (out, r), factor dtype
    residual: torch.Tensor  # same shape, layout and dtype as the input weight
    kept: torch.Tensor  # the singular values of W·C_damped that went into the adapter, float64
    total_energy: float  # Σσ² over all of them (‖W·C_damped‖²_F)
    spectrum: torch.Tensor | None  # all singular values, descending, where the solver found them all
    solver: str  # what found the pairs: a SOLVERS name, "gram" also where "subspace" fell back
    damping: float  # λ actually used (relative to mean(diag C)); 0 without covariance
    scaling: float  # LoRA scaling s = alpha / r

    @property
    def adapter_energy(self) -> float:
        """Share of Σσ² held by the adapter's components."""
        return float(self.kept.square().sum() / self.total_energy)


def _check_inputs(weight: torch.Tensor, rank: int, mode: str, solver: str, name: str) -> None:
    """One place for the weight's shape, mode, rank and finiteness checks (raised before any work)."""
    if mode not in MODES:
        raise DecompositionError(f"{name}: mode must be one of {MODES}, got {mode!r}")
    if solver not in SOLVERS:
        raise DecompositionError(f"{name}: solver must be one of {SOLVERS}, got {solver!r}")
    if weight.dim() != 2:
        raise DecompositionError(f"{name}: weight must be 2-D, got shape {tuple(weight.shape)}")
    out_dim, in_dim = weight.shape
    if not 1 <= rank <= min(out_dim, in_dim):
        raise DecompositionError(
            f"{name}: rank {rank} is outside 1..{min(out_dim, in_dim)} for a {out_dim}×{in_dim} weight"
        )
    if not all_finite(weight):
        raise DecompositionError(f"{name}: weight contains NaN or Inf")


CovarianceSource = torch.Tensor | Callable[[], torch.Tensor]
ROW_BLOCK_ELEMENTS = 1 << 24  # rows of W at a time in the product and the residual: 128 MB in float64


def _row_blocks(rows: int, width: int) -> Iterator[slice]:
    step = max(1, ROW_BLOCK_ELEMENTS // max(width, 1))
    return (slice(start, start + step) for start in range(0, rows, step))


CHOLESKY_PANEL = 1024  # columns factorised at a time by cholesky_in_place


def cholesky_in_place(matrix: torch.Tensor) -> bool:
    """Overwrite a symmetric ``matrix`` with its lower Cholesky factor (strict upper triangle zeroed); False,
    with ``matrix`` spoiled, where it is not positive definite.

    ``torch.linalg.cholesky`` copies its input whatever ``out`` says (measured: one extra matrix, 6.6 GB in
    float64 at width 28672). This left-looking blocked form reads only the lower triangle and needs one
    panel of CHOLESKY_PANEL columns at a time; its work is the same n³/3, in matrix products.
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


def _writable_covariance(source: CovarianceSource, device: torch.device) -> torch.Tensor:
    """A float64 covariance on ``device`` that may be overwritten: a callable's fresh result, else a copy."""
    if callable(source):
        return source().to(device, torch.float64)
    return source.to(device, torch.float64, copy=True)


@dataclass(frozen=True)
class DampedCovariance:
    """``C + λ·mean(diag C)·I`` and its Cholesky factor, prepared once for all linears that read one input
    (q/k/v, gate/up): they share the reading, the checks, the damping and the factorisation."""

    damped: torch.Tensor  # float64
    factor: torch.Tensor  # lower Cholesky factor of ``damped``; never modified by its users
    damping: float  # λ actually used


def _checked_covariance(source: CovarianceSource, in_dim: int, name: str, device: torch.device) -> tuple:
    """A writable float64 copy of the covariance, checked (shape, finite, positive diagonal), and mean(diag C)."""
    covariance = _writable_covariance(source, device)
    if tuple(covariance.shape) != (in_dim, in_dim):
        raise DecompositionError(
            f"{name}: covariance has shape {tuple(covariance.shape)}, expected ({in_dim}, {in_dim}) for its inputs"
        )
    if not all_finite(covariance):
        raise DecompositionError(f"{name}: covariance contains NaN or Inf")
    mean_diag = float(covariance.diagonal().mean())
    if not mean_diag > 0:
        raise DecompositionError(f"{name}: covariance is zero or negative on its diagonal (no tokens seen?)")
    return covariance, mean_diag


def _raised(lam: float, requested: float, name: str) -> float:
    """The next damping to try after a failed factorisation, or the error once past MAX_DAMPING_RAISE."""
    raised, ceiling = lam * 2 if lam else ZERO_DAMPING_START, (requested or ZERO_DAMPING_START) * MAX_DAMPING_RAISE
    if raised > ceiling:
        raise DecompositionError(
            f"{name}: covariance is unusable: not positive definite even with damping {ceiling:g} "
            f"({MAX_DAMPING_RAISE}× the requested {requested:g}); calibrate with more tokens or raise --damping"
        )
    return raised


def damped_covariance(
    covariance: CovarianceSource, damping: float, in_dim: int, name: str, device: torch.device | str = "cpu"
) -> DampedCovariance:
    """The damped covariance and its factor (2 n² floats), λ raised as ``context_product`` does."""
    damped, mean_diag = _checked_covariance(covariance, in_dim, name, torch.device(device))
    lam = damping
    damped.diagonal().add_(lam * mean_diag)
    factor = damped.clone()
    while not cholesky_in_place(factor):
        raised = _raised(lam, damping, name)
        damped.diagonal().add_((raised - lam) * mean_diag)
        factor.copy_(damped)
        lam = raised
    if lam != damping:
        log.warning("%s: covariance not positive definite at damping %g; used %g", name, damping, lam)
    return DampedCovariance(damped, factor, lam)


def context_product(
    weight: torch.Tensor,
    covariance: CovarianceSource | DampedCovariance | None,
    damping: float,
    name: str,
    device: torch.device | str = "cpu",
) -> tuple[torch.Tensor, torch.Tensor | None, float]:
    """``(W·C_damped in float64, the Cholesky factor of C_damped, λ)``; without a covariance ``(W, None, 0)``.

    ``C_damped = C + λ·mean(diag C)·I``; λ is doubled (with a warning) until C_damped is definite, at most to
    MAX_DAMPING_RAISE times the request. Memory is about one covariance plus the product: damping is added
    in place, W·C is formed a block of rows at a time, and the Cholesky factor overwrites C_damped (a failed
    factorisation reads ``covariance`` again, a callable from its source, and shifts the product by Δλ·W).
    Always float64: the covariance is stored in float64 and a float32 product would limit every small
    singular value to ε₃₂·σ₁ accuracy (the KPM cut lives among them).
    """
    device = torch.device(device)
    if covariance is None:
        return weight.to(device, torch.float64), None, 0.0
    product = torch.empty(weight.shape, dtype=torch.float64, device=device)
    if isinstance(covariance, DampedCovariance):
        if covariance.damped.shape[0] != weight.shape[1]:
            raise DecompositionError(f"{name}: covariance is {covariance.damped.shape[0]} wide, the weight reads "
                                     f"{weight.shape[1]} inputs")  # fmt: skip
        damped = covariance.damped.to(device)
        for rows in _row_blocks(*weight.shape):
            product[rows] = weight[rows].to(device, torch.float64) @ damped
        return product, covariance.factor.to(device), covariance.damping
    damped, mean_diag = _checked_covariance(covariance, weight.shape[1], name, device)
    lam = damping
    damped.diagonal().add_(lam * mean_diag)  # no identity matrix: for 28672² that alone is 6.6 GB
    for rows in _row_blocks(*weight.shape):
        product[rows] = weight[rows].to(device, torch.float64) @ damped
    while not cholesky_in_place(damped):
        raised = _raised(lam, damping, name)
        del damped
        damped, _ = _checked_covariance(covariance, weight.shape[1], name, device)
        damped.diagonal().add_(raised * mean_diag)
        for rows in _row_blocks(*weight.shape):
            product[rows].add_(weight[rows].to(device, torch.float64), alpha=(raised - lam) * mean_diag)
        lam = raised
    if lam != damping:
        log.warning("%s: covariance not positive definite at damping %g; used %g", name, damping, lam)
    return product, damped, lam


def singular_values(matrix: torch.Tensor, *, solver: str = "gram") -> torch.Tensor:
    """All singular values of a float64 ``matrix``, descending.

    ``svd``: LAPACK's SVD. Otherwise square roots of the eigenvalues of the Gram matrix of the tall
    orientation: 2-3× faster, with errors ε₆₄·σ₁²/σ — below float32 SVD's ε₃₂·σ₁ for every σ > 1e-8·σ₁.
    """
    if solver == "svd":
        return torch.linalg.svdvals(matrix)
    tall = matrix if matrix.shape[0] >= matrix.shape[1] else matrix.T
    return torch.linalg.eigvalsh(symmetric_product(tall)).clamp_min(0).sqrt().flip(0)


@dataclass(frozen=True)
class KeptPairs:
    """The r kept singular pairs of a matrix M: M·vᵢ = σᵢ·uᵢ."""

    u: torch.Tensor  # (rows, r)
    s: torch.Tensor  # (r,)
    vh: torch.Tensor  # (r, columns)
    total_energy: float  # ‖M‖²_F = Σ over all σ²
    spectrum: torch.Tensor | None  # all σ descending, where the solver found them
    solver: str


def kept_pairs(matrix: torch.Tensor, rank: int, mode: str, *, solver: str) -> KeptPairs:
    """The ``rank`` largest (``ipm``) or smallest (``kpm``) singular pairs of a float64 ``matrix``.

    ``svd``: the full thin SVD (the reference path). Otherwise from the Gram matrix of the tall
    orientation: ``subspace`` finds only the kept eigenvectors (``eigenpairs.extreme_eigenpairs``), ``gram``
    (and ``subspace`` where iteration does not pay) all of them with LAPACK's ``syevd``; the other side's
    vectors follow as ``u = M·v / ‖M·v‖`` (``σ = ‖M·v‖`` avoids the square root of a tiny eigenvalue).
    Measured at 2048×2048 / 5632×2048 on 2 cores, ``gram``: 1.7 / 2.1 s against 3.1 / 4.9 s for a float32
    SVD, and closer to the float64 SVD than a float32 SVD is (``tests/test_peft_parity.py``).
    """
    if matrix.shape[0] < matrix.shape[1]:  # LAPACK's gesdd is also ~2× slower on wide matrices
        pairs = kept_pairs(matrix.T, rank, mode, solver=solver)
        return KeptPairs(pairs.vh.T, pairs.s, pairs.u.T, pairs.total_energy, pairs.spectrum, pairs.solver)
    if solver == "svd":
        return _svd_pairs(matrix, rank, mode, "svd")
    pairs = _gram_pairs(matrix, rank, mode, solver)  # its Gram matrix is freed before an SVD is needed
    return _svd_pairs(matrix, rank, mode, pairs.solver) if pairs.solver.startswith("svd") else pairs


def _gram_pairs(matrix: torch.Tensor, rank: int, mode: str, solver: str) -> KeptPairs:
    """The kept pairs of a tall ``matrix`` from its Gram matrix; where the cut lies below what the Gram matrix
    resolves, only the name of the SVD fallback and no vectors.

    ``subspace`` results are kept where their own bounds (λ₁ by power iteration, the gap by the next Ritz
    value less its residual) show the cut resolved; otherwise the full eigen-decomposition measures the gap.
    """
    n = matrix.shape[1]
    gram = symmetric_product(matrix)
    total_energy = float(gram.diagonal().sum())
    found = extreme_eigenpairs(gram, rank, largest=mode == "ipm") if solver == "subspace" else None
    if found is not None:
        at_cut = float(found.values[-1] if mode == "ipm" else found.values[0])  # the next lies ≥ neighbour away
        beyond = max(at_cut - found.neighbour, 0.0) ** 0.5 if mode == "ipm" else (at_cut + found.neighbour) ** 0.5
        first = float(found.values[0] if mode == "ipm" else largest_eigenvalue(gram)) ** 0.5
        image = matrix @ found.vectors
        s_r = image.norm(dim=0)
        if _gram_error(_at_cut(s_r, mode), first, beyond) <= GRAM_RESOLUTION:
            return _pairs(image, s_r, found.vectors, total_energy, None, "subspace")
    eigenvalues, eigenvectors = torch.linalg.eigh(gram)
    del gram
    spectrum = eigenvalues.clamp_min(0).sqrt().flip(0)
    chosen = torch.arange(n - 1, n - 1 - rank, -1) if mode == "ipm" else torch.arange(rank - 1, -1, -1)
    v_r = eigenvectors[:, chosen]  # descending σ order: no flipped copy of all vectors
    image = matrix @ v_r
    s_r = image.norm(dim=0)
    beyond = float(spectrum[min(rank, n - 1)] if mode == "ipm" else spectrum[max(n - rank - 1, 0)])
    if rank < n and _gram_error(_at_cut(s_r, mode), float(spectrum[0]), beyond) > GRAM_RESOLUTION:
        empty = torch.empty(0)
        return KeptPairs(empty, empty, empty, total_energy, None, "svd (gram could not resolve the cut)")
    return _pairs(image, s_r, v_r, total_energy, spectrum, "gram")


def _at_cut(s_r: torch.Tensor, mode: str) -> float:
    """The kept singular value next to the cut (σ = ‖M·v‖, descending order: no root of a tiny eigenvalue)."""
    return float(s_r[-1] if mode == "ipm" else s_r[0])


def _pairs(
    image: torch.Tensor, s_r: torch.Tensor, v_r: torch.Tensor, energy: float, spectrum: torch.Tensor | None, used: str
) -> KeptPairs:
    u_r = image / torch.where(s_r > 0, s_r, 1)  # σ = 0: u is arbitrary, B = u·√σ is zero anyway
    return KeptPairs(u_r, s_r, v_r.T, energy, spectrum, used)


# The Gram route resolves a singular pair only to about ε·(σ₁/σ)² over the relative gap at the cut, so KPM's
# smallest pairs can come out wrong: on the README command's SmolLM2 store, layer 0's q_proj adapter was 39 %
# from the SVD's, o_proj 0.9 %. A layer whose estimate exceeds this takes the SVD of the product instead.
# The estimate over-states the error 100–1000× there: measured on 28 layers, every layer under 1e-3 was
# within 1.7e-6 of the SVD, while estimates of 1.7e-3 to 0.7 went with errors of 2e-6 to 0.39.
GRAM_RESOLUTION = 1e-3


def _gram_error(cut: float, first: float, beyond: float) -> float:
    """The Gram route's error estimate on the kept subspace, ε·(σ₁/σ_cut)²/gap, from the singular values at the
    cut, the first one (or a bound on it) and the next one beyond the cut (or a bound closer to the cut)."""
    if cut <= 0:
        return float("inf")
    eps = torch.finfo(torch.float64).eps
    return eps * (first / cut) ** 2 / max(abs(cut - beyond) / cut, eps)


def _svd_pairs(matrix: torch.Tensor, rank: int, mode: str, solver: str) -> KeptPairs:
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    cut = slice(0, rank) if mode == "ipm" else slice(s.numel() - rank, s.numel())
    return KeptPairs(u[:, cut], s[cut], vh[cut], float(s.square().sum()), s, solver)


def decompose_weight(
    weight: torch.Tensor,
    covariance: CovarianceSource | DampedCovariance | None,
    *,
    rank: int,
    mode: str,
    alpha: float | None = None,
    damping: float = DEFAULT_DAMPING,
    solver: str = "subspace",
    factor_dtype: torch.dtype = torch.float32,
    transposed: bool = False,
    name: str = "weight",
    device: torch.device | str = "cpu",
    balance: bool = False,
) -> Decomposition:
    """Split ``weight`` into a frozen residual and LoRA factors initialised from ``covariance``.

    ``covariance`` None gives the plain SVD of W (PiSSA for ``ipm``, MiLoRA for ``kpm``); a callable is
    read when needed and its result overwritten (see ``context_product``), a tensor is copied, a
    ``DampedCovariance`` (shared by the linears reading one input) is used as it is.
    ``transposed`` marks GPT-2 style ``Conv1D`` weights stored as (in, out).
    ``alpha`` defaults to ``rank`` (scaling 1); PEFT's ``S ← S/s`` is folded in so that
    ``residual + s·B·A`` reproduces ``weight``; ``balance`` rescales each component (``balanced``). The
    math runs in float64 on ``device`` whatever ``solver`` (see SOLVERS) finds the singular pairs; the
    factors (``factor_dtype``) and the residual (the weight's dtype) come back in host memory.
    """
    w = weight.T if transposed else weight
    _check_inputs(w, rank, mode, solver, name)
    scaling = (alpha if alpha is not None else rank) / rank
    product, chol, lam = context_product(w, covariance, damping, name, device)
    pairs = kept_pairs(product, rank, mode, solver=solver)
    del product
    u_r, s_r, vh_r = pairs.u, pairs.s, pairs.vh
    if chol is not None:
        # Vᵣᵀ C⁻¹ through the Cholesky factor, on the r kept rows only (no full inverse).
        vh_r = cholesky_solve(chol, vh_r.T).T
    del chol

    root = (s_r / scaling).sqrt()
    lora_a, lora_b = root[:, None] * vh_r, u_r * root[None, :]
    if balance:
        lora_a, lora_b = balanced(lora_a, lora_b)
    lora_a = lora_a.to("cpu", factor_dtype).contiguous()
    lora_b = lora_b.to("cpu", factor_dtype).contiguous()
    residual = torch.empty_like(weight, device="cpu")  # the weight's own layout: (in, out) for Conv1D
    _fill_residual(residual.T if transposed else residual, w, lora_a, lora_b, scaling, name, lam)
    if not (all_finite(lora_a) and all_finite(lora_b)):
        raise DecompositionError(f"{name}: decomposition produced NaN or Inf (damping {lam:g})")
    return Decomposition(
        lora_A=lora_a,
        lora_B=lora_b,
        residual=residual,
        kept=s_r.to("cpu", torch.float64),
        total_energy=pairs.total_energy,
        spectrum=None if pairs.spectrum is None else pairs.spectrum.to("cpu", torch.float64),
        solver=pairs.solver,
        damping=lam,
        scaling=scaling,
    )


def balanced(lora_a: torch.Tensor, lora_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each rank-one component rescaled so that A's row and B's column have equal norms (B·A unchanged).

    KPM's A = √σ·vᵀC⁻¹ is large where C is small and B = u·√σ small, so at one learning rate Adam moves the
    two very unequally; balancing is the scale-free split (PiSSA's and MiLoRA's factors already are).
    """
    a_norms, b_norms = lora_a.norm(dim=1), lora_b.norm(dim=0)
    factor = torch.where((a_norms > 0) & (b_norms > 0), (b_norms / a_norms).sqrt(), torch.ones_like(a_norms))
    return lora_a * factor[:, None], lora_b / factor[None, :]


def _fill_residual(
    residual: torch.Tensor,
    w: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scaling: float,
    name: str,
    lam: float,
) -> None:
    """``residual ← W − s·B·A`` (both (out, in), ``residual`` possibly a transposed view) in the weight's dtype,
    from the factors as stored (so that residual + s·B·A rebuilds W up to the weight's own rounding), a
    block of rows at a time in float64."""
    a = lora_a.double()
    for rows in _row_blocks(*w.shape):
        block = w[rows].double() - scaling * (lora_b[rows].double() @ a)
        if not all_finite(block):
            raise DecompositionError(f"{name}: decomposition produced NaN or Inf (damping {lam:g})")
        residual[rows] = block
