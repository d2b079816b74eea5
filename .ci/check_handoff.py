"""CI check of `corda-surgery convert`'s output, independent of the project's own merge code and of PEFT.

Adds s·B·A from OUT/adapter (PEFT's file format, read with safetensors) to the residual weights of OUT and
compares the logits with the original embedded model's, in float64, on real text. Usage: check_handoff.py OUT
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from corda_surgery.models import embedded_model_dir

TOLERANCE = 1e-4  # max |Δlogit| in float64 (measured: ~3e-5; the float32 storage of W_res, A, B bounds it)
PROMPTS = [
    "Who wrote the novel Pride and Prejudice, and when was it published?",
    "Janet's ducks lay 16 eggs per day. She eats three for breakfast every morning.",
]


def rebuilt_model(out: Path) -> torch.nn.Module:
    """The residual model with every adapted weight replaced by W_res + (alpha/r)·B·A."""
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    factors = load_file(out / "adapter" / "adapter_model.safetensors")
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float64).eval()
    modules = {key.removeprefix("base_model.model.").rsplit(".lora_", 1)[0] for key in factors}
    for module in sorted(modules):
        rank = next((r for p, r in config["rank_pattern"].items() if re.fullmatch(rf"(.*\.)?{p}", module)), config["r"])
        alpha = next(
            (a for p, a in config["alpha_pattern"].items() if re.fullmatch(rf"(.*\.)?{p}", module)),
            config["lora_alpha"],
        )
        a = factors[f"base_model.model.{module}.lora_A.weight"].double()
        b = factors[f"base_model.model.{module}.lora_B.weight"].double()
        weight = model.get_submodule(module).weight
        with torch.no_grad():
            weight += alpha / rank * (b @ a)
    print(
        f"adapter: {len(modules)} modules, r={config['r']}, base_model_name_or_path={config['base_model_name_or_path']}"
    )
    return model


def main(out: Path) -> None:
    original_dir = embedded_model_dir()
    tokenizer = AutoTokenizer.from_pretrained(original_dir)
    batch = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    real = batch["attention_mask"].bool()
    with torch.no_grad():
        reference = AutoModelForCausalLM.from_pretrained(original_dir, dtype=torch.float64).eval()(**batch).logits
        rebuilt = rebuilt_model(out)(**batch).logits
    error = float((rebuilt - reference)[real].abs().max())
    print(f"handoff: max |Δlogit| {error:.2e} over {int(real.sum())} tokens (tolerance {TOLERANCE:g})")
    if not error <= TOLERANCE:
        sys.exit(f"handoff check failed: residual + adapter differ from the original model by {error:.2e}")
    report = json.loads((out / "surgery.json").read_text())
    for store in report["covariance_stores"]:  # a path only where the store was kept (--keep-covariances)
        if store["path"] is not None and not Path(store["path"]).is_file():
            sys.exit(f"surgery.json names a covariance store that does not exist: {store['path']}")


if __name__ == "__main__":
    main(Path(sys.argv[1]).resolve())
