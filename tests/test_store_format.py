"""The compact store: each covariance kept once (its upper triangle), in float64 or float32; format 2 stores
(full squares) still read."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
import torch

from corda_surgery.calib.data import CalibrationSpec
from corda_surgery.calib.packing import packed_width, read_packed, write_packed
from corda_surgery.calib.store import CovarianceStore, StoreError, partial_path
from corda_surgery.surgery.calibration import calibrate
from corda_surgery.surgery.options import SurgeryOptions
from corda_surgery.surgery.run import decompose_checkpoint
from tests.helpers import PROMPTS, as_format_2, logits, relative
from tests.models import save_tiny_model

SPEC = CalibrationSpec("gsm8k", samples=16, seq_len=64, batch_size=8, rounds=2)


@pytest.fixture(scope="module")
def wide_model(tmp_path_factory):
    """Wide enough that each matrix outweighs HDF5's per-dataset overhead, as in real models."""
    return save_tiny_model(tmp_path_factory.mktemp("wide"), "llama", layers=2, hidden=256)


@pytest.mark.parametrize("width", [1, 2, 7, 300])
def test_a_packed_triangle_unpacks_to_the_matrix(tmp_path, width, monkeypatch):
    import corda_surgery.calib.packing as packing

    monkeypatch.setattr(packing, "SEGMENT_ELEMENTS", 50)  # several segments, rows split across none
    monkeypatch.setattr(packing, "MIRROR_TILE", 16)
    half = torch.randn(width, width, dtype=torch.float64)
    matrix = half + half.T
    with h5py.File(tmp_path / "p.h5", "w") as handle:
        dataset = write_packed(handle, "m", matrix, np.float64)
        assert dataset.shape == (width * (width + 1) // 2,) and packed_width(dataset.shape[0]) == width
        assert torch.equal(read_packed(dataset, width), matrix)
    assert packed_width(5) is None


def test_format_2_stores_read_the_same_covariances(wide_model, tmp_path):
    packed = calibrate(wide_model, SPEC, tmp_path / "cov.h5", progress=False)
    square = as_format_2(packed, tmp_path / "square.h5")
    with CovarianceStore(packed) as new, CovarianceStore(square) as old:
        assert new.packed and not old.packed and new.entries == old.entries
        for name, entry in new.entries.items():
            linear = entry.linears[0]
            assert new.dimension(linear) == old.dimension(linear)
            assert torch.equal(new.covariance(linear), old.covariance(linear)), name
            for index in range(new.rounds):
                assert torch.equal(new.covariance(linear, index), old.covariance(linear, index)), name
    assert packed.stat().st_size <= 0.55 * square.stat().st_size


def test_float32_storage_halves_the_store_and_keeps_the_handoff(wide_model, tmp_path):
    exact = calibrate(wide_model, SPEC, tmp_path / "f64.h5", progress=False)
    small = calibrate(wide_model, CalibrationSpec(**{**SPEC.__dict__, "store_dtype": "float32"}),
                      tmp_path / "f32.h5", progress=False)  # fmt: skip
    square = as_format_2(exact, tmp_path / "square.h5")
    assert small.stat().st_size <= 0.3 * square.stat().st_size
    with CovarianceStore(exact) as a, CovarianceStore(small) as b:
        assert b.normalised and not a.normalised
        worst = max(relative(b.covariance(e.linears[0]), a.covariance(e.linears[0])) for e in a.entries.values())
    assert 0 < worst < 1e-6  # float32 rounding of the normalised values
    out = decompose_checkpoint(wide_model, tmp_path / "out", SurgeryOptions.of(rank=8), stores=[small], progress=False)
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(wide_model)
    original = logits(AutoModelForCausalLM.from_pretrained(wide_model), tokenizer, PROMPTS)
    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(out), out / "adapter")
    assert (logits(adapted, tokenizer, PROMPTS) - original).abs().max() < 1e-4


def test_a_partial_store_of_format_2_is_not_resumed(wide_model, tmp_path):
    store = calibrate(wide_model, SPEC, tmp_path / "cov.h5", progress=False)
    as_format_2(store, partial_path(tmp_path / "again.h5"))
    with h5py.File(partial_path(tmp_path / "again.h5"), "r+") as handle:
        handle.attrs["complete"] = False
    with pytest.raises(StoreError, match="a partial store in format 2"):
        calibrate(wide_model, SPEC, tmp_path / "again.h5", resume=True, progress=False)
