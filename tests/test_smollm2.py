"""The real embedded model, SmolLM2-135M-Instruct: calibration and handoff end to end."""

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from corda_surgery.calib.data import CalibrationSpec
from corda_surgery.calib.store import CovarianceStore
from corda_surgery.models import embedded_model_dir
from corda_surgery.surgery.calibration import calibrate
from corda_surgery.surgery.options import SurgeryOptions
from corda_surgery.surgery.run import decompose_checkpoint
from tests.helpers import genai_batch_greedy, transformers_batch_greedy

pytestmark = pytest.mark.slow
peft = pytest.importorskip("peft", reason="peft is a test extra")

TEXT = [
    "The capital of France is Paris. The Eiffel Tower was completed in 1889 for the World's Fair.",
    "Janet's ducks lay 16 eggs per day. She eats three for breakfast every morning.",
]


@pytest.fixture(scope="session")
def smollm2():
    return embedded_model_dir()


@pytest.fixture(scope="session")
def smollm2_store(smollm2, tmp_path_factory):
    out = tmp_path_factory.mktemp("smollm2") / "cov.h5"
    return calibrate(smollm2, CalibrationSpec("nq_open", samples=16, seq_len=128, batch_size=8), out, progress=False)


def test_calibration_writes_a_complete_store(smollm2_store):
    with CovarianceStore(smollm2_store) as store:
        assert len(store.entries) == 30 * 4
        assert len(store.by_linear) == 30 * 7
        assert store.calibration["samples_used"] == 16
        covariance = store.covariance("model.layers.29.mlp.down_proj")
        assert covariance.shape == (1536, 1536) and torch.isfinite(covariance).all()


@pytest.fixture(scope="session")
def reference(smollm2):
    """Original logits in float32 and float64, and the float32 model's own rounding error (its floor)."""
    tokenizer = AutoTokenizer.from_pretrained(smollm2)
    batch = tokenizer(TEXT, return_tensors="pt", padding=True)
    model = AutoModelForCausalLM.from_pretrained(smollm2).eval()
    with torch.no_grad():
        logits32 = model(**batch).logits
        logits64 = model.double()(**batch).logits
    mask = batch["attention_mask"].bool()
    floor = float((logits32.double() - logits64)[mask].abs().max())
    return batch, {torch.float32: logits32, torch.float64: logits64}, floor


def handoff_error(out, batch, reference_logits, dtype) -> float:
    """Max |Δlogit| on real tokens between residual + PEFT adapter and the original, run in ``dtype``."""
    from peft import PeftModel

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(out), out / "adapter", is_trainable=True)
    with torch.no_grad():
        logits = model.to(dtype).eval()(**batch).logits
    mask = batch["attention_mask"].bool()
    return float((logits - reference_logits[dtype])[mask].abs().max())


@pytest.fixture(scope="session")
def surgeries(smollm2, smollm2_store, tmp_path_factory):
    """Each mode's rank-16 surgery of SmolLM2, made once for the tests that read it."""
    made = {}

    def surgery(mode: str):
        if mode not in made:
            out = tmp_path_factory.mktemp("surgery") / mode
            options = SurgeryOptions.of(mode=mode, rank=16)
            made[mode] = decompose_checkpoint(smollm2, out, options, stores=[smollm2_store], progress=False)
        return made[mode]

    return surgery


@pytest.mark.parametrize("mode", ["kpm", "ipm"])
def test_handoff_on_smollm2(surgeries, reference, mode):
    """The stored float32 weights carry the surgery: run in float64 the logits agree to 1e-4; run in
    float32 they agree to within twice the float32 model's own rounding error (~1e-4 for 36-unit logits)."""
    batch, logits, floor = reference
    out = surgeries(mode)
    error64 = handoff_error(out, batch, logits, torch.float64)
    error32 = handoff_error(out, batch, logits, torch.float32)
    print(
        f"\nSmolLM2-135M {mode} rank 16 handoff max |Δlogit|: float64 run {error64:.2e}, float32 run "
        f"{error32:.2e} (float32 rounding floor of the original model {floor:.2e})"
    )
    assert error64 <= 1e-4
    assert error32 <= max(1e-4, 2 * floor)


def test_merge_and_onnx_greedy_on_smollm2(smollm2, surgeries, tmp_path):
    """convert → merge (untouched adapter gives the original weights) → ONNX with KV cache → 20 greedy tokens."""
    from safetensors.torch import load_file

    from corda_surgery.export.merge import merge_adapter
    from corda_surgery.export.onnx_export import export_onnx
    from corda_surgery.export.verify import verify_onnx

    out = surgeries("kpm")
    merged = merge_adapter(out, out / "adapter", tmp_path / "merged", progress=False)
    original, rebuilt = load_file(smollm2 / "model.safetensors"), load_file(merged / "model.safetensors")
    assert original.keys() == rebuilt.keys()
    worst = max(float((rebuilt[k] - original[k]).norm() / original[k].norm()) for k in original)
    assert worst < 1e-5
    onnx_dir = export_onnx(merged, tmp_path / "onnx", with_past=True)
    report = verify_onnx(onnx_dir, merged, new_tokens=20, prefill_tokens=32, decode_steps=4, repeats=1)
    print(
        f"\nSmolLM2 ONNX ({report.provider}): max |Δlogit| {report.max_abs_error:.2e}, greedy match "
        f"{report.greedy_match}"
    )
    assert report.greedy_match
    assert report.max_rel_error < 1e-4
    prompts = [*TEXT, "The tallest mountain in the world is"]  # genai pads the batch to its longest prompt
    assert genai_batch_greedy(onnx_dir, prompts, 12) == transformers_batch_greedy(merged, prompts, 12)


def test_corda_plus_handoff_on_smollm2(smollm2, smollm2_store, reference, tmp_path):
    import json

    batch, logits, floor = reference
    out = decompose_checkpoint(
        smollm2,
        tmp_path / "plus",
        SurgeryOptions.of(method="corda++", mode="ipm", rank=16, rank_budget=16, min_rank=4, max_rank=64),
        stores=[smollm2_store],
        progress=False,
    )
    ranks = [layer["rank"] for layer in json.loads((out / "surgery.json").read_text())["layers"].values()]
    assert len(set(ranks)) > 1
    error64 = handoff_error(out, batch, logits, torch.float64)
    error32 = handoff_error(out, batch, logits, torch.float32)
    print(f"\nSmolLM2-135M corda++ ipm handoff: float64 {error64:.2e}, float32 {error32:.2e}")
    assert error64 <= 1e-4
    assert error32 <= max(1e-4, 2 * floor)
