"""Layer-by-layer streaming engine: input covariances of every linear, one block in memory.

The model is a skeleton on the ``meta`` device (``calib.model_view``). The stem (embeddings, rotary
tables) is materialised to record, for every calibration batch, the hidden states entering block 0 and
the arguments each block receives (its own masks and position embeddings: sliding-window and global
layers differ); then each block in turn is loaded from the safetensors shards, run over all batches with
pre-hooks on all its linears summing XᵀX over real tokens, written to the store, and freed. Linears whose
hooks receive the same tensor in a forward (q/k/v, gate/up, whatever the model shares) form one input
group with one covariance, computed once. Each expert of a fused-experts module gets the covariances of
the tokens routed to it (``calib.experts``), each with its own token count.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import AutoTokenizer

from corda_surgery.calib.activations import Activations
from corda_surgery.calib.data import CalibrationSpec, TokenBatch, token_batches
from corda_surgery.calib.experts import DOWN, FusedExperts, experts_arguments, routed_inputs, slice_name
from corda_surgery.calib.model_view import ModelView, UnsupportedArchitecture
from corda_surgery.calib.store import CovarianceEntry, CovarianceStore, StoreWriter
from corda_surgery.calib.weights import CheckpointError
from corda_surgery.compute import DEFAULT_COMPUTE, ComputeOptions
from corda_surgery.distributed import (
    ALONE,
    DistributedError,
    Ranks,
    all_reduce_sum,
    barrier,
    broadcast_object,
    gather_objects,
    local_world,
    samples_share,
)
from corda_surgery.distributed import current as current_ranks
from corda_surgery.errors import CordaSurgeryError
from corda_surgery.memory_plan import announce, plan_run
from corda_surgery.numerics import all_finite, mirror_tiles, symmetric_tiles
from corda_surgery.outputs import STAGING_MARK, claimed, refuse_existing

log = logging.getLogger(__name__)


class CalibrationError(CordaSurgeryError):
    """Calibration produced unusable activations (NaN/Inf); names the layer."""


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


class _Accumulator:
    """Float64 running sums (one per sampling round) of per-batch float32 XᵀX over real tokens.

    XᵀX is symmetric, so only tiles on and above the diagonal are multiplied (``symmetric_tiles``: 62.5 % of
    a full product's FLOPs at 576 wide, approaching half for wide inputs); ``totals`` mirrors the off-diagonal ones.
    """

    def __init__(self, dim: int, normalisation: str, rounds: int, device: torch.device):
        self.sums = [torch.zeros(dim, dim, dtype=torch.float64, device=device) for _ in range(rounds)]
        self.counts = [0] * rounds
        self.normalisation = normalisation
        self.tiles = symmetric_tiles(dim)

    def add(self, x: torch.Tensor, mask: torch.Tensor, round_index: int, *, routed: bool = False) -> None:
        """``x``: (batch, sequence, width) activations or the same flattened (``mask`` marks real tokens), or,
        ``routed``, the rows routed to one expert, all counted (also assumed of any other flattened input
        whose row count is not the batch's token count: an expert kept as a linear of its own, whose rows
        may include padding the model routed)."""
        x = x.float()
        if x.dim() == 2 and x.shape[0] != mask.numel():
            routed = True
        if routed:
            if self.normalisation == "peft":
                raise UnsupportedArchitecture("--covariance-norm peft needs per-sample inputs; experts get routed rows")
            mask = torch.ones(x.shape[0], 1, dtype=torch.bool, device=x.device)
            x = x[:, None, :]
        elif x.dim() == 2:
            x = x.reshape(*mask.shape, -1)
        dense = bool(mask.all())  # no padding: use the activations in place instead of gathering rows
        if self.normalisation == "peft":  # PEFT's rule: each sample scaled by |max| over its real tokens
            real = x if dense else x.masked_fill(~mask[..., None], float("-inf"))
            x = x / real.amax(dim=(1, 2)).abs()[:, None, None]
        rows = x.reshape(-1, x.shape[-1]) if dense else x[mask]
        total = self.sums[round_index]
        for tile_rows, tile_columns in self.tiles:
            total[tile_rows, tile_columns] += rows[:, tile_rows].T @ rows[:, tile_columns]
        self.counts[round_index] += rows.shape[0] if self.normalisation == "tokens" else x.shape[0]

    def totals(self) -> list[torch.Tensor]:
        """The sums with their lower triangle filled in from the upper one's tiles, in host memory."""
        for total in self.sums:
            mirror_tiles(total, self.tiles)
        return [total.cpu() for total in self.sums]


def _tokens_last(x: torch.Tensor, mask: torch.Tensor, name: str) -> torch.Tensor:
    """A linear's input as (batch, sequence, width) where it has extra axes of size one (DeepSeek's latent
    attention reads (batch, 1, sequence, width)); inputs of two or fewer axes unchanged."""
    if x.dim() <= 3:
        return x
    if x.shape[0] != mask.shape[0] or sorted(x.shape[1:-1]) != [1] * (x.dim() - 3) + [mask.shape[1]]:
        raise UnsupportedArchitecture(
            f"{name} reads a {tuple(x.shape)} input: cannot tell its tokens apart for a batch of {tuple(mask.shape)}"
        )
    return x.reshape(mask.shape[0], mask.shape[1], x.shape[-1])


class _InputGroups:
    """Pre-hooks on all linears of one block: linears that read the same tensor in a forward share one
    accumulator, filled once by the first of them (the group's leader)."""

    def __init__(self, make: Callable[[int], _Accumulator]):
        self.make = make
        self.leader_of: dict[str, str] = {}  # linear → the linear whose accumulator holds its input
        self.accumulators: dict[str, _Accumulator] = {}
        self._seen: dict[int, tuple[str, torch.Tensor]] = {}  # id(input) → (leader, the tensor, kept alive)
        self.mask, self.round = torch.ones(1, 1, dtype=torch.bool), 0

    def start_batch(self, mask: torch.Tensor, round_index: int) -> None:
        self._seen.clear()
        self.mask, self.round = mask, round_index

    def hook(self, name: str):
        def pre_hook(_module, inputs):
            x = inputs[0]
            seen = self._seen.get(id(x))
            leader = seen[0] if seen is not None and seen[1] is x else name
            if self.leader_of.setdefault(name, leader) != leader:
                raise UnsupportedArchitecture(
                    f"{name} reads the input of {self.leader_of[name]} in one batch and of {leader} in another"
                )
            if leader == name:
                self._seen[id(x)] = (name, x)
                if name not in self.accumulators:
                    self.accumulators[name] = self.make(x.shape[-1])
                self.accumulators[name].add(_tokens_last(x, self.mask, name), self.mask, self.round)

        return pre_hook

    def experts_hook(self, experts: FusedExperts):
        """A pre-hook (with keyword arguments) on a fused-experts module: one input per expert and projection."""

        def pre_hook(module, args, kwargs):
            hidden, top_k_index = experts_arguments(module, args, kwargs)
            for expert, up_rows, down_rows in routed_inputs(module, experts, hidden, top_k_index, self.mask):
                for parameter, rows in ((experts.up, up_rows), (DOWN, down_rows)):
                    name = slice_name(f"{experts.module}.{parameter}", expert)
                    self.leader_of[name] = name
                    if name not in self.accumulators:
                        self.accumulators[name] = self.make(rows.shape[-1])
                    self.accumulators[name].add(rows, self.mask, self.round, routed=True)

        return pre_hook

    def members(self, leader: str) -> tuple[str, ...]:
        return tuple(name for name, of in self.leader_of.items() if of == leader)


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
                view.runner(input_ids=batch.input_ids.to(view.device),
                            attention_mask=batch.attention_mask.to(view.device), use_cache=False)  # fmt: skip
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
    store: StoreWriter | None,
    hidden: Activations,
    *,
    layers_done: int | None = None,
    normalisation: str = "tokens",
    rounds: int = 1,
    progress: bool = True,
    ranks: Ranks = ALONE,
) -> None:
    """Run every block over this rank's batches and write each block's input covariances to ``store`` (rank 0;
    None on the others), skipping the ``layers_done`` it already holds (their forward still runs; None: the
    store's own count, which the other ranks learn from rank 0).

    ``hidden`` holds the batches' hidden states between blocks (in memory or spilled to disk).
    With ``rounds`` > 1 the batches are split into that many disjoint sampling rounds, each of which
    gets its own covariance besides their sum (candidates for CorDA++'s covariance selection). Under
    torch.distributed each rank runs every ``ranks.world``-th batch and the sums are all-reduced per block.
    """
    if layers_done is None:
        layers_done = store.layers_done if store is not None else 0
    mine = ranks.share(len(batches))
    arguments = capture_block_inputs(view, [batches[b] for b in mine], hidden)
    masks = [batches[b].attention_mask.bool().to(view.device) for b in mine]
    for index in tqdm(range(view.num_blocks), desc="blocks", unit="block", disable=not progress):
        block = view.load_block(index)
        prefix = view.block_name(index)
        groups = _InputGroups(lambda width: _Accumulator(width, normalisation, rounds, view.device))
        handles = []
        if index >= layers_done:
            handles = [block.get_submodule(name).register_forward_pre_hook(groups.hook(name))
                       for name in view.linears[index]]  # fmt: skip
            handles += [block.get_submodule(name).register_forward_pre_hook(groups.experts_hook(experts),
                                                                            with_kwargs=True)
                        for name, experts in view.experts[index].items()]  # fmt: skip
        try:
            batch_bar = tqdm(range(len(mine)), desc=f"block {index}", leave=False, disable=not progress)
            for b in batch_bar:
                groups.start_batch(masks[b], mine[b] * rounds // len(batches))
                args, kwargs = arguments[b][index]
                out = block(hidden[b], *args, **kwargs)
                hidden[b] = out[0] if isinstance(out, tuple) else out
                del out
        finally:
            for handle in handles:
                handle.remove()
            view.free_block(index)
        if handles:
            _reduce_over_ranks(groups, ranks, prefix)
            if store is not None:
                store.write_layer(index, _entries(groups, prefix, index, view.linears[index], rounds))


def _reduce_over_ranks(groups: _InputGroups, ranks: Ranks, prefix: str) -> None:
    """Give every rank the same accumulators, summed over the ranks (a rank may never have seen an input
    another did: an expert no token of its batches was routed to)."""
    if ranks.world == 1:
        return
    mine = {leader: (acc.sums[0].shape[0], groups.members(leader)) for leader, acc in groups.accumulators.items()}
    union: dict[str, tuple[int, tuple[str, ...]]] = {}
    for rank, seen in enumerate(gather_objects(mine, ranks, f"{prefix}: gathering the inputs seen")):
        for leader, found in seen.items():
            if union.setdefault(leader, found) != found:
                raise DistributedError(f"{prefix}.{leader}: rank {rank} saw it as {found}, another as "
                                       f"{union[leader]}")  # fmt: skip
    for leader in sorted(union):
        width, members = union[leader]
        if leader not in groups.accumulators:
            groups.accumulators[leader] = groups.make(width)
            groups.leader_of.update(dict.fromkeys(members, leader))
        accumulator = groups.accumulators[leader]
        for total in accumulator.sums:
            all_reduce_sum(total, ranks, f"{prefix}.{leader}: summing covariances")
        counts = torch.tensor(accumulator.counts, dtype=torch.int64, device=accumulator.sums[0].device)
        all_reduce_sum(counts, ranks, f"{prefix}.{leader}: summing token counts")
        accumulator.counts = counts.tolist()


def _entries(
    groups: _InputGroups, prefix: str, index: int, linears: dict[str, bool], rounds: int
) -> list[tuple[CovarianceEntry, list[torch.Tensor]]]:
    unseen = [name for name in linears if name not in groups.leader_of]
    if unseen:
        log.warning("%s: %s never ran on the calibration data; no covariance for them", prefix, ", ".join(unseen))
    entries = []
    for leader, accumulator in groups.accumulators.items():
        name = f"{prefix}.{leader}"
        sums = accumulator.totals()
        if not all(all_finite(s) for s in sums):
            raise CalibrationError(f"{name}: input activations contain NaN or Inf")
        linears_ = tuple(f"{prefix}.{member}" for member in groups.members(leader))
        entry = CovarianceEntry(name=name, layer=index, linears=linears_, count=sum(accumulator.counts),
                                round_counts=tuple(accumulator.counts) if rounds > 1 else ())  # fmt: skip
        entries.append((entry, sums))
    return entries


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
    plan: bool = True,
) -> Path:
    """Collect every target linear's input covariance of ``model_dir`` into the HDF5 store ``out``.

    Hidden states past ``compute``'s activation budget spill to a temporary folder beside ``out``.
    ``plan``: print the memory plan and refuse a run that cannot fit (``convert`` does that for both phases).
    """
    ranks = current_ranks()
    progress = progress and ranks.writer
    held = claimed(out, [Path(model_dir), *spec.input_files()]) if ranks.writer else _unclaimed(out)
    with held as out:
        if ranks.writer:
            refuse_existing(out, overwrite)
        barrier(ranks, "waiting for rank 0 to claim the output")
        view = open_view(model_dir, compute)
        fused = [f"{view.block_name(i)}.{name}" for i, found in enumerate(view.experts) for name in found]
        if spec.normalisation == "peft" and fused:
            raise UnsupportedArchitecture(f"--covariance-norm peft scales whole samples, but the experts of {fused[0]} "
                                          "see routed tokens: use --covariance-norm tokens")  # fmt: skip
        budget = compute.activation_budget()  # once: the default depends on the memory free now
        if view.device.type == "cpu":
            budget //= local_world()  # the ranks on this machine share its RAM
        if plan:  # per rank: its share of the samples
            share = dataclasses.replace(spec, samples=samples_share(spec.samples, spec.batch_size, ranks))
            announce(plan_run(view, compute, out, spec=share, activation_budget=budget), progress)
        try:
            tokenizer = AutoTokenizer.from_pretrained(view.reader.model_dir)
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"{model_dir}: cannot load the tokenizer ({exc})") from exc
        vocab_size = getattr(view.config, "vocab_size", None) or len(tokenizer)
        batches, description = token_batches(spec, tokenizer, vocab_size)
        if progress:
            tqdm.write(_calibration_summary(description), file=sys.stderr)
        description["forward_dtype"] = str(view.dtype).removeprefix("torch.")  # changes the sums: resume checks it
        store = None
        if ranks.writer:
            store = StoreWriter(
                out,
                fingerprint=view.reader.fingerprint(),
                calibration=description,
                num_layers=view.num_blocks,
                resume=resume,
            )
        done = broadcast_object(store.layers_done if store else 0, ranks, "agreeing on the layers already stored")
        hidden = Activations(budget, out.parent, f".{out.name}{STAGING_MARK}activations-",
                             view.device)  # fmt: skip
        try:
            stream_covariances(view, batches, store, hidden, layers_done=done, normalisation=spec.normalisation,
                               rounds=spec.rounds, progress=progress, ranks=ranks)  # fmt: skip
            if store is not None:
                out = store.finish()
                _warn_rank_deficient(out)
        finally:
            if store is not None:
                store.close()
            hidden.close()
        barrier(ranks, "waiting for rank 0 to store the covariances")  # the others may read it next
        return out


@contextlib.contextmanager
def _unclaimed(out: str | Path) -> Iterator[Path]:
    """A rank other than 0 writes nothing under ``out``: rank 0 holds it (and its lock)."""
    yield Path(out).resolve()


def _calibration_summary(description: dict) -> str:
    """One line on what the covariances will be computed from (tokens matter: see _warn_rank_deficient)."""
    how = "packed into full windows" if description["pack"] else "one record per sample"
    field = f", field {description['text_field']!r}" if description["text_field"] else ""
    return (f"calibration: {description['samples_used']} samples of up to {description['seq_len']} tokens, "
            f"{description['tokens']:,} tokens ({description['source']}, {how}{field})")  # fmt: skip


def _warn_rank_deficient(path: Path) -> None:
    """Name the inputs that saw fewer tokens than they are wide: their covariances are rank-deficient, so the
    smallest directions (KPM's cut) are set by damping there, not by data."""
    with CovarianceStore(path) as store:
        short = [(name, entry.count, store.dimension(name)) for name, entry in store.entries.items()
                 if entry.count < store.dimension(name)]  # fmt: skip
        total = len(store.entries)
    if short:
        name, count, width = short[0]
        log.warning("%d of %d inputs saw fewer calibration tokens than they are wide (e.g. %s: %d tokens for %d "
                    "inputs): their smallest covariance directions come from damping, not data; calibrate on more "
                    "tokens (--samples, --seq-len, --pack)", len(short), total, name, count, width)  # fmt: skip
