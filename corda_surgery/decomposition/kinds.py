"""The decomposition's closed sets and defaults, shared by the maths below and the options above."""

from __future__ import annotations

from enum import Enum

import torch

DEFAULT_DAMPING = 0.01  # λ in C + λ·mean(diag C)·I: PEFT's and the papers' rule
FACTOR_DTYPES = {"float32": torch.float32, "float64": torch.float64}


class Mode(str, Enum):
    KPM = "kpm"  # the r smallest components train: knowledge preserved
    IPM = "ipm"  # the r largest components train: instruction previewed


class Solver(str, Enum):
    """How the singular pairs of the float64 product W·C are found (the factors' dtype is a separate choice)."""

    GRAM = "gram"  # eigen-decomposition of the Gram matrix of the tall orientation (SVD if it cannot resolve the cut)
    SUBSPACE = "subspace"  # only the kept pairs, by subspace iteration where it pays (else gram)
    SVD = "svd"  # LAPACK's full float64 SVD (the reference)
