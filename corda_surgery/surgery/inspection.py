"""`inspect`: per-layer compactness and CorDA++ rank allocation of covariance stores, as a table and plots."""

from __future__ import annotations

import contextlib
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import torch

from corda_surgery.calib.store import Covariances, CovarianceStore
from corda_surgery.checkpoint.view import ModelView
from corda_surgery.compute import DEFAULT_COMPUTE, ComputeOptions
from corda_surgery.outputs import new_files
from corda_surgery.surgery.initialise import damping_diagnosis
from corda_surgery.surgery.options import SurgeryOptions
from corda_surgery.surgery.ranks import corda_plus_plan
from corda_surgery.surgery.report import LayerRecord
from corda_surgery.surgery.targets import LayerPlan, chosen_targets, plan_targets


def inspect_stores(
    model_dir: str | Path, stores: list[str | Path], options: SurgeryOptions, compute: ComputeOptions = DEFAULT_COMPUTE
) -> tuple[list[dict], dict[str, torch.Tensor]]:
    """One row per target linear (rank, compactness, chosen candidate, the damping's diagnosis) and the chosen
    spectra (fused experts take ``--rank`` outside CorDA++'s allocation, so they have no row).

    ``options`` is a corda++ surgery's: its mode, base rank, damping, targets and budgets; the spectra are
    computed on ``compute``'s device.
    """
    view = ModelView(model_dir)
    plan_targets(view, options)  # option mistakes first, before the fingerprint reads the weights
    with contextlib.ExitStack() as closing:
        opened = [closing.enter_context(CovarianceStore(path)) for path in stores]
        targets = chosen_targets(view, options, opened, view.reader.fingerprint()).targets
        plan, records, spectra = corda_plus_plan(
            view, opened, targets, options, progress=True, device=compute.torch_device
        )
        rows = [
            {
                "layer": t.name,
                "rank": plan[t.name].rank,
                "store": plan[t.name].store,
                "round": plan[t.name].round,
                "compactness": records[t.name].compactness,
                "compactness_at_base_rank": max(records[t.name].candidate_compactness or [0.0]),
                "damping": _diagnosis(opened, plan[t.name], t.name, options),
            }
            for t in targets
            if t.parameter is None
        ]
    return rows, spectra


def _diagnosis(stores: Sequence[Covariances], layer: LayerPlan, name: str, options: SurgeryOptions) -> dict:
    """The chosen store's damping diagnosis of ``name`` at its planned rank (``damping_diagnosis``), as a record's
    fields; empty where the store has no counts at the options' damping."""
    assert layer.store is not None
    store = stores[layer.store]
    diagnosis = damping_diagnosis(store, store.by_linear[name], options, layer.rank, layer.round)
    record = LayerRecord(rank=layer.rank)
    if diagnosis is not None:
        diagnosis.record(record)
    return {key: value for key, value in record.to_json().items() if key != "rank"}


def _kind_and_depth(name: str) -> tuple[str, int]:
    parts = name.split(".")
    depth = next(int(p) for p in parts if p.isdigit())
    return parts[-1], depth


def plot_inspection(rows: list[dict], spectra: dict[str, torch.Tensor], out_dir: Path, title: str) -> list[Path]:
    """spectra.png (cumulative σ² share per layer, by linear type) and ranks.png (rank by depth and type); a
    failure removes the plots written so far and the folders made for them."""
    with new_files(out_dir) as written:
        _draw(rows, spectra, out_dir, title, written)
    return written


def _draw(rows: list[dict], spectra: dict[str, torch.Tensor], out_dir: Path, title: str, written: list[Path]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_kind: dict[str, list[tuple[int, dict]]] = defaultdict(list)
    for row in rows:
        kind, depth = _kind_and_depth(row["layer"])
        by_kind[kind].append((depth, row))

    fig, axes = plt.subplots(1, len(by_kind), figsize=(3.2 * len(by_kind), 3), sharey=True, squeeze=False)
    for ax, (kind, items) in zip(axes[0], sorted(by_kind.items())):
        for depth, row in items:
            energy = spectra[row["layer"]].square()
            share = (energy.cumsum(0) / energy.sum()).numpy()
            ax.plot(share, color=plt.cm.viridis(depth / max(d for d, _ in items) if len(items) > 1 else 0), lw=0.8)
        ax.set_title(kind, fontsize=9)
        ax.set_xscale("log")
        ax.set_xlabel("components k")
    axes[0][0].set_ylabel("E(k): cumulative σ² share of W·C")
    fig.suptitle(f"{title}: context-oriented spectra (colour = depth)", fontsize=10)
    fig.tight_layout()
    spectra_path = out_dir / "spectra.png"
    written.append(spectra_path)
    fig.savefig(spectra_path, dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 3.5))
    for kind, items in sorted(by_kind.items()):
        items = sorted(items, key=lambda item: item[0])
        ax.plot([d for d, _ in items], [r["rank"] for _, r in items], marker="o", ms=3, label=kind)
    ax.set_xlabel("layer depth")
    ax.set_ylabel("allocated rank")
    ax.set_title(f"{title}: CorDA++ rank allocation", fontsize=10)
    ax.legend(fontsize=8, ncol=4)
    fig.tight_layout()
    ranks_path = out_dir / "ranks.png"
    written.append(ranks_path)
    fig.savefig(ranks_path, dpi=120)
    plt.close(fig)
