"""GPU acceptance: what the CPU suite cannot check, in one command of at most 8 minutes on one GPU.

1. `convert` (one pass, store kept) of the embedded SmolLM2-135M on the README's calibration, on the GPU and on
   the CPU: wall times, the largest relative difference between the two stores' covariances, and each
   output's handoff (max |Δlogit| of residual + adapter against the original model, float64).
2. The same on the GPU with a bfloat16 forward: wall, its stores' difference from the float32 forward's.
3. An 8B-shaped layer (hidden 4096, intermediate 14336; bench/big_layer.py's checkpoint) converted on the GPU:
   wall, peak GPU memory against the memory plan's.
4. The fp16 ONNX export of the merged SmolLM2 on onnxruntime's CUDA provider: parity with PyTorch (max |Δlogit|,
   greedy agreement), prefill and per-token latency (`verify-onnx`'s figures).

    python bench/gpu_check.py              # on a GPU: bench/results/gpu_check.json, the table in docs/performance.md
    python bench/gpu_check.py --dry-run    # every step on the CPU with a tiny model, fp32 ONNX: the script works

Without a CUDA device (and without --dry-run) it says so and exits 0. tests/test_bench.py runs the dry run.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import h5py
import numpy as np
import torch
from big_layer import build_checkpoint  # bench/ is on the path of its scripts
from transformers import AutoModelForCausalLM, AutoTokenizer

from corda_surgery.calib.data import CalibrationSpec
from corda_surgery.compute import ComputeOptions
from corda_surgery.export.merge import merge_adapter
from corda_surgery.export.onnx_export import export_onnx
from corda_surgery.export.verify import verify_onnx
from corda_surgery.models import embedded_model_dir
from corda_surgery.surgery.options import SurgeryOptions
from corda_surgery.surgery.run import convert_checkpoint, estimate_run

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results" / "gpu_check.json"
PROMPTS = ["Who wrote the novel Pride and Prejudice?", "Janet's ducks lay 16 eggs per day. She eats three"]
GIB = 1 << 30


def store_difference(store: Path, reference: Path) -> float:
    """The largest ‖a − b‖ / ‖b‖ over the stores' datasets (packed sums, or covariances in float32)."""
    worst = 0.0
    with h5py.File(store) as ours, h5py.File(reference) as theirs:
        for name in theirs:
            a, b = np.asarray(ours[name], dtype=np.float64), np.asarray(theirs[name], dtype=np.float64)
            worst = max(worst, float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-300)))
    return worst


def handoff(out: Path, original: Path, work: Path) -> float:
    """max |Δlogit| of the merged surgery (residual + untouched adapter) against the original, in float64."""
    merged = merge_adapter(out, out / "adapter", work / f"{out.name}-merged", progress=False)
    tokenizer = AutoTokenizer.from_pretrained(original)
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    batch = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    real = batch["attention_mask"].bool()
    with torch.no_grad():
        logits = [
            AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float64).eval()(**batch).logits
            for folder in (merged, original)
        ]
    return float((logits[0] - logits[1])[real].abs().max())


def timed_convert(model: Path, out: Path, spec: CalibrationSpec, options: SurgeryOptions, compute: ComputeOptions):
    start = time.monotonic()
    convert_checkpoint(model, out, spec, options, compute=compute, keep_covariances=True, progress=False)
    return out, round(time.monotonic() - start, 1)


def check_convert(model: Path, spec: CalibrationSpec, device: str, work: Path) -> tuple[dict, Path]:
    """Steps 1 and 2; the device's float32 output, for the export."""
    options = SurgeryOptions.of(rank=16)
    fp32 = ComputeOptions(device=device, forward_dtype="float32")
    device_out, device_s = timed_convert(model, work / "device", spec, options, fp32)
    cpu_out, cpu_s = timed_convert(
        model, work / "cpu", spec, options, ComputeOptions(device="cpu", forward_dtype="float32")
    )
    bf16 = ComputeOptions(device=device, forward_dtype="bfloat16")
    bf16_out, bf16_s = timed_convert(model, work / "bf16", spec, options, bf16)
    store = "covariances.h5"
    return {
        "convert_wall_s": {"device": device_s, "cpu": cpu_s, "device bf16 forward": bf16_s},
        "store_relative_difference_device_vs_cpu": store_difference(device_out / store, cpu_out / store),
        "store_relative_difference_bf16_vs_fp32_forward": store_difference(bf16_out / store, device_out / store),
        "handoff_max_abs_logit": {
            "device": handoff(device_out, model, work),
            "cpu": handoff(cpu_out, model, work),
            "device bf16 forward": handoff(bf16_out, model, work),
        },
    }, device_out


def check_big_layer(shape: str, device: str, work: Path) -> dict:
    """Step 3: one layer of ``shape`` on the device, peak memory against the plan (the CPU's peak RSS in a dry
    run)."""
    model = build_checkpoint(work / f"{shape}-model", shape, 1)
    spec = CalibrationSpec("nq_open", samples=16, seq_len=512, batch_size=4)
    options, compute = SurgeryOptions.of(rank=16), ComputeOptions(device=device)
    plan = estimate_run(model, compute, work / f"{shape}-out", spec=spec, options=options, keep_covariances=False)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    start = time.monotonic()
    convert_checkpoint(model, work / f"{shape}-out", spec, options, compute=compute, progress=False)
    wall = time.monotonic() - start
    if device.startswith("cuda"):
        peak, planned = torch.cuda.max_memory_allocated(), plan.device_peak
    else:
        peak, planned = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, plan.host_peak
    return {"shape": shape, "wall_s": round(wall, 1), "peak_gib": round(peak / GIB, 2),
            "plan_gib": round(planned / GIB, 2), "plan_error": round(planned / peak - 1, 3)}  # fmt: skip


def check_onnx(surgery: Path, dtype: str, work: Path) -> dict:
    """Step 4: the merged model exported with a KV cache, run on the preferred provider (CUDA where present)."""
    merged = merge_adapter(surgery, surgery / "adapter", work / "onnx-merged", progress=False)
    onnx_dir = export_onnx(merged, work / "onnx", weights=dtype, with_past=True)
    report = verify_onnx(onnx_dir, merged, repeats=3)
    return {"dtype": dtype, **vars(report)}


def _commit() -> str:
    found = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    return found.stdout.strip() or "unknown"


def table(result: dict) -> tuple[list[str], list[list[str]]]:
    """The docs' rows: one per figure."""
    convert, big, onnx = result["convert"], result["big_layer"], result["onnx"]
    walls, handoffs = convert["convert_wall_s"], convert["handoff_max_abs_logit"].values()
    planned = f"{big['plan_gib']} GiB planned ({big['plan_error'] * 100:+.0f} %)"
    rows = [
        ["convert, SmolLM2 (one pass, store kept)", f"{walls['device']} s on the GPU, {walls['cpu']} s on the CPU"],
        ["store: GPU against CPU, largest ‖ΔC‖/‖C‖", f"{convert['store_relative_difference_device_vs_cpu']:.2e}"],
        ["store: bf16 against fp32 forward (GPU)", f"{convert['store_relative_difference_bf16_vs_fp32_forward']:.2e}"],
        ["handoff, max |Δlogit| (GPU / CPU / bf16)", " / ".join(f"{value:.1e}" for value in handoffs)],
        [f"{big['shape'].upper()}-shaped layer: wall, peak memory against the plan",
         f"{big['wall_s']} s; {big['peak_gib']} GiB measured, {planned}"],
        [f"ONNX {onnx['dtype']} on {onnx['provider']}: max |Δlogit|, greedy match",
         f"{onnx['max_abs_error']:.2e}, {onnx['greedy_match']} ({onnx['greedy_tokens']} tokens)"],
        ["ONNX latency: prefill (128 tokens) / per token, against PyTorch",
         f"{onnx['prefill_ms_onnx']:.1f} / {onnx['decode_ms_per_token_onnx']:.2f} ms "
         f"(PyTorch {onnx['prefill_ms_torch']:.1f} / {onnx['decode_ms_per_token_torch']:.2f} ms)"],
    ]  # fmt: skip
    return ["check", "measured"], rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="every step on the CPU with a tiny model")
    parser.add_argument("--out", type=Path, default=None, help=f"results file [default: {RESULTS}; dry run: none]")
    args = parser.parse_args()
    if not args.dry_run and not torch.cuda.is_available():
        print(f"no CUDA device (torch {torch.__version__}): nothing to check here; --dry-run runs the steps on the CPU")
        return 0
    device = "cpu" if args.dry_run else "cuda"
    with tempfile.TemporaryDirectory(prefix="gpu_check-") as folder:
        work = Path(folder)
        if args.dry_run:
            model = build_checkpoint(work / "tiny", "tiny", 2)
            spec = CalibrationSpec("nq_open", samples=8, seq_len=32, batch_size=4)
        else:
            model, spec = embedded_model_dir(), CalibrationSpec("nq_open")
        convert, surgery = check_convert(model, spec, device, work)
        result = {
            "convert": convert,
            "big_layer": check_big_layer("tiny" if args.dry_run else "8b", device, work),
            "onnx": check_onnx(surgery, "fp32" if args.dry_run else "fp16", work),
        }
    name = torch.cuda.get_device_name() if device == "cuda" else "CPU (dry run)"
    columns, rows = table(result)
    record = {
        "title": "GPU acceptance (bench/gpu_check.py)",
        "what": "The embedded SmolLM2-135M converted on the GPU and on the CPU (README calibration, KPM rank 16), a "
        "bfloat16 forward, an 8B-shaped layer on the GPU, and the fp16 ONNX export on onnxruntime's CUDA provider.",
        "command": "python bench/gpu_check.py" + (" --dry-run" if args.dry_run else ""),
        "date": date.today().isoformat(),
        "commit": _commit(),
        "machine": f"{name}; torch {torch.__version__}",
        "source": "written by bench/gpu_check.py",
        "columns": columns,
        "rows": rows,
        "figures": result,
    }
    out = args.out or (None if args.dry_run else RESULTS)
    if out is not None:
        out.write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
