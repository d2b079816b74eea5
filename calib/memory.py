"""The calibration's part of the memory plan: what capture and calibration hold at their peaks and what they
write to disk, from the config, the token count and the dtypes, before any work.

Per block, calibration holds the block's weights in the forward dtype, the hidden states kept in memory
(capped by the activation budget), one float64 running sum per input group and round (its upper triangle,
``panels.SymmetricPanels``), and one batch's forward temporaries (every linear's output, the attention
scores, the float32 copies the covariance product reads) or, between batches, the larger transient of an
eigenvalue count (``diagnostics.eigenvalues_below_damping``). Capture holds the embeddings and the hidden
states entering block 0.

Which linears share an input is only observed while calibrating; the estimate assumes that linears in one
module with the same input width share it, except the module's last (an output projection) — exact for the
usual attention and MLP layouts, an over-estimate elsewhere. Every expert of a fused-experts module has two
inputs of its own (up and down projection).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable

import torch

from corda_surgery.calib.data import CalibrationSpec
from corda_surgery.calib.packing import packed_length
from corda_surgery.checkpoint.experts import find_fused_experts
from corda_surgery.checkpoint.view import ModelView, is_linear
from corda_surgery.numerics import symmetric_tiles
from corda_surgery.panels import panels_bytes

F32, F64 = 4, 8


def _shape(linear: torch.nn.Module) -> tuple[int, int]:
    """(out, in) of a linear: ``nn.Linear`` stores (out, in), GPT-2's ``Conv1D`` (in, out)."""
    rows, columns = linear.get_parameter("weight").shape
    return (int(rows), int(columns)) if isinstance(linear, torch.nn.Linear) else (int(columns), int(rows))


def _linear_input_widths(block: torch.nn.Module) -> list[list[int]]:
    """Input widths of a block's linears, grouped by the module that holds them, in order."""
    by_module: dict[str, list[int]] = defaultdict(list)
    for name, module in block.named_modules():
        if is_linear(module):
            by_module[name.rpartition(".")[0]].append(_shape(module)[1])
    return list(by_module.values())


def input_widths(block: torch.nn.Module) -> list[int]:
    """Widths of a block's distinct linear inputs (see the module docstring for the sharing rule)."""
    widths = []
    for module_widths in _linear_input_widths(block):
        *shared, last = module_widths
        widths.extend(sorted(set(shared)))
        widths.append(last)
    for experts in find_fused_experts(block).values():
        module = block.get_submodule(experts.module)
        widths += [experts.shape(module, p)[1] for p in experts.parameters] * experts.num_experts
    return widths


def _bytes(module: torch.nn.Module, dtype_size: int, skip: frozenset[int] = frozenset()) -> int:
    seen: set[int] = set()
    total = 0
    for owner in module.modules():
        if id(owner) in skip:
            continue
        for param in owner.parameters(recurse=False):
            if id(param) not in seen:
                seen.add(id(param))
                total += param.numel() * dtype_size
    return total


def _loading(view: ModelView, module: torch.nn.Module) -> int:
    """While a tensor is cast to the forward dtype, its stored copy is resident too (measured: read in the
    forward dtype, a tensor costs nothing beyond itself)."""
    largest = max((p.numel() for p in module.parameters()), default=0)
    return largest * view.stored_dtype.itemsize if view.stored_dtype != view.dtype else 0


def _hidden_bytes(view: ModelView, spec: CalibrationSpec) -> int:
    """All calibration samples' hidden states in the forward dtype."""
    return spec.samples * spec.seq_len * int(view.config.get_text_config().hidden_size) * view.dtype.itemsize


def capture_memory(view: ModelView, spec: CalibrationSpec, budget: int) -> dict[str, int]:
    """The capture phase's peak parts (bytes): the embeddings, and the hidden states entering block 0 held in
    memory (up to ``budget``, the activation budget), formed once the embeddings are loaded (the loading's
    transients count where they are more)."""
    skip = frozenset(id(m) for m in view.blocks.modules())
    hidden = min(_hidden_bytes(view, spec), budget)
    return {
        "embeddings": _bytes(view.runner, view.dtype.itemsize, skip),
        "hidden states": hidden,
        "loading": max(0, _loading(view, view.runner) - hidden),
    }


def calibration_memory(
    view: ModelView, spec: CalibrationSpec, budget: int, counting: Callable[[int], int] | None = None
) -> dict[str, int]:
    """The calibration phase's peak parts (bytes) for its largest block, with ``budget`` the activation budget
    and ``counting`` the bytes an eigenvalue count of an input of a width holds (None: none counted). The block
    is loaded before its sums and forward temporaries exist: the loading's transients count where they are
    more."""
    size = view.dtype.itemsize
    config = view.config.get_text_config()
    hidden = int(config.hidden_size)
    heads = int(getattr(config, "num_attention_heads", 1) or 1)
    batch = min(spec.batch_size, spec.samples)
    batch_tokens = batch * spec.seq_len
    block = max(list(view.blocks), key=lambda b: _bytes(b, size))
    widths = input_widths(block)
    widest = max(widths)
    outputs = sum(_shape(m)[0] for m in block.modules() if is_linear(m))
    product_tile = max((r.stop - r.start) * (c.stop - c.start) for r, c in symmetric_tiles(widest))  # XᵀX tile
    sums = sum(panels_bytes(w) for w in widths) * spec.rounds + (panels_bytes(widest) if spec.rounds > 1 else 0)
    forward = (
        batch_tokens * (outputs * size + 2 * widest * F32)  # outputs; float32 rows of the input
        + batch * heads * spec.seq_len**2 * F32  # attention scores
        + product_tile * (F32 + F64)  # a tile's product, and its float64 copy where it is added on
    )
    if counting is not None:  # between batches: an eigenvalue count
        forward = max(forward, *(counting(w) for w in widths))
    return {
        "block weights": _bytes(block, size),
        "hidden states": min(_hidden_bytes(view, spec), budget + batch_tokens * hidden * size),
        "covariance sums": sums,  # with several rounds, their total formed when written
        "forward": forward,
        "loading": max(0, _loading(view, block) - sums - forward),
    }


def _stored_bytes(widths: list[int], spec: CalibrationSpec) -> int:
    """The store's bytes for inputs of ``widths``: each upper triangle in the store's dtype, and each round's
    when there are several."""
    itemsize = F64 if spec.store_dtype == "float64" else F64 // 2
    return sum(packed_length(w) for w in widths) * itemsize * (1 + (spec.rounds if spec.rounds > 1 else 0))


def calibration_disk(view: ModelView, spec: CalibrationSpec, budget: int) -> dict[str, int]:
    """Bytes written to disk: the store and the hidden states past ``budget``, the activation budget, spilled
    beside it."""
    widths = [w for i in range(view.num_blocks) for w in input_widths(view.blocks[i])]
    return {
        "covariance store": _stored_bytes(widths, spec),
        "spilled hidden states": max(0, _hidden_bytes(view, spec) - budget),
    }


def block_store_disk(view: ModelView, spec: CalibrationSpec) -> int:
    """Bytes of the largest block's covariances as stored: what ``convert``'s one pass spills at a time."""
    return max(_stored_bytes(input_widths(view.blocks[i]), spec) for i in range(view.num_blocks))
