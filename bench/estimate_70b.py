"""Paper estimate of a whole Llama-3-70B conversion, from FLOP counts and the rates `big_layer.py` measured.

Rates: the measured one-layer 70B-shaped run gives this CPU's effective float32 rate in calibration
(forward + covariance products) and float64 rate in decomposition. The GPU figures assume one 80 GB H100
SXM at half its nominal dense peak (989 TFLOP/s bfloat16, 67 TFLOP/s float64 tensor cores): a lower
bound, since eigen-solvers do not run at GEMM rates. Disk: the float64 covariance store, the bfloat16
residual and the adapter; I/O time at --disk-gbps for writing the store and reading it back, reading the
weights twice (calibration, surgery) and writing the residual, added to both.

    python bench/estimate_70b.py [--tokens 65536]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from corda_surgery.numerics import symmetric_tiles

RESULTS = Path(__file__).resolve().parent / "results" / "big_layer.jsonl"
HIDDEN, INTER, KV, LAYERS, VOCAB, RANK = 8192, 28672, 1024, 80, 128256, 16
LINEARS = {  # (out, in) of each target linear in one layer
    "q": (HIDDEN, HIDDEN), "k": (KV, HIDDEN), "v": (KV, HIDDEN), "o": (HIDDEN, HIDDEN),
    "gate": (INTER, HIDDEN), "up": (INTER, HIDDEN), "down": (HIDDEN, INTER),
}  # fmt: skip
INPUT_WIDTHS = (HIDDEN, HIDDEN, HIDDEN, INTER)  # q/k/v, o, gate/up, down
GPU_BF16, GPU_F64 = 0.5 * 989e12, 0.5 * 67e12


MEASURED_GRID_SHARE = 0.625  # the measured run's XᵀX: 10 of the 16 blocks of a 4 × 4 grid


def tiled_share(width: int) -> float:
    """The share of a full XᵀX that today's ``symmetric_tiles`` multiply (about 0.51 at these widths)."""
    return sum((r.stop - r.start) * (c.stop - c.start) for r, c in symmetric_tiles(width)) / width**2


def calibration_flops(tokens: int, measured_run: bool = False) -> float:
    """One layer's forward pass plus the XᵀX products, as the measured run did them or as the code does now."""
    params = sum(o * i for o, i in LINEARS.values())
    shares = [MEASURED_GRID_SHARE if measured_run else tiled_share(w) for w in INPUT_WIDTHS]
    return 2 * params * tokens + sum(2 * share * w * w * tokens for share, w in zip(shares, INPUT_WIDTHS, strict=True))


def decomposition_flops() -> float:
    """One layer's float64 work per linear: W·C, Cholesky, Gram matrix, symmetric eigen-decomposition (~9 m³)."""
    total = 0.0
    for out, width in LINEARS.values():
        small, large = min(out, width), max(out, width)
        total += 2 * out * width * width + width**3 / 3 + 2 * large * small * small + 9 * small**3
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=16 * 512, help="Calibration tokens of the whole run.")
    parser.add_argument("--disk-gbps", type=float, default=2.0, help="Sequential disk throughput, GB/s.")
    args = parser.parse_args()
    runs = [json.loads(line) for line in RESULTS.read_text().splitlines()]
    measured = next(r for r in runs if r["shape"] == "70b" and r["layers"] == 1 and r["targets"] == "all-linear")
    bench_tokens = 16 * 512
    cpu_f32 = calibration_flops(bench_tokens, measured_run=True) / measured["phase_s"]["calibration"]
    cpu_f64 = decomposition_flops() / measured["phase_s"]["decomposition"]
    store = LAYERS * sum(w * w * 8 for w in INPUT_WIDTHS)
    residual = 2 * (LAYERS * sum(o * i for o, i in LINEARS.values()) + 2 * VOCAB * HIDDEN)
    io_hours = (2 * store + 3 * residual) / (args.disk_gbps * 1e9) / 3600
    cpu_hours = LAYERS * (calibration_flops(args.tokens) / cpu_f32 + decomposition_flops() / cpu_f64) / 3600 + io_hours
    gpu_hours = LAYERS * (calibration_flops(args.tokens) / GPU_BF16 + decomposition_flops() / GPU_F64) / 3600 + io_hours
    adapter = LAYERS * sum((o + i) * RANK * 4 for o, i in LINEARS.values())
    print(json.dumps({
        "tokens": args.tokens,
        "cpu_rates_gflops": {"float32 calibration": round(cpu_f32 / 1e9, 1),
                             "float64 decomposition": round(cpu_f64 / 1e9, 1)},
        "per_layer_tflop": {"calibration": round(calibration_flops(args.tokens) / 1e12, 1),
                            "decomposition": round(decomposition_flops() / 1e12, 1)},
        "hours": {"this CPU": round(cpu_hours, 1), "one H100 80GB (half peak)": round(gpu_hours, 2),
                  "of which disk I/O": round(io_hours, 2)},
        "disk_gb": {"covariance store": round(store / 1e9), "residual (bf16)": round(residual / 1e9),
                    "adapter": round(adapter / 1e9, 2)},
    }, indent=2))  # fmt: skip


if __name__ == "__main__":
    main()
