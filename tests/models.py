"""Tiny random models and a small trained tokenizer, saved as real checkpoint folders for the tests."""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    BertConfig,
    BertForMaskedLM,
    GPT2Config,
    GPT2LMHeadModel,
    PreTrainedTokenizerFast,
    RobertaConfig,
    RobertaForMaskedLM,
)

from corda_surgery.calib.data import BUILTIN_DIR

SAMPLE_TEXTS = [
    line for name in ("nq_open", "gsm8k") for line in (BUILTIN_DIR / f"{name}.jsonl").read_text().splitlines()[:200]
]


def make_tokenizer(vocab_size: int = 384) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained in milliseconds on the built-in data."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(SAMPLE_TEXTS, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


_DECODERS = {"llama": {}, "mistral": {}, "qwen3": {}, "qwen2": {"tie_word_embeddings": True}}


def _config(kind: str, vocab: int, layers: int, hidden: int):
    if kind in _DECODERS:
        return AutoConfig.for_model(
            kind, vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
            num_attention_heads=4, num_key_value_heads=2, head_dim=hidden // 4, max_position_embeddings=256,
            pad_token_id=0, bos_token_id=1, eos_token_id=2, **_DECODERS[kind],
        ), AutoModelForCausalLM.from_config  # fmt: skip
    if kind == "roberta":
        return RobertaConfig(
            vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4,
            intermediate_size=2 * hidden, max_position_embeddings=256, pad_token_id=0,
        ), RobertaForMaskedLM  # fmt: skip
    if kind == "gpt2":
        return GPT2Config(
            vocab_size=vocab,
            n_embd=hidden,
            n_layer=layers,
            n_head=4,
            n_positions=256,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
        ), GPT2LMHeadModel
    if kind == "bert":
        return BertConfig(
            vocab_size=vocab,
            hidden_size=hidden,
            num_hidden_layers=layers,
            num_attention_heads=4,
            intermediate_size=2 * hidden,
            max_position_embeddings=256,
            pad_token_id=0,
        ), BertForMaskedLM
    raise ValueError(kind)


def save_tiny_model(
    path: Path,
    kind: str = "llama",
    *,
    layers: int = 3,
    hidden: int = 64,
    seed: int = 0,
    dtype=torch.float32,
    tied: bool = False,
) -> Path:
    """Save a random-initialised model of the given family and the test tokenizer into ``path``; ``tied``: the
    output head shares the embedding table (SmolLM2's shape)."""
    tokenizer = make_tokenizer()
    config, build = _config(kind, len(tokenizer), layers, hidden)
    config.tie_word_embeddings = tied or config.tie_word_embeddings
    torch.manual_seed(seed)
    model = build(config).to(dtype).eval()
    with torch.no_grad():  # random init leaves norms at 1 and biases at 0: perturb so they matter
        for _name, param in model.named_parameters():
            if param.dim() == 1:
                param.add_(0.1 * torch.randn_like(param))
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
