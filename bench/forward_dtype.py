"""What a bfloat16 forward pass changes in the covariances and the KPM adapter subspaces, against sampling noise.

SmolLM2-135M stored in bfloat16 is calibrated twice on the same NQ-open samples, with the forward pass
in float32 and in bfloat16 (covariances summed in float32 per batch and float64 across batches either
way); the float32 run also keeps its two disjoint halves (``--rounds 2``). Per input, and per target
linear for the subspaces:
- relative difference ‖C_bf16 − C_fp32‖_F / ‖C_fp32‖_F, next to the halves' ‖C_half0 − C_half1‖_F / ‖C_fp32‖_F;
- the largest principal angle between the row spaces of the KPM adapters' A (rank 16) built from each,
  next to the angle between the adapters built from the two halves.

    python bench/forward_dtype.py [--samples 32 --seq-len 256]

Writes bench/results/forward_dtype.json and prints a summary (median and max over layers).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from corda_surgery.calib.data import CalibrationSpec
from corda_surgery.calib.store import CovarianceStore
from corda_surgery.checkpoint.view import ModelView
from corda_surgery.compute import ComputeOptions
from corda_surgery.decomposition.decompose import decompose_weight
from corda_surgery.memory import release_large_frees_to_os
from corda_surgery.models import embedded_model_dir
from corda_surgery.surgery.calibration import calibrate

RESULTS = Path(__file__).resolve().parent / "results" / "forward_dtype.json"
RANK = 16


def bfloat16_copy(folder: Path) -> Path:
    source = embedded_model_dir()
    AutoModelForCausalLM.from_pretrained(source, dtype=torch.bfloat16).save_pretrained(folder)
    AutoTokenizer.from_pretrained(source).save_pretrained(folder)
    return folder


def largest_angle_degrees(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest principal angle between the row spaces of ``a`` and ``b`` (r × in)."""
    qa, _ = torch.linalg.qr(a.double().T)
    qb, _ = torch.linalg.qr(b.double().T)
    cosines = torch.linalg.svdvals(qa.T @ qb).clamp(max=1.0)
    return math.degrees(math.acos(float(cosines.min())))


def summary(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "max": max(values)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=256)
    args = parser.parse_args()
    release_large_frees_to_os()
    work = Path(tempfile.mkdtemp(prefix="forward_dtype-"))
    model = bfloat16_copy(work / "smollm2-bf16")
    spec = CalibrationSpec("nq_open", samples=args.samples, seq_len=args.seq_len, batch_size=8, rounds=2)
    stores = {
        dtype: calibrate(model, spec, work / f"{dtype}.h5", compute=ComputeOptions(device="cpu", forward_dtype=dtype))
        for dtype in ("float32", "bfloat16")
    }
    view = ModelView(model)
    covariance_rows, angle_rows = [], []
    with CovarianceStore(stores["float32"]) as exact, CovarianceStore(stores["bfloat16"]) as half:
        for name in exact.entries:
            reference = exact.covariance(name)
            scale = float(reference.norm())
            covariance_rows.append({
                "input": name,
                "bf16_vs_fp32": float((half.covariance(name) - reference).norm()) / scale,
                "half0_vs_half1": float((exact.covariance(name, 0) - exact.covariance(name, 1)).norm()) / scale,
            })  # fmt: skip
        for linear in sorted(exact.by_linear):
            weight = view.reader.get(view.stored_key(f"{linear}.weight"))

            def adapter(covariance: torch.Tensor, linear: str = linear, weight: torch.Tensor = weight) -> torch.Tensor:
                return decompose_weight(weight, covariance, rank=RANK, mode="kpm", name=linear).lora_A

            fp32 = adapter(exact.covariance(linear))
            angle_rows.append({
                "linear": linear,
                "bf16_vs_fp32": largest_angle_degrees(adapter(half.covariance(linear)), fp32),
                "half0_vs_half1": largest_angle_degrees(adapter(exact.covariance(linear, 0)),
                                                        adapter(exact.covariance(linear, 1))),
            })  # fmt: skip
    result = {
        "model": "SmolLM2-135M-Instruct stored in bfloat16", "samples": args.samples, "seq_len": args.seq_len,
        "tokens": exact.calibration.get("tokens"), "rank": RANK,
        "covariance_relative_difference": {k: summary([r[k] for r in covariance_rows])
                                           for k in ("bf16_vs_fp32", "half0_vs_half1")},
        "largest_principal_angle_degrees": {k: summary([r[k] for r in angle_rows])
                                            for k in ("bf16_vs_fp32", "half0_vs_half1")},
        "per_input": covariance_rows, "per_linear": angle_rows,
    }  # fmt: skip
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2))
    print(json.dumps({k: v for k, v in result.items() if not k.startswith("per_")}, indent=2))


if __name__ == "__main__":
    main()
