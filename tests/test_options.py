"""Options by concern: errors name fields for library callers and flags on the command line."""

from __future__ import annotations

import pytest

from corda_surgery.decomposition.kinds import Mode, Solver
from corda_surgery.decomposition.options import DecompositionOptions
from corda_surgery.errors import OptionsError
from corda_surgery.surgery.options import Method, OutputOptions, RankBudget, SurgeryOptions
from tests.helpers import cli_error


def test_flat_fields_go_to_the_concern_that_owns_them():
    options = SurgeryOptions.of(method="corda++", mode="ipm", rank=8, rank_budget=8, damping=0.1, base_name="me/x")
    assert options == SurgeryOptions(
        method=Method.CORDA_PLUS,
        decomposition=DecompositionOptions(mode=Mode.IPM, damping=0.1),
        ranks=RankBudget(rank=8, rank_budget=8),
        output=OutputOptions(base_name="me/x"),
    )
    assert options.decomposition.solver is Solver.SUBSPACE and options.scaling == 1.0


@pytest.mark.parametrize(
    ("flat", "message"),
    [
        ({"rank": 0}, "rank 0: must be a whole number ≥ 1"),
        ({"factor_dtype": "int8"}, "factor_dtype 'int8': must be float32 or float64"),
        ({"rank_budget": 4}, "rank_budget needs method corda++"),
        ({"method": "pissa", "mode": "kpm"}, "mode does not go with method pissa"),
        ({"max_shard_size": "12XB"}, "max_shard_size '12XB': not a size"),
    ],
)
def test_library_errors_name_the_field(flat, message):
    with pytest.raises(OptionsError) as caught:
        SurgeryOptions.of(**flat)
    assert str(caught.value).startswith(message)
    assert "--" not in str(caught.value)


def test_the_command_line_names_the_flag(tiny_llama, tmp_path):
    assert "--damping -1.0: must be" in cli_error("decompose", tiny_llama, "--damping", "-1", "--out", tmp_path / "o")
    assert "(--covariances)" in cli_error("decompose", tiny_llama, "--out", tmp_path / "o")
    assert "--rank-budget needs --method corda++" in cli_error(
        "decompose", tiny_llama, "--method", "pissa", "--rank-budget", "4", "--out", tmp_path / "o"
    )
