"""PEFT's CorDA as a new user runs it (the baseline of vs_peft.py): whole model, hooks, preprocess_corda.

Usage: python bench/_peft_corda.py MODEL_DIR TOKENS.jsonl OUT_DIR MODE RANK
Saves OUT_DIR/adapter (PEFT adapter) and OUT_DIR/base (the residual weights, from unload()).
"""

import json
import sys
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from peft.tuners.lora.config import CordaConfig
from peft.tuners.lora.corda import preprocess_corda
from transformers import AutoModelForCausalLM

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def main(model_dir: str, tokens: str, out: str, mode: str, rank: int) -> None:
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    samples = [json.loads(line)["input_ids"] for line in Path(tokens).read_text().splitlines()]
    config = LoraConfig(
        r=rank,
        lora_alpha=rank,
        target_modules=TARGETS,
        init_lora_weights="corda",
        corda_config=CordaConfig(corda_method=mode),
    )

    @torch.no_grad()
    def run_model():
        for ids in samples:  # PEFT's hook only supports batch size 1
            model(input_ids=torch.tensor([ids]))

    preprocess_corda(model, config, run_model=run_model)
    peft_model = get_peft_model(model, config)
    peft_model.save_pretrained(f"{out}/adapter")
    peft_model.unload().save_pretrained(f"{out}/base")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5]))
