"""Checkpoint surgery: every target weight → frozen residual + initialised LoRA factors, streamed to disk.

Weights are read one tensor at a time from the input shards and written one tensor at a time into the
output shards, so peak memory stays near one weight matrix, its covariance and its factors. Everything
that the config, the options and the stores decide is checked first (``plan_targets``, ``check_stores``),
so a mistake costs seconds, not a calibration.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import itertools
import json
import logging
import math
import os
import platform
import shutil
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import torch
from tqdm.auto import tqdm

from corda_surgery import __version__
from corda_surgery.calib.data import CalibrationSpec
from corda_surgery.calib.experts import slice_name
from corda_surgery.calib.model_view import ModelView, StoredPieces
from corda_surgery.calib.store import CovarianceStore, StoreError
from corda_surgery.calib.stream import calibrate, open_view
from corda_surgery.calib.weights import CheckpointReader
from corda_surgery.compute import DEFAULT_COMPUTE, ComputeOptions
from corda_surgery.corda_plus import allocate_ranks, context_spectrum, energy_compactness, select_candidate
from corda_surgery.decompose import CovarianceSource, DampedCovariance, damped_covariance, decompose_weight
from corda_surgery.distributed import (
    ALONE,
    DistributedError,
    Ranks,
    ResultSender,
    barrier,
    broadcast_object,
    receive_result,
    samples_share,
)
from corda_surgery.distributed import current as current_ranks
from corda_surgery.errors import CordaSurgeryError
from corda_surgery.export.checkpoint_writer import copy_model_files, write_order, write_sharded_weights
from corda_surgery.export.peft_adapter import LoraAdapter, parameter_paths, peft_retargeted, write_adapter
from corda_surgery.memory_plan import MemoryPlan, announce, plan_run
from corda_surgery.options import ALL_LINEAR, Method, Mode, OptionsError, SurgeryOptions
from corda_surgery.outputs import check_disjoint, refuse_existing, staged_folder

ADAPTER_DIR = "adapter"
REPORT_NAME = "surgery.json"
STORE_NAME = "covariances.h5"  # where `convert` keeps its store, inside the output
log = logging.getLogger(__name__)
CPU = torch.device("cpu")
T = TypeVar("T")


class TargetError(CordaSurgeryError):
    """A --targets pattern that matches no linear of the model."""


@dataclass(frozen=True)
class Target:
    """One linear to adapt, or one expert's slice of a fused-experts parameter, and its (out, in) shape."""

    name: str  # module path; for an expert, "<fused parameter>[<expert>]"
    key: str | None  # stored key of a linear's weight; None for an expert's slice
    out_dim: int
    in_dim: int
    transposed: bool = False  # stored (in, out): GPT-2's Conv1D, transposed experts
    parameter: str | None = None  # the fused parameter an expert's slice belongs to
    expert: int = 0


@dataclass(frozen=True)
class LayerPlan:
    """What one target linear gets: its rank and which covariance feeds it."""

    rank: int
    store: int | None = 0  # index into the stores; None: no covariance (pissa, milora, lora)
    round: int | None = None  # a sampling round of that store instead of its sum (CorDA++ candidates)


def _matches(linear: str, pattern: str) -> bool:
    return linear == pattern or linear.endswith("." + pattern)


def _linear_targets(view: ModelView, index: int, chosen: Callable[[str], bool]) -> Iterator[Target]:
    for linear in view.linears[index]:
        if chosen(linear):
            name = f"{view.block_name(index)}.{linear}"
            key = view.stored_key(f"{name}.weight")
            shape = view.reader.spec(key)[0]
            out_dim, in_dim = (shape[1], shape[0]) if view.transposed else (shape[0], shape[1])
            yield Target(name, key, out_dim, in_dim, transposed=view.transposed)


def _expert_targets(view: ModelView, index: int, chosen: Callable[[str], bool]) -> Iterator[Target]:
    for experts in view.experts[index].values():
        module = view.blocks[index].get_submodule(experts.module)
        for parameter in experts.parameters:
            if chosen(f"{experts.module}.{parameter}"):
                name = f"{view.block_name(index)}.{experts.module}.{parameter}"
                out_dim, in_dim = experts.shape(module, parameter)
                for expert in range(experts.num_experts):
                    yield Target(slice_name(name, expert), None, out_dim, in_dim, transposed=experts.transposed,
                                 parameter=name, expert=expert)  # fmt: skip


@dataclass
class TargetPlan:
    """The targets of a surgery, and the linears all-linear leaves out with the reason for each."""

    targets: list[Target]
    left_out: dict[str, str]


def plan_targets(view: ModelView, options: SurgeryOptions) -> TargetPlan:
    """Every target linear and expert slice with its shape, after checking the ranks and budgets against them.

    ``all-linear`` leaves out, with a warning, linears narrower than the rank (routers, gates) and those PEFT
    would re-target as fused experts on this model type (``peft_retargeted``); named explicitly, they are errors.
    """
    fused = {f"{e.module}.{p}" for block in view.experts for e in block.values() for p in e.parameters}
    everywhere = sorted({name for block in view.linears for name in block} | fused)
    unmatched = [p for p in options.targets if not any(_matches(n, p) for n in everywhere)]
    if unmatched:
        raise TargetError(
            f"--targets {', '.join(unmatched)} matches no linear or fused expert weight of this model "
            f"(available: {', '.join(everywhere)}, or {ALL_LINEAR}; fused expert weights by their path, "
            "e.g. experts.down_proj)"
        )

    def chosen(name: str) -> bool:
        return not options.targets or any(_matches(name, p) for p in options.targets)

    targets = [
        target
        for index in range(view.num_blocks)
        for found in (_linear_targets(view, index, chosen), _expert_targets(view, index, chosen))
        for target in found
    ]
    left_out: dict[str, str] = {}
    retargeted = peft_retargeted(view.model_type)
    renamed = [t for t in targets if t.parameter is None and t.name.rpartition(".")[2] in retargeted]
    if renamed and options.targets:
        raise TargetError(
            f"--targets: PEFT re-targets linears named {', '.join(sorted(retargeted))} as fused experts on "
            f"{view.model_type} models when it loads an adapter (e.g. {renamed[0].name}): it could not load them"
        )
    if renamed:
        log.warning("%d linear(s) left out (e.g. %s): PEFT re-targets linears named %s as fused experts on %s "
                    "models when it loads an adapter", len(renamed), renamed[0].name, ", ".join(sorted(retargeted)),
                    view.model_type)  # fmt: skip
        left_out |= dict.fromkeys((t.name for t in renamed), "PEFT re-targets this name as fused experts")
        targets = _without(targets, renamed)

    def needed(target: Target) -> tuple[str, int]:  # CorDA++ allocates linears only: experts take --rank
        if options.method is Method.CORDA_PLUS and target.parameter is None:
            return "--min-rank", options.min_rank
        return "--rank", options.rank

    narrow = [t for t in targets if min(t.out_dim, t.in_dim) < needed(t)[1]]
    if narrow and (options.targets or len(narrow) == len(targets)):
        first, (option, rank) = narrow[0], needed(narrow[0])
        raise OptionsError(
            f"{option} {rank} is too large: {first.name} is {first.out_dim}×{first.in_dim}, so ranks go up to "
            f"{min(first.out_dim, first.in_dim)}"
        )
    if narrow:  # all-linear: routers and gates narrower than the rank are left out, not an error
        log.warning("%d linear(s) narrower than %s %d are left out, e.g. %s (%d×%d)", len(narrow), *needed(narrow[0]),
                    narrow[0].name, narrow[0].out_dim, narrow[0].in_dim)  # fmt: skip
        left_out |= {t.parameter or t.name: f"narrower than {needed(t)[0]} {needed(t)[1]}" for t in narrow}
        targets = _without(targets, narrow)
    return TargetPlan(targets, left_out)


def _without(targets: list[Target], dropped: list[Target]) -> list[Target]:
    names = {t.name for t in dropped}
    return [t for t in targets if t.name not in names]


def check_budget(targets: list[Target], options: SurgeryOptions) -> None:
    """A CorDA++ parameter budget covers --min-rank on every linear it allocates (experts take --rank)."""
    if options.method is not Method.CORDA_PLUS or options.param_budget is None:
        return
    linears = [t for t in targets if t.parameter is None]
    floor = sum((t.out_dim + t.in_dim) * options.min_rank for t in linears)
    if options.param_budget < floor:
        raise OptionsError(
            f"--param-budget {options.param_budget} is below what --min-rank {options.min_rank} needs "
            f"for {len(linears)} linears ({floor})"
        )


def chosen_targets(
    view: ModelView, options: SurgeryOptions, stores: Sequence[CovarianceStore], fingerprint: str
) -> TargetPlan:
    """The targets a surgery with these stores adapts: planned, the stores checked against them (this model,
    a covariance of the right size each), linears without a covariance left out under all-linear, the budget
    checked on what remains, and every fused weight proven writable back into its stored tensors."""
    for store in stores:
        store.check_model(fingerprint, view.reader.model_dir)
    plan = _uncalibrated(stores, plan_targets(view, options), options)
    check_stores(stores, plan.targets)
    check_budget(plan.targets, options)
    for parameter in dict.fromkeys(t.parameter for t in plan.targets if t.parameter is not None):
        view.check_stored_pieces(parameter)
    return plan


def _uncalibrated(stores: Sequence[CovarianceStore], plan: TargetPlan, options: SurgeryOptions) -> TargetPlan:
    """Linears with no covariance in a store (never called through their forward while calibrating, e.g.
    Mamba's dt_proj, whose weight the model reads directly): left out under all-linear, else refused."""
    missing = [t for t in plan.targets if any(t.name not in store.by_linear for store in stores)]
    if not missing or options.targets:
        return plan  # check_stores names the first one
    log.warning("%d linear(s) left out: never called through their forward while calibrating, so no covariance "
                "(e.g. %s)", len(missing), missing[0].name)  # fmt: skip
    reason = "never called through its forward while calibrating: no covariance"
    left_out = plan.left_out | dict.fromkeys((t.parameter or t.name for t in missing), reason)
    return TargetPlan(_without(plan.targets, missing), left_out)


def check_stores(stores: Sequence[CovarianceStore], targets: list[Target]) -> None:
    """Each store (already checked to be this model's) holds a covariance of the right size for every target."""
    for store in stores:
        for target in targets:
            size = store.dimension(target.name)
            if size != target.in_dim:
                raise StoreError(
                    f"{store.path}: covariance for {target.name} is {size}×{size}, but the layer reads "
                    f"{target.in_dim} inputs"
                )


def _lora_default_init(weight_out: int, weight_in: int, rank: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """PEFT's default LoRA init: A Kaiming-uniform (a=√5), B zero."""
    generator = torch.Generator().manual_seed(seed)
    bound = 1 / math.sqrt(weight_in)  # kaiming_uniform_ with a=√5 on fan_in gives ±1/√fan_in
    lora_a = (torch.rand(rank, weight_in, generator=generator) * 2 - 1) * bound
    return lora_a, torch.zeros(weight_out, rank)


def _on_device_or_host(work: Callable[..., T], device: torch.device, name: str) -> T:
    """``work(device=device)``, run again in host memory where the accelerator runs out of memory for this weight."""
    if device.type == "cpu":
        return work(device=device)
    try:
        return work(device=device)
    except torch.OutOfMemoryError:
        pass  # retried outside the handler: its traceback would keep the failed attempt's tensors alive
    torch.cuda.empty_cache()
    log.warning("%s: out of memory on %s; decomposed on the CPU instead", name, device)
    return work(device=CPU)


def _initialise(
    weight: torch.Tensor,
    covariance: CovarianceSource | DampedCovariance | None,
    name: str,
    layer: LayerPlan,
    options: SurgeryOptions,
    *,
    transposed: bool,
    seed: int,
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict]:
    """LoRA A, B, the residual weight and the surgery.json record for one target linear."""
    dtype = options.torch_factor_dtype
    if options.mode is None:  # lora: PEFT's random init, the weight unchanged
        out_dim, in_dim = weight.T.shape if transposed else weight.shape
        lora_a, lora_b = _lora_default_init(out_dim, in_dim, layer.rank, seed)
        return lora_a.to(dtype), lora_b.to(dtype), weight, {"rank": layer.rank}
    work = functools.partial(
        decompose_weight, weight, covariance, rank=layer.rank, mode=options.mode.value,
        alpha=options.scaling * layer.rank, damping=options.damping, solver=options.solver.value, factor_dtype=dtype,
        transposed=transposed, name=name, balance=options.balance,
    )  # fmt: skip
    result = _on_device_or_host(work, device, name)
    record = {"rank": layer.rank, "damping": result.damping, "adapter_energy": result.adapter_energy,
              "solver": result.solver, "store": layer.store, "round": layer.round}  # fmt: skip
    return result.lora_A, result.lora_B, result.residual, record


class SharedInputs:
    """Inputs read by several targets (q/k/v, gate/up of one layer): their covariance is read, checked, damped
    and factorised once, kept until the last of them is decomposed, then freed."""

    def __init__(self, stores: Sequence[CovarianceStore], targets: list[Target], plan: Mapping[str, LayerPlan]):
        self.stores, self.plan = stores, plan
        self.readers = Counter(self.key(t.name) for t in targets if plan[t.name].store is not None)
        self.prepared: dict[tuple, DampedCovariance] = {}

    def key(self, name: str) -> tuple:
        """(store, stored input, round): targets with the same key read the same covariance."""
        layer = self.plan[name]
        assert layer.store is not None
        return layer.store, self.stores[layer.store].by_linear[name].name, layer.round

    def source(self, target: Target, covariance: CovarianceSource, options: SurgeryOptions,
               device: torch.device) -> CovarianceSource | DampedCovariance:  # fmt: skip
        """What ``target`` decomposes with: the prepared shared covariance, or ``covariance`` if it reads alone."""
        key = self.key(target.name)
        if self.readers[key] == 1 and key not in self.prepared:
            return covariance
        if key not in self.prepared:
            prepare = functools.partial(damped_covariance, covariance, options.damping, target.in_dim, target.name)
            self.prepared[key] = _on_device_or_host(prepare, device, target.name)
        self.readers[key] -= 1
        return self.prepared.pop(key) if self.readers[key] == 0 else self.prepared[key]


class Initialiser:
    """What one target gets (factors, residual, surgery.json record) from its plan, store and options; the
    same on every rank, so a target decomposed elsewhere is what rank 0 would have made of it."""

    def __init__(self, stores: Sequence[CovarianceStore], targets: list[Target], plan: Mapping[str, LayerPlan],
                 plus_records: Mapping[str, dict], options: SurgeryOptions, device: torch.device):  # fmt: skip
        self.stores, self.plan, self.plus_records = stores, plan, plus_records
        self.options, self.device = options, device
        self.shared = SharedInputs(stores, targets, plan)
        self.seeds = itertools.count(options.seed)  # LoRA's random A: one seed per linear and expert, in writing order

    def __call__(self, weight: torch.Tensor, target: Target) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict]:
        layer, options = self.plan[target.name], self.options
        covariance: CovarianceSource | DampedCovariance | None = None
        record: dict = {}
        if layer.store is not None:
            store = self.stores[layer.store]
            covariance = self.shared.source(
                target, functools.partial(store.covariance, target.name, round_index=layer.round), options, self.device
            )
            below = store.by_linear[target.name].below_damping
            if below is not None and layer.round is None and store.below_damping_level == options.damping:
                record["covariance_eigenvalues_below_damping"] = below
            if target.parameter is not None:
                entry = store.by_linear[target.name]
                record["tokens"] = entry.count if layer.round is None else entry.round_counts[layer.round]
            if target.parameter is not None and record["tokens"] < layer.rank:
                covariance = None  # an expert (almost) no token was routed to cannot rank r directions
                record["covariance"] = "none: fewer routed tokens than the rank, plain SVD of the weight"
        lora_a, lora_b, residual, initial = _initialise(
            weight, covariance, target.name, layer, options, transposed=target.transposed,
            seed=next(self.seeds), device=self.device,
        )  # fmt: skip
        return lora_a, lora_b, residual, initial | record | self.plus_records.get(target.name, {})


def _damping_decided(layers: Mapping[str, dict], options: SurgeryOptions) -> list[str]:
    """KPM targets whose r smallest covariance directions all lie below the damping level."""
    if options.mode is not Mode.KPM:
        return []
    return [name for name, record in layers.items()
            if record.get("covariance_eigenvalues_below_damping", -1) >= record.get("rank", math.inf)]  # fmt: skip


def _link_or_copy(source: Path, target: Path) -> None:
    """A second name for ``source`` (no copy of a store that may be gigabytes), or a copy where links fail."""
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def _candidates(stores: Sequence[CovarianceStore]) -> list[tuple[int, int | None]]:
    """CorDA++ candidates: each store's sampling rounds where it has several, else its sum."""
    return [(i, r) for i, store in enumerate(stores) for r in (range(store.rounds) if store.rounds > 1 else [None])]


def corda_plus_plan(
    view: ModelView,
    stores: Sequence[CovarianceStore],
    targets: list[Target],
    options: SurgeryOptions,
    *,
    progress: bool,
    device: torch.device = CPU,
) -> tuple[dict[str, LayerPlan], dict[str, dict], dict[str, torch.Tensor]]:
    """Per linear: the most compact candidate covariance at the base rank, then ranks from the budget.
    (Experts' slices are not planned here: one fused parameter has one rank, so they take ``--rank``.)

    Returns the plan, per-layer records for surgery.json, and the chosen candidates' spectra.
    """
    assert options.mode is not None  # corda++ always has one
    mode = options.mode.value
    targets = [t for t in targets if t.parameter is None]
    candidates = _candidates(stores)
    chosen: dict[str, tuple[int, int | None]] = {}
    spectra: dict[str, torch.Tensor] = {}
    dims = {t.name: (t.out_dim, t.in_dim) for t in targets}
    records: dict[str, dict] = {}
    for target in tqdm(targets, desc="CorDA++ spectra", unit="layer", disable=not progress):
        assert target.key is not None  # a linear
        weight, name = view.reader.get(target.key), target.name
        candidate_spectra = []
        for i, r in candidates:
            spectrum = functools.partial(
                context_spectrum, weight, functools.partial(stores[i].covariance, name, round_index=r),
                damping=options.damping, transposed=target.transposed, name=name, solver=options.solver.value,
            )  # fmt: skip
            candidate_spectra.append(_on_device_or_host(spectrum, device, name))
        base_rank = min(options.rank, target.out_dim, target.in_dim)
        best = select_candidate(candidate_spectra, base_rank, mode)
        chosen[name], spectra[name] = candidates[best], candidate_spectra[best]
        records[name] = {"candidate_compactness": [energy_compactness(s, base_rank, mode) for s in candidate_spectra]}
    param_budget = options.param_budget
    if param_budget is None and options.rank_budget is not None:
        param_budget = round(options.rank_budget * sum(sum(d) for d in dims.values()))
    if param_budget is not None:
        ranks = allocate_ranks(spectra, dims, mode, param_budget=param_budget, min_rank=options.min_rank,
                               max_rank=options.max_rank)  # fmt: skip
    else:
        ranks = {t.name: options.rank for t in targets}
    for name in dims:
        records[name]["compactness"] = energy_compactness(spectra[name], ranks[name], mode)
    plan = {name: LayerPlan(ranks[name], *chosen[name]) for name in dims}
    return plan, records, spectra


def decompose_checkpoint(
    model_dir: str | Path,
    out: str | Path,
    options: SurgeryOptions,
    *,
    stores: Sequence[str | Path] = (),
    compute: ComputeOptions = DEFAULT_COMPUTE,
    overwrite: bool = False,
    bundle_store: bool = False,
    progress: bool = True,
    plan: bool = True,
) -> Path:
    """Write ``out``: residual model (sharded safetensors + config + tokenizer), ``adapter/`` and surgery.json.

    ``corda++`` picks each layer's most compact candidate covariance (every store, or every sampling
    round of a store that has several) and, with a rank or parameter budget, per-layer ranks.
    The adapter names ``options.base_name`` (default ``out``) as its base model; ``bundle_store`` places
    the one store in ``out/covariances.h5``. Decompositions run on ``compute``'s device (float64), each
    weight falling back to the CPU where the device runs out of memory. ``plan``: print the memory plan and
    refuse a run that cannot fit. Under torch.distributed the linears are shared out among the ranks
    (``share_of_work``); each sends its results to rank 0, which alone writes (its output is what one process
    writes).
    """
    ranks = current_ranks()
    progress = progress and ranks.writer
    method = options.method
    if method.uses_covariance and not stores:
        raise OptionsError(f"--method {method.value} needs a covariance store (--covariances)")
    if not method.uses_covariance and stores:
        raise OptionsError(f"--method {method.value} uses no covariances: drop --covariances")
    if method is Method.CORDA and len(stores) > 1:
        raise OptionsError("several covariance stores are CorDA++'s covariance selection: use --method corda++")
    if bundle_store and len(stores) != 1:
        raise OptionsError("bundle_store needs exactly one covariance store")
    model_dir = Path(model_dir)
    check_disjoint(Path(out), [model_dir, *map(Path, stores)])
    view = ModelView(model_dir, device=compute.torch_device)
    reader = view.reader
    plan_targets(view, options)  # option mistakes first, before the fingerprint reads the weights
    fingerprint = reader.fingerprint()
    with contextlib.ExitStack() as closing:
        opened = [closing.enter_context(CovarianceStore(path)) for path in stores]
        chosen = chosen_targets(view, options, opened, fingerprint)
        if plan:
            announce(plan_run(view, compute, Path(out), options=options, targets=_shapes(chosen.targets)), progress)
        if not ranks.writer:
            _decompose_share(view, chosen.targets, opened, options, compute, ranks)
        else:
            with staged_folder(out, overwrite=overwrite, inputs=[model_dir, *map(Path, stores)]) as staging:
                _write_surgery(view, chosen, opened, options, staging, Path(out).resolve(), fingerprint,
                               bundle_store, progress, compute, ranks)  # fmt: skip
    barrier(ranks, "waiting for rank 0 to write the output")  # every result taken before any rank leaves
    return Path(out).resolve()


def _layer_plan(
    view: ModelView,
    stores: Sequence[CovarianceStore],
    targets: list[Target],
    options: SurgeryOptions,
    *,
    progress: bool,
    device: torch.device,
    ranks: Ranks,
) -> tuple[dict[str, LayerPlan], dict[str, dict]]:
    """Every target's rank and covariance (CorDA++: planned by rank 0, shared with the others), and the
    CorDA++ records for surgery.json."""
    plan: dict[str, LayerPlan] = {}
    plus_records: dict[str, dict] = {}
    if options.method is Method.CORDA_PLUS:
        if ranks.writer:
            plan, plus_records, _ = corda_plus_plan(view, stores, targets, options, progress=progress, device=device)
        plan, plus_records = broadcast_object((plan, plus_records), ranks, "sharing the CorDA++ plan")
    store_index = 0 if stores else None
    return {t.name: plan.get(t.name, LayerPlan(options.rank, store_index)) for t in targets}, plus_records


def _cost(target: Target) -> int:
    """A decomposition's arithmetic, roughly: W·C plus the eigen-decomposition of the smaller side."""
    return target.out_dim * target.in_dim**2 + min(target.out_dim, target.in_dim) ** 3


def share_of_work(
    targets: list[Target], plan: Mapping[str, LayerPlan], shared: SharedInputs, options: SurgeryOptions, ranks: Ranks
) -> dict[str, int]:
    """The rank that decomposes each linear: each input group (one shared factorisation) whole to the least
    loaded rank, costliest first. Experts' slices and LoRA's random init (seeded in writing order) stay on
    rank 0, which also reads and writes everything."""
    if ranks.world == 1 or options.mode is None:
        return {}
    groups: dict[tuple, list[Target]] = {}
    for target in targets:
        if target.parameter is None:
            key = shared.key(target.name) if plan[target.name].store is not None else (target.name,)
            groups.setdefault(key, []).append(target)
    load = [0] * ranks.world
    load[0] = sum(_cost(t) for t in targets if t.parameter is not None)  # experts' slices stay on rank 0
    owners: dict[str, int] = {}
    for members in sorted(groups.values(), key=lambda group: -sum(map(_cost, group))):
        rank = min(range(ranks.world), key=lambda r: (load[r], r))
        load[rank] += sum(map(_cost, members))
        owners.update(dict.fromkeys((t.name for t in members), rank))
    return owners


def _decompose_share(
    view: ModelView,
    targets: list[Target],
    stores: Sequence[CovarianceStore],
    options: SurgeryOptions,
    compute: ComputeOptions,
    ranks: Ranks,
) -> None:
    """A rank other than 0: decompose its share, in the order rank 0 writes, and send each result there."""
    plan, plus_records = _layer_plan(view, stores, targets, options, progress=False, device=compute.torch_device,
                                     ranks=ranks)  # fmt: skip
    initialise = Initialiser(stores, targets, plan, plus_records, options, compute.torch_device)
    owners = share_of_work(targets, plan, initialise.shared, options, ranks)
    mine = {t.key: t for t in targets if owners.get(t.name) == ranks.rank}
    sender = ResultSender(ranks)
    specs = {key: view.reader.spec(key) for key in view.reader.locations}
    for key in write_order(specs, options.max_shard_size):
        target = mine.get(key)
        if target is not None:
            weight = view.reader.get(key).clone()
            view.reader.release()
            lora_a, lora_b, residual, record = initialise(weight, target)
            sender.send({"target": target.name, "record": record}, [lora_a, lora_b, residual])
    sender.close()


def _write_surgery(
    view: ModelView,
    chosen: TargetPlan,
    stores: list[CovarianceStore],
    options: SurgeryOptions,
    staging: Path,
    out: Path,
    fingerprint: str,
    bundle_store: bool,
    progress: bool,
    compute: ComputeOptions,
    ranks: Ranks = ALONE,
) -> None:
    reader = view.reader
    device = compute.torch_device
    targets = chosen.targets
    plan, plus_records = _layer_plan(view, stores, targets, options, progress=progress, device=device, ranks=ranks)
    linears = {t.key: t for t in targets if t.key is not None}
    slices: dict[str, list[Target]] = {}
    for target in targets:
        if target.parameter is not None:
            slices.setdefault(target.parameter, []).append(target)
    fused_paths = parameter_paths(view.fused_parameters(), slices)
    base_name = options.base_name or str(out)
    adapter = LoraAdapter(
        rank=options.rank, alpha=options.alpha or options.rank, lora_A={}, lora_B={},
        fan_in_fan_out=view.transposed, parameter_paths=fused_paths,
        task_type="CAUSAL_LM" if view.model.can_generate() else None, base_model_name_or_path=base_name,
    )  # fmt: skip
    layers: dict[str, dict] = {}
    initialise = Initialiser(stores, targets, plan, plus_records, options, device)
    owners = share_of_work(targets, plan, initialise.shared, options, ranks)
    bar = tqdm(total=len(reader.locations), desc="tensors", unit="tensor", disable=not progress)

    def fused_residual(parameter: str) -> torch.Tensor:
        """All experts of one fused parameter: factors side by side as PEFT's ParamWrapper keeps them."""
        fused = view.writable(parameter)
        factors_a, factors_b, records = [], [], []
        for target in slices[parameter]:
            lora_a, lora_b, fused[target.expert], record = initialise(fused[target.expert], target)
            factors_a.append(lora_a)
            factors_b.append(lora_b)
            records.append(record)
        adapter.lora_A[parameter] = torch.cat(factors_a)  # (experts·r, in): expert e's rows e·r … e·r+r-1
        adapter.lora_B[parameter] = torch.stack(factors_b, dim=-1).flatten(1)  # (out, r·experts): column k·E+e
        starved = [t.expert for t, r in zip(slices[parameter], records, strict=True) if "covariance" in r]
        if starved:
            log.warning("%s: experts %s saw fewer routed tokens than rank %d; initialised from their weights "
                        "alone (plain SVD)", parameter, starved, options.rank)  # fmt: skip
        layers[parameter] = {"rank": options.rank, "experts": records}
        return fused

    residuals = StoredPieces(view, slices, fused_residual)

    def produce(key: str) -> torch.Tensor:
        bar.update()
        piece = residuals.take(key)
        if piece is not None:
            return piece
        target = linears.get(key)
        if target is not None and owners.get(target.name, 0) != 0:
            layer = plan[target.name]
            lora_a, lora_b, residual, sent = receive_result(
                owners[target.name], [((layer.rank, target.in_dim), options.torch_factor_dtype),
                                      ((target.out_dim, layer.rank), options.torch_factor_dtype), reader.spec(key)],
                ranks,
            )  # fmt: skip
            if sent["target"] != target.name:
                raise DistributedError(f"rank {owners[target.name]} sent {sent['target']} where rank 0 writes "
                                       f"{target.name}: the ranks disagree on the writing order")  # fmt: skip
            layers[target.name] = sent["record"]
        else:
            weight = reader.get(key).clone()
            reader.release()  # read pages stay resident while mapped: unmap so memory stays one tensor
            if target is None:
                return weight
            lora_a, lora_b, residual, layers[target.name] = initialise(weight, target)
        layer = plan[target.name]
        adapter.lora_A[target.name], adapter.lora_B[target.name] = lora_a, lora_b
        if layer.rank != options.rank:
            adapter.rank_pattern[target.name] = layer.rank
            adapter.alpha_pattern[target.name] = options.scaling * layer.rank
        return residual

    with bar:
        specs = {key: reader.spec(key) for key in reader.locations}
        write_sharded_weights(staging, specs, produce, max_shard_size=options.max_shard_size)
    damping_decided = _damping_decided(layers, options)
    if damping_decided:
        log.warning("%d of %d KPM targets (e.g. %s) have at least as many covariance eigenvalues below the "
                    "damping level as their rank: their adapter's directions are chosen by the damping, not the data; "
                    "calibrate on more tokens", len(damping_decided), len(targets), damping_decided[0])  # fmt: skip
    copy_model_files(reader.model_dir, staging)
    residual_fingerprint = CheckpointReader(staging).fingerprint()
    adapter.provenance = {
        "model_fingerprint": fingerprint, "residual_fingerprint": residual_fingerprint, "base_name": base_name,
        "ranks": {name: layer["rank"] for name, layer in layers.items()}, "corda_surgery": __version__,
    }  # fmt: skip
    write_adapter(staging / ADAPTER_DIR, adapter)
    report = {
        **options.record(),
        "compute": compute.record(),
        "base_name": base_name,
        "model_fingerprint": fingerprint,
        "residual_fingerprint": residual_fingerprint,
        "covariance_stores": [_store_record(s, out / STORE_NAME if bundle_store else s.path) for s in stores],
        "layers": layers,
        "input_groups": sorted({entry.linears for store in stores for entry in store.entries.values()}),
        "left_out": chosen.left_out,
        "adapter_parameters": fused_paths,
        "unadapted_weights": _unadapted_weights(view, layers, chosen.left_out),
        "versions": {"corda_surgery": __version__, "torch": torch.__version__, "python": platform.python_version()},
    }
    (staging / REPORT_NAME).write_text(json.dumps(report, indent=2))
    if bundle_store:
        _link_or_copy(stores[0].path, staging / STORE_NAME)


def _store_record(store: CovarianceStore, path: Path) -> dict:
    return {"path": str(path), "model_fingerprint": store.fingerprint, "calibration": store.calibration,
            "eigenvalues_below_damping_level": store.below_damping_level}  # fmt: skip


def _unadapted_weights(view: ModelView, adapted: Mapping[str, object], left_out: Mapping[str, str]) -> list[str]:
    """Weight matrices of the blocks (2-D or more; stacked experts' biases aside) that stay frozen: left-out
    linears, and whatever is neither a linear PEFT adapts nor fused experts built by transformers' experts
    interface (packed experts, custom routers, convolutions). Those beyond the left-out linears are announced."""
    frozen = [name for i in range(view.num_blocks) for n, p in view.blocks[i].named_parameters()
              if p.dim() >= 2 and not n.endswith("bias") and (name := f"{view.block_name(i)}.{n}") not in adapted
              and name.removesuffix(".weight") not in adapted]  # fmt: skip
    unexplained = [name for name in frozen if name.removesuffix(".weight") not in left_out]
    if unexplained:
        log.warning("%d weight matri(ces) of the blocks stay frozen (e.g. %s): no linear PEFT adapts and no fused "
                    "experts of transformers' experts interface, or not chosen by --targets", len(unexplained),
                    unexplained[0])  # fmt: skip
    return frozen


def read_report(surgery_dir: Path) -> dict:
    """surgery.json of a surgery output, or a one-line error naming the folder."""
    path = surgery_dir / REPORT_NAME
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CordaSurgeryError(
            f"{path}: not a readable surgery report ({exc}); is {surgery_dir} a surgery output?"
        ) from exc


def convert_checkpoint(
    model_dir: str | Path,
    out: str | Path,
    spec: CalibrationSpec,
    options: SurgeryOptions,
    *,
    compute: ComputeOptions = DEFAULT_COMPUTE,
    overwrite: bool = False,
    resume: bool = False,
    progress: bool = True,
) -> Path:
    """Calibrate and decompose in one go, keeping the store as ``out/covariances.h5``.

    Everything the config and the options decide is checked before calibration starts; the store is
    calibrated beside ``out`` (resumable there with ``resume``) and moved inside when the surgery is done.
    Under torch.distributed every rank calibrates and decomposes its share; rank 0 alone writes.
    """
    ranks = current_ranks()
    progress = progress and ranks.writer
    out, model_dir = Path(out).resolve(), Path(model_dir)
    check_disjoint(out, [model_dir, *spec.input_files()])
    refuse_existing(out, overwrite)
    announce(estimate_run(model_dir, compute, out, spec=spec, options=options), progress)
    stores: list[Path] = []
    if options.method.uses_covariance:
        store = out.with_name(f".{out.name}.covariances.h5")
        stores.append(calibrate(model_dir, spec, store, compute=compute, resume=resume, overwrite=True,
                                progress=progress, plan=False))  # fmt: skip
    decompose_checkpoint(model_dir, out, options, stores=stores, compute=compute, overwrite=overwrite,
                         bundle_store=bool(stores), progress=progress, plan=False)  # fmt: skip
    for store in stores if ranks.writer else []:
        store.unlink()  # out/covariances.h5 is now its only name
    return out


def _shapes(targets: list[Target]) -> list[tuple[int, int]]:
    return [(t.out_dim, t.in_dim) for t in targets]


def estimate_run(
    model_dir: str | Path,
    compute: ComputeOptions,
    out: str | Path,
    *,
    spec: CalibrationSpec | None = None,
    options: SurgeryOptions | None = None,
) -> MemoryPlan:
    """The memory plan of a calibration (``spec``), a decomposition (``options``) or both, without doing either.

    Checks what the config and the options decide (targets, ranks) on the way, as the run would.
    """
    view = open_view(model_dir, compute)
    targets = plan_targets(view, options).targets if options is not None else []
    if options is not None:
        check_budget(targets, options)
    if options is not None and not options.method.uses_covariance:
        spec = None  # pissa, milora and lora calibrate nothing
    if spec is not None:  # per rank under torch.distributed: its share of the samples
        spec = dataclasses.replace(spec, samples=samples_share(spec.samples, spec.batch_size, current_ranks()))
    return plan_run(view, compute, Path(out), spec=spec, options=options, targets=_shapes(targets))
