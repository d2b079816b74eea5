"""Mixture-of-experts layers whose experts are fused 3-D parameters, seen as one linear per expert.

transformers 5 keeps every expert's gate+up (or up) and down projection of a layer in one parameter of
shape (experts, out, in) — (experts, in, out) where the module says ``is_transposed`` — inside a module
built by ``use_experts_implementation`` and called with the hidden states and each token's chosen experts.
Each expert's slice of such a parameter is adapted like a linear: its input covariance is that of the
real tokens routed to it (up projection) or of their gated activations (down projection), recomputed here
with the module's own weights, bias and gate, so the forward's own routing decides who sees what.
PEFT adapts these parameters through ``target_parameters`` (``lora.ParamWrapper``: one rank for all experts,
factors of all experts side by side, wrappers nested in the module's parameter order).
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional

from corda_surgery.errors import UnsupportedArchitecture

DOWN = "down_proj"


@dataclass(frozen=True)
class FusedExperts:
    """One fused-experts module: where it is (relative to its block), its projections and layout."""

    module: str
    up: str  # "gate_up_proj" (gated experts) or "up_proj"
    num_experts: int
    transposed: bool  # parameters stored (experts, in, out)

    @property
    def parameters(self) -> tuple[str, str]:
        """The adapted parameters, in the module's definition order (PEFT nests its wrappers in that order)."""
        return self.up, DOWN

    def shape(self, module: nn.Module, parameter: str) -> tuple[int, int]:
        """(out, in) of one expert's slice of ``parameter``."""
        _, rows, columns = module.get_parameter(parameter).shape
        return (int(columns), int(rows)) if self.transposed else (int(rows), int(columns))


def slice_name(parameter: str, expert: int) -> str:
    """The name of one expert's slice of a fused parameter (in the store, surgery.json and logs)."""
    return f"{parameter}[{expert}]"


def find_fused_experts(block: nn.Module) -> dict[str, FusedExperts]:
    """Modules of ``block`` that transformers' experts interface built, keyed by their path in the block."""
    found = {}
    for name, module in block.named_modules():
        if not all(hasattr(module, a) for a in ("has_gate", "has_bias", "is_transposed", "num_experts")):
            continue
        if not module.has_gate and not hasattr(module, "act_fn"):
            continue
        up = "gate_up_proj" if module.has_gate else "up_proj"
        parameters = dict(module.named_parameters(recurse=False))
        if all(p in parameters and parameters[p].dim() == 3 for p in (up, DOWN)):
            order = [p for p in parameters if p in (up, DOWN)]
            if order != [up, DOWN]:  # the slice names assume it; PEFT would nest the wrappers the other way
                continue
            found[name] = FusedExperts(name, up, int(module.num_experts), bool(module.is_transposed))
    return found


def _projection(module: nn.Module, parameter: str, expert: int, rows: torch.Tensor, transposed: bool) -> torch.Tensor:
    weight = module.get_parameter(parameter)[expert]
    out = rows @ weight if transposed else functional.linear(rows, weight)
    if module.has_bias:
        out = out + module.get_parameter(f"{parameter}_bias")[expert]
    return out


def routed_inputs(
    module: nn.Module, experts: FusedExperts, hidden: torch.Tensor, top_k_index: torch.Tensor, real: torch.Tensor
) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
    """(expert, rows its up projection reads, rows its down projection reads) for every expert, over the
    real tokens (``real``: one flag per token) routed to it; an expert that got none yields empty rows."""
    hidden = hidden.reshape(-1, hidden.shape[-1])
    chosen = top_k_index.reshape(hidden.shape[0], -1)
    if real.numel() != hidden.shape[0]:
        raise UnsupportedArchitecture(
            f"{experts.module}: called with {hidden.shape[0]} token rows for a batch of {real.numel()} tokens: "
            "cannot tell padding apart"
        )
    real = real.reshape(-1)
    for expert in range(experts.num_experts):
        rows = hidden[(chosen == expert).any(dim=-1) & real]
        projected = _projection(module, experts.up, expert, rows, experts.transposed)
        gate = getattr(module, "_apply_gate" if module.has_gate else "act_fn")  # the model's own activation
        activations = gate(projected)
        yield expert, rows, activations


def experts_arguments(module: nn.Module, args: Sequence, kwargs: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """The hidden states and chosen experts an experts module is called with: its first two parameters,
    passed by position or by whatever name the model gives them (``top_k_index``, ``router_indices``)."""
    bound = inspect.signature(module.forward).bind(*args, **kwargs)
    hidden, chosen = list(bound.arguments.values())[:2]
    return hidden, chosen
