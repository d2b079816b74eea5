"""Any transformers architecture, discovered from the model: one tiny random checkpoint per model_type.

For each: the streamed covariances equal whole-model forward hooks, the observed input groups are the ones
the model really shares, the KPM and IPM handoff reproduces the original logits, and (for the causal ones)
merge → ONNX matches PyTorch. README's family list is this matrix.
"""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForImageTextToText, AutoTokenizer

from corda_surgery.calib.data import CalibrationSpec, token_batches
from corda_surgery.calib.store import CovarianceStore
from corda_surgery.checkpoint.view import ModelView
from corda_surgery.surgery.calibration import calibrate
from corda_surgery.surgery.options import SurgeryOptions
from corda_surgery.surgery.run import decompose_checkpoint
from corda_surgery.export.merge import merge_adapter
from corda_surgery.export.onnx_export import export_onnx
from corda_surgery.export.verify import verify_onnx
from tests.families import FAMILIES, save_family_model
from tests.helpers import logits, reference_covariances, relative

peft = pytest.importorskip("peft", reason="peft is a test extra")
from peft import PeftModel  # noqa: E402

SPEC = CalibrationSpec("gsm8k", samples=8, seq_len=32, batch_size=4)  # longer than the sliding windows (8)
MULTIMODAL = {name for name, overrides in FAMILIES.items() if overrides == "multimodal"}
FUSED_EXPERTS = {"mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "gpt_oss", "phimoe", "deepseek_v3"}


def _auto(model_type: str):
    return AutoModelForImageTextToText if model_type in MULTIMODAL else AutoModelForCausalLM


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param)
    model_dir = save_family_model(root / "model", request.param)
    store = calibrate(model_dir, SPEC, root / "cov.h5", progress=False)
    return request.param, model_dir, store, root


def test_streamed_covariances_equal_whole_model_hooks(family):
    model_type, model_dir, store, _ = family
    view = ModelView(model_dir)
    model = _auto(model_type).from_pretrained(model_dir, dtype=torch.float32).eval()
    vocab = view.config.get_text_config().vocab_size
    batches, _ = token_batches(SPEC, AutoTokenizer.from_pretrained(model_dir), vocab)
    expected = reference_covariances(model, batches, view.blocks_prefix)
    with CovarianceStore(store) as opened:
        assert {name for name, entry in opened.by_linear.items() if entry.count} == set(expected)
        for name, reference in expected.items():
            assert relative(opened.covariance(name), reference) < 1e-5, name
        for entry in opened.entries.values():  # members of a group really read the leader's input
            for member in entry.linears if entry.count else ():  # an expert no token was routed to: none
                assert relative(expected[member], expected[entry.name]) == 0, member


@pytest.mark.parametrize("mode", ["kpm", "ipm"])
def test_handoff_reproduces_the_original_logits(family, mode):
    model_type, model_dir, store, root = family
    auto = _auto(model_type)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    reference = logits(auto.from_pretrained(model_dir).eval(), tokenizer)
    out = decompose_checkpoint(model_dir, root / mode, SurgeryOptions(mode=mode, rank=4), stores=[store],
                               overwrite=True, progress=False)  # fmt: skip
    model = PeftModel.from_pretrained(auto.from_pretrained(out), out / "adapter").eval()
    assert float((logits(model, tokenizer) - reference).abs().max()) <= 1e-4
    report = json.loads((out / "surgery.json").read_text())
    assert len(report["layers"]) > 0 and all(
        name.startswith(ModelView(model_dir).blocks_prefix) for name in report["layers"]
    )
    if model_type in FUSED_EXPERTS:  # every expert of every fused parameter adapted
        fused = [e for block in ModelView(model_dir).experts for e in block.values()]
        assert fused and len(report["adapter_parameters"]) == 2 * len(fused)
        assert not [name for name in report["unadapted_weights"] if ".experts." in name]
        layer = report["layers"][next(iter(report["adapter_parameters"]))]
        assert len(layer["experts"]) == 4  # top-2 routing: every real token counted by two experts
        assert sum(record["tokens"] for record in layer["experts"]) == 2 * SPEC.samples * SPEC.seq_len


def test_merge_and_onnx_match_pytorch(family):
    model_type, model_dir, store, root = family
    if model_type in MULTIMODAL:
        pytest.skip("ONNX export covers causal LMs; a multimodal checkpoint's language tower is converted, "
                    "its export needs the image inputs")  # fmt: skip
    out = decompose_checkpoint(model_dir, root / "onnx-src", SurgeryOptions(rank=4), stores=[store], overwrite=True,
                               progress=False)  # fmt: skip
    merged = merge_adapter(out, out / "adapter", root / "merged", overwrite=True, progress=False)
    onnx_dir = export_onnx(merged, root / "onnx", overwrite=True)
    report = verify_onnx(onnx_dir, merged, new_tokens=4, prefill_tokens=8, decode_steps=2, repeats=1)
    assert report.max_abs_error <= 1e-4 and report.greedy_match


def test_a_sliding_window_layer_sees_its_own_mask(tmp_path):
    """Gemma 2 alternates sliding-window and global layers: streaming must give each its own mask."""
    model_dir = save_family_model(tmp_path / "model", "gemma2")
    store = calibrate(model_dir, SPEC, tmp_path / "sliding.h5", progress=False)
    config = json.loads((model_dir / "config.json").read_text())
    assert config["layer_types"][0] == "sliding_attention" and config["sliding_window"] < SPEC.seq_len
    (model_dir / "config.json").write_text(json.dumps({**config, "layer_types": ["full_attention"] * 2}))
    everywhere_global = calibrate(model_dir, SPEC, tmp_path / "global.h5", progress=False)
    o_proj = "model.layers.0.self_attn.o_proj"  # reads the attention output of layer 0
    with CovarianceStore(store) as sliding, CovarianceStore(everywhere_global) as full:
        assert relative(sliding.covariance(o_proj), full.covariance(o_proj)) > 1e-3
        q_proj = "model.layers.0.self_attn.q_proj"  # before any attention: the same either way
        assert relative(sliding.covariance(q_proj), full.covariance(q_proj)) < 1e-6
