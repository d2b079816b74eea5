"""CorDA++ (arXiv 2506.13187): compactness metric, dynamic covariance selection, dynamic rank allocation.

The metric follows the project's design, not necessarily the paper's exact equations; it is one small
function (``energy_compactness``, a ``Metric``), so another form can replace it.

With σ₁ ≥ … ≥ σ_R the singular values of W·C_damped and E(k) = Σ_{i≤k} σᵢ² / Σ σᵢ²:
- IPM at rank r: compactness = E(r), the share of context-weighted energy the trainable components hold;
- KPM at rank r: compactness = 1 − (E(R) − E(R−r)), one minus the share the r smallest components hold.
Both are invariant to the scale of C, because damping is relative to a scale of C (``damping_scale``).
"""

from __future__ import annotations

import functools
import heapq
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol, TypeVar

import torch
from tqdm.auto import tqdm

from corda_surgery.decomposition.decompose import CovarianceSource, context_product
from corda_surgery.decomposition.kinds import DEFAULT_DAMPING_RULE, DampingRule, Mode, Solver
from corda_surgery.decomposition.solvers import singular_values
from corda_surgery.errors import CordaSurgeryError


class BudgetError(CordaSurgeryError):
    """The rank budget cannot be met (below the minimum ranks) or is inconsistent."""


def context_spectrum(
    weight: torch.Tensor,
    covariance: CovarianceSource,
    *,
    damping: float,
    damping_rule: DampingRule = DEFAULT_DAMPING_RULE,
    transposed: bool = False,
    name: str = "weight",
    solver: Solver = Solver.GRAM,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Singular values (descending, float64) of W·C_damped: what CorDA splits, without the vectors."""
    w = weight.T if transposed else weight
    product, *_ = context_product(w, covariance, damping, name, device, damping_rule)
    return singular_values(product, solver=solver).cpu()


def energy_compactness(spectrum: torch.Tensor, rank: int, mode: Mode) -> float:
    """The design's compactness of a rank-``rank`` adapter (see the module docstring)."""
    energy = spectrum.to(torch.float64).square()
    share = energy / energy.sum()
    if Mode(mode) is Mode.IPM:
        return float(share[:rank].sum())
    return float(1 - share[share.numel() - rank :].sum())


Metric = Callable[[torch.Tensor, int, Mode], float]


def select_candidate(spectra: list[torch.Tensor], rank: int, mode: Mode, metric: Metric = energy_compactness) -> int:
    """Index of the candidate covariance with the highest compactness; ties go to the first."""
    scores = [metric(s, rank, mode) for s in spectra]
    return max(range(len(scores)), key=lambda i: (scores[i], -i))


def allocate_ranks(
    spectra: dict[str, torch.Tensor],
    dims: dict[str, tuple[int, int]],
    mode: Mode,
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
    ipm = Mode(mode) is Mode.IPM  # ValueError for anything else
    names = list(spectra)
    ranks, shares, limits = {}, {}, {}
    for name in names:
        energy = spectra[name].to(torch.float64).square()
        shares[name] = (energy / energy.sum()).tolist()
        limits[name] = min(len(shares[name]), max_rank or len(shares[name]))
        if min_rank > limits[name]:
            raise BudgetError(f"{name}: `min_rank` {min_rank} exceeds the layer's limit {limits[name]}")
        ranks[name] = min_rank
    cost = {name: sum(dims[name]) for name in names}
    used = sum(cost[n] * ranks[n] for n in names)
    if used > param_budget:
        raise BudgetError(f"the budget of {param_budget} parameters is below the minimum ranks' {used}")

    def next_share(name: str) -> float:
        r = ranks[name]
        return shares[name][r] if ipm else shares[name][len(shares[name]) - r - 1]

    def priority(name: str) -> tuple[float, int]:
        value = next_share(name) / cost[name]
        return (-value if ipm else value, names.index(name))

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


class PlannedLinear(Protocol):
    """What the plan needs of a linear (the surgery's targets have it): its name, (out, in) and layout."""

    @property
    def name(self) -> str: ...
    @property
    def out_dim(self) -> int: ...
    @property
    def in_dim(self) -> int: ...
    @property
    def transposed(self) -> bool: ...  # stored (in, out)


Linear = TypeVar("Linear", bound=PlannedLinear)
# ``run(work, name)``: ``work(device=...)`` on the caller's device, or in host memory where that one runs out.
Runner = Callable[[Callable[..., torch.Tensor], str], torch.Tensor]


def _on_host(work: Callable[..., torch.Tensor], name: str) -> torch.Tensor:
    return work(device=torch.device("cpu"))


@dataclass(frozen=True)
class RankPlan:
    """Per linear, in the order planned: the chosen candidate, the rank, the surgery.json records and the chosen
    candidate's spectrum."""

    candidate: dict[str, int]  # index into the candidates
    ranks: dict[str, int]
    records: dict[str, dict]  # {"candidate_compactness": [...], "compactness": ...}, in that key order
    spectra: dict[str, torch.Tensor]


def plan_ranks(
    linears: Sequence[Linear],
    weight: Callable[[Linear], torch.Tensor],
    candidates: Sequence[Callable[[str], torch.Tensor]],
    *,
    mode: Mode,
    solver: Solver,
    damping: float,
    base_rank: int,
    damping_rule: DampingRule = DEFAULT_DAMPING_RULE,
    param_budget: int | None = None,
    rank_budget: float | None = None,
    min_rank: int = 1,
    max_rank: int | None = None,
    progress: bool = False,
    run: Runner = _on_host,
) -> RankPlan:
    """Per linear: the most compact candidate covariance at the base rank, then ranks from the budget.

    ``weight(linear)`` reads a linear's stored weight; ``candidates[i](name)`` reads candidate i's covariance of
    the linear ``name``, a fresh tensor each time (it is overwritten), inside ``run``: a retry in host memory
    reads it again. ``param_budget``, else ``rank_budget`` times Σ (in+out), hands out ranks by
    ``allocate_ranks``; without either every linear takes ``base_rank``. Fused experts are the caller's to
    leave out: one fused parameter has one rank.
    """
    mode, solver = Mode(mode), Solver(solver)
    chosen: dict[str, int] = {}
    spectra: dict[str, torch.Tensor] = {}
    dims = {linear.name: (linear.out_dim, linear.in_dim) for linear in linears}
    records: dict[str, dict] = {}
    for linear in tqdm(linears, desc="CorDA++ spectra", unit="layer", disable=not progress):
        stored, name = weight(linear), linear.name
        candidate_spectra = []
        for read in candidates:
            spectrum = functools.partial(
                context_spectrum,
                stored,
                functools.partial(read, name),
                damping=damping,
                damping_rule=damping_rule,
                transposed=linear.transposed,
                name=name,
                solver=solver,
            )
            candidate_spectra.append(run(spectrum, name))
        rank = min(base_rank, linear.out_dim, linear.in_dim)
        best = select_candidate(candidate_spectra, rank, mode)
        chosen[name], spectra[name] = best, candidate_spectra[best]
        records[name] = {"candidate_compactness": [energy_compactness(s, rank, mode) for s in candidate_spectra]}
    if param_budget is None and rank_budget is not None:
        param_budget = round(rank_budget * sum(sum(d) for d in dims.values()))
    if param_budget is not None:
        ranks = allocate_ranks(spectra, dims, mode, param_budget=param_budget, min_rank=min_rank, max_rank=max_rank)
    else:
        ranks = {name: base_rank for name in dims}
    for name in dims:
        records[name]["compactness"] = energy_compactness(spectra[name], ranks[name], mode)
    return RankPlan(chosen, ranks, records, spectra)
