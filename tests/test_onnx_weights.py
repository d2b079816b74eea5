"""export-onnx --weights: a tied embedding table stored once, and int8/int4 weights through onnxruntime's tools."""

import json

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from torch.export import Dim

from corda_surgery.errors import OptionsError
from corda_surgery.export.onnx_export import UNEXPORTABLE, ExportError, _narrowed_axes, export_onnx
from corda_surgery.export.verify import verify_onnx


def _initializers(onnx_dir) -> dict[str, np.ndarray]:
    graph = onnx.load(str(onnx_dir / "model.onnx")).graph
    return {tensor.name: numpy_helper.to_array(tensor) for tensor in graph.initializer}


def _stored_bytes(onnx_dir) -> int:
    return (onnx_dir / "model.onnx.data").stat().st_size


@pytest.fixture(scope="module")
def fp32_export(tiny_smollm2, tmp_path_factory):
    return export_onnx(tiny_smollm2, tmp_path_factory.mktemp("fp32") / "out", with_past=True)


def test_a_tied_head_reads_the_embedding_table(tiny_smollm2, fp32_export):
    """The exporter's transposed copy of the table is gone; the logits are PyTorch's."""
    info = json.loads((fp32_export / "onnx_export.json").read_text())
    assert info["weights"] == "fp32" and info["tied_embeddings"] is True
    config = json.loads((tiny_smollm2 / "config.json").read_text())
    vocab, hidden = config["vocab_size"], config["hidden_size"]
    shapes = [array.shape for array in _initializers(fp32_export).values()]
    assert shapes.count((vocab, hidden)) == 1 and (hidden, vocab) not in shapes
    report = verify_onnx(fp32_export, tiny_smollm2, new_tokens=8, prefill_tokens=16, decode_steps=4, repeats=1)
    assert report.max_abs_error < 1e-4 and report.greedy_match


def test_an_untied_head_is_left_as_exported(tiny_llama, tmp_path):
    out = export_onnx(tiny_llama, tmp_path / "out")
    assert json.loads((out / "onnx_export.json").read_text())["tied_embeddings"] is False


@pytest.mark.parametrize(
    ("weights", "bits", "size_ratio", "tolerance"), [("int8", 8, 0.45, 2e-2), ("int4", 4, 0.3, 0.3)]
)
def test_quantised_weights_are_matmulnbits_with_the_table_once(
    tiny_smollm2, fp32_export, tmp_path, weights, bits, size_ratio, tolerance
):
    out = export_onnx(tiny_smollm2, tmp_path / weights, weights=weights, block_size=32, with_past=True)
    info = json.loads((out / "onnx_export.json").read_text())
    assert (info["weights"], info["block_size"], info["tied_embeddings"]) == (weights, 32, True)
    graph = onnx.load(str(out / "model.onnx")).graph
    kinds = [node.op_type for node in graph.node]
    assert "MatMul" not in [k for k, n in zip(kinds, graph.node) if any(i in _initializers(out) for i in n.input)]
    matmuls = [node for node in graph.node if node.op_type == "MatMulNBits"]
    widths = {node.name: next(a.i for a in node.attribute if a.name == "bits") for node in matmuls}
    assert len(matmuls) == 3 * 7 + 1  # the head in 8 bits, the body in ``bits``
    assert all(width == (8 if "lm_head" in name else bits) for name, width in widths.items())
    (lookup,) = [node for node in graph.node if node.op_type == "GatherBlockQuantized"]
    produced_by = {output: node for node in graph.node for output in node.output}
    head = next(node for node in matmuls if "lm_head" in node.name)
    assert produced_by[lookup.input[0]].input[0] == head.input[1]  # the head's packed weights, reshaped
    assert lookup.input[2] == head.input[2] and produced_by[lookup.input[3]].input[0] == head.input[3]
    table_size = np.prod(_initializers(fp32_export)["model.model.embed_tokens.weight"].shape)
    assert all(array.size < table_size for array in _initializers(out).values() if array.dtype == np.float32)
    assert _stored_bytes(out) <= size_ratio * _stored_bytes(fp32_export)
    report = verify_onnx(out, tiny_smollm2, new_tokens=8, prefill_tokens=16, decode_steps=4, repeats=1)
    assert report.max_abs_error < tolerance


@pytest.mark.parametrize("block_size", [8, 48])
def test_a_block_size_matmulnbits_cannot_take_is_refused(tiny_smollm2, tmp_path, block_size):
    with pytest.raises(OptionsError, match="block_size"):
        export_onnx(tiny_smollm2, tmp_path / "out", weights="int4", block_size=block_size)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("model_type", sorted(UNEXPORTABLE))
def test_a_family_no_exporter_can_run_is_refused_before_loading(tmp_path, model_type):
    """The reason in one line, before any weight is read (the folder has a config and nothing else)."""
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text(json.dumps({"model_type": model_type}))
    with pytest.raises(ExportError, match=f"{model_type} cannot be exported to ONNX: its "):
        export_onnx(tmp_path / "model", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_an_axis_the_exporter_only_bounds_is_found():
    """An exported program whose sequence axis is bounded above (as torch.onnx leaves MiniMax's, having applied
    torch.export's suggested fix without a word): the export reads the bound back, and would refuse."""

    class Bounded(torch.nn.Module):
        def forward(self, x):
            torch._check(x.shape[1] <= 16)  # what a loop over one block of 16 makes torch.export assume
            return x * 2

    program = torch.onnx.export(Bounded(), (torch.ones(2, 5),), dynamo=True, dynamic_shapes=({1: Dim("sequence")},))
    assert _narrowed_axes(program.exported_program) == ["x[1] ≤ 16"]


def test_verify_onnx_judges_a_quantised_export_by_its_perplexity_drift(tiny_smollm2, tmp_path, capsys):
    """--text: both perplexities on the text, the drift against --max-drift, said plainly, exit status 1 past it;
    without --text a quantised export's drift is not judged, and it says so."""
    import dataclasses

    from corda_surgery.cli_deploy import _verdict
    from tests.models import SAMPLE_TEXTS

    out = export_onnx(tiny_smollm2, tmp_path / "int8", weights="int8", with_past=True)
    report = verify_onnx(out, tiny_smollm2, new_tokens=4, prefill_tokens=8, decode_steps=2, repeats=1,
                         text="\n".join(SAMPLE_TEXTS), text_window=64)  # fmt: skip
    assert report.weights == "int8" and report.text_tokens > 500
    assert 0 < abs(report.perplexity_drift) < 0.10  # int8 moves the perplexity, a little
    assert _verdict(report, max_drift=0.10) == 0 and "within --max-drift 10%" in capsys.readouterr().out
    assert _verdict(report, max_drift=0.0) == 1 and "TOO FAR" in capsys.readouterr().out
    unjudged = dataclasses.replace(report, text_tokens=0)
    assert _verdict(unjudged, max_drift=0.0) == 0 and "not judged" in capsys.readouterr().out
