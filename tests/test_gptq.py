"""GPTQ against the reference it was written to match, llm-compressor 0.14's ``quantize_weight``, which cannot be
installed beside the project (it pins transformers<=5.17).

``tests/data/gptq_oracle.safetensors`` holds what the reference made of two fixed problems (its dequantised weights
and group scales, float32); the problems themselves are rebuilt here from the seeds by
``bench.gptq_oracle.oracle_case_inputs``. To regenerate the file (after changing a case, or to check a new
llm-compressor), run ``bench/gptq_oracle.py`` in the virtual environment its docstring describes. The comparison is
exact: both sides round in float32 in the same order; a CPU whose BLAS summed differently could flip one rounding,
and its error feedback then changes the rest of that row, which the failure message shows.
"""

from __future__ import annotations

import json

import pytest
import torch
from compressed_tensors.quantization import QuantizationArgs
from compressed_tensors.quantization.utils import calculate_qparams
from safetensors import safe_open

from bench.gptq_oracle import CASES, GOLDEN, oracle_case_inputs
from corda_surgery.decomposition.decompose import DecompositionError
from corda_surgery.decomposition.gptq import Q_MAX, Q_MIN, gptq_quantise, group_scales


def golden(case: str) -> tuple[torch.Tensor, torch.Tensor, dict[str, str]]:
    with safe_open(GOLDEN, "pt") as file:
        return file.get_tensor(f"{case}.dequantised"), file.get_tensor(f"{case}.scales"), file.metadata()


def hessian_error(weight: torch.Tensor, rounded: torch.Tensor, hessian: torch.Tensor) -> float:
    """tr(ΔW H ΔWᵀ): how far the layer's outputs on the calibration inputs move, summed over them."""
    delta = (weight - rounded).double()
    return float(torch.trace(delta @ hessian.double() @ delta.T))


@pytest.mark.parametrize("case", sorted(CASES))
def test_gptq_equals_llm_compressor_exactly(case):
    reference, reference_scales, metadata = golden(case)
    assert json.loads(metadata["oracle"])["cases"][case] == CASES[case], "the cases changed: rerun bench/gptq_oracle.py"
    weight, hessian, group_size = oracle_case_inputs(case)
    ours = gptq_quantise(weight, hessian, group_size=group_size, name=f"case {case}")
    assert ours.scales.dtype == torch.float32 and torch.equal(ours.scales, reference_scales)
    differ = ours.dequantised != reference
    assert not differ.any(), f"{int(differ.sum())} weights differ, in rows {differ.any(dim=1).nonzero().flatten()}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("group_size", [32, 128])
def test_group_scales_are_compressed_tensors_own(dtype, group_size):
    """The installed compressed-tensors, live: the scales its observer would set, a zero group included."""
    weight = torch.randn(24, 256, generator=torch.Generator().manual_seed(7)) * 0.03
    weight[2, :group_size] = 0
    weight[5, -group_size:] = -weight[5, -group_size:].abs()  # a group whose largest magnitude is its minimum
    scale_dtype = None if dtype == torch.float32 else dtype
    args = QuantizationArgs(
        num_bits=4, type="int", symmetric=True, strategy="group", group_size=group_size, scale_dtype=scale_dtype
    )
    groups = weight.unflatten(-1, (-1, group_size))
    theirs, _ = calculate_qparams(groups.amin(-1), groups.amax(-1), args)
    ours = group_scales(weight, group_size, dtype)
    assert ours.dtype == dtype and torch.equal(ours.float(), theirs)


def test_gptq_moves_the_outputs_less_than_rounding_to_nearest():
    """Case (a) measures 2.08 times less error in the Hessian's metric than rounding each weight on the same scales;
    1.5 leaves room for a different case without letting the error feedback go unused."""
    weight, hessian, group_size = oracle_case_inputs("a")
    gptq = gptq_quantise(weight, hessian, group_size=group_size)
    scales = gptq.scales.repeat_interleave(group_size, dim=1)
    nearest = torch.clamp(torch.round(weight / scales), Q_MIN, Q_MAX) * scales
    assert hessian_error(weight, nearest, hessian) > 1.5 * hessian_error(weight, gptq.dequantised, hessian)


def test_inputs_that_never_varied_get_zero_codes():
    weight, hessian, group_size = oracle_case_inputs("a")
    dead = CASES["a"]["dead_columns"]
    assert dead and bool((hessian[dead].abs().sum(dim=1) == 0).all())
    codes = gptq_quantise(weight, hessian, group_size=group_size).codes
    assert bool((codes[:, dead] == 0).all()) and bool((weight[:, dead] != 0).any())


def test_a_group_size_that_does_not_divide_the_inputs_is_refused_naming_the_layer():
    with pytest.raises(DecompositionError, match=r"model\.layers\.0\.mlp\.down_proj: 100 inputs .* groups of 32"):
        gptq_quantise(torch.randn(4, 100), torch.eye(100), group_size=32, name="model.layers.0.mlp.down_proj")
