"""The decomposition's closed sets and defaults, shared by the maths below and the options above."""

from __future__ import annotations

from enum import Enum

import torch

DEFAULT_DAMPING = 0.01  # λ in C + λ·scale·I, scale from the damping rule: PEFT's and the papers' level
FACTOR_DTYPES = {"float32": torch.float32, "float64": torch.float64}


class DampingRule(str, Enum):
    """What λ multiplies in C + λ·scale·I."""

    MEAN_DIAGONAL = "mean-diagonal"  # mean(diag C) = tr(C)/d, the mean eigenvalue: PEFT's and the papers' rule
    MEDIAN_DIAGONAL = "median-diagonal"  # median of diag C's positive entries: massive dimensions cannot raise it


DEFAULT_DAMPING_RULE = DampingRule.MEAN_DIAGONAL


def damping_scale(diagonal: torch.Tensor, rule: DampingRule) -> float:
    """The scale λ multiplies under ``rule``, from the covariance's diagonal (any positive multiple of C gives
    the same multiple of it). The mean is the mean eigenvalue, so a few dimensions that carry most of tr(C)
    set it; the median of the positive variances is the typical dimension's, whatever up to half of them do
    (inputs that never vary are left out: they carry no data). 0 for a diagonal without positive entries."""
    if DampingRule(rule) is DampingRule.MEAN_DIAGONAL:
        return float(diagonal.mean())
    positive = diagonal[diagonal > 0]
    return float(positive.median()) if positive.numel() else 0.0


class Mode(str, Enum):
    KPM = "kpm"  # the r smallest components train: knowledge preserved
    IPM = "ipm"  # the r largest components train: instruction previewed


class Solver(str, Enum):
    """How the singular pairs of the float64 product W·C are found (the factors' dtype is a separate choice)."""

    GRAM = "gram"  # eigen-decomposition of the Gram matrix of the tall orientation (SVD if it cannot resolve the cut)
    SUBSPACE = "subspace"  # only the kept pairs, by subspace iteration where it pays (else gram)
    SVD = "svd"  # LAPACK's full float64 SVD (the reference)
