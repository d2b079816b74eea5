"""The memory and disk a run will need, estimated from the config, token count and dtypes before any work.

A run that cannot fit refuses up front with the arithmetic instead of failing hours in. The estimate
follows what the code holds at its peaks (``bench/big_layer.py`` compares it with measured peaks):

- calibration, per block: the block's weights in the forward dtype, the hidden states kept in memory
  (capped by the activation budget), one float64 running sum per input group and round, and one
  batch's forward temporaries (every linear's output, the attention scores, the float32 copies the
  covariance product reads);
- decomposition, per weight: the float64 covariance (damped and factorised in place), the float64
  product W·C, the SVD's workspace (what any solver falls back to where the cut is beyond the Gram
  matrix's resolution), and the weight;
  plus, for an input several linears read, its damped covariance and factor, kept for all of them.

Which linears share an input is only observed while calibrating; the plan assumes that linears in one
module with the same input width share it, except the module's last (an output projection) — exact for
the usual attention and MLP layouts, an over-estimate elsewhere. Every expert of a fused-experts module
has two inputs of its own (up and down projection); while its experts are decomposed, the fused weight
and its residual (split into the stored tensors) are held whole.
"""

from __future__ import annotations

import math
import os
import shutil
import sys
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from corda_surgery.calib.data import CalibrationSpec
from corda_surgery.calib.experts import find_fused_experts
from corda_surgery.calib.model_view import ModelView, is_linear
from corda_surgery.compute import ComputeOptions, available_host_memory, available_memory
from corda_surgery.decompose import CHOLESKY_PANEL, ROW_BLOCK_ELEMENTS
from corda_surgery.errors import CordaSurgeryError
from corda_surgery.numerics import symmetric_tiles
from corda_surgery.options import SurgeryOptions

GIB = 1 << 30
F32, F64 = 4, 8


CALIBRATION_PHASES = ["capture", "calibration"]
HINTS = {
    "capture": "lower --max-memory, --samples or --seq-len",
    "calibration": "lower --max-memory, --batch-size or --seq-len",
    "decomposition": "the largest target weight sets this (leave it out with --targets)",
}


class MemoryPlanError(CordaSurgeryError):
    """The run would not fit the memory or the output disk; the message gives the arithmetic."""


@dataclass
class MemoryPlan:
    """Estimated peaks in bytes, with the parts they add up from (for the printout)."""

    device: torch.device
    baseline: int  # what the process holds already (interpreter, torch, the model skeleton)
    phases: dict[str, dict[str, int]] = field(default_factory=dict)  # phase → part → bytes, on the compute device
    disk: dict[str, int] = field(default_factory=dict)
    out: Path | None = None  # the output the disk figure is for
    disk_folder: Path | None = None  # its nearest existing folder, whose free space counts

    def peak(self, phase: str) -> int:
        return sum(self.phases[phase].values())

    def _peak_of(self, phases: list[str]) -> tuple[int, str | None]:
        """The largest of ``phases`` (those this plan has) and its name."""
        present = [p for p in phases if p in self.phases]
        if not present:
            return 0, None
        phase = max(present, key=self.peak)
        return self.peak(phase), phase

    @property
    def device_peak(self) -> int:
        """On a GPU only calibration must fit: a decomposition that does not is done on the CPU."""
        on_device = CALIBRATION_PHASES if self.device.type == "cuda" else list(self.phases)
        return self._peak_of(on_device)[0]

    @property
    def host_peak(self) -> int:
        """Peak resident memory of the process: the baseline plus its largest phase in host memory (on a GPU
        the decomposition's: the covariance is read into RAM first, and a weight may fall back to the CPU)."""
        return self.baseline + self._peak_of(self._host_phases)[0]

    @property
    def _host_phases(self) -> list[str]:
        return list(self.phases) if self.device.type == "cpu" else ["decomposition"]

    def describe(self) -> str:
        lines = [f"memory plan ({'RAM' if self.device.type == 'cpu' else self.device}; estimates):"]
        for phase, parts in self.phases.items():
            detail = ", ".join(f"{name} {size / GIB:.2f}" for name, size in parts.items() if size)
            lines.append(f"  {phase:<13} {self.peak(phase) / GIB:7.2f} GiB  ({detail})")
        lines.append(
            f"  peak RAM      {self.host_peak / GIB:7.2f} GiB  (with {self.baseline / GIB:.2f} GiB in use now)"
        )
        if self.device.type != "cpu":
            lines.append(f"  peak {self.device}  {self.device_peak / GIB:7.2f} GiB")
        if self.disk:
            detail = ", ".join(f"{name} {size / GIB:.2f}" for name, size in self.disk.items() if size)
            lines.append(f"  disk          {sum(self.disk.values()) / GIB:7.2f} GiB  ({detail}) in {self.disk_folder}")
        return "\n".join(lines)

    def check(self) -> None:
        """Refuse a run whose estimate exceeds the free memory of its device or the free disk of its output."""
        checks = [
            ("RAM", available_host_memory(), list(self.phases) if self.device.type == "cpu" else ["decomposition"])
        ]
        if self.device.type == "cuda":
            checks.append((str(self.device), available_memory(self.device), CALIBRATION_PHASES))
        for memory, free, phases in checks:
            needed, phase = self._peak_of(phases)
            if phase is not None and needed > free:
                parts = " + ".join(f"{name} {size / GIB:.2f}" for name, size in self.phases[phase].items() if size)
                raise MemoryPlanError(
                    f"this run needs about {needed / GIB:.2f} GiB of {memory} ({phase}: {parts}) but "
                    f"{free / GIB:.2f} GiB are free; {HINTS[phase]}, or use a machine with more memory"
                )
        if self.disk and self.disk_folder is not None:
            free_disk = shutil.disk_usage(self.disk_folder).free
            needed_disk = sum(self.disk.values())
            if needed_disk > free_disk:
                parts = " + ".join(f"{name} {size / GIB:.2f}" for name, size in self.disk.items() if size)
                raise MemoryPlanError(
                    f"{self.out}: the outputs need about {needed_disk / GIB:.2f} GiB ({parts}) but "
                    f"{free_disk / GIB:.2f} GiB are free in {self.disk_folder}"
                )


def announce(plan: MemoryPlan, progress: bool) -> None:
    """Print the plan first (with the progress bars, on stderr), then refuse the run if it cannot fit."""
    if progress:
        tqdm.write(plan.describe(), file=sys.stderr)
    plan.check()


def resident_bytes() -> int:
    """This process's resident memory now (Linux ``/proc/self/statm``; 0 where it cannot be read)."""
    try:
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def _existing_folder(path: Path) -> Path:
    folder = path.resolve().parent
    while not folder.exists():
        folder = folder.parent
    return folder


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


def _shared_width(view: ModelView) -> int:
    """The widest input that several linears read (by the module docstring's sharing rule), 0 if none."""
    return max((width for block in view.blocks for *shared, _ in _linear_input_widths(block)
                for width in shared if shared.count(width) > 1), default=0)  # fmt: skip


def _input_widths(block: torch.nn.Module) -> list[int]:
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


def _largest_fused(view: ModelView) -> int:
    """Bytes of the largest fused expert parameter as stored."""
    return max((p.numel() * view.stored_dtype.itemsize for block in view.blocks for p in block.parameters()
                if p.dim() == 3), default=0)  # fmt: skip


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
    """While a tensor is cast to the forward dtype, its stored copy and the shard pages read are resident too."""
    largest = max((p.numel() for p in module.parameters()), default=0)
    return 2 * largest * view.stored_dtype.itemsize


def _calibration(view: ModelView, spec: CalibrationSpec, budget: int) -> dict[str, int]:
    """The calibration phase's peak parts for its largest block."""
    size = view.dtype.itemsize
    config = view.config.get_text_config()
    hidden = int(config.hidden_size)
    heads = int(getattr(config, "num_attention_heads", 1) or 1)
    batch = min(spec.batch_size, spec.samples)
    tokens, batch_tokens = spec.samples * spec.seq_len, batch * spec.seq_len
    block = max(list(view.blocks), key=lambda b: _bytes(b, size))
    widths = _input_widths(block)
    widest = max(widths)
    outputs = sum(_shape(m)[0] for m in block.modules() if is_linear(m))
    product_tile = max((r.stop - r.start) * (c.stop - c.start) for r, c in symmetric_tiles(widest))  # XᵀX tile
    return {
        "block weights": _bytes(block, size) + _loading(view, block),
        "hidden states": min(tokens * hidden * size, budget + batch_tokens * hidden * size),
        "covariance sums": sum(w * w * F64 for w in widths) * spec.rounds
        + (widest * widest * F64 if spec.rounds > 1 else 0),  # the rounds' total, formed when written
        "forward": batch_tokens * (outputs * size + 2 * widest * F32)  # outputs; float32 rows of the input
        + batch * heads * spec.seq_len**2 * F32  # attention scores
        + product_tile * (F32 + F64),  # a tile's product, and its float64 copy where it is added on
    }


def _capture(view: ModelView, spec: CalibrationSpec, budget: int) -> dict[str, int]:
    size = view.dtype.itemsize
    hidden = int(view.config.get_text_config().hidden_size)
    skip = frozenset(id(m) for m in view.blocks.modules())
    return {
        "embeddings": _bytes(view.runner, size, skip) + _loading(view, view.runner),
        "hidden states": min(spec.samples * spec.seq_len * hidden * size, budget),
    }


def _decomposition(shapes: list[tuple[int, int]], stored_size: int, shared_width: int) -> dict[str, int]:
    """The decomposition phase's peak parts for its most demanding weight (out, in): while the singular pairs
    are found, the covariance (its Cholesky factor by then), W·C, and the SVD's (the fallback of every solver)
    or the Cholesky's temporaries are alive; the residual is formed after W·C and the factor are freed. A
    shared input's damped covariance and factor (``shared_width`` wide) may be held meanwhile, for the rest of
    its readers."""

    def parts(out_dim: int, in_dim: int) -> dict[str, int]:
        small = min(out_dim, in_dim)
        return {
            "covariance": in_dim * in_dim * F64,
            "W·C": out_dim * in_dim * F64 + 2 * min(ROW_BLOCK_ELEMENTS, out_dim * in_dim) * F64,  # + a row block
            # The SVD's copy of W·C, U, Vᵀ and gesdd's workspace (measured 2.7–4.2 n² besides the 3 out·in), or
            # two Cholesky panels. Not less for gram or subspace: where they cannot resolve the cut they free
            # their Gram matrix (4 n² with syevd's workspace) and take the SVD (KPM on SmolLM2: 16 of 210 linears).
            "solver": max(3 * out_dim * in_dim + 5 * small * small, 2 * in_dim * CHOLESKY_PANEL) * F64,
            "weight": out_dim * in_dim * stored_size,
        }

    peak = max((parts(*shape) for shape in shapes), key=lambda p: sum(p.values()))
    return peak | ({"shared input (damped + factor)": 2 * shared_width * shared_width * F64} if shared_width else {})


def plan_run(
    view: ModelView,
    compute: ComputeOptions,
    out: Path,
    *,
    spec: CalibrationSpec | None = None,
    options: SurgeryOptions | None = None,
    targets: Sequence[tuple[int, int]] = (),
    activation_budget: int | None = None,
) -> MemoryPlan:
    """The plan of a calibration (``spec``), a decomposition (``options`` and the targets' (out, in) shapes),
    or both (convert), writing to ``out``."""
    plan = MemoryPlan(device=view.device, baseline=resident_bytes(), out=out, disk_folder=_existing_folder(out))
    if spec is not None:
        budget = compute.activation_budget() if activation_budget is None else activation_budget
        plan.phases["capture"] = _capture(view, spec, budget)
        plan.phases["calibration"] = _calibration(view, spec, budget)
        widths = [w for i in range(view.num_blocks) for w in _input_widths(view.blocks[i])]
        plan.disk["covariance store"] = sum(w * w * F64 for w in widths) * (1 + (spec.rounds if spec.rounds > 1 else 0))
        hidden = int(view.config.get_text_config().hidden_size)
        plan.disk["spilled hidden states"] = max(0, spec.samples * spec.seq_len * hidden * view.dtype.itemsize - budget)
    if options is not None and targets:
        stored_size = view.stored_dtype.itemsize
        if options.method.uses_covariance or options.mode is not None:
            shared_width = _shared_width(view) if options.method.uses_covariance else 0
            plan.phases["decomposition"] = _decomposition(list(targets), stored_size, shared_width)
            if _largest_fused(view):
                plan.phases["decomposition"]["fused experts"] = 3 * _largest_fused(view)  # weight, residual, pieces
        plan.disk["residual model"] = sum(
            math.prod(location.shape) * location.dtype.itemsize for location in view.reader.layout.values()
        )
        plan.disk["adapter"] = sum((o + i) * options.rank for o, i in targets) * options.torch_factor_dtype.itemsize
    return plan
