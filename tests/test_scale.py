"""Scale on one machine: device and forward dtype, the activation budget (spill), the memory plan, bounded
decomposition, and (where a GPU is present) CUDA against the CPU."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import corda_surgery.compute as compute_module
from corda_surgery.calib.data import CalibrationSpec
from corda_surgery.calib.store import CovarianceStore, StoreError
from corda_surgery.calib.stream import calibrate, open_view
from corda_surgery.compute import ComputeOptions
from corda_surgery.decomposition.decompose import decompose_weight
from corda_surgery.surgery.calibration import calibrate as calibrate_command
from corda_surgery.surgery.options import OptionsError, SurgeryOptions
from corda_surgery.surgery.plan import MemoryPlanError
from corda_surgery.surgery.run import convert_checkpoint, estimate_run
from tests.helpers import as_format_2, cli_error, datasets, relative, run_cli
from tests.models import save_tiny_model

SPEC = CalibrationSpec("gsm8k", samples=12, seq_len=48, batch_size=4)


def _spill_folders(folder):
    return [p for p in folder.iterdir() if "activations" in p.name]


def test_spilled_hidden_states_give_the_same_store(tiny_llama, tmp_path):
    in_memory = calibrate(tiny_llama, SPEC, tmp_path / "memory.h5", progress=False)
    spilled = calibrate(tiny_llama, SPEC, tmp_path / "spilled.h5", compute=ComputeOptions(max_memory=1), progress=False)
    got, want = datasets(spilled), datasets(in_memory)
    assert got.keys() == want.keys()
    for name in want:
        assert np.array_equal(got[name][0], want[name][0]), name
    assert _spill_folders(tmp_path) == []


def test_spill_folder_is_removed_on_failure(tiny_llama, tmp_path, monkeypatch):
    from corda_surgery.checkpoint.view import ModelView

    original_free = ModelView.free_block
    seen = []

    def failing_free(self, index):
        original_free(self, index)
        seen.append([len(list(folder.iterdir())) for folder in _spill_folders(tmp_path)])
        raise RuntimeError("simulated failure")

    monkeypatch.setattr(ModelView, "free_block", failing_free)
    with pytest.raises(RuntimeError, match="simulated"):
        calibrate(tiny_llama, SPEC, tmp_path / "cov.h5", compute=ComputeOptions(max_memory=1), progress=False)
    assert seen[0] == [SPEC.samples // SPEC.batch_size]  # it did spill its 3 batches, beside the output
    assert _spill_folders(tmp_path) == []


_PEAK_SCRIPT = """
import json, sys
from corda_surgery.memory import release_large_frees_to_os
from corda_surgery.calib.data import CalibrationSpec
from corda_surgery.surgery.calibration import calibrate
from corda_surgery.compute import ComputeOptions
release_large_frees_to_os()
model, out, budget = sys.argv[1], sys.argv[2], sys.argv[3]
spec = CalibrationSpec("gsm8k", samples=96, seq_len=256, batch_size=8)
calibrate(model, spec, out, compute=ComputeOptions(max_memory=budget or None), progress=False)
# VmHWM: this process's own peak (ru_maxrss would carry over the peak of the forked test process)
status = open("/proc/self/status").read().splitlines()
print(json.dumps(next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmHWM:"))))
"""


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="reads peak memory from Linux's /proc")
def test_activation_budget_lowers_peak_memory(tmp_path):
    model = save_tiny_model(tmp_path / "wide", "llama", layers=2, hidden=512)

    def peak(budget: str, name: str) -> int:
        done = subprocess.run(
            [sys.executable, "-c", _PEAK_SCRIPT, str(model), str(tmp_path / name), budget],
            capture_output=True,
            text=True,
            check=True,
        )
        return json.loads(done.stdout.splitlines()[-1])

    in_memory, spilled = peak("", "memory.h5"), peak("1", "spilled.h5")
    with CovarianceStore(tmp_path / "memory.h5") as store:
        hidden_bytes = store.calibration["tokens"] * 512 * 4  # float32 forward; padding only adds to this
    assert in_memory - spilled > 0.5 * hidden_bytes, (in_memory, spilled, hidden_bytes)
    for name, (data, _) in datasets(tmp_path / "memory.h5").items():
        assert np.array_equal(datasets(tmp_path / "spilled.h5")[name][0], data), name


def test_memory_plan_counts_the_store_the_run_writes(tiny_llama, tiny_gpt2, tmp_path):
    for model in (tiny_llama, tiny_gpt2):
        plan = estimate_run(model, ComputeOptions(), tmp_path / "cov.h5", spec=SPEC)
        store = calibrate(model, SPEC, tmp_path / "cov.h5", progress=False, overwrite=True)
        written = sum(data.nbytes for data, _ in datasets(store).values())
        assert plan.disk["covariance store"] == written, model


def test_dry_run_prints_the_plan_and_writes_nothing(tiny_llama, tmp_path):
    out = tmp_path / "parent" / "out"
    result = run_cli("convert", tiny_llama, "--out", out, "--samples", 12, "--seq-len", 48, "--dry-run")
    assert result.exit_code == 0, result.output
    for part in ("memory plan", "calibration", "decomposition", "peak RAM", "disk", "fits"):
        assert part in result.stdout
    assert not (tmp_path / "parent").exists()


def test_run_that_cannot_fit_is_refused_before_any_work(tiny_llama, tmp_path, monkeypatch):
    message = cli_error(
        "convert", tiny_llama, "--out", tmp_path / "out", "--samples", 1000000, "--seq-len", 4096, "--max-memory", "1TB"
    )
    assert "GiB of RAM" in message and "hidden states" in message and "--max-memory" in message
    monkeypatch.setattr("shutil.disk_usage", lambda path: type("Usage", (), {"free": 1000})())
    with pytest.raises(MemoryPlanError, match=r"the outputs need about .* GiB \(one block's covariances"):
        convert_checkpoint(tiny_llama, tmp_path / "out", SPEC, SurgeryOptions.of(), progress=False)
    assert list(tmp_path.iterdir()) == []


def test_calibrate_refuses_a_run_that_cannot_fit_before_any_work(tiny_llama, tmp_path, monkeypatch):
    import corda_surgery.surgery.plan as memory_plan

    monkeypatch.setattr(memory_plan, "available_host_memory", lambda: 1)
    with pytest.raises(MemoryPlanError, match=r"GiB of RAM \((capture|calibration): "):
        calibrate_command(tiny_llama, SPEC, tmp_path / "out" / "cov.h5", compute=ComputeOptions(device="cpu"))
    assert list(tmp_path.iterdir()) == []
    calibrate(tiny_llama, SPEC, tmp_path / "cov.h5", compute=ComputeOptions(device="cpu"), progress=False)  # no plan


def test_device_and_dtype_options_are_checked():
    with pytest.raises(OptionsError, match=r"^device 'tpu'"):
        ComputeOptions(device="tpu")
    with pytest.raises(OptionsError, match=r"^forward_dtype 'float8'"):
        ComputeOptions(forward_dtype="float8")
    with pytest.raises(OptionsError, match=r"^max_memory"):
        ComputeOptions(max_memory="lots")
    if not torch.cuda.is_available():
        with pytest.raises(OptionsError, match=r"^device cuda: no CUDA device"):
            ComputeOptions(device="cuda")


def test_auto_forward_dtype_is_the_checkpoints_where_the_device_computes_it(tmp_path, monkeypatch):
    model = save_tiny_model(tmp_path / "bf16", "llama", dtype=torch.bfloat16)
    monkeypatch.setattr(compute_module, "native_half_matmul", lambda dtype: True)
    assert open_view(model, ComputeOptions(device="cpu")).dtype == torch.bfloat16
    monkeypatch.setattr(compute_module, "native_half_matmul", lambda dtype: False)
    assert open_view(model, ComputeOptions(device="cpu")).dtype == torch.float32
    assert open_view(model, ComputeOptions(device="cpu", forward_dtype="bfloat16")).dtype == torch.bfloat16


def test_bfloat16_forward_is_close_to_float32(tmp_path):
    model = save_tiny_model(tmp_path / "bf16", "llama", dtype=torch.bfloat16)
    exact, half = (
        calibrate(model, SPEC, tmp_path / f"{dtype}.h5", compute=ComputeOptions(forward_dtype=dtype), progress=False)
        for dtype in ("float32", "bfloat16")
    )
    with CovarianceStore(exact) as a, CovarianceStore(half) as b:
        differences = [relative(b.covariance(n), a.covariance(n)) for n in a.entries]
    assert 0 < max(differences) < 0.05  # bfloat16 keeps 8 bits: ~0.4 % per value, averaged over tokens


def test_covariance_read_again_when_damping_must_grow():
    weight = torch.randn(6, 4, dtype=torch.float64)
    covariance = torch.diag(torch.tensor([1.0, 1.0, -0.5, 1.0], dtype=torch.float64))  # indefinite
    reads = []

    def read():
        reads.append(1)
        return covariance.clone()

    from_callable = decompose_weight(weight, read, rank=2, mode="kpm", factor_dtype=torch.float64)
    from_tensor = decompose_weight(weight, covariance, rank=2, mode="kpm", factor_dtype=torch.float64)
    assert len(reads) > 1 and from_callable.damping == from_tensor.damping > 0.01
    assert torch.equal(from_callable.lora_A, from_tensor.lora_A)
    assert torch.equal(from_callable.residual, from_tensor.residual)
    assert torch.equal(covariance, torch.diag(torch.tensor([1.0, 1.0, -0.5, 1.0], dtype=torch.float64)))


@pytest.mark.parametrize("entry", [(-1, -3), (0, -1)])  # inside the last diagonal tile; a mirrored pair of tiles
def test_store_checks_find_asymmetry_in_any_tile(tiny_llama, tmp_path, monkeypatch, entry):
    import h5py

    import corda_surgery.calib.checks as store_checks

    store = as_format_2(calibrate(tiny_llama, SPEC, tmp_path / "cov.h5", progress=False), tmp_path / "square.h5")
    with h5py.File(store, "r+") as f:  # a packed store is symmetric by construction; a square one may not be
        name = "model.layers.2.mlp.down_proj"
        data = f[name][()]
        data[entry] *= 2
        f[name][...] = data
    monkeypatch.setattr(store_checks, "SYMMETRY_TILE", 8)
    with CovarianceStore(store) as opened, pytest.raises(StoreError, match="down_proj is not symmetric"):
        opened.covariance(name)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_convert_on_cuda_matches_the_cpu(tiny_llama, tmp_path):
    kept = {"keep_covariances": True, "progress": False}
    cpu = convert_checkpoint(
        tiny_llama, tmp_path / "cpu", SPEC, SurgeryOptions.of(), compute=ComputeOptions(device="cpu"), **kept
    )
    on_gpu = ComputeOptions(device="cuda", forward_dtype="float32")
    gpu = convert_checkpoint(tiny_llama, tmp_path / "gpu", SPEC, SurgeryOptions.of(), compute=on_gpu, **kept)
    with CovarianceStore(cpu / "covariances.h5") as a, CovarianceStore(gpu / "covariances.h5") as b:
        for name in a.entries:
            assert relative(b.covariance(name), a.covariance(name)) < 1e-6, name
    from tests.test_surgery import _handoff_error

    assert _handoff_error(tiny_llama, gpu) <= 1e-4


def test_finiteness_is_checked_in_every_slice(monkeypatch):
    import corda_surgery.numerics as numerics

    monkeypatch.setattr(numerics, "CHECK_BLOCK_ELEMENTS", 7)
    matrix = torch.zeros(6, 5, dtype=torch.float64)
    assert numerics.all_finite(matrix) and numerics.all_finite(matrix.T)
    matrix[5, 4] = float("nan")  # the last slice only
    assert not numerics.all_finite(matrix) and not numerics.all_finite(matrix.T)
    assert not numerics.all_finite(matrix[:, 3:])  # a view neither contiguous nor transposed


def test_plan_on_a_gpu_checks_calibration_there_and_decomposition_in_ram(monkeypatch):
    import corda_surgery.surgery.plan as memory_plan

    gib = memory_plan.GIB
    monkeypatch.setattr(memory_plan, "available_memory", lambda device: 10 * gib)  # the GPU's free memory
    monkeypatch.setattr(memory_plan, "available_host_memory", lambda: 20 * gib)
    plan = memory_plan.MemoryPlan(device=torch.device("cuda"), baseline=0)
    plan.phases = {"calibration": {"covariance sums": 8 * gib}, "decomposition": {"covariance": 15 * gib}}
    plan.check()  # the decomposition falls back to the CPU: it must fit the RAM, not the GPU
    assert plan.device_peak == 8 * gib and plan.host_peak == 15 * gib
    plan.phases["calibration"]["hidden states"] = 4 * gib
    with pytest.raises(MemoryPlanError, match=r"12\.00 GiB of cuda \(calibration: .*lower max_memory"):
        plan.check()
    plan.phases["calibration"]["hidden states"] = 0
    plan.phases["decomposition"]["W·C"] = 6 * gib
    with pytest.raises(MemoryPlanError, match=r"21\.00 GiB of RAM \(decomposition: .*with targets\)"):
        plan.check()
