"""Run every export before it counts: the graph at shapes other than the traced ones against PyTorch, and the
folder through onnxruntime-genai.

A graph records the example's shapes wherever the model's Python decided on them, and an exporter can
write a graph that onnx.checker accepts but onnxruntime cannot run; both are caught here, before the output
folder is published.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from torch import nn
from transformers import PreTrainedModel

from corda_surgery.errors import CordaSurgeryError
from corda_surgery.export.genai_config import genai_greedy

log = logging.getLogger(__name__)


class ExportError(CordaSurgeryError):
    """The model cannot be exported (unsupported architecture, exporter failure); names the model."""


def cache_geometry(config) -> tuple[int, int, int]:
    """(layers, key/value heads, head dim) of the KV cache."""
    layers = config.num_hidden_layers
    heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return layers, heads, head_dim


def example_inputs(model: PreTrainedModel, *, batch: int, sequence: int, past_length: int | None) -> tuple:
    """(input_ids, attention_mask, position_ids[, past]) for ``batch`` rows of ``sequence`` new tokens."""
    generator = torch.Generator().manual_seed(batch * 100 + sequence)
    input_ids = torch.randint(0, model.config.vocab_size, (batch, sequence), generator=generator)
    offset = past_length or 0
    attention_mask = torch.ones(batch, offset + sequence, dtype=torch.long)
    position_ids = torch.arange(offset, offset + sequence).expand(batch, sequence)
    if past_length is None:
        return input_ids, attention_mask, position_ids
    layers, heads, head_dim = cache_geometry(model.config)
    past = [
        torch.randn(batch, heads, past_length, head_dim, generator=generator).to(model.dtype) for _ in range(2 * layers)
    ]
    return input_ids, attention_mask, position_ids, past


def check_other_shapes(
    path: Path,
    module: nn.Module,
    model: PreTrainedModel,
    with_past: bool,
    input_names: list[str],
    model_dir: Path,
    exporter: str,
    exact: bool = True,
) -> None:
    """A graph records the example's shapes wherever the model's Python decided on them: run it at other
    batch, sequence and past lengths against PyTorch. A quantised graph (not ``exact``) must run and give
    finite logits of the right shape; how far it drifts is measured by verify-onnx --text.

    Tracer warnings cannot tell a broken trace from a good one (Llama's correct trace warns as GPT-2's
    broken one does), and the dynamo exporter may fix an axis it cannot keep dynamic (Qwen3-Next's chunk loop
    fixes the sequence at the example's): both give wrong logits or no run here. An axis the dynamo exporter
    only bounds (MiniMax's block loop: any length up to one block) runs at these shapes; the export refuses
    it from the exported program's ranges instead (onnx_export._narrowed_axes).
    """
    args = example_inputs(model, batch=3, sequence=5, past_length=2 if with_past else None)
    input_ids, attention_mask = args[0], args[1]
    pad = getattr(model.config.get_text_config(), "pad_token_id", None) or 0  # not every config declares one
    input_ids[-1, -2:] = pad  # a right-padded row: padding must not spoil real tokens
    attention_mask[-1, -2:] = 0
    real = attention_mask[:, -input_ids.shape[1] :].bool().numpy()
    with torch.no_grad():
        expected = module(*args)
    expected = (expected[0] if with_past else expected).float().numpy()[real]
    flat = [*args[:3], *(args[3] if with_past else [])]
    feeds = {name: tensor.numpy() for name, tensor in zip(input_names, flat)}
    # float32 runs on the CPU everywhere; fp16 only where the CUDA provider is (the CPU lacks fp16 kernels)
    if model.dtype != torch.float32 and "CUDAExecutionProvider" not in ort.get_available_providers():
        log.warning(
            "%s: a %s graph is not checked at other shapes without onnxruntime's CUDA provider; run "
            "verify-onnx where it is",
            model_dir,
            model.dtype,
        )
        return
    wanted = ["CPUExecutionProvider"] if model.dtype == torch.float32 else ["CUDAExecutionProvider"]
    ort.set_default_logger_severity(4)
    try:
        session = ort.InferenceSession(str(path), providers=wanted)
        logits = session.run(["logits"], feeds)[0].astype(np.float32)
    except Exception as exc:  # onnxruntime raises its own types: a graph that fails at other shapes
        raise ExportError(
            f"{model_dir}: the {exporter} export fails at shapes other than the example's (batch 3, sequence 5): "
            f"{str(exc).splitlines()[0][:300]}"
        ) from exc
    logits = logits[real] if logits.shape[:2] == real.shape else logits
    if not exact:
        if logits.shape != expected.shape or not np.isfinite(logits).all():
            raise ExportError(f"{model_dir}: the quantised graph gives no finite logits at batch 3, sequence 5")
        return
    error = float(np.abs(logits - expected).max()) if logits.shape == expected.shape else float("inf")
    tolerance = 1e-3 if model.dtype == torch.float32 else 5e-2
    if not error <= tolerance:
        hint = (
            "it baked shapes into the graph; use `exporter` dynamo"
            if exporter == "torchscript"
            else ("the graph does not compute what the model does there")
        )
        raise ExportError(
            f"{model_dir}: the {exporter} export gives wrong logits at shapes other than the example's (max |Δ| "
            f"{error:.2g} at batch 3, sequence 5, one row padded): {hint}"
        )


def check_genai(folder: Path, model: PreTrainedModel, *, exact: bool, new_tokens: int = 4) -> None:
    """onnxruntime-genai loads the folder and continues a prompt greedily: as PyTorch does, where ``exact``."""
    if model.dtype != torch.float32:  # onnxruntime-genai runs fp16 graphs on CUDA only; checked there by hand
        log.warning("%s: onnxruntime-genai is not run on a %s export here (CPU)", folder, model.dtype)
        return
    prompt = example_inputs(model, batch=1, sequence=6, past_length=None)[0][0].tolist()
    tokens = genai_greedy(folder, prompt, new_tokens)
    if not exact:
        return
    with torch.no_grad():
        ids = torch.tensor([prompt])
        expected = model.generate(  # type: ignore[operator]
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
            do_sample=False,
        )[0, len(prompt) :].tolist()  # fmt: skip
    if tokens != expected:
        raise ExportError(
            f"{folder}: onnxruntime-genai's greedy tokens {tokens} differ from PyTorch's {expected} on the same prompt"
        )
