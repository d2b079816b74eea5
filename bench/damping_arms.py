"""The fidelity study's damping arms (issue 38): KPM, and IPM as the control, under PEFT's damping rule and the
median-diagonal rule at more than one level, compared with today's adapters.

What an arm changes is only where its adapter starts, so besides the study's own panels it is measured by
how far that start lies from today's (PEFT's rule, λ = 0.01): the largest principal angle between the two
initial adapters' subspaces, per target, for the row space of A (the input side, where C_d⁻¹ acts) and the
column space of B. The angles depend on the initialisation alone: they are computed from the converted
models, once, and kept in angles.json beside the runs, so that a report made without the models (a new
checkout) still has them.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import torch

ANGLES = "angles.json"
# Today's arm for each damping arm: the one run at PEFT's rule and λ = 0.01, its comparison at equal rate and seed.
REFERENCES = {"kpm": "corda-kpm", "ipm": "corda-ipm"}


def largest_angle(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest principal angle in degrees between the spaces spanned by the columns of ``a`` and ``b``."""
    qa, _ = torch.linalg.qr(a.double())
    qb, _ = torch.linalg.qr(b.double())
    cosine = float(torch.linalg.svdvals(qa.T @ qb).min().clamp(max=1.0))
    return float(torch.rad2deg(torch.arccos(torch.tensor(cosine))))


def adapter_angles(arm: Path, reference: Path) -> dict[str, float]:
    """Median and largest, over the targets, of the largest principal angle between the two initial adapters'
    A row spaces and B column spaces (degrees)."""
    from corda_surgery.export.peft_adapter import read_adapter

    ours, today = read_adapter(arm), read_adapter(reference)
    a = [largest_angle(ours.lora_A[m].T, today.lora_A[m].T) for m in sorted(today.lora_A)]
    b = [largest_angle(ours.lora_B[m], today.lora_B[m]) for m in sorted(today.lora_B)]
    return {"A_median": statistics.median(a), "A_max": max(a), "B_median": statistics.median(b), "B_max": max(b)}


def angles_to_today(out: Path, arms: dict[str, str]) -> dict[str, dict[str, float]]:
    """Per damping arm (name → its reference), the angles to today's adapters: from the converted models under
    ``out/models`` where both are there (then saved to ``out/angles.json``), else from that file."""
    path = out / ANGLES
    known: dict[str, dict[str, float]] = json.loads(path.read_text()) if path.is_file() else {}
    for arm, reference in arms.items():
        folders = (out / "models" / arm / "adapter", out / "models" / reference / "adapter")
        if arm not in known and all((folder / "adapter_config.json").is_file() for folder in folders):
            known[arm] = adapter_angles(*folders)
    if known:
        path.write_text(json.dumps(known, indent=2, sort_keys=True))
    return known


def angle_cell(angles: dict[str, float] | None) -> str:
    """The table's cell: A / B median angles, the largest in brackets."""
    if angles is None:
        return ""
    return f"{angles['A_median']:.0f}° ({angles['A_max']:.0f}°) / {angles['B_median']:.0f}° ({angles['B_max']:.0f}°)"
