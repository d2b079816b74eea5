"""Golden data for tests/test_gptq.py: llm-compressor's own GPTQ on two fixed problems, so that the suite checks
corda_surgery's GPTQ against the reference it was written to match without installing it (llm-compressor 0.14
pins transformers<=5.17, the project needs a newer one).

Each case's weight and Hessian come from a seed (``oracle_case_inputs``, which the test imports to rebuild them);
the file keeps only what the reference made of them, its dequantised weights and its group scales (float32), in
``tests/data/gptq_oracle.safetensors``, with the versions, seeds and shapes in its metadata ("oracle", one JSON
string). The reference is llm-compressor's ``quantize_weight`` (blocksize 128, percdamp 0.01, no act-order) with
symmetric int4 group scales from compressed-tensors' ``calculate_qparams`` on the original weight's per-group
min/max, as its memoryless_minmax observer sets them. Run it in a virtual environment of its own, on the CPU:

    python3 -m venv V && V/bin/pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu
    V/bin/pip install llmcompressor==0.14.0.1 torch==2.13.0
    V/bin/python bench/gptq_oracle.py
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

GOLDEN = Path(__file__).resolve().parent.parent / "tests" / "data" / "gptq_oracle.safetensors"
BLOCKSIZE, PERCDAMP = 128, 0.01
SAMPLES = 2000  # calibration rows of X, H = XᵀX
# name → seed, weight shape (out, in), group size, inputs that never vary (zero row and column of H)
CASES: dict[str, dict] = {
    "a": {"seed": 0, "shape": [96, 384], "group_size": 128, "dead_columns": [3]},
    "b": {"seed": 1, "shape": [64, 256], "group_size": 32, "dead_columns": []},
}


def oracle_case_inputs(case: str) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Case ``case``'s weight (float32), Hessian (float64) and group size, rebuilt from its seed on the CPU.

    X is correlated (Gaussian times a Gaussian mixing matrix), so that GPTQ's error feedback has something to
    exploit, and rounded to integers: XᵀX is then exact in float64, whatever order a BLAS sums it in."""
    spec = CASES[case]
    (out_dim, in_dim), dead = spec["shape"], spec["dead_columns"]
    generator = torch.Generator().manual_seed(spec["seed"])
    weight = (torch.randn(out_dim, in_dim, generator=generator, dtype=torch.float64) * 0.05).float()
    mixing = torch.randn(in_dim, in_dim, generator=generator, dtype=torch.float64)
    x = (torch.randn(SAMPLES, in_dim, generator=generator, dtype=torch.float64) @ mixing).round()
    hessian = x.T @ x
    hessian[dead, :] = 0
    hessian[:, dead] = 0
    return weight, hessian, spec["group_size"]


def oracle(weight: torch.Tensor, hessian: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """llm-compressor's GPTQ of ``weight``: its dequantised weight and its (out, in / group_size) scales."""
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.utils import calculate_qparams
    from llmcompressor.modifiers.gptq.gptq_quantize import quantize_weight

    args = QuantizationArgs(num_bits=4, type="int", symmetric=True, strategy="group", group_size=group_size)
    groups = weight.unflatten(-1, (-1, group_size))
    scale, zero_point = calculate_qparams(groups.amin(-1), groups.amax(-1), args)
    dequantised, _, fell_back = quantize_weight(
        weights=weight[None].clone(),
        hessians=hessian.float()[None].clone(),
        scale=scale[None],
        zero_point=zero_point[None],
        global_scale=None,
        quant_args=args,
        blocksize=BLOCKSIZE,
        percdamp=PERCDAMP,
    )
    assert not bool(fell_back[0]), "the reference fell back to round-to-nearest"
    return dequantised[0].float().contiguous(), scale.float().contiguous()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=GOLDEN)
    args = parser.parse_args()
    from importlib.metadata import version

    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    for case in CASES:
        tensors[f"{case}.dequantised"], tensors[f"{case}.scales"] = oracle(*oracle_case_inputs(case))
    record = {package: version(package) for package in ("llmcompressor", "compressed-tensors", "torch")}
    record |= {"cases": CASES, "samples": SAMPLES, "blocksize": BLOCKSIZE, "percdamp": PERCDAMP}
    # one key: safetensors writes several in a random order, and a rerun would differ from the committed file
    metadata = {"oracle": json.dumps(record, sort_keys=True)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, args.out, metadata=metadata)
    print(f"{args.out}: {args.out.stat().st_size} bytes, {metadata}")


if __name__ == "__main__":
    main()
