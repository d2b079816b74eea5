"""The handoff with the trainers people use (transformers' Trainer, TRL's SFTTrainer), and an adapter that
travels: trained, moved with its residual to another place, reloaded and merged to the same logits."""

import json
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from corda_surgery.calib.data import CalibrationSpec
from corda_surgery.surgery.calibration import calibrate
from corda_surgery.surgery.options import SurgeryOptions
from corda_surgery.surgery.run import decompose_checkpoint
from corda_surgery.export.merge import merge_adapter
from tests.helpers import PROMPTS, logits

peft = pytest.importorskip("peft", reason="peft is a test extra")
from peft import AutoPeftModelForCausalLM, PeftModel  # noqa: E402

STEPS = 6


def _train_with_transformers(model, tokenizer, work):
    from transformers import DataCollatorForLanguageModeling, Trainer, TrainingArguments

    rows = [{"input_ids": tokenizer(text)["input_ids"][:32]} for text in PROMPTS * 4]
    args = TrainingArguments(
        output_dir=str(work), max_steps=STEPS, per_device_train_batch_size=2, learning_rate=1e-2, logging_steps=1,
        save_strategy="no", report_to=[], use_cpu=True, seed=0, disable_tqdm=True,
    )  # fmt: skip
    collator = DataCollatorForLanguageModeling(tokenizer, mlm=False)
    return Trainer(model=model, args=args, train_dataset=rows, data_collator=collator)


def _train_with_trl(model, tokenizer, work):
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    args = SFTConfig(
        output_dir=str(work), max_steps=STEPS, per_device_train_batch_size=2, learning_rate=1e-2, logging_steps=1,
        save_strategy="no", report_to=[], use_cpu=True, seed=0, disable_tqdm=True, max_length=32,
        bf16=False,  # TRL's default is bf16 training: the logits compared below are float32
    )  # fmt: skip
    dataset = Dataset.from_list([{"text": text} for text in PROMPTS * 4])
    return SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer)


@pytest.mark.parametrize("make_trainer", [_train_with_transformers, _train_with_trl], ids=["Trainer", "SFTTrainer"])
def test_trained_adapter_moved_elsewhere_merges_to_the_same_logits(make_trainer, tiny_llama, tmp_path):
    made, moved = tmp_path / "made", tmp_path / "moved"
    store = calibrate(tiny_llama, CalibrationSpec("nq_open", samples=8, seq_len=32, batch_size=4), made / "cov.h5",
                      progress=False)  # fmt: skip
    # the adapter names the place the residual will live (--base-name), not where it is made
    options = SurgeryOptions(mode="ipm", rank=4, base_name=str(moved / "out"))
    out = decompose_checkpoint(tiny_llama, made / "out", options, stores=[store], progress=False)
    tokenizer = AutoTokenizer.from_pretrained(out)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(out), out / "adapter", is_trainable=True)
    initial = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
    trainer = make_trainer(model, tokenizer, made / "train")
    trainer.train()
    assert all(not torch.equal(p, initial[n]) for n, p in model.named_parameters() if "lora_" in n)
    model.save_pretrained(made / "trained")
    expected = logits(model.eval(), tokenizer)
    saved = json.loads((made / "trained" / "adapter_config.json").read_text())
    assert saved["base_model_name_or_path"] == str(moved / "out")

    shutil.move(made, moved)  # the folders it was made in are gone
    merged = merge_adapter(moved / "out", moved / "trained", tmp_path / "merged", progress=False)
    via_merge = logits(AutoModelForCausalLM.from_pretrained(merged).eval(), tokenizer)
    assert float((via_merge - expected).abs().max()) <= 1e-4
    via_peft = logits(AutoPeftModelForCausalLM.from_pretrained(moved / "trained").eval(), tokenizer)
    assert float((via_peft - expected).abs().max()) <= 1e-5
