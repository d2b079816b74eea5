"""Every target's rank and covariance: one rank for all, or CorDA++'s plan from the stores' candidates."""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch

from corda_surgery.calib.store import Covariances
from corda_surgery.checkpoint.view import ModelView
from corda_surgery.decomposition.corda_plus import plan_ranks
from corda_surgery.distributed import Ranks, broadcast_object
from corda_surgery.surgery.initialise import CPU, on_device_or_host
from corda_surgery.surgery.options import Method, SurgeryOptions
from corda_surgery.surgery.report import LayerRecord
from corda_surgery.surgery.targets import LayerPlan, Target


def _candidates(stores: Sequence[Covariances]) -> list[tuple[int, int | None]]:
    """CorDA++ candidates: each store's sampling rounds where it has several, else its sum."""
    return [(i, r) for i, store in enumerate(stores) for r in (range(store.rounds) if store.rounds > 1 else [None])]


def corda_plus_plan(
    view: ModelView,
    stores: Sequence[Covariances],
    targets: list[Target],
    options: SurgeryOptions,
    *,
    progress: bool,
    device: torch.device = CPU,
) -> tuple[dict[str, LayerPlan], dict[str, LayerRecord], dict[str, torch.Tensor]]:
    """CorDA++'s plan over the stores' candidates (``plan_ranks``): per linear the chosen store and round, the
    rank, the records for surgery.json and the chosen spectrum. Experts' slices are not planned: one fused
    parameter has one rank, so they take ``--rank``."""
    assert options.mode is not None  # corda++ always has one
    candidates = _candidates(stores)
    planned = plan_ranks(
        [t for t in targets if not t.is_expert],
        lambda target: view.reader.get(view.stored_key(f"{target.name}.weight")),
        [functools.partial(stores[i].covariance, round_index=r) for i, r in candidates],
        mode=options.mode,
        solver=options.decomposition.solver,
        damping=options.decomposition.damping,
        damping_rule=options.decomposition.damping_rule,
        base_rank=options.rank,
        param_budget=options.ranks.param_budget,
        rank_budget=options.ranks.rank_budget,
        min_rank=options.ranks.min_rank,
        max_rank=options.ranks.max_rank,
        progress=progress,
        run=lambda work, name: on_device_or_host(work, device, name),
    )
    plan = {name: LayerPlan(rank, *candidates[planned.candidate[name]]) for name, rank in planned.ranks.items()}
    records = {name: LayerRecord(rank=planned.ranks[name], **record) for name, record in planned.records.items()}
    return plan, records, planned.spectra


def layer_plan(
    view: ModelView,
    stores: Sequence[Covariances],
    targets: list[Target],
    options: SurgeryOptions,
    *,
    progress: bool,
    device: torch.device,
    ranks: Ranks,
) -> tuple[dict[str, LayerPlan], dict[str, LayerRecord]]:
    """Every target's rank and covariance (CorDA++: planned by rank 0, shared with the others), and the
    CorDA++ records for surgery.json."""
    plan: dict[str, LayerPlan] = {}
    plus_records: dict[str, LayerRecord] = {}
    if options.method is Method.CORDA_PLUS:
        if ranks.writer:
            plan, plus_records, _ = corda_plus_plan(view, stores, targets, options, progress=progress, device=device)
        plan, plus_records = broadcast_object((plan, plus_records), ranks, "sharing the CorDA++ plan")
    store_index = 0 if stores else None
    return {t.name: plan.get(t.name, LayerPlan(options.rank, store_index)) for t in targets}, plus_records
