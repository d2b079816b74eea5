"""``--memory-budget``: covariances held as upper triangles in panels (the same sums, factorised and solved a
panel at a time), the same output as a run without a budget, and a budget the run cannot keep refused before
it starts, naming the smallest one it can."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
import torch

from corda_surgery import panels as panels_module
from corda_surgery.calib.data import CalibrationSpec
from corda_surgery.calib.memory import calibration_memory, input_widths
from corda_surgery.calib.packing import read_packed, read_packed_panels, write_packed
from corda_surgery.checkpoint.view import ModelView
from corda_surgery.compute import ComputeOptions
from corda_surgery.decomposition.decompose import decompose_weight
from corda_surgery.numerics import cholesky_solve, mirror_tiles, symmetric_tiles
from corda_surgery.panels import SymmetricPanels, accumulate_tiles, panels_bytes
from corda_surgery.surgery.options import SurgeryOptions
from corda_surgery.surgery.plan import MemoryPlanError
from corda_surgery.surgery.run import convert_checkpoint, estimate_run
from tests.helpers import cli_error, tensors

SPEC = CalibrationSpec("gsm8k", samples=8, seq_len=32, batch_size=4)
WIDTHS = [1, 15, 16, 17, 70]  # one panel, exactly one, one and a row, several (16-row panels)


@pytest.fixture
def small_panels(monkeypatch):
    """16-row panels, so that the tiny models' inputs span several."""
    monkeypatch.setattr(panels_module, "PANEL_ROWS", 16)


def _sums(width: int, rows: torch.Tensor) -> tuple[torch.Tensor, SymmetricPanels]:
    """The square sum as ``Accumulator`` makes it, and the panels' from the same tiles."""
    tiles = symmetric_tiles(width)
    square = torch.zeros(width, width, dtype=torch.float64)
    for tile_rows, tile_columns in tiles:
        square[tile_rows, tile_columns] += rows[:, tile_rows].T @ rows[:, tile_columns]
    mirror_tiles(square, tiles)
    triangle = SymmetricPanels.zeros(width)
    accumulate_tiles(triangle, rows, tiles)
    return square, triangle


@pytest.mark.parametrize("width", WIDTHS)
def test_panels_hold_the_square_sums_upper_triangle_bit_for_bit(small_panels, width):
    square, triangle = _sums(width, torch.randn(300, width))
    for i in range(width):
        assert torch.equal(triangle.row(i), square[i, i:])
    assert torch.equal(triangle.dense(), square)
    assert sum(panel.numel() * 8 for panel in triangle.panels) == panels_bytes(width)


@pytest.mark.parametrize("width", WIDTHS)
def test_panels_product_factor_and_solve_match_the_square(small_panels, width):
    square, triangle = _sums(width, torch.randn(3 * width + 5, width))
    weight = torch.randn(9, width, dtype=torch.float64)
    torch.testing.assert_close(triangle.left_product(weight), weight @ square, rtol=1e-12, atol=1e-9)
    triangle.add_to_diagonal(0.5)
    square.diagonal().add_(0.5)
    assert torch.equal(triangle.diagonal(), square.diagonal())
    assert triangle.cholesky_()
    rhs = torch.randn(width, 4, dtype=torch.float64)
    torch.testing.assert_close(
        triangle.cholesky_solve(rhs), cholesky_solve(torch.linalg.cholesky(square), rhs), rtol=1e-10, atol=1e-12
    )


def test_panels_refuse_a_matrix_that_is_not_positive_definite(small_panels):
    _, triangle = _sums(40, torch.randn(10, 40))  # rank 10 of 40
    triangle.add_to_diagonal(-1.0)
    assert not triangle.cholesky_()


def test_the_store_gets_the_same_bytes_from_panels_and_reads_them_back(small_panels, tmp_path):
    square, triangle = _sums(50, torch.randn(80, 50))
    with h5py.File(tmp_path / "s.h5", "w") as file:
        write_packed(file, "square", square, np.float64)
        write_packed(file, "panels", triangle, np.float64)
        assert np.array_equal(file["square"][()], file["panels"][()])
        read = read_packed_panels(file["panels"], 50)
        assert torch.equal(read.dense(), read_packed(file["square"], 50))


@pytest.mark.parametrize("mode", ["kpm", "ipm"])
def test_a_weight_decomposed_from_panels_matches_the_square(small_panels, mode):
    square, triangle = _sums(48, torch.randn(400, 48).double().float())
    weight = torch.randn(40, 48)
    kwargs = {"rank": 4, "mode": mode, "name": "w", "factor_dtype": torch.float64}
    from_square = decompose_weight(weight, lambda: square.clone() / 400, **kwargs)
    from_panels = decompose_weight(weight, lambda: triangle.clone().div_(400), **kwargs)
    for field in ("lora_A", "lora_B", "residual"):
        torch.testing.assert_close(getattr(from_panels, field), getattr(from_square, field), rtol=0, atol=1e-9)
    assert from_panels.damping == from_square.damping


def test_a_run_under_a_budget_gives_the_unbounded_runs_output_bit_for_bit(tiny_llama, tmp_path, small_panels):
    """A budget changes what is planned and checked, never the arithmetic: every tensor the same bits."""
    options = SurgeryOptions.of(rank=4, mode="kpm")
    free = convert_checkpoint(tiny_llama, tmp_path / "free", SPEC, options, progress=False)
    budget = ComputeOptions(memory_budget="64GiB")
    kept = convert_checkpoint(tiny_llama, tmp_path / "kept", SPEC, options, compute=budget, progress=False)
    for folder in ("", "adapter"):
        expected, found = tensors(free / folder), tensors(kept / folder)
        assert expected.keys() == found.keys()
        assert all(torch.equal(found[name], tensor) for name, tensor in expected.items())


def test_the_plan_counts_triangles(tiny_llama, small_panels):
    view = ModelView(tiny_llama)
    widths = input_widths(max(view.blocks, key=lambda block: sum(p.numel() for p in block.parameters())))
    assert calibration_memory(view, SPEC, 0)["covariance sums"] == sum(panels_bytes(w) for w in widths)
    assert sum(panels_bytes(w) for w in widths) < 0.75 * sum(w * w * 8 for w in widths)


def test_a_budget_below_the_run_is_refused_with_the_smallest_it_can_keep(tiny_llama, tmp_path):
    options = SurgeryOptions.of(rank=4, mode="kpm")
    roomy = estimate_run(tiny_llama, ComputeOptions(memory_budget="64GiB"), tmp_path / "o", spec=SPEC, options=options)
    roomy.check()
    assert roomy.baseline < roomy.smallest <= roomy.host_peak
    tight = estimate_run(
        tiny_llama, ComputeOptions(memory_budget=roomy.baseline), tmp_path / "o", spec=SPEC, options=options
    )
    with pytest.raises(MemoryPlanError, match=r"--memory-budget .* smallest budget it can keep is") as refused:
        tight.check()
    assert f"{roomy.smallest / (1 << 30):.2f} GiB" in str(refused.value)


def test_the_cli_refuses_a_budget_it_cannot_keep(tiny_llama, tmp_path):
    message = cli_error(
        "convert", str(tiny_llama), "--data", "gsm8k", "--samples", "8", "--seq-len", "32",
        "--memory-budget", "1MB", "--out", str(tmp_path / "o"),
    )  # fmt: skip
    assert "--memory-budget" in message and "smallest budget" in message
    assert not (tmp_path / "o").exists()
