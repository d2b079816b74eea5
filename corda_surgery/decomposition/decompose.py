"""Context-oriented decomposition of one weight matrix (CorDA, arXiv 2406.05223).

``W·C = U S Vᵀ`` with ``C`` the damped input covariance, rebuilt as ``W = U S (Vᵀ C⁻¹)``. The ``r``
components that become the trainable adapter are the smallest (KPM) or the largest (IPM); the frozen
residual ``W − s·B·A`` keeps the layer's output unchanged before training.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TypeVar

import torch

from corda_surgery.decomposition.kinds import (
    DEFAULT_DAMPING,
    DEFAULT_DAMPING_RULE,
    DampingRule,
    Mode,
    Solver,
    damping_scale,
)
from corda_surgery.decomposition.memory import ROW_BLOCK_ELEMENTS
from corda_surgery.decomposition.solvers import KeptPairs, MemoryShortfall, kept_pairs
from corda_surgery.errors import CordaSurgeryError
from corda_surgery.numerics import all_finite, cholesky_in_place, cholesky_solve
from corda_surgery.panels import Covariance, SymmetricPanels, finite

log = logging.getLogger(__name__)

# A covariance that is not positive definite at the requested damping gets it doubled, up to this factor
# (from ZERO_DAMPING_START when 0 was requested); one that needs more is unusable, not a warning.
MAX_DAMPING_RAISE = 1024
ZERO_DAMPING_START = 1e-8
FELL_BACK_LABEL = "svd (gram could not resolve the cut)"  # the solver surgery.json names for such a layer
BLOCKED_LABEL = "blocked svd (gram could not resolve the cut; the svd did not fit in memory)"

CovarianceSource = Covariance | Callable[[], Covariance]
Kind = TypeVar("Kind", Mode, Solver)


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
    solver: Solver  # what found the pairs: GRAM also where SUBSPACE declined to iterate
    fell_back: bool  # SVD taken because the Gram route could not resolve the cut (solver is then SVD)
    damping: float  # λ actually used (relative to the rule's scale); 0 without covariance
    scaling: float  # LoRA scaling s = alpha / r
    damping_rule: DampingRule = DEFAULT_DAMPING_RULE
    damping_level: float = 0.0  # λ·scale / mean(diag C): the level in the default rule's units (λ under it)
    blocked: bool = False  # the fallback's SVD was the blocked one (the SVD did not fit in the free memory)

    @property
    def adapter_energy(self) -> float:
        """Share of Σσ² held by the adapter's components."""
        return float(self.kept.square().sum() / self.total_energy)

    @property
    def solver_label(self) -> str:
        """The solver as surgery.json records it: its value, or the fallback's label."""
        if self.fell_back:
            return BLOCKED_LABEL if self.blocked else FELL_BACK_LABEL
        return self.solver.value


@dataclass(frozen=True)
class DampedCovariance:
    """``C + λ·scale·I`` (``damping_scale``) and its Cholesky factor, prepared once for all linears that read
    one input (q/k/v, gate/up): they share the reading, the checks, the damping and the factorisation."""

    damped: Covariance  # float64
    factor: Covariance  # Cholesky factor of ``damped`` (``_factorise``); never modified by its users
    damping: float  # λ actually used
    level: float  # λ·scale / mean(diag C)


def _member(kind: type[Kind], value: Kind, what: str, name: str) -> Kind:
    """``value`` as a member of ``kind`` (its string also accepted), else the error that names the layer."""
    try:
        return kind(value)
    except ValueError:
        choices = ", ".join(member.value for member in kind)
        raise DecompositionError(f"{name}: {what} must be one of {choices}, got {value!r}") from None


def _check_inputs(weight: torch.Tensor, rank: int, mode: Mode, solver: Solver, name: str) -> tuple[Mode, Solver]:
    """One place for the mode, solver, weight's shape, rank and finiteness checks (raised before any work)."""
    mode, solver = _member(Mode, mode, "mode", name), _member(Solver, solver, "solver", name)
    if weight.dim() != 2:
        raise DecompositionError(f"{name}: weight must be 2-D, got shape {tuple(weight.shape)}")
    out_dim, in_dim = weight.shape
    if not 1 <= rank <= min(out_dim, in_dim):
        raise DecompositionError(
            f"{name}: rank {rank} is outside 1..{min(out_dim, in_dim)} for a {out_dim}×{in_dim} weight"
        )
    if not all_finite(weight):
        raise DecompositionError(f"{name}: weight contains NaN or Inf")
    return mode, solver


def _row_blocks(rows: int, width: int) -> Iterator[slice]:
    step = max(1, ROW_BLOCK_ELEMENTS // max(width, 1))
    return (slice(start, start + step) for start in range(0, rows, step))


def _context_rows(product: torch.Tensor, weight: torch.Tensor, damped: Covariance, device: torch.device) -> None:
    """``product ← W·C_damped`` in float64, a block of rows of W at a time (no float64 copy of all of W)."""
    for rows in _row_blocks(*weight.shape):
        block = weight[rows].to(device, torch.float64)
        if isinstance(damped, SymmetricPanels):
            damped.left_product(block, out=product[rows])
        else:
            product[rows] = block @ damped


def _add_to_diagonal(matrix: Covariance, value: float) -> None:
    if isinstance(matrix, SymmetricPanels):
        matrix.add_to_diagonal(value)
    else:
        matrix.diagonal().add_(value)


def _factorise(matrix: Covariance) -> bool:
    """Overwrite ``matrix`` with its Cholesky factor (``cholesky_in_place``, or the panels' own)."""
    return matrix.cholesky_() if isinstance(matrix, SymmetricPanels) else cholesky_in_place(matrix)


def _solve(factor: Covariance, rhs: torch.Tensor) -> torch.Tensor:
    """``C⁻¹·rhs`` from the factor ``_factorise`` left."""
    return factor.cholesky_solve(rhs) if isinstance(factor, SymmetricPanels) else cholesky_solve(factor, rhs)


def _checked_covariance(
    source: CovarianceSource, in_dim: int, name: str, device: torch.device, rule: DampingRule
) -> tuple[Covariance, float, float]:
    """A float64 covariance on ``device`` that may be overwritten (a callable's fresh result, else a copy),
    checked (shape, finite, positive diagonal), the scale λ multiplies under ``rule`` and mean(diag C)."""
    fresh = callable(source)
    covariance = source() if callable(source) else source
    if isinstance(covariance, SymmetricPanels):
        covariance = (covariance if fresh else covariance.clone()).to(device)
    else:
        covariance = covariance.to(device, torch.float64, copy=not fresh)
    if tuple(covariance.shape) != (in_dim, in_dim):
        raise DecompositionError(
            f"{name}: covariance has shape {tuple(covariance.shape)}, expected ({in_dim}, {in_dim}) for its inputs"
        )
    if not finite(covariance):
        raise DecompositionError(f"{name}: covariance contains NaN or Inf")
    mean_diag = float(covariance.diagonal().mean())
    if not mean_diag > 0:
        raise DecompositionError(f"{name}: covariance is zero or negative on its diagonal (no tokens seen?)")
    scale = mean_diag if rule is DampingRule.MEAN_DIAGONAL else damping_scale(covariance.diagonal(), rule)
    return covariance, scale, mean_diag


def _definite(
    damping: float, name: str, factorised: Callable[[], bool], raise_to: Callable[[float, float], None]
) -> float:
    """The λ at which ``factorised()`` succeeds: ``damping``, doubled (``raise_to(λ, raised)`` moves the
    operands along) while it fails, from ZERO_DAMPING_START for 0 and at most to MAX_DAMPING_RAISE times the
    request, past which the covariance is unusable; a raise is logged."""
    lam, ceiling = damping, (damping or ZERO_DAMPING_START) * MAX_DAMPING_RAISE
    while not factorised():
        raised = lam * 2 if lam else ZERO_DAMPING_START
        if raised > ceiling:
            raise DecompositionError(
                f"{name}: covariance is unusable: not positive definite even with damping {ceiling:g} "
                f"({MAX_DAMPING_RAISE}× the requested {damping:g}); calibrate with more tokens or raise `damping`"
            )
        raise_to(lam, raised)
        lam = raised
    if lam != damping:
        log.warning("%s: covariance not positive definite at damping %g; used %g", name, damping, lam)
    return lam


def damped_covariance(
    covariance: CovarianceSource,
    damping: float,
    in_dim: int,
    name: str,
    device: torch.device | str = "cpu",
    rule: DampingRule = DEFAULT_DAMPING_RULE,
) -> DampedCovariance:
    """The damped covariance and its factor (2 n² floats), λ raised as ``context_product`` does."""
    damped, scale, mean_diag = _checked_covariance(covariance, in_dim, name, torch.device(device), DampingRule(rule))
    _add_to_diagonal(damped, damping * scale)
    factor = damped.clone()

    def raise_to(lam: float, raised: float) -> None:
        _add_to_diagonal(damped, (raised - lam) * scale)
        factor.copy_(damped)  # type: ignore[arg-type]  # both of one form

    lam = _definite(damping, name, lambda: _factorise(factor), raise_to)
    return DampedCovariance(damped, factor, lam, _level(lam, scale, mean_diag, rule))


def _level(lam: float, scale: float, mean_diag: float, rule: DampingRule) -> float:
    """λ·scale in mean(diag C)'s units: λ itself under the mean-diagonal rule."""
    return lam if DampingRule(rule) is DampingRule.MEAN_DIAGONAL else lam * scale / mean_diag


def context_product(
    weight: torch.Tensor,
    covariance: CovarianceSource | DampedCovariance | None,
    damping: float,
    name: str,
    device: torch.device | str = "cpu",
    rule: DampingRule = DEFAULT_DAMPING_RULE,
) -> tuple[torch.Tensor, Covariance | None, float, float]:
    """``(W·C_damped in float64, the Cholesky factor of C_damped, λ, its level in mean(diag C)'s units)``;
    without a covariance ``(W, None, 0, 0)``.

    ``C_damped = C + λ·scale·I`` (``damping_scale`` under ``rule``; a shared ``DampedCovariance`` carries its
    own), λ raised until C_damped is definite (``_definite``). Memory is about
    one covariance plus the product: damping is added in place, W·C is formed a block of rows at a time, and
    the Cholesky factor overwrites C_damped (a failed factorisation reads ``covariance`` again, a callable from
    its source, and shifts the product by Δλ·W). Always float64: a float32 product would limit every small
    singular value to ε₃₂·σ₁ accuracy, and the KPM cut lives among them.
    """
    device = torch.device(device)
    if covariance is None:
        return weight.to(device, torch.float64), None, 0.0, 0.0
    product = torch.empty(weight.shape, dtype=torch.float64, device=device)
    if isinstance(covariance, DampedCovariance):
        if covariance.damped.shape[0] != weight.shape[1]:
            raise DecompositionError(
                f"{name}: covariance is {covariance.damped.shape[0]} wide, the weight reads {weight.shape[1]} inputs"
            )
        _context_rows(product, weight, covariance.damped.to(device), device)
        return product, covariance.factor.to(device), covariance.damping, covariance.level
    source, rule = covariance, DampingRule(rule)  # a tensor or a callable, as raise_to reads it again
    damped, scale, mean_diag = _checked_covariance(source, weight.shape[1], name, device, rule)
    _add_to_diagonal(damped, damping * scale)  # no identity matrix: that alone would be one more n²
    _context_rows(product, weight, damped, device)

    def raise_to(lam: float, raised: float) -> None:
        nonlocal damped
        del damped  # the spoiled factor goes before the covariance is read again
        damped, _, _ = _checked_covariance(source, weight.shape[1], name, device, rule)
        _add_to_diagonal(damped, raised * scale)
        for rows in _row_blocks(*weight.shape):
            product[rows].add_(weight[rows].to(device, torch.float64), alpha=(raised - lam) * scale)

    lam = _definite(damping, name, lambda: _factorise(damped), raise_to)
    return product, damped, lam, _level(lam, scale, mean_diag, rule)


def decompose_weight(
    weight: torch.Tensor,
    covariance: CovarianceSource | DampedCovariance | None,
    *,
    rank: int,
    mode: Mode,
    alpha: float | None = None,
    damping: float = DEFAULT_DAMPING,
    damping_rule: DampingRule = DEFAULT_DAMPING_RULE,
    solver: Solver = Solver.SUBSPACE,
    factor_dtype: torch.dtype = torch.float32,
    transposed: bool = False,
    name: str = "weight",
    device: torch.device | str = "cpu",
    balance: bool = False,
    memory_budget: int | None = None,
) -> Decomposition:
    """Split ``weight`` into a frozen residual and LoRA factors initialised from ``covariance``.

    ``covariance`` None gives the plain SVD of W (PiSSA for IPM, MiLoRA for KPM); a callable is read when
    needed and its result overwritten (see ``context_product``), a tensor is copied, a ``DampedCovariance``
    (shared by the linears reading one input) is used as it is, its damping with it; ``damping_rule`` says
    what ``damping`` multiplies (``damping_scale``). ``transposed`` marks GPT-2 style ``Conv1D``
    weights stored as (in, out). ``alpha`` defaults to ``rank`` (scaling 1); ``balance`` rescales each
    component (``balanced``); a fallback keeps within ``memory_budget``. The math runs in float64 on ``device``
    whatever ``solver`` finds the singular pairs; the factors (``factor_dtype``) and the residual (the weight's
    dtype) come back in host memory.
    """
    w = weight.T if transposed else weight
    mode, solver = _check_inputs(w, rank, mode, solver, name)
    scaling = (alpha if alpha is not None else rank) / rank
    product, chol, lam, level = context_product(w, covariance, damping, name, device, damping_rule)
    try:
        pairs = kept_pairs(product, rank, mode, solver=solver, memory_budget=memory_budget)
    except MemoryShortfall as exc:
        raise MemoryShortfall(f"{name}: {exc}") from None
    del product
    lora_a, lora_b = _factors(pairs, chol, scaling, balance, factor_dtype)
    del chol  # freed before the residual's row blocks
    residual = residual_of(weight, lora_a, lora_b, scaling, transposed=transposed, name=name, damping=lam)
    if not (all_finite(lora_a) and all_finite(lora_b)):
        raise DecompositionError(f"{name}: decomposition produced NaN or Inf (damping {lam:g})")
    return Decomposition(
        lora_A=lora_a,
        lora_B=lora_b,
        residual=residual,
        kept=pairs.s.to("cpu", torch.float64),
        total_energy=pairs.total_energy,
        spectrum=None if pairs.spectrum is None else pairs.spectrum.to("cpu", torch.float64),
        solver=pairs.solver,
        fell_back=pairs.fell_back,
        blocked=pairs.blocked,
        damping=lam,
        scaling=scaling,
        damping_rule=DampingRule(damping_rule),
        damping_level=level,
    )


def _factors(
    pairs: KeptPairs, chol: Covariance | None, scaling: float, balance: bool, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """``A = √(σ/s)·Vᵣᵀ C⁻¹`` and ``B = Uᵣ·√(σ/s)`` in host memory: PEFT's ``S ← S/s`` folded in, so that
    ``residual + s·B·A`` reproduces the weight; ``Vᵣᵀ C⁻¹`` through the Cholesky factor, r rows, no inverse."""
    vh_r = pairs.vh if chol is None else _solve(chol, pairs.vh.T).T
    root = (pairs.s / scaling).sqrt()
    lora_a, lora_b = root[:, None] * vh_r, pairs.u * root[None, :]
    if balance:
        lora_a, lora_b = balanced(lora_a, lora_b)
    return lora_a.to("cpu", dtype).contiguous(), lora_b.to("cpu", dtype).contiguous()


def balanced(lora_a: torch.Tensor, lora_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each rank-one component rescaled so that A's row and B's column have equal norms (B·A unchanged).

    KPM's A = √σ·vᵀC⁻¹ is large where C is small and B = u·√σ small, so at one learning rate Adam moves the
    two very unequally; balancing is the scale-free split (PiSSA's and MiLoRA's factors already are).
    """
    a_norms, b_norms = lora_a.norm(dim=1), lora_b.norm(dim=0)
    factor = torch.where((a_norms > 0) & (b_norms > 0), (b_norms / a_norms).sqrt(), torch.ones_like(a_norms))
    return lora_a * factor[:, None], lora_b / factor[None, :]


def residual_of(
    weight: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scaling: float,
    *,
    transposed: bool = False,
    name: str = "weight",
    damping: float = 0.0,
) -> torch.Tensor:
    """``W − s·B·A`` in the weight's own layout and dtype, from the factors as stored: what ``decompose_weight``
    returns as the residual, so a resumed run rebuilds it from saved factors bit for bit."""
    w = weight.T if transposed else weight
    residual = torch.empty_like(weight, device="cpu")  # the weight's own layout: (in, out) for Conv1D
    _fill_residual(residual.T if transposed else residual, w, lora_a, lora_b, scaling, name, damping)
    return residual


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
