"""CorDA++ (arXiv 2506.13187): compactness metric, dynamic covariance selection, dynamic rank allocation.

The paper's exact equations were not available when this was written; the metric below follows the
project's design and is one small function in METRICS, so the paper's form can replace it.

With σ₁ ≥ … ≥ σ_R the singular values of W·C_damped and E(k) = Σ_{i≤k} σᵢ² / Σ σᵢ²:
- IPM at rank r: compactness = E(r), the share of context-weighted energy the trainable components hold;
- KPM at rank r: compactness = 1 − (E(R) − E(R−r)), one minus the share the r smallest components hold.
Both are invariant to the scale of C, because damping is relative to mean(diag C).
"""

from __future__ import annotations

import heapq
from collections.abc import Callable

import torch

from corda_surgery.decompose import CovarianceSource, context_product, singular_values
from corda_surgery.errors import CordaSurgeryError


class BudgetError(CordaSurgeryError):
    """The rank budget cannot be met (below the minimum ranks) or is inconsistent."""


def context_spectrum(
    weight: torch.Tensor,
    covariance: CovarianceSource,
    *,
    damping: float,
    transposed: bool = False,
    name: str = "weight",
    solver: str = "gram",
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Singular values (descending, float64) of W·C_damped: what CorDA splits, without the vectors."""
    product, _, _ = context_product(weight.T if transposed else weight, covariance, damping, name, device)
    return singular_values(product, solver=solver).cpu()


def energy_compactness(spectrum: torch.Tensor, rank: int, mode: str) -> float:
    """The design's compactness of a rank-``rank`` adapter (see the module docstring)."""
    energy = spectrum.to(torch.float64).square()
    share = energy / energy.sum()
    if mode == "ipm":
        return float(share[:rank].sum())
    return float(1 - share[share.numel() - rank :].sum())


Metric = Callable[[torch.Tensor, int, str], float]
METRICS: dict[str, Metric] = {"energy": energy_compactness}


def select_candidate(spectra: list[torch.Tensor], rank: int, mode: str, metric: Metric = energy_compactness) -> int:
    """Index of the candidate covariance with the highest compactness; ties go to the first."""
    scores = [metric(s, rank, mode) for s in spectra]
    return max(range(len(scores)), key=lambda i: (scores[i], -i))


def allocate_ranks(
    spectra: dict[str, torch.Tensor],
    dims: dict[str, tuple[int, int]],
    mode: str,
    *,
    param_budget: int,
    min_rank: int = 1,
    max_rank: int | None = None,
) -> dict[str, int]:
    """Per-layer ranks with Σ (in+out)·r_l ≤ ``param_budget``, handed out one unit at a time.

    Each unit goes to the layer whose next component is worth most per parameter: for IPM the largest
    next σ² share (most task energy gained), for KPM the smallest next σ² share (least knowledge energy
    disturbed). A layer whose unit no longer fits is skipped; ties go to the earlier layer, so the
    result is reproducible. ``dims`` holds (out, in) per layer.
    """
    if mode not in ("ipm", "kpm"):
        raise ValueError(f"mode must be ipm or kpm, got {mode!r}")
    names = list(spectra)
    ranks, shares, limits = {}, {}, {}
    for name in names:
        energy = spectra[name].to(torch.float64).square()
        shares[name] = (energy / energy.sum()).tolist()
        limits[name] = min(len(shares[name]), max_rank or len(shares[name]))
        if min_rank > limits[name]:
            raise BudgetError(f"{name}: --min-rank {min_rank} exceeds the layer's limit {limits[name]}")
        ranks[name] = min_rank
    cost = {name: sum(dims[name]) for name in names}
    used = sum(cost[n] * ranks[n] for n in names)
    if used > param_budget:
        raise BudgetError(f"the budget of {param_budget} parameters is below the minimum ranks' {used}")

    def next_share(name: str) -> float:
        r = ranks[name]
        return shares[name][r] if mode == "ipm" else shares[name][len(shares[name]) - r - 1]

    def priority(name: str) -> tuple[float, int]:
        value = next_share(name) / cost[name]
        return (-value if mode == "ipm" else value, names.index(name))

    heap = [(*priority(n), n) for n in names if ranks[n] < limits[n]]
    heapq.heapify(heap)
    while heap:
        _, _, name = heapq.heappop(heap)
        if used + cost[name] > param_budget:
            continue  # this layer's unit no longer fits; cheaper layers may still
        ranks[name] += 1
        used += cost[name]
        if ranks[name] < limits[name]:
            heapq.heappush(heap, (*priority(name), name))
    return ranks
