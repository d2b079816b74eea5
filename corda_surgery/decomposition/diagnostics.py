"""Diagnostics of a covariance that the decomposition reports: how many of its directions the damping decides."""

from __future__ import annotations

import torch

from corda_surgery.decomposition.kinds import DEFAULT_DAMPING

# Widest covariance whose eigenvalues below the damping level are counted: one float64 factorisation each, so
# a calibration counts its inputs up to this width (KPM's cut lives there when they are as many as the rank).
BELOW_DAMPING_MAX_WIDTH = 8192


def eigenvalues_below_damping(total: torch.Tensor, damping: float = DEFAULT_DAMPING) -> int | None:
    """How many eigenvalues of the covariance (any positive multiple of it) lie below damping·mean(diag):
    the negative inertia of C − level·I (Sylvester), from its LDLᵀ factorisation, cheaper than eigenvalues,
    after a Cholesky factorisation that settles the common case of none. None for a covariance without
    positive diagonal (no tokens)."""
    mean_diagonal = float(total.diagonal().mean())
    if not mean_diagonal > 0:
        return None
    shifted = total.double().clone()
    shifted.diagonal().sub_(damping * mean_diagonal)
    if not int(torch.linalg.cholesky_ex(shifted).info):
        return 0  # positive definite: no eigenvalue at or below the level
    factors, pivots, _ = torch.linalg.ldl_factor_ex(shifted)  # an exactly zero pivot is an eigenvalue at the level
    diagonal, below, pivots = factors.diagonal().tolist(), factors.diagonal(-1).tolist(), pivots.tolist()
    negative, k = 0, 0
    while k < len(pivots):
        if pivots[k] > 0:  # a 1×1 block of D
            negative, k = negative + (diagonal[k] < 0), k + 1
            continue
        a, b, c = diagonal[k], below[k], diagonal[k + 1]  # a 2×2 block of D (LAPACK marks both rows negative)
        determinant = a * c - b * b
        negative, k = negative + (1 if determinant < 0 else 2 if a + c < 0 else 0), k + 2
    return negative
