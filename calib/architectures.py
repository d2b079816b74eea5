"""Model families as data: where the blocks are and which linears read the same input tensor.

Linears in one group read one tensor (q/k/v; gate/up) and so share one covariance. Adding a family is
adding a row, not a branch in the engine.
"""

from __future__ import annotations

from dataclasses import dataclass

from corda_surgery.errors import CordaSurgeryError


class UnsupportedArchitecture(CordaSurgeryError):
    """The checkpoint's model_type has no row in FAMILIES, or its layout differs from the row."""


@dataclass(frozen=True)
class Family:
    layers: str  # path of the block ModuleList, relative to ``model.base_model``
    input_groups: tuple[tuple[str, ...], ...]  # linears (relative to a block) grouped by shared input
    transposed: bool = False  # GPT-2 style Conv1D weights, stored (in, out)

    @property
    def linears(self) -> tuple[str, ...]:
        return tuple(name for group in self.input_groups for name in group)


_LLAMA_LIKE = Family(
    layers="layers",
    input_groups=(
        ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
        ("self_attn.o_proj",),
        ("mlp.gate_proj", "mlp.up_proj"),
        ("mlp.down_proj",),
    ),
)
_GPT2 = Family(
    layers="h",
    input_groups=(("attn.c_attn",), ("attn.c_proj",), ("mlp.c_fc",), ("mlp.c_proj",)),
    transposed=True,
)
_BERT = Family(
    layers="encoder.layer",
    input_groups=(
        ("attention.self.query", "attention.self.key", "attention.self.value"),
        ("attention.output.dense",),
        ("intermediate.dense",),
        ("output.dense",),
    ),
)

FAMILIES: dict[str, Family] = {
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "qwen3": _LLAMA_LIKE,
    "gpt2": _GPT2,
    "bert": _BERT,
    "roberta": _BERT,
}


def family_for(model_type: str) -> Family:
    """The family row for a config's ``model_type``, or a clear error listing what is supported."""
    try:
        return FAMILIES[model_type]
    except KeyError as exc:
        raise UnsupportedArchitecture(
            f"model_type {model_type!r} is not supported; supported: {', '.join(sorted(FAMILIES))}. "
            "A new family needs a row in calib/architectures.py (block list path and linears grouped by input)."
        ) from exc
