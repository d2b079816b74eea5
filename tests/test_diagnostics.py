"""The damping's diagnosis on synthetic covariances: what limits the directions a KPM adapter takes where at
least its rank of covariance eigenvalues lie below the damping level."""

import pytest
import torch

from corda_surgery.decomposition.diagnostics import DampingLimit, damping_limit, eigenvalues_below_damping

RANK = 8


def _counts(population: torch.Tensor, tokens: int, seed: int) -> tuple[int, int, int, int]:
    """(width, count below the damping on all tokens, tokens, the count on the first half), the tokens drawn
    from a zero-mean Gaussian with covariance ``population``."""
    generator = torch.Generator().manual_seed(seed)
    width = population.shape[0]
    root = torch.linalg.cholesky(population)
    x = torch.randn(tokens, width, generator=generator, dtype=torch.float64) @ root.T
    half = x[: tokens // 2]
    below, below_half = eigenvalues_below_damping(x.T @ x), eigenvalues_below_damping(half.T @ half)
    assert below is not None and below_half is not None
    return width, below, tokens, below_half


@pytest.mark.parametrize("seed", range(4))
def test_a_massive_dimension_is_spectrum_limited_whatever_the_tokens(seed):
    """A few dimensions 10⁴× the others put 0.01·mean(diag C) above every ordinary eigenvalue: the count hardly
    moves between half and all of many tokens, and the diagnosis says that the spectrum limits it."""
    variances = torch.ones(64, dtype=torch.float64)
    variances[:4] = 1e4
    width, below, tokens, below_half = _counts(torch.diag(variances), 4096, seed)
    assert below == below_half == 60  # every ordinary direction, at half the tokens as at all of them
    assert damping_limit(width, RANK, below, tokens, below_half, tokens // 2) is DampingLimit.SPECTRUM


UNDER_SAMPLED = {
    "flat, fewer tokens than width": (torch.eye(64, dtype=torch.float64), [24, 40, 56]),
    # no dimension dominates, none below the level; twice as many tokens as width spread the smallest below it
    "spread, twice the width": (torch.diag(torch.logspace(0, -2.5, 256, dtype=torch.float64)), [512]),
}


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("case", UNDER_SAMPLED)
def test_an_under_sampled_covariance_is_sample_limited(seed, case):
    """A covariance without massive dimensions seen through few tokens has at least the rank of eigenvalues
    below the level, and more at half the tokens: the sample limits it, more tokens lift them."""
    population, token_counts = UNDER_SAMPLED[case]
    for tokens in token_counts:
        width, below, tokens, below_half = _counts(population, tokens, seed)
        assert below >= RANK and below_half > below, tokens
        assert damping_limit(width, RANK, below, tokens, below_half, tokens // 2) is DampingLimit.SAMPLE, tokens


def test_massive_dimensions_over_a_spread_spectrum_are_spectrum_limited():
    """Three dimensions 3000× the rest over a spectrum spread tenfold: most directions stay below the level from
    512 to 4096 tokens (rank-deficient half or not), and the diagnosis says the spectrum limits them."""
    variances = torch.logspace(0, -1, 256, dtype=torch.float64)
    variances[:3] = 3e3
    for tokens in (512, 4096):
        width, below, tokens, below_half = _counts(torch.diag(variances), tokens, 0)
        assert below >= 140 and below_half - below <= 10
        assert damping_limit(width, RANK, below, tokens, below_half, tokens // 2) is DampingLimit.SPECTRUM


def test_the_limit_needs_the_rank_reached_and_says_when_it_cannot_tell():
    assert damping_limit(576, 16, 15, 1000, 400, 500) is None  # below the rank: the data decides
    assert damping_limit(576, 16, 85, 500) is DampingLimit.SAMPLE  # 76 zero eigenvalues leave 9, fewer than 16
    assert damping_limit(576, 16, 100, 5000) is None  # no count on part of the tokens: unknown
    assert damping_limit(576, 16, 158, 49220, 163, 12288) is DampingLimit.SPECTRUM  # layer 0's q/k/v, 4× tokens
    assert damping_limit(576, 16, 18, 49220, 49, 12288) is DampingLimit.SAMPLE  # a late o_proj, 4× tokens
