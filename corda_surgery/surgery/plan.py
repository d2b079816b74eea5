"""The memory and disk a run will need, estimated from the config, token count and dtypes before any work.

A run that cannot fit refuses up front with the arithmetic instead of failing hours in. Each phase owns its
estimate of what the code holds at its peaks (``bench/big_layer.py`` compares them with measured peaks):
capture and calibration in ``corda_surgery.calib.memory``, the decomposition of one weight in
``corda_surgery.decomposition.memory``; this plan adds them up, with what surgery itself holds (while the
experts of a fused-experts module are decomposed, its fused weight and residual, split into the stored
tensors, are held whole) and the output's size on disk.
"""

from __future__ import annotations

import math
import shutil
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from corda_surgery.calib.data import CalibrationSpec
from corda_surgery.calib.memory import (
    block_store_disk,
    calibration_disk,
    calibration_memory,
    capture_memory,
)
from corda_surgery.checkpoint.view import ModelView
from corda_surgery.compute import ComputeOptions, available_host_memory, available_memory, resident_bytes
from corda_surgery.decomposition.diagnostics import count_memory
from corda_surgery.decomposition.memory import WeightShape, decomposition_memory, fallback_memory
from corda_surgery.distributed import local_world
from corda_surgery.errors import CordaSurgeryError
from corda_surgery.paths import resolved
from corda_surgery.surgery.options import SurgeryOptions
from corda_surgery.surgery.quantise import quantisation_memory

GIB = 1 << 30


CALIBRATION_PHASES = ["capture", "calibration"]
HINTS = {
    "capture": "lower `max_memory`, `samples` or `seq_len`",
    "calibration": "lower `max_memory`, `batch_size` or `seq_len`",
    "decomposition": "the largest target weight sets this (leave it out with `targets`)",
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
    # The decomposition's peak where a target falls back from the Gram route, by fallback (the SVD, the blocked
    # SVD taken where the SVD does not fit): a rarer path, shown but not part of the verdict.
    fallbacks: dict[str, int] = field(default_factory=dict)
    budget: int | None = None  # --memory-budget: the peak RAM the run must keep within
    smallest: int = 0  # under a budget: the peak RAM with every hidden state spilled, the least a budget can be

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
        if self.budget is not None:
            verdict = "kept" if self.host_peak <= self.budget else "too small"
            lines.append(
                f"  budget        {self.budget / GIB:7.2f} GiB  ({verdict}; covariances as upper triangles; "
                f"the smallest this run can keep: {self.smallest / GIB:.2f} GiB)"
            )
        if self.fallbacks:
            lines.append(self._describe_fallbacks())
        if self.disk:
            detail = ", ".join(f"{name} {size / GIB:.2f}" for name, size in self.disk.items() if size)
            lines.append(f"  disk          {sum(self.disk.values()) / GIB:7.2f} GiB  ({detail}) in {self.disk_folder}")
        return "\n".join(lines)

    def _describe_fallbacks(self) -> str:
        """Which targets may take the rarer path, what it costs, and what happens where it does not fit."""
        costs = ", ".join(f"{name} {(self.baseline + peak) / GIB:.2f} GiB" for name, peak in self.fallbacks.items())
        fits = min(self.fallbacks.values()) <= self._free_host()  # as ``check``: free excludes the baseline
        outcome = "fits now" if fits else "does not fit now: such a target would stop the run, its finished work kept"
        return (
            f"  fallback      peak RAM {costs} for a target whose cut the Gram route cannot resolve (mostly KPM's)\n"
            f"                the blocked SVD where the SVD does not fit; {outcome}; not in the verdict"
        )

    def _free_host(self) -> int:
        """RAM the run may still take: the free memory, and no more than the budget leaves beside the baseline."""
        free = available_host_memory()
        return free if self.budget is None else min(free, max(0, self.budget - self.baseline))

    def check(self) -> None:
        """Refuse a run whose estimate exceeds its memory budget, the free memory of its device or the free disk of
        its output."""
        self._check_budget()
        checks = [("RAM", available_host_memory(), self._host_phases)]
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

    def _check_budget(self) -> None:
        """A budget below the plan's peak is refused with the smallest one the run can keep, and what sets it."""
        if self.budget is None or self.host_peak <= self.budget:
            return
        _, phase = self._peak_of(self._host_phases)
        assert phase is not None
        parts = " + ".join(f"{name} {size / GIB:.2f}" for name, size in self.phases[phase].items() if size)
        spill = " with every hidden state spilled to disk (--max-memory 0)" if self.smallest < self.host_peak else ""
        raise MemoryPlanError(
            f"--memory-budget {self.budget / GIB:.2f} GiB is below this run's peak of about {self.host_peak / GIB:.2f} "
            f"GiB ({phase}: {parts}, besides {self.baseline / GIB:.2f} GiB in use now); the smallest budget it can "
            f"keep is {self.smallest / GIB:.2f} GiB{spill} (to need less: {HINTS[phase]})"
        )


def announce(plan: MemoryPlan, progress: bool) -> None:
    """Print the plan first (with the progress bars, on stderr), then refuse the run if it cannot fit."""
    if progress:
        tqdm.write(plan.describe(), file=sys.stderr)
    plan.check()


def _existing_folder(path: Path) -> Path:
    folder = resolved(path).parent
    while not folder.exists():
        folder = folder.parent
    return folder


def _largest_fused(view: ModelView) -> int:
    """Bytes of the largest fused expert parameter as stored."""
    return max(
        (p.numel() * view.stored_dtype.itemsize for block in view.blocks for p in block.parameters() if p.dim() == 3),
        default=0,
    )


def _plan_decomposition(
    plan: MemoryPlan,
    view: ModelView,
    options: SurgeryOptions,
    targets: Sequence[WeightShape],
    one_pass: bool,
) -> None:
    """The decomposition's phase on the solver's own path, and its fallbacks' peaks beside it."""
    stored_size, solver = view.stored_dtype.itemsize, options.decomposition.solver
    held = {"fused experts": 3 * _largest_fused(view)}  # weight, residual, pieces
    if options.quantisation.quantised:
        held["4-bit residual"] = quantisation_memory([(t.out_dim, t.in_dim) for t in targets])
    if one_pass and "calibration" in plan.phases:  # held by the calibration meanwhile (its sums are spilled)
        held["hidden states"] = plan.phases["calibration"]["hidden states"]
    plan.phases["decomposition"] = decomposition_memory(targets, stored_size, solver) | held
    fallbacks = fallback_memory(targets, stored_size, solver)
    if fallbacks is not None:
        svd, blocked = (sum(parts.values()) + sum(held.values()) for parts in fallbacks)
        if svd > plan.peak("decomposition"):
            plan.fallbacks = {"SVD": svd} | ({"blocked SVD": blocked} if blocked < svd else {})


def plan_run(
    view: ModelView,
    compute: ComputeOptions,
    out: Path,
    *,
    spec: CalibrationSpec | None = None,
    options: SurgeryOptions | None = None,
    targets: Sequence[WeightShape] = (),
    activation_budget: int | None = None,
    one_pass: bool = False,
    keep_store: bool = True,
) -> MemoryPlan:
    """The plan of a calibration (``spec``), a decomposition (``options`` and the targets' (out, in) shapes),
    or both (convert), writing to ``out``. ``one_pass``: each block is decomposed while the calibration holds
    its hidden states, from its covariances spilled to disk, and no store is written unless ``keep_store``; two
    passes without ``keep_store`` still write the whole store, and remove it at the end."""
    plan = MemoryPlan(
        device=view.device, baseline=resident_bytes(), out=out, disk_folder=_existing_folder(out), budget=compute.budget
    )
    if spec is not None:
        budget = compute.activation_budget() if activation_budget is None else activation_budget
        plan.phases["capture"] = capture_memory(view, spec, budget)
        plan.phases["calibration"] = calibration_memory(view, spec, budget, count_memory)
        disk = calibration_disk(view, spec, budget)
        if not keep_store:
            store = disk.pop("covariance store")
            disk["covariance store (removed at the end)"] = 0 if one_pass else store
        if one_pass:  # each rank on this machine spills its own copy
            disk["one block's covariances (while it is decomposed)"] = block_store_disk(view, spec) * local_world()
        plan.disk.update(disk)
    if options is not None and targets:
        if options.method.uses_covariance or options.mode is not None:
            _plan_decomposition(plan, view, options, targets, one_pass)
        plan.disk["residual model"] = sum(
            math.prod(location.shape) * location.dtype.itemsize for location in view.reader.layout.values()
        )
        adapter = (
            sum((t.out_dim + t.in_dim) * options.rank for t in targets)
            * options.decomposition.torch_factor_dtype.itemsize
        )
        plan.disk["adapter"] = adapter
        if options.mode is not None:  # each decomposition's factors, saved for resume until the output is published
            plan.disk["finished work"] = adapter
    if plan.budget is not None:  # the least it can keep: the same run with every hidden state spilled
        floor = plan if activation_budget == 0 or spec is None else plan_run(
            view, compute, out, spec=spec, options=options, targets=targets, activation_budget=0,
            one_pass=one_pass, keep_store=keep_store,
        )  # fmt: skip
        plan.smallest = floor.host_peak
    return plan
