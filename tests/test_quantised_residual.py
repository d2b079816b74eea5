"""The 4-bit residual (--residual nf4 / int4): it loads from disk alone in 4 bits, PEFT's adapter on it gives
what its dequantised weights give, TRL trains on it, merge folds the trained adapter into the dequantised
weights (saying so), and the refit lowers each layer's output error."""

import json
import logging
import re
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from corda_surgery.calib.data import CalibrationSpec
from corda_surgery.checkpoint.reader import CheckpointError
from corda_surgery.errors import OptionsError
from corda_surgery.export.merge import merge_adapter
from corda_surgery.surgery.calibration import calibrate
from corda_surgery.surgery.options import SurgeryOptions
from corda_surgery.surgery.run import decompose_checkpoint
from tests.helpers import PROMPTS, cli_error, logits
from tests.models import save_tiny_model

peft = pytest.importorskip("peft", reason="peft is a test extra")
from peft import PeftModel  # noqa: E402

SPEC = CalibrationSpec("nq_open", samples=16, seq_len=48, batch_size=4)
GROUP = 32


@pytest.fixture(scope="module")
def model_and_store(tmp_path_factory):
    """SmolLM2's shape (tied head), 128 wide so that NF4's blocks of 64 and int4's groups divide every weight."""
    root = tmp_path_factory.mktemp("quantised")
    model = save_tiny_model(root / "model", "llama", hidden=128, tied=True)
    return model, calibrate(model, SPEC, root / "cov.h5", progress=False)


def _surgery(model_and_store, out, **options):
    model, store = model_and_store
    settings = SurgeryOptions.of(**({"rank": 8, "group_size": GROUP} | options))
    return decompose_checkpoint(model, out, settings, stores=[store], progress=False)


def _exact_cpu_kernels(model):
    """bitsandbytes' bfloat16 CPU kernel (AVX512-BF16) rounds the 4-bit matmul: off, the layer computes in float32."""
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
    return model


def _load(folder, residual):
    """How a trainer loads the residual: NF4 as is; int4 dequantised (PEFT cannot wrap compressed-tensors' packed
    linears, and the CPU has no kernel for them)."""
    if residual == "nf4":
        return _exact_cpu_kernels(AutoModelForCausalLM.from_pretrained(folder))
    from transformers import CompressedTensorsConfig

    return AutoModelForCausalLM.from_pretrained(folder, quantization_config=CompressedTensorsConfig(dequantize=True))


def _with_adapter(folder, residual="nf4"):
    """The residual from disk with its adapter, and the linears' types as loaded (before PEFT wraps them)."""
    base = _load(folder, residual)
    q_proj, head = base.model.layers[0].self_attn.q_proj, base.lm_head
    return PeftModel.from_pretrained(base, folder / "adapter").eval(), (q_proj, head)


@pytest.mark.parametrize("residual", ["nf4", "int4"])
def test_the_residual_loads_in_4_bits_and_merges_to_what_it_computes(model_and_store, tmp_path, residual, caplog):
    """From disk alone: the targets load quantised (NF4 as bitsandbytes' Linear4bit holding uint8 codes, no float
    copy; int4 through compressed-tensors), every other linear as stored; residual + adapter gives the logits of
    the merged checkpoint (dequantised residual + s·B·A) to float rounding."""
    out = _surgery(model_and_store, tmp_path / "out", mode="ipm", residual=residual)
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    kept = config["llm_int8_skip_modules" if residual == "nf4" else "ignore"]
    assert kept == ["lm_head"]  # the tied head, the one linear no target covers
    model, (q_proj, head) = _with_adapter(out, residual)
    if residual == "nf4":
        import bitsandbytes as bnb

        assert isinstance(q_proj, bnb.nn.Linear4bit) and q_proj.weight.dtype == torch.uint8
        assert not isinstance(head, bnb.nn.Linear4bit)
    tokenizer = AutoTokenizer.from_pretrained(out)
    with caplog.at_level(logging.WARNING):
        merged = merge_adapter(out, out / "adapter", tmp_path / "merged", progress=False)
    assert f"stores its residual in {residual}" in caplog.text and "dequantised weights" in caplog.text
    assert "quantization_config" not in json.loads((merged / "config.json").read_text())
    plain = AutoModelForCausalLM.from_pretrained(merged).eval()
    torch.testing.assert_close(logits(model, tokenizer), logits(plain, tokenizer), atol=2e-5, rtol=0)


def test_the_int4_residual_loads_compressed_as_vllm_and_transformers_serve_it(model_and_store, tmp_path):
    """Loaded as stored (compressed-tensors keeps the packed codes), the residual computes what its dequantised
    load computes."""
    out = _surgery(model_and_store, tmp_path / "out", mode="ipm", residual="int4")
    compressed = AutoModelForCausalLM.from_pretrained(out).eval()
    assert compressed.model.layers[0].self_attn.q_proj.weight_packed.dtype == torch.int32
    tokenizer = AutoTokenizer.from_pretrained(out)
    torch.testing.assert_close(
        logits(compressed, tokenizer), logits(_load(out, "int4").eval(), tokenizer), atol=2e-5, rtol=0
    )


@pytest.mark.parametrize("residual", ["nf4", "int4"])
def test_the_refit_lowers_every_layers_output_error(model_and_store, tmp_path, residual):
    """Per layer, tr(E·C·Eᵀ)/tr(W·C·Wᵀ) with B refit is at most the plain quantised residual's (the refit keeps its
    best round), and lower summed over the layers: clearly for NF4, which knows nothing of C; for GPTQ, whose
    rounding already minimises the same metric, a little."""
    out = _surgery(model_and_store, tmp_path / "out", mode="ipm", residual=residual)
    layers = json.loads((out / "surgery.json").read_text())["layers"].values()
    before = torch.tensor([layer["quantisation_error"] for layer in layers])
    after = torch.tensor([layer["quantisation_error_refit"] for layer in layers])
    assert (before > 0).all() and (after <= before).all()
    assert after.sum() < {"nf4": 0.9, "int4": 0.99}[residual] * before.sum()  # GPTQ already weighs by C
    plain = _surgery(model_and_store, tmp_path / "plain", mode="ipm", residual=residual, refit_rounds=0)
    layers = json.loads((plain / "surgery.json").read_text())["layers"].values()
    assert [layer["quantisation_error"] for layer in layers] == pytest.approx(before.tolist(), rel=1e-6)
    assert all("quantisation_error_refit" not in layer for layer in layers)


def test_trl_trains_the_adapter_on_the_nf4_residual(model_and_store, tmp_path):
    """QLoRA with a CorDA start: SFTTrainer on the 4-bit base (bitsandbytes' CPU backend), the base untouched; the
    saved adapter reloads onto the residual from disk, and merges to the same logits."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    out = _surgery(model_and_store, tmp_path / "out", mode="ipm", residual="nf4")
    tokenizer = AutoTokenizer.from_pretrained(out)
    base = _exact_cpu_kernels(AutoModelForCausalLM.from_pretrained(out))
    model = PeftModel.from_pretrained(base, out / "adapter", is_trainable=True)
    codes = base.model.layers[0].mlp.down_proj.weight.detach().clone()
    initial = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_B" in n}
    args = SFTConfig(
        output_dir=str(tmp_path / "train"), max_steps=4, per_device_train_batch_size=2, learning_rate=1e-2,
        save_strategy="no", report_to=[], use_cpu=True, seed=0, disable_tqdm=True, max_length=32, bf16=False,
        logging_steps=1,
    )  # fmt: skip
    dataset = Dataset.from_list([{"text": text} for text in PROMPTS * 4])
    trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer)
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert losses and all(torch.isfinite(torch.tensor(losses)))
    assert all(not torch.equal(p, initial[n]) for n, p in model.named_parameters() if n in initial)
    assert torch.equal(base.model.layers[0].mlp.down_proj.weight, codes)  # the 4-bit base does not train
    model.save_pretrained(tmp_path / "trained")
    start, _ = _with_adapter(out)
    reloaded = logits(PeftModel.from_pretrained(_load(out, "nf4"), tmp_path / "trained").eval(), tokenizer)
    assert (reloaded - logits(start, tokenizer)).abs().max() > 1e-3  # the trained adapter, not the initial one
    merged = merge_adapter(out, tmp_path / "trained", tmp_path / "merged", progress=False)
    plain = AutoModelForCausalLM.from_pretrained(merged).eval()
    torch.testing.assert_close(logits(plain, tokenizer), reloaded, atol=2e-5, rtol=0)


def test_qloras_start_needs_no_calibration(model_and_store, tmp_path):
    """--method lora --residual nf4 is QLoRA's own start: the weights in NF4, B zero, nothing refit."""
    model, _ = model_and_store
    options = SurgeryOptions.of(method="lora", residual="nf4")
    out = decompose_checkpoint(model, tmp_path / "out", options, progress=False)
    assert json.loads((out / "surgery.json").read_text())["refit_rounds"] == 0
    adapter = load_file(out / "adapter" / "adapter_model.safetensors")
    assert all(not tensor.any() for name, tensor in adapter.items() if "lora_B" in name)


@pytest.mark.parametrize(
    ("options", "named"),
    [
        ({"method": "lora", "residual": "int4"}, "residual int4"),
        ({"method": "pissa", "residual": "nf4", "refit_rounds": 2}, "refit_rounds"),
        ({"residual": "int4", "refit_rounds": -1}, "refit_rounds"),
        ({"residual": "int4", "group_size": 0}, "group_size"),
        ({"residual": "int8"}, "residual"),
        ({"refit_rounds": 2}, "refit_rounds"),  # no quantised residual to refit to
    ],
)
def test_options_that_cannot_go_together_are_refused(options, named):
    with pytest.raises(OptionsError, match=named):
        SurgeryOptions.of(**options)


def test_a_width_the_groups_do_not_divide_is_refused_before_calibrating(model_and_store, tmp_path):
    """convert refuses it before the calibration starts: no store is written, beside the output or anywhere."""
    model, _ = model_and_store
    message = cli_error("convert", str(model), "--residual", "int4", "--group-size", "48", "--out", str(tmp_path / "o"))
    assert re.search(r"model\.layers\.0\.\S+: 128 inputs do not split into groups of 48 \(--group-size\)", message)
    assert list(tmp_path.iterdir()) == []


def test_conv1d_weights_are_refused_naming_the_family(tmp_path):
    model = save_tiny_model(tmp_path / "gpt2", "gpt2")
    message = cli_error("decompose", str(model), "--method", "pissa", "--residual", "nf4", "--out", str(tmp_path / "o"))
    assert "gpt2" in message and "Conv1D" in message
    assert not (tmp_path / "o").exists()


def _tamper(tensors, key, form):
    """One stranger's change to a quantised folder's tensors (``key``: a quantised linear's module path)."""
    if form == "absmax":
        tensors[f"{key}.weight.absmax"] = tensors[f"{key}.weight.absmax"][:-1].clone()
    elif form == "state":  # a shape in the JSON state that the codes do not hold
        state = bytes(tensors[f"{key}.weight.quant_state.bitsandbytes__nf4"].tolist()).replace(b"128", b"1e309")
        tensors[f"{key}.weight.quant_state.bitsandbytes__nf4"] = torch.tensor(list(state), dtype=torch.uint8)
    elif form == "shape":  # zero columns: no group size
        tensors[f"{key}.weight_shape"] = torch.tensor([128, 0])
    else:  # an asymmetric scheme's zero points, which this tool never writes
        tensors[f"{key}.weight_zero_point"] = torch.zeros(16, 4, dtype=torch.int32)


@pytest.mark.parametrize(
    ("residual", "form", "named"),
    [
        ("nf4", "absmax", "model.layers.1.mlp.up_proj.weight is no nf4 weight"),
        ("nf4", "state", "model.layers.1.mlp.up_proj.weight is no nf4 weight"),
        ("int4", "shape", "model.layers.1.mlp.up_proj.weight_packed is no int4 weight"),
        ("int4", "zero point", "model.layers.1.mlp.up_proj.weight_zero_point is quantised in a layout"),
    ],
)
def test_merge_refuses_a_tampered_quantised_weight_naming_it(model_and_store, tmp_path, residual, form, named):
    """A stranger's folder: whatever does not fit the layout this tool writes is named, nothing is dequantised."""
    out = _surgery(model_and_store, tmp_path / "out", residual=residual, refit_rounds=0)
    tampered = tmp_path / "tampered"
    shutil.copytree(out, tampered)
    shard = next(tampered.glob("*.safetensors"))
    tensors = load_file(shard)
    _tamper(tensors, "model.layers.1.mlp.up_proj", form)
    save_file(tensors, shard, metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=re.escape(named)):
        merge_adapter(tampered, tampered / "adapter", tmp_path / "merged", progress=False)
    assert not (tmp_path / "merged").exists()


def test_merge_refuses_a_quantization_config_it_did_not_write(model_and_store, tmp_path):
    """An 8-bit bitsandbytes config over the same files: not read as NF4."""
    out = _surgery(model_and_store, tmp_path / "out", residual="nf4", refit_rounds=0)
    config = json.loads((out / "config.json").read_text())
    config["quantization_config"] |= {"load_in_4bit": False, "load_in_8bit": True}
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="no nf4 or int4 residual of corda-surgery's"):
        merge_adapter(out, out / "adapter", tmp_path / "merged", progress=False)


@pytest.mark.parametrize("residual", ["nf4", "int4"])
def test_a_bfloat16_checkpoint_merges_back_to_bfloat16(tmp_path, residual):
    """The residual is quantised from the checkpoint's own dtype (NF4's state records it, int4's scales carry it),
    so the merged weights come back in it: no float32 tensors in a bfloat16 checkpoint."""
    model = save_tiny_model(tmp_path / "model", "llama", hidden=128, tied=True, dtype=torch.bfloat16)
    store = calibrate(model, SPEC, tmp_path / "cov.h5", progress=False)
    out = _surgery((model, store), tmp_path / "out", mode="ipm", residual=residual)
    merged = merge_adapter(out, out / "adapter", tmp_path / "merged", progress=False)
    stored = load_file(next(merged.glob("*.safetensors")))
    assert {tensor.dtype for tensor in stored.values()} == {torch.bfloat16}


def test_the_refit_is_the_least_squares_b_in_the_covariance_metric():
    """One round: B solves min ‖(W − Q − s·B·A)·C^{1/2}‖ for the first rounding Q, A kept (the normal equations
    hold), and it lowers the error on a coarse grid; the error is tr(E·C·Eᵀ) relative to tr(W·C·Wᵀ)."""
    from dataclasses import dataclass

    from corda_surgery.decomposition.refit import refit_adapter, weighted_error

    @dataclass
    class Rounded:
        dequantised: torch.Tensor

    generator = torch.Generator().manual_seed(0)
    weight, lora_a, lora_b = (torch.randn(*shape, generator=generator) for shape in [(12, 10), (3, 10), (12, 3)])
    inputs = torch.randn(200, 10, generator=generator, dtype=torch.float64) * torch.linspace(0.1, 3, 10)
    covariance, scaling = inputs.T @ inputs / 200, 2.0

    def quantise(residual):
        return Rounded((residual / 0.5).round() * 0.5)

    refit = refit_adapter(weight, lora_a, lora_b, scaling, covariance, quantise, rounds=1)
    first = quantise((weight.double() - scaling * lora_b.double() @ lora_a.double()).float()).dequantised.double()
    a, error = lora_a.double(), weight.double() - first - scaling * lora_b.double() @ lora_a.double()
    reference = weighted_error(weight.double(), covariance)
    assert refit.error_before == pytest.approx(weighted_error(error, covariance) / reference, rel=1e-6)
    assert refit.error_after < refit.error_before
    b = refit.lora_b.double()
    torch.testing.assert_close(
        (weight.double() - first - scaling * b @ a) @ covariance @ a.T,
        torch.zeros(12, 3),
        atol=1e-4,
        rtol=0,
        check_dtype=False,
    )  # fmt: skip  (B is returned in float32)


@pytest.mark.parametrize("command", ["calibrate", "export-onnx"])
def test_a_4_bit_residual_is_no_input_but_to_merge(model_and_store, tmp_path, command):
    """The commands that read float weights (calibrate, and export-onnx, whose loader is not the view's) refuse a
    quantised folder in one line that says to merge it first."""
    out = _surgery(model_and_store, tmp_path / "out", residual="nf4", refit_rounds=0)
    message = cli_error(command, str(out), "--out", str(tmp_path / "next"))
    assert "a quantised checkpoint ('bitsandbytes')" in message and "merge" in message
    assert not (tmp_path / "next").exists()


@pytest.mark.parametrize("residual", ["nf4", "int4"])
@pytest.mark.parametrize(("shape", "dtype"), [((48, 100), torch.float32), ((40, 96), torch.bfloat16)])
def test_the_planned_layout_is_what_the_quantisers_write(residual, shape, dtype):
    """The streaming writer plans every tensor before it is made: the plan (names, shapes, dtypes, NF4's JSON state
    included) equals what bitsandbytes and the packer produce, for element counts that are no multiple of 64 too."""
    from corda_surgery.checkpoint.quantised import ResidualFormat, quantised_specs
    from corda_surgery.decomposition.gptq import gptq_quantise
    from corda_surgery.decomposition.nf4 import nf4_quantise

    weight, group = torch.randn(*shape, generator=torch.Generator().manual_seed(0)), 4
    if residual == "nf4":
        made = nf4_quantise(weight, dtype).tensors("m.weight")
    else:
        made = gptq_quantise(weight, torch.eye(shape[1]), group_size=group, scale_dtype=dtype).tensors("m.weight")
    planned = quantised_specs("m.weight", shape, dtype, ResidualFormat(residual), group)
    assert {name: (tuple(t.shape), t.dtype) for name, t in made.items()} == planned
