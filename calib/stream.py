"""Layer-by-layer streaming engine: input covariances of every linear, one block in memory.

The model is a skeleton on the ``meta`` device (``corda_surgery.checkpoint.view``). The stem (embeddings,
rotary tables) is materialised to record, for every calibration batch, the hidden states entering block 0
and the arguments each block receives (its own masks and position embeddings: sliding-window and global
layers differ); then each block in turn is loaded from the safetensors shards, run over all batches with
pre-hooks on all its linears summing XᵀX over real tokens (``corda_surgery.calib.accumulate``), handed to the sink
(``corda_surgery.calib.sink``: the store on rank 0), and freed.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import AutoTokenizer

from corda_surgery.calib.accumulate import Accumulator, InputGroups, expert_slices
from corda_surgery.calib.activations import Activations, rank_activation_budget
from corda_surgery.calib.data import CalibrationSpec, TokenBatch, check_source, token_batches
from corda_surgery.calib.sink import CovarianceSink, RankOutput, rank_output
from corda_surgery.calib.store import LEGACY_COUNT_RULE, CountedLevel, CovarianceEntry
from corda_surgery.checkpoint.reader import CheckpointError
from corda_surgery.checkpoint.view import REMOTE_CODE_REFUSED, ModelView, UnsupportedArchitecture
from corda_surgery.compute import DEFAULT_COMPUTE, ComputeOptions
from corda_surgery.distributed import (
    ALONE,
    DistributedError,
    Ranks,
    all_reduce_sum,
    barrier,
    broadcast_object,
    gather_objects,
)
from corda_surgery.distributed import current as current_ranks
from corda_surgery.errors import CordaSurgeryError
from corda_surgery.outputs import STAGING_MARK
from corda_surgery.panels import Covariance, finite, tensors, total_of

log = logging.getLogger(__name__)


class CalibrationError(CordaSurgeryError):
    """Calibration produced unusable activations (NaN/Inf); names the layer."""


@dataclass(frozen=True)
class BelowDamping:
    """How each input's covariance eigenvalues below the damping level (λ = ``level`` under the damping
    ``rule``, named) are counted (``count`` of a sum: None where not counted); the decomposition owns that
    arithmetic, so calibration is handed it, and the store records the rule and level with the counts. Each
    input is counted on its whole sum and, midway, on the sum over the first half of the batches (summed over
    the ranks under torch.distributed), so that a later reader can tell whether more tokens move the count.
    Inputs wider than ``max_width`` and experts' slices (hundreds per layer) are never counted."""

    level: float
    count: Callable[[Covariance], int | None]
    rule: str = LEGACY_COUNT_RULE
    max_width: int | None = None  # None: every width


class _StopForward(Exception):
    """Raised by the last recorder: everything after the blocks is never run."""


class _BlockInputRecorder(nn.Module):
    """Stands in for a block during capture: records its arguments and passes hidden states through."""

    def __init__(self, index: int, sink: list, last: bool):
        super().__init__()
        self.index, self.sink, self.last = index, sink, last

    def forward(self, hidden_states, *args, **kwargs):
        self.sink.append((self.index, hidden_states, args, kwargs))
        if self.last:
            raise _StopForward
        return hidden_states


@torch.no_grad()
def capture_block_inputs(view: ModelView, batches: list[TokenBatch], hidden: Activations) -> list[list]:
    """Append the hidden states entering block 0 to ``hidden``; return each block's other arguments per batch."""
    view.load_stem()
    originals = list(view.blocks)
    arguments = []
    try:
        for batch in batches:
            sink: list = []
            for i in range(view.num_blocks):
                view.blocks[i] = _BlockInputRecorder(i, sink, last=i == view.num_blocks - 1)
            with contextlib.suppress(_StopForward):
                view.runner(
                    input_ids=batch.input_ids.to(view.device),
                    attention_mask=batch.attention_mask.to(view.device),
                    use_cache=False,
                )
            hidden.append(sink[0][1])
            arguments.append([(args, kwargs) for _, _, args, kwargs in sink])
    finally:
        for i, block in enumerate(originals):
            view.blocks[i] = block
        view.free_stem()
    return arguments


@torch.no_grad()
def stream_covariances(
    view: ModelView,
    batches: list[TokenBatch],
    sink: CovarianceSink,
    hidden: Activations,
    *,
    layers_done: int | None = None,
    normalisation: str = "tokens",
    rounds: int = 1,
    progress: bool = True,
    ranks: Ranks = ALONE,
    below_damping: BelowDamping | None = None,
) -> None:
    """Run every block over this rank's batches and hand each block's input covariances to ``sink``, skipping
    the ``layers_done`` it already holds (their forward still runs; None: the sink's own count).

    ``hidden`` holds the batches' hidden states between blocks (in memory or spilled to disk).
    With ``rounds`` > 1 the batches are split into that many disjoint sampling rounds, each of which
    gets its own covariance besides their sum (candidates for CorDA++'s covariance selection). Under
    torch.distributed each rank runs every ``ranks.world``-th batch and the sums are all-reduced per block.
    """
    if layers_done is None:
        layers_done = sink.layers_done
    mine = ranks.share(len(batches))
    arguments = capture_block_inputs(view, [batches[b] for b in mine], hidden)
    masks = [batches[b].attention_mask.bool().to(view.device) for b in mine]
    # this rank's first batch of the second half (len(mine): none), where the first half is counted
    halfway = next((b for b, batch in enumerate(mine) if batch >= len(batches) // 2), len(mine))
    halfway = halfway if below_damping is not None and len(batches) > 1 else -1
    for index in tqdm(range(view.num_blocks), desc="blocks", unit="block", disable=not progress):
        block = view.load_block(index)
        groups = InputGroups(lambda width: Accumulator(width, normalisation, rounds, view.device))
        handles = _hook(view, index, block, groups) if index >= layers_done else []
        halves: dict[str, tuple[int | None, int]] = {}
        counting = below_damping if handles else None  # a block already stored is not counted again
        try:
            for b in tqdm(range(len(mine)), desc=f"block {index}", leave=False, disable=not progress):
                if counting is not None and b == halfway:
                    halves = _count_so_far(groups, view, index, counting, ranks)
                groups.start_batch(masks[b], mine[b] * rounds // len(batches))
                args, kwargs = arguments[b][index]
                out = block(hidden[b], *args, **kwargs)
                hidden[b] = out[0] if isinstance(out, tuple) else out
                del out
            if counting is not None and halfway == len(mine):  # all of this rank's batches were in the first half
                halves = _count_so_far(groups, view, index, counting, ranks)
        finally:
            for handle in handles:
                handle.remove()
            view.free_block(index)
        if handles:
            _reduce_over_ranks(groups, ranks, view.block_name(index))
            counted = below_damping if ranks.writer else None  # rank 0's counts are the run's
            entries = _entries(groups, view, index, rounds, counted, halves)
            del groups  # the entries hold the sums: a sink that lets go of them frees them (convert's one pass)
            sink.write_layer(index, entries)


def _hook(view: ModelView, index: int, block: nn.Module, groups: InputGroups) -> list:
    """Pre-hooks of ``groups`` on block ``index``'s linears and fused-experts modules; their handles."""
    handles = [block.get_submodule(name).register_forward_pre_hook(groups.hook(name)) for name in view.linears[index]]
    for name, experts in view.experts[index].items():
        module = block.get_submodule(name)
        handles.append(module.register_forward_pre_hook(groups.experts_hook(experts), with_kwargs=True))
    return handles


def _reduce_over_ranks(groups: InputGroups, ranks: Ranks, prefix: str) -> None:
    """Give every rank the same accumulators, summed over the ranks (a rank may never have seen an input
    another did: an expert no token of its batches was routed to)."""
    if ranks.world == 1:
        return
    mine = {leader: (acc.sums[0].shape[0], groups.members(leader)) for leader, acc in groups.accumulators.items()}
    union: dict[str, tuple[int, tuple[str, ...]]] = {}
    for rank, seen in enumerate(gather_objects(mine, ranks, f"{prefix}: gathering the inputs seen")):
        for leader, found in seen.items():
            if union.setdefault(leader, found) != found:
                raise DistributedError(f"{prefix}.{leader}: rank {rank} saw it as {found}, another as {union[leader]}")
    for leader in sorted(union):
        width, members = union[leader]
        if leader not in groups.accumulators:
            groups.accumulators[leader] = groups.make(width)
            groups.leader_of.update(dict.fromkeys(members, leader))
        accumulator = groups.accumulators[leader]
        for part in (part for total in accumulator.sums for part in tensors(total)):
            all_reduce_sum(part, ranks, f"{prefix}.{leader}: summing covariances")
        counts = torch.tensor(accumulator.counts, dtype=torch.int64, device=accumulator.sums[0].device)
        all_reduce_sum(counts, ranks, f"{prefix}.{leader}: summing token counts")
        accumulator.counts = counts.tolist()


def _count_so_far(
    groups: InputGroups, view: ModelView, index: int, below_damping: BelowDamping, ranks: Ranks
) -> dict[str, tuple[int | None, int]]:
    """Per counted input of block ``index``: its count below the damping on the sums so far and the count they
    are divided by, on rank 0 (empty elsewhere). Under torch.distributed every rank calls this once per block,
    at its own first batch of the second half, and the sums so far are added up over the ranks, one input at a
    time (a rank whose share has no first-half batch adds zeros)."""
    prefix, uncounted, limit = view.block_name(index), expert_slices(view.experts[index]), below_damping.max_width
    widths = {
        leader: accumulator.sums[0].shape[0]
        for leader, accumulator in groups.accumulators.items()
        if leader not in uncounted and (limit is None or accumulator.sums[0].shape[0] <= limit)
    }
    for seen_elsewhere in gather_objects(widths, ranks, f"{prefix}: gathering the inputs of the first half"):
        widths.update(seen_elsewhere)
    counted: dict[str, tuple[int | None, int]] = {}
    for leader in sorted(widths):
        total, seen = _sum_so_far(groups.accumulators.get(leader), groups.make, widths[leader], ranks)
        if ranks.writer and seen > 0:  # counted in host memory, as the whole sums are (a GPU's sum copied)
            counted[leader] = (below_damping.count(total.cpu()), seen)
        del total
    return counted


def _sum_so_far(
    accumulator: Accumulator | None, make: Callable[[int], Accumulator], width: int, ranks: Ranks
) -> tuple[Covariance, int]:
    """An input's sum so far and its count, summed over the ranks (the accumulator's own sum, not a copy, for
    one process and one round); a rank that never saw the input adds zeros of the same form (``make``)."""
    if accumulator is None:
        accumulator = make(width)
    total, seen = accumulator.so_far(), sum(accumulator.counts)
    if ranks.world == 1:
        return total, seen
    if total is accumulator.sums[0]:
        total = total.clone()  # the running sum goes on
    counts = torch.tensor([seen], dtype=torch.int64, device=total.device)
    for part in tensors(total):
        all_reduce_sum(part, ranks, "summing the first half's covariances")
    all_reduce_sum(counts, ranks, "summing the first half's token counts")
    return total, int(counts)


def _entries(
    groups: InputGroups,
    view: ModelView,
    index: int,
    rounds: int,
    below_damping: BelowDamping | None,
    halves: dict[str, tuple[int | None, int]],
) -> Iterator[tuple[CovarianceEntry, Sequence[Covariance]]]:
    """Block ``index``'s inputs with their sums (one per round) and counts (``halves``: those midway), made when
    the sink first asks for them (a discarding sink never does) and all checked before the first is handed
    over."""
    prefix = view.block_name(index)
    unseen = [name for name in view.linears[index] if name not in groups.leader_of]
    if unseen:
        log.warning("%s: %s never ran on the calibration data; no covariance for them", prefix, ", ".join(unseen))
    uncounted = expert_slices(view.experts[index])
    entries = []
    for leader, accumulator in groups.accumulators.items():
        name = f"{prefix}.{leader}"
        sums = accumulator.totals()
        if not all(finite(s) for s in sums):
            raise CalibrationError(f"{name}: input activations contain NaN or Inf")
        below = None
        if below_damping is not None and leader not in uncounted:
            below = below_damping.count(total_of(sums))
        below_half, half_count = halves.get(leader, (None, None)) if below is not None else (None, None)
        entry = CovarianceEntry(
            name=name,
            layer=index,
            linears=tuple(f"{prefix}.{member}" for member in groups.members(leader)),
            count=sum(accumulator.counts),
            round_counts=tuple(accumulator.counts) if rounds > 1 else (),
            below_damping=below,
            below_damping_half=below_half,
            half_count=half_count if below_half is not None else None,
        )
        entries.append((entry, sums))
    yield from entries


def open_view(model_dir: str | Path, compute: ComputeOptions) -> ModelView:
    """The model's view with blocks materialised on the compute device in the forward dtype."""
    view = ModelView(model_dir, device=compute.torch_device)
    view.dtype = compute.torch_forward_dtype(view.stored_dtype)
    return view


def calibrate(
    model_dir: str | Path,
    spec: CalibrationSpec,
    out: str | Path,
    *,
    compute: ComputeOptions = DEFAULT_COMPUTE,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    activation_budget: int | None = None,
    below_damping: BelowDamping | None = None,
    before_work: Callable[[ModelView, Path], None] | None = None,
    output: RankOutput | None = None,
) -> Path:
    """Collect every target linear's input covariance of ``model_dir`` into the HDF5 store ``out``: hidden states
    past ``activation_budget`` spill beside it; ``below_damping`` counts small eigenvalues into it; ``before_work``
    (the memory plan) sees the view and the claimed output first; ``output`` takes the summed blocks (default: the
    store, rank 0 writing under torch.distributed; ``convert``'s one pass decomposes them)."""
    check_source(spec)
    ranks = current_ranks()
    progress = progress and ranks.writer
    output = rank_output(ranks) if output is None else output
    with output.claim(out, [Path(model_dir), *spec.input_files()], overwrite, resume) as out:
        barrier(ranks, "waiting for rank 0 to claim the output")
        view = open_view(model_dir, compute)
        _check_normalisation(view, spec)
        budget = rank_activation_budget(compute) if activation_budget is None else activation_budget
        if before_work is not None:
            before_work(view, out)
        batches, description = _token_batches(view, spec, model_dir, progress)
        counted = CountedLevel(below_damping.rule, below_damping.level) if below_damping is not None else None
        sink = output.sink(out, view, description, resume=resume, counted=counted)
        done, finished = broadcast_object((sink.layers_done, sink.finished), ranks, "agreeing on the layers stored")
        if finished:  # resume found the store written: no forward to run
            sink.close()
            return out
        hidden = Activations(budget, out.parent, f".{out.name}{STAGING_MARK}activations-", view.device)
        try:
            stream_covariances(
                view,
                batches,
                sink,
                hidden,
                layers_done=done,
                normalisation=spec.normalisation,
                rounds=spec.rounds,
                progress=progress,
                ranks=ranks,
                below_damping=below_damping,
            )
            sink.finish()
        except DistributedError:
            raise  # another rank stopped (a kill, a lost node): the partial store stays for --resume
        except Exception:
            sink.discard()  # an error leaves no partial store; a signal or a kill leaves it for --resume
            raise
        finally:
            sink.close()
            hidden.close()
        barrier(ranks, "waiting for rank 0 to store the covariances")  # the others may read it next
        return out


def _check_normalisation(view: ModelView, spec: CalibrationSpec) -> None:
    """Refuse PEFT's per-sample scaling where fused experts see routed tokens, not samples."""
    fused = [f"{view.block_name(i)}.{name}" for i, found in enumerate(view.experts) for name in found]
    if spec.normalisation == "peft" and fused:
        raise UnsupportedArchitecture(
            f"`normalisation` peft scales whole samples, but the experts of {fused[0]} see routed tokens: "
            "use `normalisation` tokens"
        )


def _token_batches(
    view: ModelView, spec: CalibrationSpec, model_dir: str | Path, progress: bool
) -> tuple[list[TokenBatch], dict]:
    """The calibration batches and their description for the store (which records the forward dtype too: it
    changes the sums, so resume checks it)."""
    try:
        tokenizer = AutoTokenizer.from_pretrained(view.reader.model_dir, trust_remote_code=False)
    except (OSError, ValueError) as exc:
        if "trust_remote_code" in str(exc):
            raise CheckpointError(f"{model_dir}: its tokenizer {REMOTE_CODE_REFUSED}") from exc
        raise CheckpointError(f"{model_dir}: cannot load the tokenizer ({exc})") from exc
    vocab_size = getattr(view.config, "vocab_size", None) or len(tokenizer)
    batches, description = token_batches(spec, tokenizer, vocab_size)
    if progress:
        tqdm.write(_calibration_summary(description), file=sys.stderr)
    description["forward_dtype"] = str(view.dtype).removeprefix("torch.")
    return batches, description


def _calibration_summary(description: dict) -> str:
    """One line on what the covariances will be computed from (tokens matter: see ``warn_rank_deficient``)."""
    how = "packed into full windows" if description["pack"] else "one record per sample"
    field = f", field {description['text_field']!r}" if description["text_field"] else ""
    return (
        f"calibration: {description['samples_used']} samples of up to {description['seq_len']} tokens, "
        f"{description['tokens']:,} tokens ({description['source']}, {how}{field})"
    )
