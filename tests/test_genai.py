"""export-onnx's folder in onnxruntime-genai, loaded from the folder alone: its tokenizer, config and graph."""

import json
import logging

import pytest

from corda_surgery.export.genai_config import GENAI_CONFIG
from corda_surgery.export.onnx_export import export_onnx
from tests.helpers import PROMPTS, genai_batch_greedy, transformers_batch_greedy


@pytest.mark.parametrize("weights", ["fp32", "int4"])
def test_genai_generates_from_the_export_alone(tiny_smollm2, tmp_path, weights):
    """fp32: the padded batch's greedy tokens are transformers'; int4: the folder loads and generates."""
    out = export_onnx(tiny_smollm2, tmp_path / weights, weights=weights, with_past=True)
    assert json.loads((out / "onnx_export.json").read_text())["genai_config"] is True
    tokens = genai_batch_greedy(out, PROMPTS, new_tokens=8)
    assert [len(row) for row in tokens] == [8, 8]
    if weights == "fp32":
        assert tokens == transformers_batch_greedy(tiny_smollm2, PROMPTS, new_tokens=8)


def test_genai_config_maps_the_graph_names(tiny_qwen2, tmp_path):
    out = export_onnx(tiny_qwen2, tmp_path / "out", with_past=True)
    config = json.loads((out / GENAI_CONFIG).read_text())
    decoder = config["model"]["decoder"]
    assert config["model"]["type"] == "qwen2" and config["search"]["past_present_share_buffer"] is False
    assert decoder["inputs"]["past_key_names"] == "past_key_values.%d.key"
    assert decoder["outputs"]["present_value_names"] == "present.%d.value"
    assert decoder["num_hidden_layers"] == 3 and decoder["num_key_value_heads"] == 2


@pytest.mark.parametrize(("fixture", "with_past", "reason"), [
    ("tiny_llama", False, "exported without --with-past"), ("tiny_gpt2", True, "model type gpt2"),
])  # fmt: skip
def test_no_genai_config_where_genai_cannot_run_it(request, tmp_path, caplog, fixture, with_past, reason):
    with caplog.at_level(logging.WARNING):
        out = export_onnx(request.getfixturevalue(fixture), tmp_path / "out", with_past=with_past)
    assert not (out / GENAI_CONFIG).exists()
    assert json.loads((out / "onnx_export.json").read_text())["genai_config"] is False
    assert f"no {GENAI_CONFIG} (onnxruntime-genai: {reason})" in caplog.text
