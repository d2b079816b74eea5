"""Only the r kept pairs (``--solver subspace``): the same subspace and factors as the full float64 SVD
where the cut has a gap, and, wherever it has none, a fallback that still rebuilds the weight exactly."""

import pytest
import torch

from corda_surgery.decomposition import eigenpairs
from corda_surgery.decomposition.decompose import decompose_weight
from corda_surgery.decomposition.eigenpairs import extreme_eigenpairs, largest_eigenvalue
from corda_surgery.decomposition.kinds import Mode, Solver
from corda_surgery.decomposition.solvers import kept_pairs
from tests.helpers import relative

RANK = 8


@pytest.fixture
def iterate_whatever_it_costs(monkeypatch):
    """At these sizes the full eigen-decomposition is cheaper than iterating, and the solver says so; the
    accuracy tests lift that budget so that the iteration itself runs."""
    monkeypatch.setattr(eigenpairs, "STEPS_PER_WIDTH_OVER_BLOCK", 1e9)


def _with_spectrum(rows: int, columns: int, singular_values: torch.Tensor, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(rows, columns, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(columns, columns, generator=g, dtype=torch.float64))
    return (u * singular_values) @ v.T


def _sine_of_largest_angle(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest principal angle between the column spaces of two orthonormal bases."""
    cosines = torch.linalg.svdvals(a.T @ b)
    return float((1 - cosines.min().square()).clamp_min(0).sqrt())


def _gapped(columns: int, mode: Mode) -> torch.Tensor:
    """A decaying spectrum with a 30 % gap at the cut of ``mode``."""
    s = torch.logspace(0, -2, columns, dtype=torch.float64)
    if mode is Mode.IPM:
        s[RANK:] *= 0.7
    else:
        s[: columns - RANK] /= 0.7
    return s.sort(descending=True).values


@pytest.mark.parametrize("mode", list(Mode))
@pytest.mark.parametrize("shape", [(400, 200), (200, 400)])
@pytest.mark.usefixtures("iterate_whatever_it_costs")
def test_kept_pairs_agree_with_the_full_svd_where_the_cut_has_a_gap(mode, shape):
    rows, columns = shape
    matrix = _with_spectrum(max(shape), min(shape), _gapped(min(shape), mode))
    matrix = matrix if rows >= columns else matrix.T
    found = kept_pairs(matrix, RANK, mode, solver=Solver.SUBSPACE)
    exact = kept_pairs(matrix, RANK, mode, solver=Solver.SVD)
    gram = kept_pairs(matrix, RANK, mode, solver=Solver.GRAM)
    assert found.solver is Solver.SUBSPACE and not found.fell_back and found.spectrum is None
    # The Gram side's vectors within 1e-6; the other side's (M·v/σ) amplify that error by σ₁/σ, 100 at the
    # KPM cut here: within 1e-6 or as close as the full Gram eigen-decomposition gets, whichever is larger.
    for side in ("u", "vh"):
        ours, reference, full = (getattr(p, side) for p in (found, exact, gram))
        ours, reference, full = (t if side == "u" else t.T for t in (ours, reference, full))
        bound = max(1e-6, 2 * _sine_of_largest_angle(full, reference))
        assert _sine_of_largest_angle(ours, reference) <= bound, side
    assert relative(found.s, exact.s) <= 1e-10  # the same order: descending
    assert found.total_energy == pytest.approx(exact.total_energy, rel=1e-12)


@pytest.mark.parametrize("mode", list(Mode))
@pytest.mark.usefixtures("iterate_whatever_it_costs")
def test_factors_agree_with_the_float64_svd_path(mode):
    g = torch.Generator().manual_seed(1)
    weight = _with_spectrum(300, 160, _gapped(160, mode), seed=2)
    x = torch.randn(2000, 160, generator=g, dtype=torch.float64)
    covariance = x.T @ x / 2000
    ours = decompose_weight(
        weight, covariance, rank=RANK, mode=mode, solver=Solver.SUBSPACE, factor_dtype=torch.float64
    )
    exact = decompose_weight(weight, covariance, rank=RANK, mode=mode, solver=Solver.SVD, factor_dtype=torch.float64)
    assert ours.solver is Solver.SUBSPACE and not ours.fell_back
    assert relative(ours.lora_B @ ours.lora_A, exact.lora_B @ exact.lora_A) <= 1e-6
    assert ours.adapter_energy == pytest.approx(exact.adapter_energy, rel=1e-10)
    assert relative(ours.residual + ours.lora_B @ ours.lora_A, weight) <= 1e-14


@pytest.mark.parametrize("mode", list(Mode))
@pytest.mark.usefixtures("iterate_whatever_it_costs")
def test_a_cut_inside_a_cluster_falls_back_and_still_rebuilds_the_weight(mode):
    """Equal singular values around the cut: whichever r of them are kept (iteration may converge on any, fall
    back to the full eigen-decomposition, or, with no gap to resolve the cut by, to the SVD), residual + adapter
    still give W."""
    s = torch.logspace(0, -3, 200, dtype=torch.float64)
    middle = RANK if mode is Mode.IPM else 200 - RANK
    cluster = slice(middle - 8, min(200, middle + 16))
    s[cluster] = s[middle] * (1 + 1e-13 * torch.arange(cluster.stop - cluster.start, dtype=torch.float64))
    weight = _with_spectrum(300, 200, s.sort(descending=True).values, seed=3)
    result = decompose_weight(weight, None, rank=RANK, mode=mode, solver=Solver.SUBSPACE, factor_dtype=torch.float64)
    assert (result.solver, result.fell_back) in ((Solver.SUBSPACE, False), (Solver.GRAM, False), (Solver.SVD, True))
    assert relative(result.residual + result.lora_B @ result.lora_A, weight) <= 1e-14


def test_small_matrices_and_singular_grams_are_left_to_the_full_solver():
    small = _with_spectrum(60, 40, torch.logspace(0, -2, 40, dtype=torch.float64))
    assert extreme_eigenpairs(small.T @ small, RANK, largest=True) is None  # block ≥ a quarter of n
    rank_deficient = _with_spectrum(400, 200, torch.cat([torch.ones(100), torch.zeros(100)]).double())
    assert extreme_eigenpairs(rank_deficient.T @ rank_deficient, RANK, largest=False) is None


@pytest.mark.parametrize("solver", [Solver.GRAM, Solver.SUBSPACE])
def test_a_cut_below_the_gram_resolution_takes_the_svd(solver):
    """Smallest singular values near 1e-7·σ₁ are lost in the Gram matrix's rounding (ε·σ₁²): KPM there takes
    the SVD of the product, recorded as such, and matches it."""
    s = torch.cat([torch.logspace(0, -2, 180, dtype=torch.float64), torch.logspace(-6.5, -7, 20, dtype=torch.float64)])
    weight = _with_spectrum(300, 200, s, seed=5)
    found = decompose_weight(weight, None, rank=RANK, mode=Mode.KPM, solver=solver, factor_dtype=torch.float64)
    exact = decompose_weight(weight, None, rank=RANK, mode=Mode.KPM, solver=Solver.SVD, factor_dtype=torch.float64)
    assert found.solver is Solver.SVD and found.fell_back  # subspace: the full eigh measured the gap
    assert found.solver_label == "svd (gram could not resolve the cut)"  # what surgery.json records
    assert relative(found.lora_B @ found.lora_A, exact.lora_B @ exact.lora_A) <= 1e-12


@pytest.mark.parametrize("largest", [True, False])
def test_iteration_runs_where_it_pays_and_declines_a_dense_cut(largest):
    """With the production budget: a 10× gap at the cut converges (and matches eigh); the smallest pairs of a
    random Gram matrix (a dense Marchenko–Pastur edge: ρ near 1) are declined, for the full eigen-decomposition."""
    n = 600
    s = torch.logspace(0, -2, n, dtype=torch.float64)
    if largest:
        s[RANK:] /= 10
    else:
        s[: n - RANK] *= 10
    gapped = _with_spectrum(n, n, s.sort(descending=True).values, seed=6)
    gram = gapped.T @ gapped
    found = extreme_eigenpairs(gram, RANK, largest=largest)
    budget = eigenpairs.STEPS_PER_WIDTH_OVER_BLOCK * n / eigenpairs._block_width(n, RANK)
    assert found is not None and found.iterations <= budget
    values, vectors = torch.linalg.eigh(gram)
    wanted = slice(n - RANK, n) if largest else slice(0, RANK)
    assert _sine_of_largest_angle(found.vectors, vectors[:, wanted]) <= 1e-6
    assert relative(found.values.sort().values, values[wanted]) <= 1e-10
    if not largest:
        random = torch.randn(2 * n, n, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
        assert extreme_eigenpairs(random.T @ random, RANK, largest=False) is None


def test_largest_eigenvalue_is_within_a_few_per_cent():
    for seed, spectrum in enumerate([torch.logspace(0, -3, 500), torch.ones(500) + torch.rand(500) * 1e-2]):
        matrix = _with_spectrum(500, 500, spectrum.double().sort(descending=True).values, seed=seed)
        estimate = largest_eigenvalue(matrix.T @ matrix)
        top = float(spectrum.max()) ** 2
        assert 0.95 * top <= estimate <= top * (1 + 1e-12)
