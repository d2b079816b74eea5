"""The adapter that knows its residual is quantised.

Quantising the frozen residual ``W − s·B·A`` moves the model's output before training by ``E = W − Q − s·B·A``.
What the output feels of E on the calibration inputs is ``‖E·C^{1/2}‖² = tr(E·C·Eᵀ)``, the context-oriented
metric. Keeping A (the mode's input directions, so KPM and IPM train where they chose to), the B that makes
it smallest for a fixed Q is a least-squares fit; the residual it leaves is quantised again, and so on for a
few rounds (LoftQ's alternation, in the metric of the calibration data). The best round is kept: requantising
need not lower the error every time.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

import torch

from corda_surgery.decomposition.decompose import DecompositionError
from corda_surgery.numerics import all_finite

DEFAULT_REFIT_ROUNDS = 3


class Quantised(Protocol):
    """A quantised weight: whatever it stores, and the float weight it stands for."""

    @property
    def dequantised(self) -> torch.Tensor: ...


Q = TypeVar("Q", bound=Quantised)


@dataclass(frozen=True)
class Refit(Generic[Q]):
    lora_b: torch.Tensor  # the adapter's B for ``quantised`` (A unchanged), in B's dtype
    quantised: Q  # the residual as stored: Q(W − s·B·A)
    error_before: float  # relative C-weighted error of the residual quantised as the decomposition left it
    error_after: float  # … and with this B (equal to error_before where no round lowered it)
    rounds: int  # rounds run


def weighted_error(error: torch.Tensor, covariance: torch.Tensor) -> float:
    """``tr(E·C·Eᵀ)``: the squared output error of ``error`` (out, in) on inputs whose covariance is C, in C's
    dtype (a figure to compare rounds and layers by: float32 is plenty, at half float64's time)."""
    error = error.to(covariance.dtype)
    return float(((error @ covariance) * error).sum(dtype=torch.float64))


def refit_adapter(
    weight: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scaling: float,
    covariance: torch.Tensor,
    quantise: Callable[[torch.Tensor], Q],
    *,
    rounds: int = DEFAULT_REFIT_ROUNDS,
    name: str = "weight",
) -> Refit[Q]:
    """Quantise ``W − s·B·A`` with ``quantise`` and, over ``rounds`` rounds, refit B against the quantised
    residual in the metric of ``covariance`` (float64, (in, in)); ``rounds`` 0 only quantises. Errors are
    relative to ``tr(W·C·Wᵀ)``, so layers compare."""
    w, a, metric = weight.double(), lora_a.double(), covariance.float()
    reference = weighted_error(w, metric)
    if not reference > 0:
        raise DecompositionError(f"{name}: the weight has no output on the calibration inputs (tr(W·C·Wᵀ) = 0)")

    def attempt(b: torch.Tensor) -> tuple[Q, float]:
        residual = (w - scaling * (b @ a)).float()
        quantised = quantise(residual)
        error = w - quantised.dequantised.double() - scaling * (b @ a)
        return quantised, weighted_error(error, metric) / reference

    b = lora_b.double()
    quantised, before = attempt(b)
    best_b, best, best_error = b, quantised, before
    projected = covariance @ a.T  # C·Aᵀ (in, r)
    gram = a @ projected  # A·C·Aᵀ (r, r)
    for _ in range(rounds):
        target = w - quantised.dequantised.double()  # what s·B·A should be, given the latest Q
        b = torch.linalg.lstsq(gram, (target @ projected).T).solution.T / scaling
        if not all_finite(b):
            raise DecompositionError(f"{name}: refitting the adapter to the quantised residual gave NaN or Inf")
        quantised, error = attempt(b)
        if error < best_error:
            best_b, best, best_error = b, quantised, error
    return Refit(best_b.to(lora_b.dtype), best, before, best_error, rounds)
