import pytest
import torch

from corda_surgery.decomposition.decompose import DecompositionError, damped_covariance, decompose_weight
from corda_surgery.decomposition.kinds import Mode, Solver
from corda_surgery.surgery.options import OptionsError, SurgeryOptions
from tests.helpers import relative


def _covariance(dim: int, tokens: int, seed: int = 0, dtype=torch.float64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, dim, generator=g, dtype=dtype) * torch.logspace(0, 2, dim, dtype=dtype)
    return x.T @ x / tokens


def _ill_conditioned(dim: int, condition: float, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(dim, dim, generator=g, dtype=torch.float64))
    eigenvalues = torch.logspace(0, -torch.log10(torch.tensor(condition)).item(), dim, dtype=torch.float64)
    return (q * eigenvalues) @ q.T


COVARIANCES = {
    "random": lambda: _covariance(48, 500),
    "condition_1e12": lambda: _ill_conditioned(48, 1e12),
    "rank_deficient": lambda: _covariance(48, 20),  # fewer tokens than dimensions
}


@pytest.mark.parametrize("kind", sorted(COVARIANCES))
@pytest.mark.parametrize("mode", list(Mode))
@pytest.mark.parametrize("solver", list(Solver))
@pytest.mark.parametrize("factor_dtype", [torch.float32, torch.float64])
def test_reconstruction(kind, mode, solver, factor_dtype):
    weight = torch.randn(40, 48, generator=torch.Generator().manual_seed(1))
    d = decompose_weight(
        weight, COVARIANCES[kind](), rank=8, mode=mode, alpha=16, solver=solver, factor_dtype=factor_dtype, name="w"
    )
    assert d.lora_A.shape == (8, 48) and d.lora_B.shape == (40, 8)
    assert d.lora_A.dtype == d.lora_B.dtype == factor_dtype
    assert d.residual.dtype == weight.dtype and d.residual.shape == weight.shape
    rebuilt = d.residual.double() + d.scaling * (d.lora_B.double() @ d.lora_A.double())
    assert relative(rebuilt, weight) < 1e-5
    assert d.scaling == 2.0


@pytest.mark.parametrize("mode", list(Mode))
def test_conv1d_transposed_weight(mode):
    conv_weight = torch.randn(48, 40)  # GPT-2 Conv1D stores (in, out)
    d = decompose_weight(conv_weight, _covariance(48, 300), rank=4, mode=mode, transposed=True, name="c_attn")
    assert d.residual.shape == (48, 40)
    assert d.lora_A.shape == (4, 48) and d.lora_B.shape == (40, 4)
    rebuilt = d.residual.T.double() + d.scaling * (d.lora_B.double() @ d.lora_A.double())
    assert relative(rebuilt, conv_weight.T) < 1e-5


@pytest.mark.parametrize("mode", list(Mode))
def test_mode_picks_smallest_or_largest_components(mode):
    weight = torch.randn(40, 48, dtype=torch.float64)
    cov = _covariance(48, 500)
    rank = 6
    d = decompose_weight(weight, cov, rank=rank, mode=mode, solver=Solver.SVD, factor_dtype=torch.float64)
    damped = cov + 0.01 * cov.diagonal().mean() * torch.eye(48, dtype=torch.float64)
    u, s, vh = torch.linalg.svd(weight @ damped, full_matrices=False)
    cut = slice(0, rank) if mode is Mode.IPM else slice(len(s) - rank, len(s))
    expected = u[:, cut] @ torch.diag(s[cut]) @ vh[cut] @ torch.linalg.inv(damped)
    assert relative(d.scaling * d.lora_B @ d.lora_A, expected) < 1e-10
    assert d.spectrum is not None and torch.allclose(d.spectrum, s) and torch.allclose(d.kept, s[cut])
    kept = s[cut].square().sum() / s.square().sum()
    assert d.adapter_energy == pytest.approx(float(kept))


def test_plain_svd_without_covariance_is_pissa_or_milora():
    weight = torch.randn(30, 20, dtype=torch.float64)
    u, s, vh = torch.linalg.svd(weight, full_matrices=False)
    pissa = decompose_weight(weight, None, rank=3, mode=Mode.IPM, solver=Solver.SVD, factor_dtype=torch.float64)
    milora = decompose_weight(weight, None, rank=3, mode=Mode.KPM, solver=Solver.SVD, factor_dtype=torch.float64)
    assert torch.allclose(pissa.lora_B @ pissa.lora_A, u[:, :3] @ torch.diag(s[:3]) @ vh[:3])
    assert torch.allclose(milora.lora_B @ milora.lora_A, u[:, -3:] @ torch.diag(s[-3:]) @ vh[-3:])


def test_damping_grows_when_not_definite(caplog):
    cov = torch.diag(torch.tensor([1.0, 1.0, -0.5, 1.0], dtype=torch.float64))  # indefinite
    d = decompose_weight(torch.randn(4, 4), cov, rank=2, mode=Mode.IPM, name="layers.0.q_proj")
    assert d.damping > 0.01
    assert "layers.0.q_proj" in caplog.text


@pytest.mark.parametrize(
    "weight, cov, rank, message",
    [
        (torch.randn(8, 6), torch.eye(6), 7, "rank 7 is outside 1..6"),
        (torch.randn(8, 6), torch.eye(6), 0, "rank 0 is outside"),
        (torch.randn(8, 6), torch.eye(5), 2, "covariance has shape (5, 5), expected (6, 6)"),
        (torch.full((8, 6), float("nan")), torch.eye(6), 2, "weight contains NaN or Inf"),
        (torch.randn(8, 6), torch.full((6, 6), float("inf")), 2, "covariance contains NaN or Inf"),
        (torch.randn(8, 6), torch.zeros(6, 6), 2, "covariance is zero"),
        (torch.randn(8, 6), -torch.eye(6), 2, "covariance is zero or negative"),
    ],
)
def test_bad_input_names_the_layer(weight, cov, rank, message):
    with pytest.raises(DecompositionError, match=r"model\.layers\.3\.mlp\.up_proj") as error:
        decompose_weight(weight, cov, rank=rank, mode=Mode.KPM, name="model.layers.3.mlp.up_proj")
    assert message in str(error.value)


@pytest.mark.parametrize("mode", list(Mode))
@pytest.mark.parametrize("damping", [0.01, 0.0])
def test_a_shared_damped_covariance_gives_the_same_factors_bit_for_bit(mode, damping, caplog):
    """q/k/v read one input: damping and factorising it once must change nothing. Damping 0 on a rank-deficient
    covariance takes the raised-damping path, where the per-linear route shifts W·C by Δλ·W instead of
    forming it anew: there the two agree to float64 rounding amplified by a 1e-8-damped, rank-deficient C⁻¹."""
    cov = _covariance(48, 20)
    shared = damped_covariance(cov, damping, 48, "layers.0.q_proj")
    assert shared.damping > 0 if damping == 0 else shared.damping == damping
    for out_dim in (40, 16):  # q_proj and the narrower k_proj
        weight = torch.randn(out_dim, 48, generator=torch.Generator().manual_seed(out_dim))
        alone = decompose_weight(weight, cov, rank=8, mode=mode, damping=damping, name="w")
        reused = decompose_weight(weight, shared, rank=8, mode=mode, damping=damping, name="w")
        for field in ("lora_A", "lora_B", "residual", "kept"):
            a, b = getattr(alone, field), getattr(reused, field)
            assert torch.equal(a, b) if damping else relative(b, a) <= 1e-5, field
        assert alone.damping == reused.damping
    assert torch.equal(shared.damped, cov + shared.damping * cov.diagonal().mean() * torch.eye(48, dtype=torch.float64))
    with pytest.raises(DecompositionError, match="w: covariance is 48 wide, the weight reads 40"):
        decompose_weight(torch.randn(8, 40), shared, rank=2, mode=mode, name="w")


def test_never_definite_is_an_error_not_a_loop():
    cov = torch.tensor([[1.0, 1e9], [1e9, 1.0]], dtype=torch.float64)  # mean diag 1, eigenvalue −1e9
    with pytest.raises(DecompositionError, match="not positive definite even with damping"):
        decompose_weight(torch.randn(2, 2), cov, rank=1, mode=Mode.IPM, name="w")


@pytest.mark.parametrize("field", ["mode", "solver"])
def test_a_value_outside_the_enum_is_named(field):
    chosen = {"mode": Mode.KPM, "solver": Solver.GRAM} | {field: "big"}
    with pytest.raises(DecompositionError, match=f"w: {field} must be one of .*, got 'big'"):
        decompose_weight(torch.randn(3, 3), torch.eye(3), rank=1, name="w", **chosen)


def test_the_solver_is_a_member_and_its_label_is_what_surgery_json_records():
    weight = torch.randn(40, 48, generator=torch.Generator().manual_seed(2))
    d = decompose_weight(weight, _covariance(48, 500), rank=4, mode=Mode.IPM, solver=Solver.GRAM)
    assert d.solver is Solver.GRAM and not d.fell_back and d.solver_label == "gram"
    assert decompose_weight(weight, None, rank=4, mode="kpm", solver="svd").solver is Solver.SVD  # values accepted


@pytest.mark.parametrize("mode", list(Mode))
def test_balanced_components_have_equal_norms_and_the_same_product(mode):
    weight = torch.randn(40, 48, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    covariance = _covariance(48, 500)
    plain = decompose_weight(weight, covariance, rank=6, mode=mode, factor_dtype=torch.float64)
    even = decompose_weight(weight, covariance, rank=6, mode=mode, factor_dtype=torch.float64, balance=True)
    assert torch.allclose(even.lora_A.norm(dim=1), even.lora_B.norm(dim=0), rtol=1e-12)
    assert relative(even.lora_B @ even.lora_A, plain.lora_B @ plain.lora_A) < 1e-13
    assert relative(even.residual, plain.residual) < 1e-13


def test_balance_is_refused_without_a_decomposition():
    with pytest.raises(OptionsError, match=r"^balance needs a decomposition"):
        SurgeryOptions.of(method="lora", balance=True)


FIELDS = ("lora_A", "lora_B", "residual", "kept")


def _toeplitz(dim: int, rho: float) -> torch.Tensor:
    """ρ^|i−j|: a spread spectrum over a constant (unit) diagonal."""
    index = torch.arange(dim, dtype=torch.float64)
    return rho ** (index[:, None] - index[None, :]).abs()


@pytest.mark.parametrize("mode", list(Mode))
@pytest.mark.parametrize(
    "covariance",
    [lambda: 0.37 * torch.eye(48, dtype=torch.float64), lambda: _toeplitz(48, 0.9)],
    ids=["flat", "toeplitz"],
)
def test_the_median_rule_is_the_mean_rule_where_no_dimension_dominates(mode, covariance):
    """Where every input varies alike (a flat spectrum, or any spectrum over a constant diagonal), the median
    of diag C is its mean, so both rules damp alike and give the same adapter and residual."""
    cov = covariance()
    weight = torch.randn(40, 48, generator=torch.Generator().manual_seed(1))
    mean = decompose_weight(weight, cov, rank=8, mode=mode, name="w")
    median = decompose_weight(weight, cov, rank=8, mode=mode, damping_rule="median-diagonal", name="w")
    for field in FIELDS:
        assert relative(getattr(median, field), getattr(mean, field)) <= 1e-12, field
    assert (mean.damping_rule, median.damping_rule) == ("mean-diagonal", "median-diagonal")
    assert mean.damping_level == 0.01 and median.damping_level == pytest.approx(0.01, rel=1e-12)


def test_massive_dimensions_raise_the_mean_rule_not_the_median():
    """Two dimensions 10⁴× the rest: λ·mean(diag C) lies above every other eigenvalue, λ·median(diag C) below
    them all, so only the mean rule's KPM adapter takes the damping's directions; the median rule's level, in
    the mean rule's units, is the median over the mean."""
    from corda_surgery.decomposition.diagnostics import eigenvalues_below_damping

    variances = torch.ones(48, dtype=torch.float64)
    variances[:2] = 1e4
    x = torch.randn(4000, 48, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * variances.sqrt()
    cov = x.T @ x / 4000
    assert eigenvalues_below_damping(cov) == 46 and eigenvalues_below_damping(cov, rule="median-diagonal") == 0
    weight = torch.randn(40, 48, generator=torch.Generator().manual_seed(1))
    median = decompose_weight(weight, cov, rank=8, mode="kpm", damping_rule="median-diagonal", name="w")
    diagonal = cov.diagonal()
    assert median.damping_level == pytest.approx(0.01 * float(diagonal[diagonal > 0].median() / diagonal.mean()))
    assert median.damping_level < 1e-4


@pytest.mark.parametrize("mode", list(Mode))
def test_a_shared_covariance_under_the_median_rule_gives_the_same_factors_bit_for_bit(mode):
    cov = _covariance(48, 500)
    shared = damped_covariance(cov, 0.01, 48, "layers.0.q_proj", rule="median-diagonal")
    scale = float(cov.diagonal().median())
    assert torch.equal(shared.damped, cov + 0.01 * scale * torch.eye(48, dtype=torch.float64))
    assert shared.level == pytest.approx(0.01 * scale / float(cov.diagonal().mean()))
    weight = torch.randn(40, 48, generator=torch.Generator().manual_seed(40))
    alone = decompose_weight(weight, cov, rank=8, mode=mode, damping_rule="median-diagonal", name="w")
    reused = decompose_weight(weight, shared, rank=8, mode=mode, damping_rule="median-diagonal", name="w")
    for field in FIELDS:
        assert torch.equal(getattr(alone, field), getattr(reused, field)), field
    assert alone.damping_level == reused.damping_level


def test_the_damping_rule_is_a_member_and_named_in_the_error():
    options = SurgeryOptions.of(damping_rule="median-diagonal")
    assert options.decomposition.damping_rule.value == "median-diagonal"
    with pytest.raises(OptionsError, match=r"^damping_rule 'median'"):
        SurgeryOptions.of(damping_rule="median")
