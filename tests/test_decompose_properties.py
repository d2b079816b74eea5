"""Property-based: over random shapes, ranks, dtypes and conditioning the decomposition reconstructs the
weight, or raises the documented DecompositionError — never a silent NaN."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from corda_surgery.decomposition.decompose import DecompositionError, decompose_weight
from corda_surgery.decomposition.kinds import Mode, Solver


@st.composite
def cases(draw):
    out_dim = draw(st.integers(1, 24))
    in_dim = draw(st.integers(1, 24))
    rank = draw(st.integers(0, min(out_dim, in_dim) + 1))  # includes invalid 0 and min+1
    log_condition = draw(st.floats(0, 14))
    tokens = draw(st.integers(1, 3 * in_dim))
    seed = draw(st.integers(0, 2**16))
    weight_dtype = draw(st.sampled_from([torch.float32, torch.bfloat16, torch.float16]))
    solver = draw(st.sampled_from(list(Solver)))
    mode = draw(st.sampled_from(list(Mode)))
    zero_covariance = draw(st.integers(0, 9)) == 0  # one case in ten: a layer that saw no tokens
    return out_dim, in_dim, rank, log_condition, tokens, seed, weight_dtype, solver, mode, zero_covariance


@settings(max_examples=150, deadline=None)
@given(cases())
def test_reconstruction_or_documented_error(case):
    out_dim, in_dim, rank, log_condition, tokens, seed, weight_dtype, solver, mode, zero_covariance = case
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(out_dim, in_dim, generator=g).to(weight_dtype)
    scales = torch.logspace(0, -log_condition / 2, in_dim, dtype=torch.float64)
    x = torch.randn(tokens, in_dim, generator=g, dtype=torch.float64) * scales
    covariance = torch.zeros(in_dim, in_dim, dtype=torch.float64) if zero_covariance else x.T @ x / tokens
    try:
        d = decompose_weight(weight, covariance, rank=rank, mode=mode, solver=solver, name="layer")
    except DecompositionError as error:
        assert str(error).startswith("layer:")
        assert rank < 1 or rank > min(out_dim, in_dim) or zero_covariance
        return
    assert 1 <= rank <= min(out_dim, in_dim) and not zero_covariance
    for tensor in (d.lora_A, d.lora_B, d.residual):
        assert torch.isfinite(tensor).all()
    assert d.residual.dtype == weight_dtype
    rebuilt = d.residual.double() + d.scaling * d.lora_B.double() @ d.lora_A.double()
    # the residual is rounded once to the weight's dtype: error of that dtype's precision, relative to |W|
    # plus |s·B·A| (the IPM residual can be a small difference of large terms)
    scale = weight.double().norm() + (d.scaling * d.lora_B.double() @ d.lora_A.double()).norm()
    tolerance = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}[weight_dtype]
    assert float((rebuilt - weight.double()).norm()) <= tolerance * float(scale) + 1e-12
