"""What float32 storage of the covariances changes: store size, the KPM and IPM adapters, and the handoff.

Calibrates the embedded SmolLM2-135M on the default data twice (the compact store in float64, and in float32),
decomposes each store in KPM and IPM (rank 16, all linears), and compares every float32 adapter with its
float64 counterpart: the largest principal angle between the kept subspaces (the row spaces of A), and the
relative distance of s·B·A. The handoff (residual + adapter against the original model) is measured on the
float32 KPM output. ``--format-2-store`` gives a store written by a format-2 version for the size comparison.
Writes ``bench/results/store_dtype.json``.

    python bench/store_dtype.py --format-2-store /path/to/covariances.h5
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
from pathlib import Path

import torch
from safetensors.torch import load_file

from corda_surgery.calib.data import CalibrationSpec
from corda_surgery.models import resolve_model
from corda_surgery.surgery import SurgeryOptions, calibrate, decompose_checkpoint

RESULTS = Path(__file__).resolve().parent / "results"
PROMPTS = ["The capital of France is", "Question: what is 7 + 5?\nAnswer:", "def fibonacci(n):"]


def _factors(folder: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    tensors = load_file(folder / "adapter" / "adapter_model.safetensors")
    names = {key.removesuffix(".lora_A.weight") for key in tensors if key.endswith(".lora_A.weight")}
    return {
        name: (tensors[f"{name}.lora_A.weight"].double(), tensors[f"{name}.lora_B.weight"].double()) for name in names
    }


def _largest_angle(a: torch.Tensor, b: torch.Tensor) -> float:
    """Degrees: the largest principal angle between the row spaces of ``a`` and ``b``."""
    qa, qb = torch.linalg.qr(a.T).Q, torch.linalg.qr(b.T).Q
    cosines = torch.linalg.svdvals(qa.T @ qb).clamp(max=1.0)
    return float(torch.rad2deg(torch.arccos(cosines.min())))


def compare(reference: Path, other: Path) -> dict[str, list[float]]:
    """Per adapted linear: the largest principal angle of A's row spaces and ‖ΔBA‖/‖BA‖."""
    ref, new = _factors(reference), _factors(other)
    angles, distances = [], []
    for name, (a, b) in ref.items():
        a2, b2 = new[name]
        angles.append(_largest_angle(a, a2))
        distances.append(float((b2 @ a2 - b @ a).norm() / (b @ a).norm()))
    return {"angle": angles, "distance": distances}


def handoff(model_dir: Path, surgery: Path) -> float:
    """max |Δlogit| of the residual + untouched adapter against the original model, on PROMPTS."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    batch = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    with torch.no_grad():
        original = AutoModelForCausalLM.from_pretrained(model_dir).eval()(**batch).logits
        adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(surgery), surgery / "adapter")
        logits = adapted.eval()(**batch).logits
    mask = batch["attention_mask"].bool()
    return float((logits - original)[mask].abs().max())


def _machine() -> str:
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    return f"{os.cpu_count()} cores {platform.machine()}, {memory:.0f} GiB, {gpu}; torch {torch.__version__}"


def _summary(values: list[float], unit: str) -> str:
    return f"{statistics.median(values):.3g}{unit} / {max(values):.3g}{unit}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("out/store-dtype"))
    parser.add_argument("--format-2-store", type=Path, default=None, help="a format-2 store of the same run")
    args = parser.parse_args()
    model = resolve_model(None)
    outputs, sizes = {}, {}
    for dtype in ("float64", "float32"):
        store = args.out / f"{dtype}.h5"
        if not store.exists():
            calibrate(model, CalibrationSpec("nq_open", store_dtype=dtype), store)
        sizes[dtype] = store.stat().st_size
        for mode in ("kpm", "ipm"):
            out = args.out / f"{dtype}-{mode}"
            if not out.exists():
                decompose_checkpoint(model, out, SurgeryOptions.of(mode=mode), stores=[store])
            outputs[dtype, mode] = out
    rows = []
    for mode in ("kpm", "ipm"):
        found = compare(outputs["float64", mode], outputs["float32", mode])
        rows.append([mode.upper(), _summary(found["angle"], "°"), _summary(found["distance"], "")])
    old = args.format_2_store.stat().st_size if args.format_2_store else None
    sizes_text = ", ".join(
        f"{dtype} {size / 1e6:.0f} MB" + (f" ({size / old:.2f} of format 2's {old / 1e6:.0f} MB)" if old else "")
        for dtype, size in sizes.items()
    )
    record = {
        "title": "Float32 storage of the covariances",
        "what": "The embedded SmolLM2-135M, the default calibration (49,220 packed NQ-open tokens), rank 16 on all "
        "210 linears: each float32 adapter against the float64 one from the same calibration, per linear (median / "
        "max): the largest principal angle between the kept subspaces (A's row spaces) and ‖Δ(B·A)‖/‖B·A‖. "
        f"Store sizes: {sizes_text}. Handoff of the float32 KPM output (max |Δlogit| on "
        f"{len(PROMPTS)} prompts): {handoff(model, outputs['float32', 'kpm']):.2e}.",
        "command": "python bench/store_dtype.py --format-2-store STORE",
        "date": datetime.date.today().isoformat(),
        "commit": subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True
        ).stdout.strip(),
        "machine": _machine(),
        "source": "written by bench/store_dtype.py",
        "columns": ["mode", "largest principal angle, median / max", "‖Δ(B·A)‖ / ‖B·A‖, median / max"],
        "rows": rows,
    }
    (RESULTS / "store_dtype.json").write_text(json.dumps(record, indent=1, ensure_ascii=False) + "\n")
    print(json.dumps(record, indent=1, ensure_ascii=False))


if __name__ == "__main__":
    main()
