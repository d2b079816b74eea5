"""Merge and ONNX export: parity with PyTorch on tiny models, padding, and the CUDA/fp16 path on a GPU."""

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from corda_surgery.export.onnx_export import ExportError, export_onnx
from corda_surgery.export.onnx_runtime import OnnxCausalLM
from corda_surgery.export.verify import DEFAULT_PROMPTS, verify_onnx

PROMPTS = ["Who wrote the novel Pride and Prejudice and when was it published?", "Paris is"]


@pytest.fixture(
    scope="module",
    params=[
        ("llama", False, "auto"),
        ("llama", True, "auto"),
        ("llama", True, "dynamo"),
        ("gpt2", False, "auto"),
        ("gpt2", True, "auto"),
    ],
    ids=lambda p: f"{p[0]}-{'past' if p[1] else 'nopast'}-{p[2]}",
)
def exported(request, tmp_path_factory):
    kind, with_past, exporter = request.param
    model_dir = request.getfixturevalue(f"tiny_{kind}")
    out = tmp_path_factory.mktemp("onnx") / "out"
    return model_dir, export_onnx(model_dir, out, with_past=with_past, exporter=exporter)


def test_logits_and_greedy_match_pytorch(exported):
    model_dir, onnx_dir = exported
    report = verify_onnx(onnx_dir, model_dir, new_tokens=8, prefill_tokens=16, decode_steps=4, repeats=1)
    assert report.provider in ("CPUExecutionProvider", "CUDAExecutionProvider")
    assert report.max_abs_error < 1e-4
    assert report.greedy_match


def test_export_info_records_the_opset_in_the_graph(exported):
    _, onnx_dir = exported
    info = json.loads((onnx_dir / "onnx_export.json").read_text())
    graph = onnx.load(str(onnx_dir / "model.onnx"), load_external_data=False)
    declared = {entry.domain: entry.version for entry in graph.opset_import}
    assert isinstance(info["opset"], int) and info["opset"] == declared.get("", declared.get("ai.onnx"))


def test_exporter_warnings_are_recorded_not_silenced(exported):
    _, onnx_dir = exported
    info = json.loads((onnx_dir / "onnx_export.json").read_text())
    assert isinstance(info["exporter_warnings"], dict)
    if info["exporter"] == "torchscript":  # the tracer always warns about Python control flow
        assert any(message.startswith("TracerWarning") for message in info["exporter_warnings"])


@pytest.mark.parametrize("with_past", [False, True])
def test_a_trace_that_baked_shapes_into_the_graph_is_refused(tiny_gpt2, tmp_path, with_past):
    """GPT-2's TorchScript trace is wrong at other batch/sequence lengths: the export says so, writes nothing."""
    with pytest.raises(ExportError, match="baked shapes into the graph; use exporter dynamo"):
        export_onnx(tiny_gpt2, tmp_path / "out", exporter="torchscript", with_past=with_past)
    assert list(tmp_path.iterdir()) == []


def test_padded_batch_equals_each_prompt_alone(exported):
    model_dir, onnx_dir = exported
    session = OnnxCausalLM(onnx_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    for side in ("right", "left"):
        tokenizer.padding_side = side
        batch = tokenizer(PROMPTS, return_tensors="np", padding=True)
        logits, _ = session(batch["input_ids"], batch["attention_mask"])
        for row, prompt in enumerate(PROMPTS):
            ids = np.array([tokenizer(prompt)["input_ids"]])
            alone, _ = session(ids, np.ones_like(ids))
            real = batch["attention_mask"][row].astype(bool)
            assert np.abs(logits[row][real] - alone[0]).max() < 1e-4, side


def test_kv_cache_steps_equal_full_forward(exported):
    model_dir, onnx_dir = exported
    session = OnnxCausalLM(onnx_dir)
    if not session.with_past:
        pytest.skip("exported without --with-past")
    ids = np.array([AutoTokenizer.from_pretrained(model_dir)(PROMPTS[0])["input_ids"]])
    full, _ = session(ids, np.ones_like(ids))
    logits, past = session(ids[:, :5], np.ones((1, 5)))
    steps = [logits[0, -1]]
    for t in range(5, ids.shape[1]):
        logits, past = session(ids[:, t : t + 1], np.ones((1, t + 1)), past)
        steps.append(logits[0, -1])
    assert np.abs(np.stack(steps) - full[0, 4:]).max() < 1e-4


@pytest.mark.gpu
@pytest.mark.skipif(
    "CUDAExecutionProvider" not in ort.get_available_providers() or not torch.cuda.is_available(),
    reason="needs a CUDA GPU with onnxruntime's CUDA provider",
)
def test_cuda_fp16_export(tiny_llama, tmp_path):
    onnx_dir = export_onnx(tiny_llama, tmp_path / "fp16", weights="fp16", with_past=True)
    session = OnnxCausalLM(onnx_dir)
    assert session.provider == "CUDAExecutionProvider"
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    batch = tokenizer(list(DEFAULT_PROMPTS), return_tensors="pt", padding=True)
    with torch.no_grad():
        reference = AutoModelForCausalLM.from_pretrained(tiny_llama)(**batch).logits.numpy()
    logits, _ = session(batch["input_ids"].numpy(), batch["attention_mask"].numpy())
    real = batch["attention_mask"].numpy().astype(bool)
    assert np.abs(logits.astype(np.float32) - reference)[real].max() < 5e-2  # fp16 tolerance, see README
    assert (logits.argmax(-1) == reference.argmax(-1))[real].mean() > 0.95
