"""The r largest or smallest eigenpairs of a symmetric positive semi-definite matrix, at matrix-product speed.

CorDA keeps r of n singular pairs of W·C. A full eigen-decomposition of the Gram matrix spends most of its
time in LAPACK's memory-bound tridiagonal reduction, for pairs that are thrown away. Block subspace
iteration with Rayleigh–Ritz finds only the wanted ones: iterating with G for the largest, with G⁻¹
(through G's Cholesky factor: shift-invert at zero) for the smallest. The wanted directions are the most
amplified ones, so from a random start they are found first. A pair is accepted when its residual
‖G·v − θ·v‖ is below 1e-11·θ or ε·‖G‖_F (looser than a full eigen-decomposition for the largest pairs,
whose vectors it still pins to far below the factors' float32).

Whether iteration pays depends on the spectrum at the cut: each step shrinks the unwanted part by the ratio
ρ of the r-th wanted eigenvalue to the first one outside the block. After every step the Ritz values give ρ
and the residuals say how far there is still to go; once the steps still needed would cost more than the
full eigen-decomposition (a cut inside a dense cluster, as on random matrices), or the Gram matrix is too
ill-conditioned to factor, ``None`` tells the caller to take that decomposition instead — after a few
steps, not a fixed maximum.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from corda_surgery.numerics import cholesky_solve

OVERSAMPLING = (16, 48)  # block = r + n/16 clamped to these: wider matrices take a wider, faster block
RELATIVE_TOLERANCE = 1e-11  # residual against the eigenvalue itself
# Residual against ε·‖G‖_F, where the smallest pairs' bound lies: a looser multiple lets KPM's adapters drift from
# the float64 SVD's, at this one they are as close to it as the full eigen-decomposition's.
ROUNDING_TOLERANCE = 1.0
SMALLEST_FOR_ITERATION = 4  # blocks above n/this: the full eigen-decomposition is as fast
# Steps that cost as much as LAPACK's syevd of the same matrix, per unit of n / block: past them iterating
# does not pay (one step is a few matrix products, syevd a memory-bound tridiagonal reduction).
STEPS_PER_WIDTH_OVER_BLOCK = 0.8
FIRST_PREDICTION = 2  # Ritz values of the first step say little about ρ


@dataclass(frozen=True)
class ExtremePairs:
    """The wanted pairs in descending eigenvalue order (the largest: most extreme first; the smallest: the
    cut's first)."""

    values: torch.Tensor  # (r,) descending
    vectors: torch.Tensor  # (n, r), the same order
    neighbour: float  # lower bound on the distance from the cut's eigenvalue to the next one outside the r
    iterations: int


def _block_width(n: int, rank: int) -> int:
    low, high = OVERSAMPLING
    return rank + min(high, max(low, n // 16))


def extreme_eigenpairs(gram: torch.Tensor, rank: int, *, largest: bool, seed: int = 0) -> ExtremePairs | None:
    """The ``rank`` largest or smallest eigenpairs of a symmetric PSD float64 ``gram``; ``None`` where
    iteration does not pay (small matrices, a slow cut) or cannot run (a Gram matrix too ill-conditioned)."""
    n = gram.shape[0]
    block = _block_width(n, rank)
    if block * SMALLEST_FOR_ITERATION > n:
        return None
    if not largest:
        factor, info = torch.linalg.cholesky_ex(gram)
        if int(info):
            return None  # numerically singular: its smallest pairs are rounding noise, eigh says so too
    budget = STEPS_PER_WIDTH_OVER_BLOCK * n / block
    scale = float(torch.linalg.matrix_norm(gram)) * torch.finfo(gram.dtype).eps
    generator = torch.Generator(device=gram.device).manual_seed(seed)
    vectors = torch.randn(n, block, dtype=gram.dtype, device=gram.device, generator=generator)
    image = gram @ vectors if largest else vectors  # G times the vectors: what the next step of the largest needs
    # Ritz values come ascending: the wanted ones, the one beyond the cut, and the block's far end.
    wanted = slice(block - rank, block) if largest else slice(0, rank)
    beyond, cut, far = (block - rank - 1, block - rank, 0) if largest else (rank, rank - 1, block - 1)
    iteration, distance_left = 0, math.inf
    while True:
        iteration += 1
        basis, _ = torch.linalg.qr(image if largest else cholesky_solve(factor, vectors))
        image = gram @ basis
        projected = basis.T @ image
        values, rotation = torch.linalg.eigh((projected + projected.T) / 2)  # ascending
        vectors, image = basis @ rotation, image @ rotation  # Ritz vectors and G times them
        residuals = (image - vectors * values).norm(dim=0)
        bound = (RELATIVE_TOLERANCE * values[wanted].abs()).clamp_min(ROUNDING_TOLERANCE * scale)
        if bool((residuals[wanted] <= bound).all()):
            order = torch.arange(block - 1, block - rank - 1, -1) if largest else torch.arange(rank - 1, -1, -1)
            distance = abs(float(values[beyond] - values[cut])) - float(residuals[beyond])
            return ExtremePairs(values[order], vectors[:, order], max(distance, 0.0), iteration)
        still = float(torch.log(residuals[wanted] / bound).max())  # the worst pair's distance from its bound
        stalled = still >= distance_left  # at the rounding floor
        if iteration >= FIRST_PREDICTION and (stalled or iteration + _steps_left(values, still, cut, far) > budget):
            return None  # the full eigen-decomposition is as good, or faster
        distance_left = still


def _steps_left(values: torch.Tensor, distance: float, cut: int, far: int) -> float:
    """Steps until the worst residual, ``distance`` (log residual / bound) from its bound, is within it, each
    shrinking it by ρ = the block's far-end Ritz value over the cut's (largest) or the reverse (smallest,
    iterated with the inverse); inf where ρ ≥ 1."""
    low, high = sorted((float(values[cut]), float(values[far])))
    if not low > 0 or low >= high:
        return math.inf
    return max(0.0, distance) / math.log(high / low)


POWER_STEPS = 6  # the Rayleigh quotient is within a few per cent of λ₁ after these, whatever the gaps at the top


def largest_eigenvalue(gram: torch.Tensor, seed: int = 0) -> float:
    """λ₁ of a symmetric PSD ``gram`` to a few per cent (from below), by power iteration on four vectors: the
    scale against which the Gram route's resolution of the smallest pairs is judged."""
    generator = torch.Generator(device=gram.device).manual_seed(seed)
    vectors = torch.randn(gram.shape[0], 4, dtype=gram.dtype, device=gram.device, generator=generator)
    for _ in range(POWER_STEPS):
        vectors, _ = torch.linalg.qr(gram @ vectors)
    return float(torch.linalg.eigvalsh(vectors.T @ gram @ vectors)[-1])
