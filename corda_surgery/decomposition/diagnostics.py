"""Diagnostics of a covariance that the decomposition reports: how many of its directions the damping decides,
and whether more calibration tokens would change that (``damping_limit``)."""

from __future__ import annotations

import math
from enum import Enum

import torch

from corda_surgery.decomposition.kinds import DEFAULT_DAMPING, DEFAULT_DAMPING_RULE, DampingRule, damping_scale

# Widest covariance whose eigenvalues below the damping level are counted: one float64 factorisation each, so
# a calibration counts its inputs up to this width (KPM's cut lives there when they are as many as the rank).
BELOW_DAMPING_MAX_WIDTH = 8192
COUNT_SQUARES = 3  # width² float64 matrices a count holds at its peak: the sum, its shifted copy, a factorisation


def count_memory(width: int) -> int:
    """Bytes an eigenvalue count of a ``width``-wide input holds at its peak (0: not counted, too wide)."""
    return COUNT_SQUARES * width * width * 8 if width <= BELOW_DAMPING_MAX_WIDTH else 0


class DampingLimit(str, Enum):
    """What limits the directions a KPM adapter takes where at least ``rank`` covariance eigenvalues lie below
    the damping level: the sample (more tokens lift them above it) or the spectrum (they stay below)."""

    SAMPLE = "sample"
    SPECTRUM = "spectrum"


def eigenvalues_below_damping(
    total: torch.Tensor,
    damping: float = DEFAULT_DAMPING,
    rule: DampingRule = DEFAULT_DAMPING_RULE,
    *,
    overwrite: bool = False,
) -> int | None:
    """How many eigenvalues of the covariance (any positive multiple of it) lie below damping·scale (the
    rule's, ``damping_scale``): the negative inertia of C − level·I (Sylvester), from its LDLᵀ factorisation,
    cheaper than eigenvalues, after a Cholesky factorisation that settles the common case of none. None for a
    covariance without positive diagonal (no tokens). ``overwrite``: a float64 ``total`` that may be shifted in
    place (no copy). Its peak: the shifted matrix and one factorisation's output (COUNT_SQUARES squares)."""
    if not float(total.diagonal().mean()) > 0:
        return None
    level = damping * damping_scale(total.diagonal(), rule)
    shifted = total if overwrite else total.double().clone()
    shifted.diagonal().sub_(level)
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


def lasting_below_damping(width: int, below: int, tokens: int, below_half: int, half_tokens: int) -> float:
    """Of ``below`` eigenvalues under the level at ``tokens`` tokens (``below_half`` at ``half_tokens``), how many
    would stay there however many tokens were used.

    Fewer tokens than the width leave ``width − tokens`` eigenvalues exactly zero: sampling, gone with more
    tokens; the rest (the excess) is modelled as what stays plus a sampling part that shrinks as tokens^-½
    (the spread of a sample covariance's small eigenvalues below the population's, Marchenko–Pastur), so the
    excesses at two token counts give both parts. Where the part is itself rank-deficient its nonzero
    eigenvalues are inflated by sampling, not deflated: its excess then bounds what stays."""
    excess = below - max(width - tokens, 0)
    excess_half = below_half - max(width - half_tokens, 0)
    if half_tokens < width:
        return float(max(min(excess, excess_half), 0))
    sampling = max(excess_half - excess, 0) / (math.sqrt(tokens / half_tokens) - 1)
    return max(excess - sampling, 0.0)


def damping_limit(
    width: int, rank: int, below: int, tokens: int, below_half: int | None = None, half_tokens: int | None = None
) -> DampingLimit | None:
    """What limits a covariance with ``below`` eigenvalues under the damping level at ``tokens`` tokens, where
    that reaches ``rank`` (None below it: the data chooses the adapter's directions; None too where it cannot
    be told, without a count on part of the tokens).

    SAMPLE where the exactly-zero eigenvalues of fewer tokens than the width leave fewer than ``rank`` others,
    or fewer than ``rank`` would stay with unlimited tokens (``lasting_below_damping``): more tokens bring the
    count under the rank. SPECTRUM otherwise: a few massive dimensions put the level above much of the
    spectrum, and only the damping rule or level moves it."""
    if below < rank:
        return None
    if below - max(width - tokens, 0) < rank:
        return DampingLimit.SAMPLE
    if below_half is None or half_tokens is None or not 0 < half_tokens < tokens:
        return None
    lasting = lasting_below_damping(width, below, tokens, below_half, half_tokens)
    return DampingLimit.SPECTRUM if lasting >= rank else DampingLimit.SAMPLE
