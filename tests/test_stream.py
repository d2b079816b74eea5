"""The streaming engine against whole-model forward hooks, and its batching, resume and memory promises."""

import h5py
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForMaskedLM, AutoTokenizer

from corda_surgery import numerics
from corda_surgery.calib.accumulate import Accumulator
from corda_surgery.calib.data import CalibrationSpec, token_batches
from corda_surgery.calib.store import CovarianceStore, partial_path
from corda_surgery.calib.stream import calibrate
from corda_surgery.checkpoint.view import ModelView
from corda_surgery.decomposition.diagnostics import eigenvalues_below_damping
from corda_surgery.surgery.calibration import calibrate as calibrate_command
from tests.helpers import datasets, reference_covariances, relative

SPEC = CalibrationSpec("gsm8k", samples=12, seq_len=48, batch_size=4)


@pytest.mark.parametrize(
    "fixture, auto_class",
    [
        ("tiny_llama", AutoModelForCausalLM),
        ("tiny_gpt2", AutoModelForCausalLM),
        ("tiny_qwen2", AutoModelForCausalLM),
        ("tiny_bert", AutoModelForMaskedLM),
    ],
)
def test_streamed_equals_whole_model_hooks(fixture, auto_class, request, tmp_path):
    model_dir = request.getfixturevalue(fixture)
    out = calibrate(model_dir, SPEC, tmp_path / "cov.h5", progress=False)
    model = auto_class.from_pretrained(model_dir, dtype=torch.float32).eval()
    batches, _ = token_batches(SPEC, AutoTokenizer.from_pretrained(model_dir), model.config.vocab_size)
    expected = reference_covariances(model, batches, ModelView(model_dir).blocks_prefix)
    with CovarianceStore(out) as store:
        assert set(store.by_linear) == set(expected)
        for name, reference in expected.items():
            assert relative(store.covariance(name), reference) < 1e-5, name


@pytest.mark.parametrize("width", [100, 384, 576, 1536, 4100])
def test_tiled_products_equal_the_full_product(width):
    """XᵀX is multiplied tile by tile on and above the diagonal and mirrored: the same sums as XᵀX over the
    real tokens (padding left out), to float32 products' rounding."""
    generator = torch.Generator().manual_seed(width)
    x = torch.randn(3, 40, width, generator=generator)
    mask = torch.ones(3, 40, dtype=torch.bool)
    mask[1, 25:] = False
    accumulator = Accumulator(width, "tokens", 1, torch.device("cpu"))
    accumulator.add(x, mask, 0)
    accumulator.add(x[:2], mask[:2], 0)
    rows = torch.cat([x[mask], x[:2][mask[:2]]]).double()
    total = accumulator.totals()[0].dense()
    assert torch.equal(total, total.T) and relative(total, rows.T @ rows) <= 1e-6
    assert accumulator.counts == [int(mask.sum()) + int(mask[:2].sum())]


LIMITS = [(1, 256, 2048), (576, 256, 2048), (1536, 256, 2048), (100, 8, 32), (257, 8, 32), (300, 16, 40), (333, 7, 23)]


@pytest.mark.parametrize(("width", "leaf", "side"), LIMITS)
def test_symmetric_tiles_cover_the_matrix_once_with_their_mirrors(width, leaf, side, monkeypatch):
    """Tiles plus the mirrors of the off-diagonal ones cover every entry exactly once; leaves and tiles stay
    within their limits (small limits reach every branch that wide inputs take with the real ones)."""
    monkeypatch.setattr(numerics, "SYMMETRIC_LEAF", leaf)
    monkeypatch.setattr(numerics, "MAX_TILE_SIDE", side)
    covered = torch.zeros(width, width, dtype=torch.int32)
    for rows, columns in numerics.symmetric_tiles(width):
        covered[rows, columns] += 1
        if rows != columns:
            assert rows.stop <= columns.start  # above the diagonal
            assert max(rows.stop - rows.start, columns.stop - columns.start) <= side
            covered[columns, rows] += 1
        else:
            assert rows.stop - rows.start <= leaf
    assert bool((covered == 1).all())


@pytest.mark.parametrize("seed", range(6))
def test_eigenvalues_below_damping_are_counted_by_inertia(seed):
    """The LDLᵀ inertia count equals the count of eigenvalues (Bunch–Kaufman's 2×2 pivots included)."""
    generator = torch.Generator().manual_seed(seed)
    width, tokens = 60 + 37 * seed, 20 + 29 * seed
    scales = torch.logspace(0, -4, width, dtype=torch.float64)
    x = torch.randn(tokens, width, generator=generator, dtype=torch.float64) * scales
    total = x.T @ x
    for damping in (1e-4, 1e-2, 0.3):
        expected = int((torch.linalg.eigvalsh(total) < damping * total.diagonal().mean()).sum())
        assert eigenvalues_below_damping(total, damping) == expected
    assert eigenvalues_below_damping(total, 1e-2) >= width - tokens  # rank-deficient: every missing direction
    full_rank = torch.randn(4 * width, width, generator=generator, dtype=torch.float64)
    total = full_rank.T @ full_rank
    for damping in (1e-2, 0.9):  # none below (settled by Cholesky), and some (by the inertia)
        expected = int((torch.linalg.eigvalsh(total) < damping * total.diagonal().mean()).sum())
        assert eigenvalues_below_damping(total, damping) == expected
        assert (expected == 0) == (damping == 1e-2)


def test_eigenvalues_below_the_damping_come_from_the_caller(tiny_llama, tmp_path):
    """The store does no linear algebra: the calibrate command passes the decomposition's count and its level
    in; the engine alone writes the same sums without them."""
    spec = CalibrationSpec("gsm8k", samples=2, seq_len=12, batch_size=2)
    from corda_surgery.calib.stream import calibrate as calibrate_engine

    counted = calibrate_command(tiny_llama, spec, tmp_path / "counted.h5", progress=False)
    plain = calibrate_engine(tiny_llama, spec, tmp_path / "plain.h5", progress=False)
    with CovarianceStore(counted) as a, CovarianceStore(plain) as b:
        assert a.counted is not None and a.counted.damping == 0.01 and b.counted is None
        assert a.entries.keys() == b.entries.keys()
        for name, entry in a.entries.items():
            covariance = a.covariance(name)
            expected = int((torch.linalg.eigvalsh(covariance) < 0.01 * covariance.diagonal().mean()).sum())
            assert entry.below_damping == expected > 0 and b.entries[name].below_damping is None, name
            assert torch.equal(covariance, b.covariance(name)), name


def test_eigenvalues_below_the_damping_are_also_counted_at_half_the_batches(tiny_llama, tmp_path):
    """Midway through each block's batches every input is counted again, on the sum so far: the count of the
    covariance of the first half of the batches (by whole-model hooks), with that half's token count."""
    counted = calibrate_command(tiny_llama, SPEC, tmp_path / "counted.h5", progress=False)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    batches, _ = token_batches(SPEC, AutoTokenizer.from_pretrained(tiny_llama), model.config.vocab_size)
    first = batches[: len(batches) // 2]
    expected = reference_covariances(model, first, ModelView(tiny_llama).blocks_prefix)
    with CovarianceStore(counted) as store:
        assert store.counted is not None and (store.counted.rule, store.counted.damping) == ("mean-diagonal", 0.01)
        for name, entry in store.entries.items():
            half = expected[entry.linears[0]]
            assert entry.half_count == sum(int(b.attention_mask.sum()) for b in first) < entry.count, name
            assert entry.below_damping_half == eigenvalues_below_damping(half) >= entry.below_damping, name


def test_shared_inputs_share_one_covariance(tiny_llama, tmp_path):
    out = calibrate(tiny_llama, SPEC, tmp_path / "cov.h5", progress=False)
    with CovarianceStore(out) as store:
        entry = store.by_linear["model.layers.1.self_attn.k_proj"]
        assert entry.name == "model.layers.1.self_attn.q_proj"
        assert entry.linears == tuple(f"model.layers.1.self_attn.{p}_proj" for p in "qkv")
        assert store.by_linear["model.layers.1.mlp.up_proj"].name == "model.layers.1.mlp.gate_proj"
        assert len(store.entries) == 4 * 3
        assert store.calibration["tokens"] == entry.count


def test_batch_size_does_not_change_covariances(tiny_llama, tmp_path):
    one = calibrate(
        tiny_llama, SPEC.__class__(**{**SPEC.__dict__, "batch_size": 1}), tmp_path / "b1.h5", progress=False
    )
    four = calibrate(tiny_llama, SPEC, tmp_path / "b4.h5", progress=False)
    with CovarianceStore(one) as a, CovarianceStore(four) as b:
        for name in a.entries:
            assert a.entries[name].count == b.entries[name].count
            assert relative(a.covariance(name), b.covariance(name)) < 1e-5, name


@pytest.mark.parametrize("stop_after", [0, 2])
def test_resume_after_interruption_equals_uninterrupted_run(tiny_llama, tmp_path, monkeypatch, stop_after):
    reference = calibrate_command(tiny_llama, SPEC, tmp_path / "ref.h5", progress=False)
    out = tmp_path / "cov.h5"
    original_free = ModelView.free_block

    def failing_free(self, index):
        original_free(self, index)
        if index == stop_after:
            raise KeyboardInterrupt("simulated stop")

    monkeypatch.setattr(ModelView, "free_block", failing_free)
    with pytest.raises(KeyboardInterrupt):
        calibrate_command(tiny_llama, SPEC, out, progress=False)
    monkeypatch.undo()
    assert not out.exists() and partial_path(out).exists()
    with h5py.File(partial_path(out), "r") as f:
        assert f.attrs["layers_done"] == stop_after  # the block in progress was not marked done
    calibrate_command(tiny_llama, SPEC, out, resume=True, progress=False)
    assert not partial_path(out).exists()
    got, want = datasets(out), datasets(reference)
    assert got.keys() == want.keys()
    for name in want:
        assert np.array_equal(got[name][0], want[name][0]), name
        assert got[name][1] == want[name][1]  # counts, members and eigenvalues below the damping alike


def test_only_one_block_is_materialised(tmp_path, monkeypatch):
    from tests.models import save_tiny_model

    model_dir = save_tiny_model(tmp_path / "deep", "llama", layers=6)
    seen = []
    original_load = ModelView.load_block

    def counting_load(self, index):
        block = original_load(self, index)
        materialised = [i for i, b in enumerate(self.blocks) if any(not p.is_meta for p in b.parameters())]
        stem = [n for n, p in self.runner.named_parameters() if not p.is_meta and ".layers." not in f".{n}"]
        seen.append((materialised, stem))
        return block

    monkeypatch.setattr(ModelView, "load_block", counting_load)
    calibrate(model_dir, SPEC, tmp_path / "cov.h5", progress=False)
    assert [m for m, _ in seen] == [[i] for i in range(6)]
    assert all(stem == [] for _, stem in seen)  # embeddings freed once block 0's inputs are captured


def test_a_partial_store_counted_at_another_damping_is_not_resumed(tmp_path):
    """The counts of a resumed run must all be at one damping: a partial store counted at another is refused;
    one counted under PEFT's rule also keeps the legacy attribute older readers know."""
    from corda_surgery.calib.store import CountedLevel, StoreError, StoreWriter

    mean, median = CountedLevel("mean-diagonal", 0.01), CountedLevel("median-diagonal", 0.01)
    settings = {"fingerprint": "f", "calibration": {"source": "x"}, "num_layers": 2}
    StoreWriter(tmp_path / "cov.h5", resume=False, counted=mean, **settings).close()
    with h5py.File(partial_path(tmp_path / "cov.h5")) as handle:
        assert handle.attrs["below_damping_level"] == 0.01
    with pytest.raises(StoreError, match="counted its eigenvalues at another damping"):
        StoreWriter(tmp_path / "cov.h5", resume=True, counted=median, **settings)
    StoreWriter(tmp_path / "cov.h5", resume=True, counted=mean, **settings).close()
