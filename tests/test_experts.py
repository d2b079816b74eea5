"""Mixture-of-experts checkpoints whose experts are fused 3-D parameters: every expert adapted.

Each expert's slice gets the covariance of the real tokens routed to it; the adapter is PEFT's
``target_parameters`` form, which stock PEFT loads and trains; merge and to-lora fold it back expert by
expert into the stored per-expert tensors.
"""

from __future__ import annotations

import json
import logging
import shutil

import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from corda_surgery.calib.data import CalibrationSpec, token_batches
from corda_surgery.calib.store import CovarianceStore
from corda_surgery.checkpoint.view import ModelView
from corda_surgery.errors import UnsupportedArchitecture
from corda_surgery.surgery.calibration import calibrate
from corda_surgery.surgery.options import SurgeryOptions
from corda_surgery.surgery.run import decompose_checkpoint
from tests.families import save_family_model
from tests.helpers import PROMPTS, cli_error, logits, reference_covariances, relative, run_cli, tensors
from tests.models import make_tokenizer

peft = pytest.importorskip("peft", reason="peft is a test extra")
from peft import PeftModel  # noqa: E402

SPEC = CalibrationSpec("gsm8k", samples=8, seq_len=32, batch_size=4)


@pytest.fixture(scope="module")
def mixtral(tmp_path_factory):
    root = tmp_path_factory.mktemp("mixtral")
    model_dir = save_family_model(root / "model", "mixtral")
    return model_dir, calibrate(model_dir, SPEC, root / "cov.h5", progress=False)


def test_routed_inputs_are_what_the_eager_expert_loop_multiplies(mixtral, monkeypatch):
    """An independent definition of each expert's inputs: the rows transformers' own eager loop passes to
    ``F.linear`` with that expert's slice of the fused weight."""
    model_dir, _ = mixtral
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    model.set_experts_implementation("eager")
    slices = {p[e].data_ptr(): f"{n}[{e}]" for n, p in model.named_parameters() if p.dim() == 3
              for e in range(p.shape[0])}  # fmt: skip
    sums: dict[str, torch.Tensor] = {}
    linear = torch.nn.functional.linear

    def spy(x, weight, bias=None):
        name = slices.get(weight.data_ptr())
        if name is not None:
            sums[name] = sums.get(name, 0) + x.double().T @ x.double()
        return linear(x, weight, bias)

    batches, _ = token_batches(SPEC, AutoTokenizer.from_pretrained(model_dir), model.config.vocab_size)
    assert all(bool(b.attention_mask.all()) for b in batches)  # the eager loop routes padding too: none here
    expected = reference_covariances(model, batches, "model.layers")
    monkeypatch.setattr(torch.nn.functional, "linear", spy)
    with torch.no_grad():
        for batch in batches:
            model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
    assert len(sums) == 2 * 4 * 2  # two projections of four experts in two layers, every one routed to
    for name, total in sums.items():
        assert relative(total / total.trace() * expected[name].trace(), expected[name]) < 1e-6, name


def test_padding_is_never_routed(mixtral, tmp_path):
    """Padded batches give every expert the same tokens, and so the same covariance, as unpadded ones."""
    model_dir, _ = mixtral
    spec = CalibrationSpec("alpaca", samples=6, seq_len=64, batch_size=3)
    padded = calibrate(model_dir, spec, tmp_path / "padded.h5", progress=False)
    single = calibrate(model_dir, CalibrationSpec("alpaca", samples=6, seq_len=64, batch_size=1),
                       tmp_path / "single.h5", progress=False)  # fmt: skip
    batches, _ = token_batches(spec, AutoTokenizer.from_pretrained(model_dir), 10_000)
    assert not all(bool(b.attention_mask.all()) for b in batches)
    with CovarianceStore(padded) as a, CovarianceStore(single) as b:
        experts = [name for name in a.entries if "experts" in name]
        assert len(experts) == 16
        for name in experts:
            assert a.entries[name].count == b.entries[name].count, name
            if a.entries[name].count:
                assert relative(a.covariance(name), b.covariance(name)) < 1e-5, name


def test_trained_expert_adapter_merges_and_converts_to_lora_like_peft(mixtral, tmp_path):
    """Stock PEFT trains the fused experts' factors; merge and to-lora give the trained model's logits."""
    from transformers import DataCollatorForLanguageModeling, Trainer, TrainingArguments

    model_dir, store = mixtral
    out = decompose_checkpoint(model_dir, tmp_path / "kpm", SurgeryOptions(mode="kpm", rank=4), stores=[store],
                               progress=False)  # fmt: skip
    tokenizer = AutoTokenizer.from_pretrained(out)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(out), out / "adapter", is_trainable=True)
    experts = {n: p.detach().clone() for n, p in model.named_parameters() if "experts" in n and "lora_" in n}
    assert len(experts) == 8 and all(p.requires_grad for n, p in model.named_parameters() if n in experts)
    rows = [{"input_ids": tokenizer(text)["input_ids"][:32]} for text in PROMPTS * 4]
    args = TrainingArguments(output_dir=str(tmp_path / "train"), max_steps=4, per_device_train_batch_size=2,
                             learning_rate=1e-2, save_strategy="no", report_to=[], use_cpu=True, seed=0,
                             disable_tqdm=True)  # fmt: skip
    Trainer(model=model, args=args, train_dataset=rows,
            data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False)).train()  # fmt: skip
    trained = dict(model.named_parameters())
    assert all(not torch.equal(trained[n], p) for n, p in experts.items())  # the experts' factors learned
    model.save_pretrained(tmp_path / "trained")
    expected = logits(model.eval(), tokenizer)

    assert run_cli("merge", out, "--adapter", tmp_path / "trained", "--out", tmp_path / "merged").exit_code == 0
    merged = logits(AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval(), tokenizer)
    assert float((merged - expected).abs().max()) <= 1e-4
    original_keys = set(tensors(model_dir))
    assert set(tensors(tmp_path / "merged")) == original_keys  # per-expert tensors, as the checkpoint stores them

    result = run_cli("to-lora", out, tmp_path / "trained", "--base", model_dir, "--out", tmp_path / "lora")
    assert result.exit_code == 0, result.output
    lora = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), tmp_path / "lora").eval()
    assert float((logits(lora, tokenizer) - expected).abs().max()) <= 1e-4


def test_experts_without_routed_tokens_are_named_and_initialised_from_their_weights(tmp_path, caplog):
    model_dir = save_family_model(tmp_path / "model", "mixtral", num_local_experts=16)
    spec = CalibrationSpec("gsm8k", samples=1, seq_len=4, batch_size=1)  # 8 token-expert pairs for 16 experts
    store = calibrate(model_dir, spec, tmp_path / "cov.h5", progress=False)
    with caplog.at_level(logging.WARNING):
        out = decompose_checkpoint(model_dir, tmp_path / "kpm", SurgeryOptions(mode="kpm", rank=2), stores=[store],
                                   progress=False)  # fmt: skip
    report = json.loads((out / "surgery.json").read_text())
    for parameter in report["adapter_parameters"]:
        records = report["layers"][parameter]["experts"]
        starved = [e for e, r in enumerate(records) if r["tokens"] < 2]
        assert len(starved) >= 8 and all("plain SVD" in records[e]["covariance"] for e in starved)
        assert all("covariance" not in r for r in records if r["tokens"] >= 2)
        assert f"{parameter}: experts {starved} saw fewer routed tokens than rank 2" in caplog.text
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    reference = logits(AutoModelForCausalLM.from_pretrained(model_dir).eval(), tokenizer)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(out), out / "adapter").eval()
    assert float((logits(model, tokenizer) - reference).abs().max()) <= 1e-4


def test_corda_plus_plus_allocates_linears_and_gives_experts_the_base_rank(mixtral, tmp_path):
    model_dir, store = mixtral
    options = SurgeryOptions(method="corda++", mode="ipm", rank=4, min_rank=2, max_rank=8, rank_budget=4)
    out = decompose_checkpoint(model_dir, tmp_path / "plus", options, stores=[store], progress=False)
    report = json.loads((out / "surgery.json").read_text())
    linears = {n: layer["rank"] for n, layer in report["layers"].items() if n not in report["adapter_parameters"]}
    assert len(set(linears.values())) > 1  # allocated
    assert all(report["layers"][p]["rank"] == 4 for p in report["adapter_parameters"])
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    reference = logits(AutoModelForCausalLM.from_pretrained(model_dir).eval(), tokenizer)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(out), out / "adapter").eval()
    assert float((logits(model, tokenizer) - reference).abs().max()) <= 1e-4
    assert ModelView(model_dir).experts[0]  # the view found the fused experts it adapted


def test_targets_pick_one_fused_weight_and_the_rest_stays_frozen(mixtral, tmp_path):
    model_dir, store = mixtral
    options = SurgeryOptions(mode="ipm", rank=4, targets=("experts.down_proj",))
    out = decompose_checkpoint(model_dir, tmp_path / "down", options, stores=[store], progress=False)
    report = json.loads((out / "surgery.json").read_text())
    assert sorted(report["layers"]) == [f"model.layers.{i}.mlp.experts.down_proj" for i in range(2)]
    frozen = [name for name in report["unadapted_weights"] if "experts" in name]
    assert frozen == [f"model.layers.{i}.mlp.experts.gate_up_proj" for i in range(2)]
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["target_modules"] == [] and config["target_parameters"] == sorted(report["layers"])
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    reference = logits(AutoModelForCausalLM.from_pretrained(model_dir).eval(), tokenizer)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(out), out / "adapter").eval()
    assert sum(p.numel() for n, p in model.named_parameters() if "lora_" in n) == 2 * (4 * 4 * 128 + 64 * 4 * 4)
    assert float((logits(model, tokenizer) - reference).abs().max()) <= 1e-4


def test_an_expert_adapter_that_does_not_fit_is_refused_naming_the_weight(mixtral, tmp_path):
    model_dir, store = mixtral
    out = decompose_checkpoint(model_dir, tmp_path / "kpm", SurgeryOptions(mode="kpm", rank=4), stores=[store],
                               progress=False)  # fmt: skip
    adapter = tmp_path / "adapter"
    shutil.copytree(out / "adapter", adapter)
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**config, "target_parameters": ["experts.up_proj"]}))
    error = cli_error("merge", out, "--adapter", adapter, "--out", tmp_path / "merged")
    assert "target_parameters names experts.up_proj, which is no fused expert parameter" in error
    shutil.copy(out / "adapter" / "adapter_config.json", adapter)
    factors = tensors(adapter)
    key = "base_model.model.model.layers.1.mlp.experts.lora_A.weight"  # down_proj: the outer wrapper
    factors[key] = factors[key][:12]  # three experts' rows instead of four
    save_file(factors, str(adapter / "adapter_model.safetensors"))
    error = cli_error("merge", out, "--adapter", adapter, "--out", tmp_path / "merged")
    assert "model.layers.1.mlp.experts.down_proj" in error
    assert not (tmp_path / "merged").exists()


@pytest.fixture(scope="module")
def deepseek(tmp_path_factory):
    return save_family_model(tmp_path_factory.mktemp("deepseek") / "model", "deepseek_v3")


def test_latent_attention_inputs_with_extra_axes_count_real_tokens_only(deepseek, tmp_path):
    """DeepSeek's kv_b_proj reads (batch, 1, sequence, width): padded batches give the unpadded covariances."""
    padded = calibrate(deepseek, CalibrationSpec("alpaca", samples=6, seq_len=64, batch_size=3), tmp_path / "p.h5",
                       progress=False)  # fmt: skip
    single = calibrate(deepseek, CalibrationSpec("alpaca", samples=6, seq_len=64, batch_size=1), tmp_path / "s.h5",
                       progress=False)  # fmt: skip
    with CovarianceStore(padded) as a, CovarianceStore(single) as b:
        assert "model.layers.0.self_attn.kv_b_proj" in a.by_linear
        for name, entry in a.entries.items():
            assert entry.count == b.entries[name].count, name
            if entry.count:
                assert relative(a.covariance(name), b.covariance(name)) < 1e-5, name


def test_linears_peft_would_retarget_as_experts_are_left_out_or_refused(deepseek, tmp_path):
    """PEFT rewrites gate/up/down_proj targets into fused-expert targets on DeepSeek-style models when it loads
    an adapter: all-linear leaves those linears out (and PEFT then loads the rest); naming one is refused."""
    store = calibrate(deepseek, SPEC, tmp_path / "cov.h5", progress=False)
    out = decompose_checkpoint(deepseek, tmp_path / "kpm", SurgeryOptions(mode="kpm", rank=4), stores=[store],
                               progress=False)  # fmt: skip
    report = json.loads((out / "surgery.json").read_text())
    assert report["left_out"]["model.layers.1.mlp.shared_experts.gate_proj"].startswith("PEFT re-targets")
    assert report["left_out"]["model.layers.0.mlp.down_proj"].startswith("PEFT re-targets")
    error = cli_error("decompose", deepseek, "--covariances", store, "--targets", "shared_experts.up_proj",
                      "--out", tmp_path / "named")  # fmt: skip
    assert "PEFT re-targets linears named down_proj, gate, gate_proj, up_proj as fused experts" in error


def test_a_linear_never_called_through_its_forward_is_left_out(tmp_path):
    """Mamba reads dt_proj's weight directly: no covariance, so all-linear leaves it out; naming it is refused."""
    model_dir = tmp_path / "mamba"
    config = {"vocab_size": 1000, "hidden_size": 64, "num_hidden_layers": 2, "state_size": 8, "time_step_rank": 8}
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(AutoConfig.for_model("mamba", **config)).save_pretrained(model_dir)
    make_tokenizer().save_pretrained(model_dir)
    store = calibrate(model_dir, SPEC, tmp_path / "cov.h5", progress=False)
    out = decompose_checkpoint(model_dir, tmp_path / "kpm", SurgeryOptions(mode="kpm", rank=4), stores=[store],
                               progress=False)  # fmt: skip
    report = json.loads((out / "surgery.json").read_text())
    assert report["left_out"]["backbone.layers.0.mixer.dt_proj"].startswith("never called through its forward")
    assert "backbone.layers.0.mixer.in_proj" in report["layers"]
    merged = run_cli("merge", out, "--out", tmp_path / "merged")
    assert merged.exit_code == 0, merged.output
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    reference = logits(AutoModelForCausalLM.from_pretrained(model_dir).eval(), tokenizer)
    again = logits(AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval(), tokenizer)
    assert float((again - reference).abs().max()) <= 1e-4
    error = cli_error("decompose", model_dir, "--covariances", store, "--targets", "dt_proj", "--rank", 4,
                      "--out", tmp_path / "x")  # fmt: skip
    assert "no covariance for layer backbone.layers.0.mixer.dt_proj" in error


def test_per_sample_normalisation_is_refused_before_any_work_on_routed_experts(mixtral, tmp_path):
    model_dir, _ = mixtral
    spec = CalibrationSpec("gsm8k", samples=8, seq_len=32, batch_size=4, normalisation="peft")
    with pytest.raises(UnsupportedArchitecture, match=r"experts of model\.layers\.0\.mlp\.experts see routed"):
        calibrate(model_dir, spec, tmp_path / "peft.h5", progress=False)
    assert list(tmp_path.iterdir()) == []
