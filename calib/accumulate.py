"""Covariance sums of one block's linear inputs, and the forward pre-hooks that fill them.

Linears whose hooks receive the same tensor in a forward (q/k/v, gate/up, whatever the model shares) form
one input group with one sum, computed once. Each expert of a fused-experts module gets the sums of the
tokens routed to it (``corda_surgery.checkpoint.experts``), each with its own token count.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from corda_surgery.checkpoint.experts import DOWN, FusedExperts, experts_arguments, routed_inputs, slice_name
from corda_surgery.errors import UnsupportedArchitecture
from corda_surgery.numerics import symmetric_tiles
from corda_surgery.panels import SymmetricPanels, accumulate_tiles, total_of


class Accumulator:
    """Float64 running sums (one per sampling round) of per-batch float32 XᵀX over real tokens.

    XᵀX is symmetric, so only tiles on and above the diagonal are multiplied (``symmetric_tiles``: about
    half a full product's FLOPs for wide inputs), and only that upper triangle is held (``SymmetricPanels``:
    half a square's memory).
    """

    def __init__(self, dim: int, normalisation: str, rounds: int, device: torch.device):
        self.sums = [SymmetricPanels.zeros(dim, device) for _ in range(rounds)]
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
                raise UnsupportedArchitecture("`normalisation` peft needs per-sample inputs; experts get routed rows")
            mask = torch.ones(x.shape[0], 1, dtype=torch.bool, device=x.device)
            x = x[:, None, :]
        elif x.dim() == 2:
            x = x.reshape(*mask.shape, -1)
        dense = bool(mask.all())  # no padding: use the activations in place instead of gathering rows
        if self.normalisation == "peft":  # PEFT's rule: each sample scaled by |max| over its real tokens
            real = x if dense else x.masked_fill(~mask[..., None], float("-inf"))
            x = x / real.amax(dim=(1, 2)).abs()[:, None, None]
        rows = x.reshape(-1, x.shape[-1]) if dense else x[mask]
        accumulate_tiles(self.sums[round_index], rows, self.tiles)
        self.counts[round_index] += rows.shape[0] if self.normalisation == "tokens" else x.shape[0]

    def so_far(self) -> SymmetricPanels:
        """The sum over all rounds of the batches added so far, where the sums live (a copy only where there are
        several rounds)."""
        return total_of(self.sums)

    def totals(self) -> list[SymmetricPanels]:
        """The sums, in host memory."""
        return [total.cpu() for total in self.sums]


def tokens_last(x: torch.Tensor, mask: torch.Tensor, name: str) -> torch.Tensor:
    """A linear's input as (batch, sequence, width) where it has extra axes of size one (DeepSeek's latent
    attention reads (batch, 1, sequence, width)); inputs of two or fewer axes unchanged."""
    if x.dim() <= 3:
        return x
    if x.shape[0] != mask.shape[0] or sorted(x.shape[1:-1]) != [1] * (x.dim() - 3) + [mask.shape[1]]:
        raise UnsupportedArchitecture(
            f"{name} reads a {tuple(x.shape)} input: cannot tell its tokens apart for a batch of {tuple(mask.shape)}"
        )
    return x.reshape(mask.shape[0], mask.shape[1], x.shape[-1])


def expert_slices(experts: dict[str, FusedExperts]) -> set[str]:
    """The input names (relative to the block) of every expert slice of ``experts``' fused parameters."""
    return {
        slice_name(f"{found.module}.{parameter}", expert)
        for found in experts.values()
        for parameter in found.parameters
        for expert in range(found.num_experts)
    }


class InputGroups:
    """Pre-hooks on all linears of one block: linears that read the same tensor in a forward share one
    accumulator, filled once by the first of them (the group's leader)."""

    def __init__(self, make: Callable[[int], Accumulator]):
        self.make = make
        self.leader_of: dict[str, str] = {}  # linear → the linear whose accumulator holds its input
        self.accumulators: dict[str, Accumulator] = {}
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
                self.accumulators[name].add(tokens_last(x, self.mask, name), self.mask, self.round)

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
