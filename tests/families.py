"""Tiny random checkpoints of many transformers families, each built from its own config class (no downloads).

Sizes are the smallest that keep every family's invariants (heads divide the width, rotary halves, expert
counts); sliding-window families get a window shorter than the test sequences so their local layers differ
from global ones.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText

from tests.models import make_tokenizer

HIDDEN, LAYERS = 64, 2
_DECODER = {
    "hidden_size": HIDDEN, "intermediate_size": 2 * HIDDEN, "num_hidden_layers": LAYERS, "num_attention_heads": 4,
    "num_key_value_heads": 2, "max_position_embeddings": 256, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2,
}  # fmt: skip
SLIDING = {"sliding_window": 8}
# model_type → (config overrides, auto class for saving)
# fmt: off
FAMILIES: dict[str, dict | str] = {
    "llama": {},
    "mistral": SLIDING,
    "qwen2": {"tie_word_embeddings": True},
    "qwen3": {"head_dim": 16},
    "gemma": {"head_dim": 16},
    "gemma2": {"head_dim": 16, **SLIDING, "final_logit_softcapping": 30.0, "attn_logit_softcapping": 50.0},
    "gemma3_text": {"head_dim": 16, **SLIDING},
    "phi3": {},
    "olmo2": {},
    "granite": {},
    "cohere": {},
    "stablelm": {},
    "starcoder2": SLIDING,
    "gpt_neox": {"num_key_value_heads": None},
    "falcon": {"num_key_value_heads": None, "intermediate_size": None, "new_decoder_architecture": False},
    "mixtral": {"num_local_experts": 4, "num_experts_per_tok": 2},
    "qwen2_moe": {
        "num_experts": 4,
        "num_experts_per_tok": 2,
        "moe_intermediate_size": 32,
        "shared_expert_intermediate_size": 64,
        "head_dim": 16,
    },
    "qwen3_moe": {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32, "head_dim": 16},
    "olmoe": {"num_experts": 4, "num_experts_per_tok": 2},
    "gpt_oss": {"num_local_experts": 4, "num_experts_per_tok": 2, "head_dim": 16, **SLIDING},
    "phimoe": {"num_local_experts": 4, "num_experts_per_tok": 2},
    "deepseek_v3": {
        "n_routed_experts": 4,
        "num_experts_per_tok": 2,
        "n_shared_experts": 1,
        "moe_intermediate_size": 32,
        "first_k_dense_replace": 1,
        "n_group": 1,
        "topk_group": 1,
        "num_key_value_heads": 4,
        "kv_lora_rank": 16,
        "q_lora_rank": 32,
        "qk_rope_head_dim": 8,
        "qk_nope_head_dim": 8,
        "v_head_dim": 16,
        "head_dim": 8,
    },
    "gpt2": {
        "n_embd": HIDDEN,
        "n_layer": LAYERS,
        "n_head": 4,
        "n_positions": 256,
        "hidden_size": None,
        "num_hidden_layers": None,
        "num_attention_heads": None,
        "num_key_value_heads": None,
        "intermediate_size": None,
        "max_position_embeddings": None,
    },
    "gemma3": "multimodal",
}
# fmt: on


def _decoder_config(model_type: str, vocab: int, overrides: dict):
    values = {**_DECODER, "vocab_size": vocab, **overrides}
    return AutoConfig.for_model(model_type, **{k: v for k, v in values.items() if v is not None})


def _gemma3_config(vocab: int):
    text = {**_DECODER, "vocab_size": vocab, "head_dim": 16, **SLIDING, "model_type": "gemma3_text"}
    vision = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
              "image_size": 28, "patch_size": 14, "model_type": "siglip_vision_model"}  # fmt: skip
    return AutoConfig.for_model("gemma3", text_config=text, vision_config=vision, mm_tokens_per_image=4)


def save_family_model(path: Path, model_type: str, seed: int = 0, **changes) -> Path:
    """A random ``model_type`` checkpoint with the test tokenizer, saved as safetensors; ``changes`` to its
    config on top of the family's own."""
    tokenizer = make_tokenizer()
    overrides = FAMILIES[model_type]
    if overrides == "multimodal":
        config, auto = _gemma3_config(len(tokenizer)), AutoModelForImageTextToText
    else:
        config = _decoder_config(model_type, len(tokenizer), {**overrides, **changes})
        auto = AutoModelForCausalLM
    torch.manual_seed(seed)
    model = auto.from_config(config).to(torch.float32).eval()
    with torch.no_grad():  # random init leaves norms at 1 and biases at 0: perturb so they matter
        for param in model.parameters():
            if param.dim() == 1:
                param.add_(0.1 * torch.randn_like(param))
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def readme_table() -> str:
    """The README's list of supported families: what tests/test_families.py checks for each model_type."""
    from tests.test_families import FUSED_EXPERTS, MULTIMODAL

    rows = ["| model_type | calibration = whole-model hooks, KPM/IPM handoff | merge → ONNX |", "|---|---|---|"]
    for model_type in sorted(FAMILIES):
        if model_type in MULTIMODAL:
            onnx = "not exported: the language tower is converted; export needs the image inputs"
        else:
            onnx = "tested (logits ≤ 1e-4, greedy tokens equal)"
            onnx += " with batched_mm experts" if model_type in FUSED_EXPERTS else ""
        notes = {name: " (every expert adapted: PEFT `target_parameters`)" for name in FUSED_EXPERTS}
        notes["gpt_oss"] = " (transposed experts with biases, every expert adapted)"
        notes["phimoe"] = (
            " (every expert adapted; its router, an nn.Linear subclass returning scores and indices, left out)"
        )
        notes["deepseek_v3"] = (
            " (latent attention; every expert adapted; dense and shared-expert MLP left out: PEFT "
            "re-targets gate/up/down_proj names as experts on this model type)"
        )
        notes["gemma3"] = " (language tower; vision tower untouched)"
        rows.append(f"| {model_type} | tested{notes.get(model_type, '')} | {onnx} |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(readme_table())
