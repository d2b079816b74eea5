"""The r largest or smallest eigenpairs of a symmetric positive semi-definite matrix, at matrix-product speed.

CorDA keeps r of n singular pairs of W·C. A full eigen-decomposition of the Gram matrix spends most of its
time in LAPACK's memory-bound tridiagonal reduction, for pairs that are thrown away. Block subspace
iteration with Rayleigh–Ritz finds only the wanted ones: iterating with G for the largest, with G⁻¹
(through G's Cholesky factor: shift-invert at zero) for the smallest. The wanted directions are the most
amplified ones, so from a random start they are found first. A pair is accepted when its residual
‖G·v − θ·v‖ is below 1e-11·θ or a few ε·‖G‖ (looser than a full eigen-decomposition for the largest pairs,
whose vectors it still pins to far below the factors' float32); otherwise (a slow cut inside a cluster, a
Gram matrix too ill-conditioned to factor) ``None`` tells the caller to fall back to the full
eigen-decomposition.
"""

from __future__ import annotations

import torch

OVERSAMPLING = 16  # block = r + this: each iteration shrinks the unwanted part by λ_{r+p+1}/λ_r or better
MAX_ITERATIONS = 60
RELATIVE_TOLERANCE = 1e-11  # residual against the eigenvalue itself
ROUNDING_TOLERANCE = 8.0  # residual against ε·‖G‖_F·√n: below that no float64 solver does better
SMALLEST_FOR_ITERATION = 4  # blocks above n/this: the full eigen-decomposition is as fast


def extreme_eigenpairs(gram: torch.Tensor, rank: int, *, largest: bool, seed: int = 0) -> tuple | None:
    """``(eigenvalues descending, eigenvectors (n, r), iterations)`` of the ``rank`` largest or smallest
    eigenpairs of a symmetric PSD float64 ``gram``; ``None`` where iteration does not pay (small matrices) or
    did not converge."""
    n = gram.shape[0]
    block = rank + OVERSAMPLING
    if block * SMALLEST_FOR_ITERATION > n:
        return None
    if not largest:
        factor, info = torch.linalg.cholesky_ex(gram)
        if int(info):
            return None  # numerically singular: its smallest pairs are rounding noise, eigh says so too
    scale = float(torch.linalg.matrix_norm(gram)) * torch.finfo(gram.dtype).eps * n**0.5
    generator = torch.Generator(device=gram.device).manual_seed(seed)
    vectors = torch.randn(n, block, dtype=gram.dtype, device=gram.device, generator=generator)
    image = gram @ vectors if largest else vectors  # G times the vectors: what the next step of the largest needs
    for iteration in range(1, MAX_ITERATIONS + 1):
        basis, _ = torch.linalg.qr(image if largest else torch.cholesky_solve(vectors, factor))
        image = gram @ basis
        projected = basis.T @ image
        values, rotation = torch.linalg.eigh((projected + projected.T) / 2)  # ascending
        wanted = slice(block - rank, block) if largest else slice(0, rank)
        vectors, image = basis @ rotation, image @ rotation  # Ritz vectors and G times them
        residual = (image[:, wanted] - vectors[:, wanted] * values[wanted]).norm(dim=0)
        bound = (RELATIVE_TOLERANCE * values[wanted].abs()).clamp_min(ROUNDING_TOLERANCE * scale)
        if bool((residual <= bound).all()):
            order = torch.arange(block - 1, block - rank - 1, -1) if largest else torch.arange(rank - 1, -1, -1)
            return values[order], vectors[:, order], iteration
    return None
