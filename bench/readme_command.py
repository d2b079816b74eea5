"""The README's main command against its own arithmetic floor (issue 19's "within 1.5× of its floor").

Runs `corda-surgery convert --out OUT` (the embedded SmolLM2-135M, its default calibration) as a new user
would, timed by /usr/bin/time, after one untimed run that fills the GGUF cache (a new user pays that once:
it is reported separately). The floor is the GEMM work any CorDA implementation must do, at this machine's
measured float32 / float64 matrix-multiply rates:
- forward: 2 · (parameters of the linears of every block) · tokens, and attention's two products over the
  causal half of each window, 2 · hidden · window · tokens per block (float32);
- covariance: one symmetric XᵀX per distinct input, width² · tokens (float32: half a GEMM);
- decomposition (float64): per linear W·C (2·out·in²), the symmetric Gram matrix of its tall side (m·n², n
  the smaller side: half a GEMM) and a symmetric eigen-decomposition with vectors of it (10/3·n³); per shared
  input one Cholesky factor (in³/3).
Start-up, reading and writing have no floor: they count against the ratio.

    python bench/readme_command.py [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from vs_peft import matmul_gflops  # bench/ is on the path when this script runs

REPO = Path(__file__).resolve().parents[1]


def linear_shapes(config: dict) -> list[tuple[str, int, int]]:
    """(name, out, in) of a Llama-style block's seven linears, grouped-query attention included."""
    h, i = config["hidden_size"], config["intermediate_size"]
    kv = h // config["num_attention_heads"] * config.get("num_key_value_heads", config["num_attention_heads"])
    return [("q", h, h), ("k", kv, h), ("v", kv, h), ("o", h, h), ("gate", i, h), ("up", i, h), ("down", h, i)]


def floor_seconds(config: dict, tokens: int, window: int, rate32: float, rate64: float) -> dict[str, float]:
    layers = config["num_hidden_layers"]
    shapes = linear_shapes(config)
    h, i = config["hidden_size"], config["intermediate_size"]
    forward = (2 * sum(o * n for _, o, n in shapes) + 2 * h * window) * tokens * layers
    covariance = (3 * h * h + i * i) * tokens * layers  # distinct inputs: q/k/v, o, gate/up, down
    decomposition = layers * (
        sum(2 * o * n * n + max(o, n) * min(o, n) ** 2 + 10 / 3 * min(o, n) ** 3 for _, o, n in shapes)
        + (3 * h**3 + i**3) / 3
    )
    return {
        "forward": forward / rate32 / 1e9,
        "covariance": covariance / rate32 / 1e9,
        "decomposition": decomposition / rate64 / 1e9,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=None, help="output folder [default: a temporary one]")
    settings = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="readme-command-"))
    out = settings.out or work / "smollm2-kpm"
    console = shutil.which("corda-surgery") or str(Path(sys.executable).parent / "corda-surgery")
    subprocess.run([console, "convert", "--out", str(work / "warm"), "--samples", "1", "--seq-len", "8"],
                   check=True, capture_output=True)  # fmt: skip
    shutil.rmtree(work / "warm")
    command = ["/usr/bin/time", "-v", console, "convert", "--out", str(out)]
    started = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, check=True)
    wall = time.perf_counter() - started
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", result.stderr).group(1)) / 1024
    report = json.loads((out / "surgery.json").read_text())
    calibration = report["covariance_stores"][0]["calibration"]
    tokens, window = calibration["tokens"], calibration["seq_len"]
    config = json.loads((out / "config.json").read_text())
    rate32, rate64 = matmul_gflops(torch.float32), matmul_gflops(torch.float64)
    floor = floor_seconds(config, tokens, window, rate32, rate64)
    total = sum(floor.values())
    print(json.dumps({
        "command": "corda-surgery convert --out OUT", "tokens": tokens, "wall_s": round(wall, 1),
        "peak_rss_mb": round(rss), "gflops_float32": round(rate32), "gflops_float64": round(rate64),
        "floor_s": {k: round(v, 1) for k, v in floor.items()}, "floor_total_s": round(total, 1),
        "ratio": round(wall / total, 2),
    }, indent=2))  # fmt: skip
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
