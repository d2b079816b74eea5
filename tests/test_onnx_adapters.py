"""One residual, many adapters: export-onnx --adapters-as-inputs and export-adapter, switched on one session;
and a to-lora adapter served by PEFT on the original base (what vLLM and TGI load)."""

import json
import shutil

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from corda_surgery.calib.data import CalibrationSpec
from corda_surgery.export.merge import merge_adapter
from corda_surgery.export.onnx_runtime import OnnxCausalLM
from corda_surgery.surgery.calibration import calibrate
from corda_surgery.surgery.options import SurgeryOptions
from corda_surgery.surgery.run import decompose_checkpoint
from tests.helpers import cli_error, run_cli

IDS = np.array([[1, 5, 7, 9, 11, 13, 17], [19, 23, 29, 31, 37, 41, 43]])


@pytest.fixture(scope="module")
def surgery(tiny_smollm2, tmp_path_factory):
    root = tmp_path_factory.mktemp("surgery")
    store = calibrate(tiny_smollm2, CalibrationSpec("nq_open", samples=8, seq_len=64), root / "c.h5", progress=False)
    options = SurgeryOptions.of(mode="ipm", rank=4)
    return decompose_checkpoint(tiny_smollm2, root / "out", options, stores=[store], progress=False)


def _trained(surgery, folder, seed: int, alpha: float | None = None):
    """A stand-in for a fine-tune of the surgery's adapter: its factors moved, its lora_alpha optionally changed."""
    shutil.copytree(surgery / "adapter", folder)
    factors = load_file(folder / "adapter_model.safetensors")
    generator = torch.Generator().manual_seed(seed)
    moved = {name: t + 0.1 * t.abs().mean() * torch.randn(t.shape, generator=generator) for name, t in factors.items()}
    save_file(moved, folder / "adapter_model.safetensors")
    if alpha is not None:
        config = json.loads((folder / "adapter_config.json").read_text())
        (folder / "adapter_config.json").write_text(json.dumps({**config, "lora_alpha": alpha}))
    return folder


def _logits(model_dir) -> np.ndarray:
    with torch.no_grad():
        return AutoModelForCausalLM.from_pretrained(model_dir)(torch.from_numpy(IDS)).logits.numpy()


def _run(onnx_dir, session, adapter_file=None) -> np.ndarray:
    info = OnnxCausalLM(onnx_dir)
    feeds = {"input_ids": IDS, "attention_mask": np.ones_like(IDS), "position_ids": np.tile(np.arange(7), (2, 1))}
    feeds.update(zip(info.info["inputs"][3:], info.empty_past(2)))
    options = ort.RunOptions()
    if adapter_file is not None:
        adapter = ort.LoraAdapter()
        adapter.Load(str(adapter_file))
        options.add_active_adapter(adapter)
    return session.run(["logits"], feeds, options)[0]


@pytest.mark.parametrize("weights", ["fp32", "int4"])
def test_two_adapters_switched_on_one_residual_session(surgery, tiny_smollm2, tmp_path, weights):
    """Each adapter gives its merged model's logits (fp32 to 1e-4); none active gives the original model."""
    onnx_dir = tmp_path / "onnx"
    result = run_cli("export-onnx", surgery, "--out", onnx_dir, "--adapters-as-inputs", "--weights", weights)
    assert result.exit_code == 0, result.output
    session = ort.InferenceSession(str(onnx_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    graph = onnx.load(str(onnx_dir / "model.onnx"), load_external_data=False).graph
    lifted = json.loads((onnx_dir / "adapter_inputs.json").read_text())
    assert len(lifted) == 2 * 3 * 7 and set(lifted) <= {i.name for i in graph.input}
    assert not any(node.op_type == "MatMulNBits" and set(node.input) & set(lifted) for node in graph.node)
    results = {}
    for seed, alpha in ((1, None), (2, 8.0)):  # the second with another lora_alpha: s·B is folded in
        trained = _trained(surgery, tmp_path / f"trained{seed}", seed, alpha)
        file = tmp_path / f"trained{seed}.onnx_adapter"
        assert run_cli("export-adapter", trained, "--onnx", onnx_dir, "--out", file).exit_code == 0
        merged = merge_adapter(surgery, trained, tmp_path / f"merged{seed}", progress=False)
        results[seed] = (_run(onnx_dir, session, file), _logits(merged))
    # int4: the residual's own rounding, measured with no adapter active; the float adapters add none to it
    error = np.abs(_run(onnx_dir, session) - _logits(tiny_smollm2)).max()
    tolerance = 1e-4 if weights == "fp32" else 1.5 * error
    assert error < (1e-4 if weights == "fp32" else 0.5)
    for seed, (served, merged) in [*results.items(), (1, results[1])]:  # and back to the first
        assert np.abs(served - merged).max() < tolerance, seed
    assert np.abs(results[1][1] - results[2][1]).max() > 2 * tolerance  # the two fine-tunes differ
    for seed, (served, _) in results.items():  # onnxruntime-genai's own multi-LoRA API reads the same files
        assert np.abs(_genai_logits(onnx_dir, tmp_path / f"trained{seed}.onnx_adapter") - served[0]).max() < 1e-4


def _genai_logits(onnx_dir, adapter_file) -> np.ndarray:
    import onnxruntime_genai as og

    config = og.Config(str(onnx_dir))
    config.clear_providers()
    model = og.Model(config)
    adapters = og.Adapters(model)
    adapters.load(str(adapter_file), "fine-tune")
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=IDS.shape[1] + 1, do_sample=False)
    generator = og.Generator(model, params)
    generator.set_active_adapter(adapters, "fine-tune")
    generator.append_tokens(IDS[:1].astype(np.int32))
    return np.asarray(generator.get_output("logits"))[0]


def test_an_adapter_of_another_rank_is_refused_naming_the_input(surgery, tmp_path):
    onnx_dir = tmp_path / "onnx"
    run_cli("export-onnx", surgery, "--out", onnx_dir, "--adapters-as-inputs", "--no-past")
    other = tmp_path / "other"
    shutil.copytree(surgery / "adapter", other)
    factors = load_file(other / "adapter_model.safetensors")  # rank 8 from rank 4: A's rows and B's columns twice
    doubled = {n: torch.cat([t, t], dim=0 if "lora_A" in n else 1) for n, t in factors.items()}
    save_file(doubled, other / "adapter_model.safetensors")
    config = json.loads((other / "adapter_config.json").read_text())
    (other / "adapter_config.json").write_text(json.dumps({**config, "r": 8, "lora_alpha": 8}))
    message = cli_error("export-adapter", other, "--onnx", onnx_dir, "--out", tmp_path / "a.onnx_adapter")
    assert "lora_A has shape" in message and "the graph takes" in message
    assert not list(tmp_path.glob("*.onnx_adapter")) and not list(tmp_path.glob(".*partial"))


def test_export_adapter_needs_an_adapters_as_inputs_export(surgery, tiny_smollm2, tmp_path):
    onnx_dir = tmp_path / "onnx"
    run_cli("export-onnx", tiny_smollm2, "--out", onnx_dir, "--no-past")
    message = cli_error("export-adapter", surgery / "adapter", "--onnx", onnx_dir, "--out", tmp_path / "a.onnx_adapter")
    assert "adapter_inputs.json" in message and "--adapters-as-inputs" in message


def test_a_to_lora_adapter_serves_the_fine_tune_in_peft_on_the_original_base(surgery, tiny_smollm2, tmp_path):
    """What vLLM and TGI load: a PEFT LoRA on the original checkpoint, giving the fine-tune's logits."""
    peft = pytest.importorskip("peft", reason="peft is a test extra")
    trained = _trained(surgery, tmp_path / "trained", seed=3)
    assert run_cli("to-lora", surgery, trained, "--base", tiny_smollm2, "--out", tmp_path / "lora").exit_code == 0
    base = AutoModelForCausalLM.from_pretrained(tiny_smollm2)
    served = peft.PeftModel.from_pretrained(base, tmp_path / "lora").eval()
    with torch.no_grad():
        logits = served(torch.from_numpy(IDS)).logits.numpy()
    merged = merge_adapter(surgery, trained, tmp_path / "merged", progress=False)
    assert np.abs(logits - _logits(merged)).max() < 1e-4


@pytest.mark.parametrize(("content", "culprit"), [(b"{", "not valid JSON"), (b'{"x": {"module": 3}}', "malformed")])
def test_a_strangers_adapter_inputs_file_is_refused_in_one_line(surgery, tmp_path, content, culprit):
    onnx_dir = tmp_path / "onnx"
    run_cli("export-onnx", surgery, "--out", onnx_dir, "--adapters-as-inputs", "--no-past")
    (onnx_dir / "adapter_inputs.json").write_bytes(content)
    message = cli_error("export-adapter", surgery / "adapter", "--onnx", onnx_dir, "--out", tmp_path / "a.onnx_adapter")
    assert "adapter_inputs.json" in message and culprit in message
