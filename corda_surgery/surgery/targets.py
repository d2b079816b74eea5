"""Which linears a surgery adapts: every target linear and expert slice with its shape, checked against the
options, the budgets and the stores before any weight is read, so a mistake costs seconds, not a calibration."""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

from corda_surgery.calib.store import Covariances, StoreError
from corda_surgery.checkpoint.experts import slice_name
from corda_surgery.checkpoint.quantised import ResidualFormat
from corda_surgery.checkpoint.view import ModelView
from corda_surgery.decomposition.gptq import check_group_size
from corda_surgery.decomposition.memory import WeightShape
from corda_surgery.distributed import current as current_ranks
from corda_surgery.errors import CordaSurgeryError, OptionsError
from corda_surgery.export.peft_adapter import peft_retargeted
from corda_surgery.surgery.options import ALL_LINEAR, Method, SurgeryOptions

log = logging.getLogger(__name__)


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

    @property
    def is_expert(self) -> bool:
        return self.parameter is not None


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
                    yield Target(
                        slice_name(name, expert),
                        None,
                        out_dim,
                        in_dim,
                        transposed=experts.transposed,
                        parameter=name,
                        expert=expert,
                    )


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
            f"`targets` {', '.join(unmatched)} matches no linear or fused expert weight of this model "
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
    plan = _without_narrow(_without_retargeted(TargetPlan(targets, {}), view, options), options)
    _check_quantisable(view, plan.targets, options)
    return plan


def _check_quantisable(view: ModelView, targets: Sequence[Target], options: SurgeryOptions) -> None:
    """What a 4-bit residual cannot be, refused before any calibration: written by one process, of linears stored
    (out, in) whose width int4's groups divide."""
    settings = options.quantisation
    if not settings.quantised:
        return
    residual = settings.residual.value
    if current_ranks().world > 1:
        raise OptionsError(
            f"`residual` {residual}: quantised residuals are written by one process; run without torchrun"
        )
    for target in targets:
        if target.is_expert:
            raise OptionsError(f"`residual` {residual}: fused experts ({target.parameter}) cannot be stored in 4 bits")
        if target.transposed:
            raise OptionsError(f"`residual` {residual}: {view.model_type}'s Conv1D weights cannot be stored in 4 bits")
        if settings.residual is ResidualFormat.INT4:
            check_group_size(target.in_dim, settings.group_size, target.name)


def _without_retargeted(plan: TargetPlan, view: ModelView, options: SurgeryOptions) -> TargetPlan:
    """Linears PEFT would re-target as fused experts when it loads the adapter: refused when named, else left out."""
    retargeted = peft_retargeted(view.model_type)
    renamed = [t for t in plan.targets if not t.is_expert and t.name.rpartition(".")[2] in retargeted]
    if not renamed:
        return plan
    if options.targets:
        raise TargetError(
            f"`targets`: PEFT re-targets linears named {', '.join(sorted(retargeted))} as fused experts on "
            f"{view.model_type} models when it loads an adapter (e.g. {renamed[0].name}): it could not load them"
        )
    log.warning(
        "%d linear(s) left out (e.g. %s): PEFT re-targets linears named %s as fused experts on %s "
        "models when it loads an adapter",
        len(renamed),
        renamed[0].name,
        ", ".join(sorted(retargeted)),
        view.model_type,
    )
    left_out = plan.left_out | dict.fromkeys((t.name for t in renamed), "PEFT re-targets this name as fused experts")
    return TargetPlan(_without(plan.targets, renamed), left_out)


def _without_narrow(plan: TargetPlan, options: SurgeryOptions) -> TargetPlan:
    """Linears narrower than the rank they would get: refused when named (or when all are), else left out."""

    def needed(target: Target) -> tuple[str, int]:  # CorDA++ allocates linears only: experts take the rank
        if options.method is Method.CORDA_PLUS and not target.is_expert:
            return "min_rank", options.ranks.min_rank
        return "rank", options.rank

    def flag(target: Target) -> str:  # as surgery.json and the log have always said it
        option, rank = needed(target)
        return f"--{option.replace('_', '-')} {rank}"

    targets = plan.targets
    narrow = [t for t in targets if min(t.out_dim, t.in_dim) < needed(t)[1]]
    if not narrow:
        return plan
    if options.targets or len(narrow) == len(targets):
        first, (option, rank) = narrow[0], needed(narrow[0])
        raise OptionsError(
            f"`{option}` {rank} is too large: {first.name} is {first.out_dim}×{first.in_dim}, so ranks go up to "
            f"{min(first.out_dim, first.in_dim)}"
        )
    log.warning(  # all-linear: routers and gates narrower than the rank are left out, not an error
        "%d linear(s) narrower than %s are left out, e.g. %s (%d×%d)",
        len(narrow),
        flag(narrow[0]),
        narrow[0].name,
        narrow[0].out_dim,
        narrow[0].in_dim,
    )
    left_out = plan.left_out | {t.parameter or t.name: f"narrower than {flag(t)}" for t in narrow}
    return TargetPlan(_without(targets, narrow), left_out)


def _without(targets: list[Target], dropped: list[Target]) -> list[Target]:
    names = {t.name for t in dropped}
    return [t for t in targets if t.name not in names]


def check_budget(targets: list[Target], options: SurgeryOptions) -> None:
    """A CorDA++ parameter budget covers --min-rank on every linear it allocates (experts take --rank)."""
    if options.method is not Method.CORDA_PLUS or options.ranks.param_budget is None:
        return
    linears = [t for t in targets if not t.is_expert]
    floor = sum((t.out_dim + t.in_dim) * options.ranks.min_rank for t in linears)
    if options.ranks.param_budget < floor:
        raise OptionsError(
            f"`param_budget` {options.ranks.param_budget} is below what `min_rank` {options.ranks.min_rank} needs "
            f"for {len(linears)} linears ({floor})"
        )


def chosen_targets(
    view: ModelView, options: SurgeryOptions, stores: Sequence[Covariances], fingerprint: str
) -> TargetPlan:
    """The targets a surgery with these stores adapts: planned, the stores checked against them (this model,
    a covariance of the right size each), linears without a covariance left out under all-linear, the budget
    checked on what remains, and every fused weight proven writable back into its stored tensors."""
    for store in stores:
        store.check_model(fingerprint, view.reader.model_dir)
    plan = _uncalibrated(stores, plan_targets(view, options), options)
    if not plan.targets:
        reasons = "; ".join(sorted(set(plan.left_out.values()))) or "none chosen"
        raise TargetError(f"no target linear is left to adapt ({reasons}): the adapter would adapt nothing")
    check_stores(stores, plan.targets)
    check_budget(plan.targets, options)
    for parameter in dict.fromkeys(t.parameter for t in plan.targets if t.parameter is not None):
        view.check_stored_pieces(parameter)
    return plan


def _uncalibrated(stores: Sequence[Covariances], plan: TargetPlan, options: SurgeryOptions) -> TargetPlan:
    """Linears with no covariance in a store (never called through their forward while calibrating, e.g.
    Mamba's dt_proj, whose weight the model reads directly): left out under all-linear, else refused."""
    missing = [t for t in plan.targets if any(t.name not in store.by_linear for store in stores)]
    if not missing or options.targets:
        return plan  # check_stores names the first one
    if len(missing) == len(plan.targets):
        lacking = next(store for store in stores if missing[0].name not in store.by_linear)
        raise StoreError(
            f"{lacking.path}: holds no covariance for any of the {len(missing)} target linears of this model "
            f"(e.g. {missing[0].name}): the adapter would adapt nothing"
        )
    log.warning(
        "%d linear(s) left out: never called through their forward while calibrating, so no covariance (e.g. %s)",
        len(missing),
        missing[0].name,
    )
    reason = "never called through its forward while calibrating: no covariance"
    left_out = plan.left_out | dict.fromkeys((t.parameter or t.name for t in missing), reason)
    return TargetPlan(_without(plan.targets, missing), left_out)


def check_stores(stores: Sequence[Covariances], targets: list[Target]) -> None:
    """Each store (already checked to be this model's) holds a covariance of the right size for every target."""
    for store in stores:
        for target in targets:
            size = store.dimension(target.name)
            if size != target.in_dim:
                raise StoreError(
                    f"{store.path}: covariance for {target.name} is {size}×{size}, but the layer reads "
                    f"{target.in_dim} inputs"
                )


def shapes(targets: list[Target], uses_covariance: bool) -> list[WeightShape]:
    """The targets as the memory plan sees them. Which linears share an input is only observed while
    calibrating; the plan takes the targets of one module with one input width to share it (q/k/v, gate/up; an
    expert's slices never do). Its damped covariance and factor are prepared for the first reader and freed after
    the last, so they are held while a target whose name sorts between those two is decomposed (o_proj between
    k_proj and q_proj; down_proj before gate_proj). A reader is counted with a covariance of its own too: the
    plan cannot tell the readers from an output projection of the same width, and errs high by that for them."""
    if not uses_covariance:
        return [WeightShape(t.out_dim, t.in_dim, covariance=False) for t in targets]
    readers: dict[tuple[str, int], list[str]] = defaultdict(list)
    for t in targets:
        if not t.is_expert:
            readers[(t.name.rpartition(".")[0], t.in_dim)].append(t.name)
    spans = [(module, width, min(names), max(names)) for (module, width), names in readers.items() if len(names) > 1]

    def shape(target: Target) -> WeightShape:
        module = target.name.rpartition(".")[0]
        held = [w for m, w, first, last in spans if m == module and first <= target.name <= last]
        return WeightShape(target.out_dim, target.in_dim, max(held, default=0))

    return [shape(t) for t in targets]
