"""Checkpoint surgery: handoff to transformers + PEFT, training, to-lora, and what must not change."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from corda_surgery.calib.data import CalibrationSpec
from corda_surgery.errors import CordaSurgeryError
from corda_surgery.export.to_lora import convert_to_lora
from corda_surgery.surgery.calibration import calibrate
from corda_surgery.surgery.options import SurgeryOptions
from corda_surgery.surgery.run import decompose_checkpoint
from corda_surgery.surgery.targets import TargetError
from tests.helpers import PROMPTS, logits, tensors

peft = pytest.importorskip("peft", reason="peft is a test extra")
from peft import PeftModel  # noqa: E402

SPEC = CalibrationSpec("nq_open", samples=16, seq_len=64, batch_size=4)


@pytest.fixture(scope="module")
def stores(tiny_llama, tiny_gpt2, tiny_qwen2, tmp_path_factory):
    folder = tmp_path_factory.mktemp("stores")
    return {
        name: calibrate(model_dir, SPEC, folder / f"{name}.h5", progress=False)
        for name, model_dir in (("llama", tiny_llama), ("gpt2", tiny_gpt2), ("qwen2", tiny_qwen2))
    }


def _handoff_error(model_dir, out):
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    reference = logits(AutoModelForCausalLM.from_pretrained(model_dir).eval(), tokenizer)
    residual = AutoModelForCausalLM.from_pretrained(out)
    model = PeftModel.from_pretrained(residual, out / "adapter", is_trainable=True).eval()
    return float((logits(model, tokenizer) - reference).abs().max())


@pytest.mark.parametrize("kind", ["llama", "gpt2", "qwen2"])
@pytest.mark.parametrize("mode", ["kpm", "ipm"])
def test_handoff_reproduces_original_logits(kind, mode, stores, request, tmp_path):
    model_dir = request.getfixturevalue(f"tiny_{kind}")
    out = decompose_checkpoint(
        model_dir, tmp_path / "out", SurgeryOptions.of(mode=mode, rank=8), stores=[stores[kind]], progress=False
    )
    assert _handoff_error(model_dir, out) <= 1e-4
    report = json.loads((out / "surgery.json").read_text())
    assert report["mode"] == mode
    assert len(report["layers"]) == {"llama": 7, "qwen2": 7, "gpt2": 4}[kind] * 3


@pytest.mark.parametrize("rule", ["mean-diagonal", "median-diagonal"])
@pytest.mark.parametrize("method", ["corda", "corda++"])
@pytest.mark.parametrize("mode", ["kpm", "ipm"])
def test_handoff_is_exact_under_every_damping_rule(rule, method, mode, tiny_llama, stores, tmp_path):
    """Whatever λ multiplies, residual + s·B·A is the weight: the logits stay within 1e-4; surgery.json names
    the rule, and per target its λ and (for a rule other than the default) the level in mean(diag C)'s units."""
    budget = {"rank_budget": 8} if method == "corda++" else {}
    options = SurgeryOptions.of(method=method, mode=mode, rank=8, damping_rule=rule, **budget)
    out = decompose_checkpoint(tiny_llama, tmp_path / "out", options, stores=[stores["llama"]], progress=False)
    assert _handoff_error(tiny_llama, out) <= 1e-4
    report = json.loads((out / "surgery.json").read_text())
    assert report["damping_rule"] == rule and report["damping"] == 0.01
    for layer in report["layers"].values():
        assert layer["damping"] >= 0.01
        if rule == "mean-diagonal":
            assert "damping_rule" not in layer and "damping_level" not in layer
        else:
            assert layer["damping_rule"] == rule and layer["damping_level"] > 0


def test_convert_counts_at_its_own_damping_rule(tiny_llama, tmp_path, caplog):
    """convert hands its rule and λ to the calibration, so the store's counts (and the diagnosis in
    surgery.json) are at the level the surgery uses; the legacy λ·mean(diag C) attribute is left out."""
    import h5py

    from corda_surgery.decomposition.diagnostics import eigenvalues_below_damping
    from corda_surgery.surgery.run import convert_checkpoint

    options = SurgeryOptions.of(rank=8, damping_rule="median-diagonal")
    out = convert_checkpoint(tiny_llama, tmp_path / "out", SPEC, options, keep_covariances=True, progress=False)
    with h5py.File(out / "covariances.h5") as handle:
        assert json.loads(handle.attrs["damping_counted"]) == {"rule": "median-diagonal", "damping": 0.01}
        assert "below_damping_level" not in handle.attrs
    report = json.loads((out / "surgery.json").read_text())
    assert report["covariance_stores"][0]["eigenvalues_below_damping_rule"] == "median-diagonal"
    from corda_surgery.calib.store import CovarianceStore

    with CovarianceStore(out / "covariances.h5") as store:
        for name, layer in report["layers"].items():
            count = eigenvalues_below_damping(store.covariance(name), 0.01, "median-diagonal")
            assert layer["covariance_eigenvalues_below_damping"] == count, name


def test_an_input_several_linears_read_is_read_once(tiny_llama, stores, tmp_path, monkeypatch):
    """q/k/v and gate/up share their damped covariance and its factor: one store read per input."""
    from corda_surgery.calib.store import CovarianceStore

    reads: list[str] = []
    original = CovarianceStore.triangle

    def counted(self, linear, round_index=None):
        reads.append(linear)
        return original(self, linear, round_index)

    monkeypatch.setattr(CovarianceStore, "triangle", counted)
    out = decompose_checkpoint(tiny_llama, tmp_path / "out", SurgeryOptions.of(rank=8), stores=[stores["llama"]],
                               progress=False)  # fmt: skip
    assert len(reads) == 4 * 3  # per layer: q/k/v, o, gate/up, down
    assert _handoff_error(tiny_llama, out) <= 1e-4


def test_eigenvalues_below_the_damping_are_counted_and_kpm_warns(tiny_llama, tmp_path, caplog):
    """Each stored input records how many covariance eigenvalues lie below the damping level (counted here
    independently); surgery.json carries them, and KPM names the layers where they reach the rank: here fewer
    tokens than the inputs are wide, so the sample limits them and the advice is more tokens."""
    import numpy as np

    from corda_surgery.calib.store import CovarianceStore

    store = calibrate(tiny_llama, CalibrationSpec("gsm8k", samples=2, seq_len=12, batch_size=2), tmp_path / "few.h5",
                      progress=False)  # fmt: skip
    with CovarianceStore(store) as opened:
        assert opened.counted is not None and opened.counted.damping == 0.01
        for name, entry in opened.entries.items():
            c = opened.covariance(name).numpy()
            expected = int((np.linalg.eigvalsh(c) < 0.01 * np.diag(c).mean()).sum())
            assert entry.below_damping == expected >= c.shape[0] - entry.count > 0, name
    with caplog.at_level("WARNING"):
        out = decompose_checkpoint(tiny_llama, tmp_path / "out", SurgeryOptions.of(rank=8), stores=[store],
                                   progress=False)  # fmt: skip
    layers = json.loads((out / "surgery.json").read_text())["layers"]
    assert all(layer["covariance_eigenvalues_below_damping"] >= 8 for layer in layers.values())
    assert {layer["damping_limit"] for layer in layers.values()} == {"sample"}
    assert f"{len(layers)} of {len(layers)} KPM targets" in caplog.text and "chosen by the damping" in caplog.text
    assert "limited by the sample" in caplog.text and "calibrate on more tokens" in caplog.text
    assert "spectrum" not in caplog.text


def test_a_massive_input_dimension_is_diagnosed_as_the_spectrum(tiny_llama, tmp_path, caplog):
    """Two of layer 0's normalised input dimensions scaled 300× (a model's massive activations): its q/k/v input
    keeps its other directions below 0.01·mean(diag C) at half the tokens as at all of them, so the diagnosis
    names the spectrum, says more tokens would not help and that the study found nothing to change there, as a
    note (-v), not a warning: there is nothing the user should do."""
    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    with torch.no_grad():
        model.model.layers[0].input_layernorm.weight[:2] *= 300
    model.save_pretrained(tmp_path / "massive")
    AutoTokenizer.from_pretrained(tiny_llama).save_pretrained(tmp_path / "massive")
    store = calibrate(tmp_path / "massive", SPEC, tmp_path / "massive.h5", progress=False)
    with caplog.at_level("INFO"):
        out = decompose_checkpoint(tmp_path / "massive", tmp_path / "out", SurgeryOptions.of(rank=8), stores=[store],
                                   progress=False)  # fmt: skip
    layers = json.loads((out / "surgery.json").read_text())["layers"]
    for name in ("q_proj", "k_proj", "v_proj"):
        layer = layers[f"model.layers.0.self_attn.{name}"]
        assert layer["half_tokens"] < SPEC.samples * SPEC.seq_len, name
        assert layer["covariance_eigenvalues_below_damping_half"] >= layer["covariance_eigenvalues_below_damping"] >= 8
        assert layer["damping_limit"] == "spectrum", name
    spectrum = [r for r in caplog.records if "limited by the spectrum" in r.getMessage()]
    assert spectrum and all(r.levelname == "INFO" for r in spectrum)
    assert "made KPM forget more, not less" in spectrum[0].getMessage()
    assert not [r for r in caplog.records if r.levelname == "WARNING" and "spectrum" in r.getMessage()]


def test_balanced_factors_keep_the_handoff_and_even_out_the_norms(tiny_llama, stores, tmp_path):
    plain = decompose_checkpoint(tiny_llama, tmp_path / "plain", SurgeryOptions.of(rank=8), stores=[stores["llama"]],
                                 progress=False)  # fmt: skip
    even = decompose_checkpoint(tiny_llama, tmp_path / "even", SurgeryOptions.of(rank=8, balance=True),
                                stores=[stores["llama"]], progress=False)  # fmt: skip
    assert _handoff_error(tiny_llama, even) <= 1e-4
    before, after = tensors(plain / "adapter"), tensors(even / "adapter")
    for key in (k for k in after if k.endswith("lora_A.weight")):
        a, b = after[key].double(), after[key.replace("lora_A", "lora_B")].double()
        a0, b0 = before[key].double(), before[key.replace("lora_A", "lora_B")].double()
        assert torch.allclose(a.norm(dim=1), b.norm(dim=0), rtol=1e-5), key
        assert float((b @ a - b0 @ a0).norm() / (b0 @ a0).norm()) <= 1e-6, key  # float32 factors
        assert float(a.norm(dim=1).max() / b.norm(dim=0).max()) < float(a0.norm(dim=1).max() / b0.norm(dim=0).max())
    assert json.loads((even / "surgery.json").read_text())["balance"] is True


def test_only_targets_change_and_ties_stay(tiny_qwen2, stores, tmp_path):
    out = decompose_checkpoint(
        tiny_qwen2,
        tmp_path / "out",
        SurgeryOptions.of(rank=4, targets="q_proj,down_proj", max_shard_size=40_000),
        stores=[stores["qwen2"]],
        progress=False,
    )
    assert (out / "model.safetensors.index.json").is_file()  # small shards: really sharded
    before, after = tensors(tiny_qwen2), tensors(out)
    assert before.keys() == after.keys()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {f"model.layers.{i}.{m}.weight" for i in range(3) for m in ("self_attn.q_proj", "mlp.down_proj")}
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert len(config["target_modules"]) == 6


def test_unknown_target_pattern(tiny_llama, stores, tmp_path):
    with pytest.raises(TargetError, match="qproj matches no linear"):
        decompose_checkpoint(
            tiny_llama, tmp_path / "out", SurgeryOptions.of(targets="qproj"), stores=[stores["llama"]], progress=False
        )
    assert not (tmp_path / "out").exists()


def test_training_changes_only_the_adapter_and_loss_falls(tiny_llama, stores, tmp_path):
    from transformers import Trainer, TrainingArguments

    out = decompose_checkpoint(
        tiny_llama, tmp_path / "out", SurgeryOptions.of(mode="ipm", rank=8), stores=[stores["llama"]], progress=False
    )
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(out), out / "adapter", is_trainable=True)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    tokenizer = AutoTokenizer.from_pretrained(out)
    rows = [tokenizer(text)["input_ids"][:32] for text in PROMPTS * 8]
    dataset = [{"input_ids": ids, "labels": ids} for ids in rows]
    args = TrainingArguments(
        output_dir=str(tmp_path / "train"),
        max_steps=12,
        per_device_train_batch_size=2,
        learning_rate=5e-3,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
    )
    collate = lambda rows: {  # noqa: E731 - equal-length pairs from the same prompts
        k: torch.nn.utils.rnn.pad_sequence(
            [torch.tensor(r[k]) for r in rows], batch_first=True, padding_value=-100 if k == "labels" else 0
        )
        for k in rows[0]
    }
    trainer = Trainer(model=model, args=args, train_dataset=dataset, data_collator=collate)
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert sum(losses[-3:]) < sum(losses[:3])
    for name, param in model.named_parameters():
        if "lora_" in name:
            assert not torch.equal(param, before[name]), name
        else:
            assert torch.equal(param, before[name]), name
    trained = tmp_path / "trained"
    model.save_pretrained(trained)

    # to-lora: the original model + the rank-2r LoRA equals residual + trained adapter.
    lora = convert_to_lora(out, trained, tiny_llama, tmp_path / "lora")
    expected = logits(model.eval(), tokenizer)
    on_original = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama), lora).eval()
    assert float((logits(on_original, tokenizer) - expected).abs().max()) <= 1e-4
    assert json.loads((lora / "adapter_config.json").read_text())["r"] == 16


def test_to_lora_refuses_another_base(tiny_llama, tiny_gpt2, stores, tmp_path):
    out = decompose_checkpoint(
        tiny_llama, tmp_path / "out", SurgeryOptions.of(rank=4), stores=[stores["llama"]], progress=False
    )
    with pytest.raises(CordaSurgeryError, match="not the model"):
        convert_to_lora(out, out / "adapter", tiny_gpt2, tmp_path / "lora")
