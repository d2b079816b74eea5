"""Check an ONNX export against PyTorch: logits, greedy tokens, perplexity on a text, latency, and size.

A float export must give PyTorch's greedy tokens. A quantised one (int8/int4) cannot; it is judged by how far
its perplexity on a text drifts from PyTorch's, against a threshold the caller sets.
"""

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
    greedy_agreement: float = 1.0  # share of the greedy tokens before the first that differs, over the prompts
    weights: str = "fp32"
    size_bytes: int = 0  # model.onnx and its external data
    text_tokens: int = 0  # tokens scored for perplexity (0: no text given)
    perplexity_onnx: float = float("nan")
    perplexity_torch: float = float("nan")

    @property
    def perplexity_drift(self) -> float:
        """ONNX perplexity relative to PyTorch's, minus one (nan without a text)."""
        return self.perplexity_onnx / self.perplexity_torch - 1


def median_ms(run, repeats: int) -> float:
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


def negative_log_likelihoods(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """−log p(target) per position, in float64."""
    logits = logits.astype(np.float64)
    top = logits.max(-1, keepdims=True)
    log_norm = np.log(np.exp(logits - top).sum(-1)) + top[..., 0]
    return log_norm - np.take_along_axis(logits, targets[..., None], -1)[..., 0]


def text_perplexities(
    session: OnnxCausalLM, model, tokenizer, text: str, *, window: int, max_tokens: int
) -> tuple[float, float, int]:
    """(ONNX, PyTorch) perplexity over the text's first ``max_tokens`` tokens in disjoint windows; tokens scored."""
    ids = np.array(tokenizer(text)["input_ids"][:max_tokens], dtype=np.int64)
    onnx_nll, torch_nll = [], []
    for start in range(0, len(ids) - 1, window):
        chunk = ids[start : start + window][None]
        if chunk.shape[1] < 2:
            break
        logits, _ = session(chunk, np.ones_like(chunk))
        with torch.no_grad():
            reference = model(torch.from_numpy(chunk)).logits.float().numpy()
        onnx_nll.append(negative_log_likelihoods(logits[0, :-1], chunk[0, 1:]))
        torch_nll.append(negative_log_likelihoods(reference[0, :-1], chunk[0, 1:]))
    scored = np.concatenate(onnx_nll), np.concatenate(torch_nll)
    return float(np.exp(scored[0].mean())), float(np.exp(scored[1].mean())), int(scored[0].size)


def greedy_agreement(ours: list[int], theirs: list[int]) -> float:
    same = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), len(theirs))
    return same / len(theirs)


def verify_onnx(
    onnx_dir: str | Path,
    reference_dir: str | Path,
    *,
    prompts=DEFAULT_PROMPTS,
    new_tokens: int = 20,
    prefill_tokens: int = 128,
    decode_steps: int = 32,
    repeats: int = 5,
    text: str | None = None,
    text_window: int = 512,
    text_tokens: int = 4096,
) -> VerifyReport:
    session = OnnxCausalLM(onnx_dir)
    tokenizer = AutoTokenizer.from_pretrained(reference_dir, trust_remote_code=False)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    model = AutoModelForCausalLM.from_pretrained(
        reference_dir, dtype=torch.float32, trust_remote_code=False, use_safetensors=True
    ).eval()
    max_abs, max_rel, agreement = compare_logits(session, model, tokenizer, prompts)
    agreements = []
    for prompt in prompts:
        ids = tokenizer(prompt)["input_ids"]
        agreements.append(greedy_agreement(session.greedy(ids, new_tokens), _torch_greedy(model, ids, new_tokens)))
    perplexities = (
        text_perplexities(session, model, tokenizer, text, window=text_window, max_tokens=text_tokens)
        if text is not None
        else (float("nan"), float("nan"), 0)
    )

    generator = np.random.default_rng(0)
    prefill = generator.integers(0, len(tokenizer), size=(1, prefill_tokens))
    prefill_t = torch.from_numpy(prefill)
    with torch.no_grad():
        prefill_ms_torch = median_ms(lambda: model(prefill_t, use_cache=False), repeats)
    prefill_ms_onnx = median_ms(lambda: session(prefill, np.ones_like(prefill)), repeats)

    def decode_torch():
        with torch.no_grad():
            out = model(prefill_t, use_cache=True)
            cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
            for _ in range(decode_steps):
                out = model(token, past_key_values=cache, use_cache=True)
                cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)

    def decode_onnx():
        session.greedy(prefill[0].tolist(), decode_steps)

    decode_ms_torch = (median_ms(decode_torch, repeats) - prefill_ms_torch) / decode_steps
    decode_ms_onnx = (median_ms(decode_onnx, repeats) - prefill_ms_onnx) / decode_steps
    return VerifyReport(
        provider=session.provider,
        max_abs_error=max_abs,
        max_rel_error=max_rel,
        argmax_agreement=agreement,
        greedy_match=all(agreement == 1 for agreement in agreements),
        greedy_tokens=new_tokens,
        prefill_tokens=prefill_tokens,
        prefill_ms_onnx=prefill_ms_onnx,
        prefill_ms_torch=prefill_ms_torch,
        decode_steps=decode_steps,
        decode_ms_per_token_onnx=decode_ms_onnx,
        decode_ms_per_token_torch=decode_ms_torch,
        greedy_agreement=float(np.mean(agreements)),
        weights=session.info["weights"],
        size_bytes=sum(path.stat().st_size for path in Path(onnx_dir).glob("model.onnx*")),
        text_tokens=perplexities[2],
        perplexity_onnx=perplexities[0],
        perplexity_torch=perplexities[1],
    )
