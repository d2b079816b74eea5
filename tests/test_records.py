"""What is recorded is true: surgery.json against the files on disk, store formats, model fingerprints."""

import json
import shutil
from pathlib import Path

import h5py
import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

import corda_surgery
from corda_surgery.calib.data import CalibrationSpec
from corda_surgery.calib.store import FORMAT_VERSION, CovarianceStore, StoreError
from corda_surgery.checkpoint.reader import CheckpointReader
from corda_surgery.decomposition.decompose import decompose_weight
from corda_surgery.surgery.calibration import calibrate
from corda_surgery.surgery.options import SurgeryOptions
from corda_surgery.surgery.run import decompose_checkpoint
from tests.helpers import cli_error, relative, run_cli, tensors

SPEC = CalibrationSpec("nq_open", samples=8, seq_len=32, batch_size=4)


def test_convert_into_a_new_folder_records_what_is_on_disk(tiny_llama, tmp_path):
    out = tmp_path / "not" / "yet" / "there"
    args = ["convert", tiny_llama, "--data", "nq_open", "--samples", 8, "--seq-len", 32, "--batch-size", 4]
    result = run_cli(*args, "--rank", 4, "--alpha", 8, "--keep-covariances", "--out", out)
    assert result.exit_code == 0, result.output
    report = json.loads((out / "surgery.json").read_text())
    assert (report["method"], report["mode"], report["rank"], report["alpha"]) == ("corda", "kpm", 4, 8.0)
    assert (report["solver"], report["factor_dtype"], report["damping"]) == ("subspace", "float32", 0.01)
    assert report["model_fingerprint"] == CheckpointReader(tiny_llama).fingerprint()
    assert report["versions"]["corda_surgery"] == corda_surgery.__version__
    assert report["versions"]["torch"] == torch.__version__

    [store_record] = report["covariance_stores"]
    assert Path(store_record["path"]) == out / "covariances.h5"
    with CovarianceStore(store_record["path"]) as store:
        assert store.calibration == store_record["calibration"]
        assert store.fingerprint == store_record["model_fingerprint"] == report["model_fingerprint"]
        assert store.calibration["samples_used"] == 8

    adapter_config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == str(out)
    assert adapter_config["r"] == 4 and adapter_config["lora_alpha"] == 8
    assert sorted(report["layers"]) == adapter_config["target_modules"]
    factors = tensors(out / "adapter")
    for name, layer in report["layers"].items():
        lora_a = factors[f"base_model.model.{name}.lora_A.weight"]
        assert lora_a.shape[0] == layer["rank"] == 4 and lora_a.dtype == torch.float32
        assert layer["damping"] >= 0.01 and 0 < layer["adapter_energy"] < 1
    # nothing hidden is left beside the output: no staging folder, lock or calibration store
    assert sorted(p.name for p in out.parent.iterdir()) == ["there"]


def test_factor_dtype_and_base_name_reach_the_adapter(tiny_llama, tmp_path):
    store = calibrate(tiny_llama, SPEC, tmp_path / "cov.h5", progress=False)
    out = decompose_checkpoint(
        tiny_llama,
        tmp_path / "out",
        SurgeryOptions.of(rank=4, factor_dtype="float64", base_name="me/residual"),
        stores=[store],
        progress=False,
    )
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "me/residual"
    assert {t.dtype for t in tensors(out / "adapter").values()} == {torch.float64}
    assert json.loads((out / "surgery.json").read_text())["covariance_stores"][0]["path"] == str(store)


def test_decomposition_reads_the_covariance_in_float64(tiny_llama, tmp_path):
    """The product W·C is float64 only if C is: the stored float64 sum must reach it unrounded."""
    store = calibrate(tiny_llama, SPEC, tmp_path / "cov.h5", progress=False)
    out = decompose_checkpoint(tiny_llama, tmp_path / "out", SurgeryOptions.of(rank=4), stores=[store], progress=False)
    factors, weights = tensors(out / "adapter"), tensors(tiny_llama)
    name = "model.layers.1.self_attn.o_proj"
    with CovarianceStore(store) as opened:
        covariance = opened.covariance(name)
    assert covariance.dtype == torch.float64
    exact = decompose_weight(weights[f"{name}.weight"], covariance, rank=4, mode="kpm", name=name)
    rounded = decompose_weight(weights[f"{name}.weight"], covariance.float(), rank=4, mode="kpm", name=name)
    written = factors[f"base_model.model.{name}.lora_A.weight"]
    assert relative(written, exact.lora_A) == 0
    assert relative(rounded.lora_A, exact.lora_A) > 1e-7  # the test can tell float32 rounding apart


@pytest.mark.parametrize(("version", "message"), [(FORMAT_VERSION + 1, "newer corda-surgery"), (1, "calibrate again")])
def test_store_format_version_is_checked_when_read(tiny_llama, tmp_path, version, message):
    store = calibrate(tiny_llama, SPEC, tmp_path / "cov.h5", progress=False)
    with h5py.File(store, "a") as handle:
        handle.attrs["format_version"] = version
    with pytest.raises(StoreError, match=message):
        CovarianceStore(store)
    assert message in cli_error("decompose", tiny_llama, "--covariances", store, "--out", tmp_path / "o")


def _fingerprint(model_dir: Path) -> str:
    return CheckpointReader(model_dir).fingerprint()


def test_fingerprint_tells_apart_weights_that_differ_in_the_middle_of_a_shard(tiny_llama, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(tiny_llama, copy)
    assert _fingerprint(copy) == _fingerprint(tiny_llama)
    weights = load_file(copy / "model.safetensors")
    middle = "model.layers.1.mlp.up_proj.weight"  # far from both ends of the one shard
    weights[middle] += 1e-3 * torch.randn_like(weights[middle])  # what a different merged adapter does
    save_file(weights, copy / "model.safetensors", metadata={"format": "pt"})
    assert (copy / "model.safetensors").stat().st_size == (tiny_llama / "model.safetensors").stat().st_size
    assert _fingerprint(copy) != _fingerprint(tiny_llama)
    weights[middle] = load_file(tiny_llama / "model.safetensors")[middle]
    weights["model.layers.1.input_layernorm.weight"][7] += 1e-3  # small tensors are hashed whole
    save_file(weights, copy / "model.safetensors", metadata={"format": "pt"})
    assert _fingerprint(copy) != _fingerprint(tiny_llama)


def test_fingerprint_ignores_sharding_and_the_saving_transformers_version(tiny_llama, tmp_path):
    resharded = tmp_path / "resharded"
    AutoModelForCausalLM.from_pretrained(tiny_llama).save_pretrained(resharded, max_shard_size="100KB")
    shutil.copy(tiny_llama / "config.json", resharded / "config.json")
    assert len(list(resharded.glob("*.safetensors"))) > 1
    assert _fingerprint(resharded) == _fingerprint(tiny_llama)
    config = json.loads((resharded / "config.json").read_text())
    (resharded / "config.json").write_text(json.dumps({**config, "transformers_version": "9.9.9"}, indent=4))
    assert _fingerprint(resharded) == _fingerprint(tiny_llama)
    (resharded / "config.json").write_text(json.dumps({**config, "rms_norm_eps": 1e-3}))
    assert _fingerprint(resharded) != _fingerprint(tiny_llama)
