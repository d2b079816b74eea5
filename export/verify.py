"""Check an ONNX export against PyTorch: logits, greedy tokens, and latency of both."""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from corda_surgery.export.onnx_runtime import OnnxCausalLM

DEFAULT_PROMPTS = (
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
    "How many clips did Natalia sell altogether in April and May?",
    "Who wrote the novel Pride and Prejudice?",
    "The Eiffel Tower is located in",
)


@dataclass
class VerifyReport:
    provider: str
    max_abs_error: float
    max_rel_error: float  # max |Δ| / max |logit|
    argmax_agreement: float  # share of real positions with the same next-token argmax
    greedy_match: bool
    greedy_tokens: int
    prefill_tokens: int
    prefill_ms_onnx: float
    prefill_ms_torch: float
    decode_steps: int
    decode_ms_per_token_onnx: float
    decode_ms_per_token_torch: float


def _median_ms(run, repeats: int) -> float:
    run()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def _torch_greedy(model, prompt_ids: list[int], new_tokens: int) -> list[int]:
    """Plain argmax decoding with the KV cache (generate() would stop at or suppress end-of-sequence)."""
    generated: list[int] = []
    with torch.no_grad():
        out = model(torch.tensor([prompt_ids]), use_cache=True)
        for _ in range(new_tokens):
            token = int(out.logits[0, -1].argmax())
            generated.append(token)
            out = model(torch.tensor([[token]]), past_key_values=out.past_key_values, use_cache=True)
    return generated


def compare_logits(session: OnnxCausalLM, model, tokenizer, prompts) -> tuple[float, float, float]:
    """Padded batch of prompts through both; errors over real tokens only."""
    batch = tokenizer(list(prompts), return_tensors="pt", padding=True)
    mask = batch["attention_mask"]
    with torch.no_grad():
        reference = model(**batch).logits.float().numpy()
    logits, _ = session(batch["input_ids"].numpy(), mask.numpy())
    real = mask.numpy().astype(bool)
    diff = np.abs(logits.astype(np.float32) - reference)[real]
    agreement = float((logits.argmax(-1) == reference.argmax(-1))[real].mean())
    return float(diff.max()), float(diff.max() / np.abs(reference[real]).max()), agreement


def verify_onnx(
    onnx_dir: str | Path,
    reference_dir: str | Path,
    *,
    prompts=DEFAULT_PROMPTS,
    new_tokens: int = 20,
    prefill_tokens: int = 128,
    decode_steps: int = 32,
    repeats: int = 5,
) -> VerifyReport:
    session = OnnxCausalLM(onnx_dir)
    tokenizer = AutoTokenizer.from_pretrained(reference_dir)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    model = AutoModelForCausalLM.from_pretrained(reference_dir, dtype=torch.float32).eval()
    max_abs, max_rel, agreement = compare_logits(session, model, tokenizer, prompts)
    greedy_match = True
    for prompt in prompts:
        ids = tokenizer(prompt)["input_ids"]
        greedy_match &= session.greedy(ids, new_tokens) == _torch_greedy(model, ids, new_tokens)

    generator = np.random.default_rng(0)
    prefill = generator.integers(0, len(tokenizer), size=(1, prefill_tokens))
    prefill_t = torch.from_numpy(prefill)
    with torch.no_grad():
        prefill_ms_torch = _median_ms(lambda: model(prefill_t, use_cache=False), repeats)
    prefill_ms_onnx = _median_ms(lambda: session(prefill, np.ones_like(prefill)), repeats)

    def decode_torch():
        with torch.no_grad():
            out = model(prefill_t, use_cache=True)
            cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
            for _ in range(decode_steps):
                out = model(token, past_key_values=cache, use_cache=True)
                cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)

    def decode_onnx():
        session.greedy(prefill[0].tolist(), decode_steps)

    decode_ms_torch = (_median_ms(decode_torch, repeats) - prefill_ms_torch) / decode_steps
    decode_ms_onnx = (_median_ms(decode_onnx, repeats) - prefill_ms_onnx) / decode_steps
    return VerifyReport(
        provider=session.provider,
        max_abs_error=max_abs,
        max_rel_error=max_rel,
        argmax_agreement=agreement,
        greedy_match=bool(greedy_match),
        greedy_tokens=new_tokens,
        prefill_tokens=prefill_tokens,
        prefill_ms_onnx=prefill_ms_onnx,
        prefill_ms_torch=prefill_ms_torch,
        decode_steps=decode_steps,
        decode_ms_per_token_onnx=decode_ms_onnx,
        decode_ms_per_token_torch=decode_ms_torch,
    )
