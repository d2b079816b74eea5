"""onnxruntime sessions for exported causal LMs: CUDA when it really loads, else CPU; greedy decoding."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort

from corda_surgery.export.onnx_export import EXPORT_INFO, ONNX_NAME

_NUMPY_DTYPES = {"fp32": np.float32, "fp16": np.float16}


def preferred_providers() -> list[str]:
    available = ort.get_available_providers()
    return (["CUDAExecutionProvider"] if "CUDAExecutionProvider" in available else []) + ["CPUExecutionProvider"]


class OnnxCausalLM:
    """One exported decoder; ``provider`` says which execution provider actually runs it.

    onnxruntime silently falls back to the CPU when the CUDA libraries fail to load, so the provider is
    read back from the session rather than assumed from the request.
    """

    def __init__(self, onnx_dir: str | Path, providers: list[str] | None = None):
        onnx_dir = Path(onnx_dir)
        info_path = onnx_dir / EXPORT_INFO
        if not info_path.is_file():
            raise FileNotFoundError(f"{onnx_dir}: no {EXPORT_INFO} (not an export-onnx output folder)")
        self.info = json.loads(info_path.read_text())
        ort.set_default_logger_severity(4)  # a CUDA library that fails to load is reported via `provider`
        options = ort.SessionOptions()
        options.log_severity_level = 3
        self.session = ort.InferenceSession(
            str(onnx_dir / ONNX_NAME), options, providers=providers or preferred_providers()
        )
        self.provider = self.session.get_providers()[0]
        self.float_type = _NUMPY_DTYPES[self.info["dtype"]]

    @property
    def with_past(self) -> bool:
        return bool(self.info["with_past"])

    def empty_past(self, batch: int) -> list[np.ndarray]:
        shape = (batch, self.info["num_kv_heads"], 0, self.info["head_dim"])
        return [np.zeros(shape, dtype=self.float_type) for _ in range(2 * self.info["num_layers"])]

    def __call__(self, input_ids: np.ndarray, attention_mask: np.ndarray, past: list[np.ndarray] | None = None):
        """(logits, presents) for one step; position ids follow the attention mask (left or right padding)."""
        positions = np.cumsum(attention_mask, axis=1) - 1
        positions = np.maximum(positions, 0)[:, -input_ids.shape[1] :].astype(np.int64)
        feeds = {
            "input_ids": input_ids.astype(np.int64),
            "attention_mask": attention_mask.astype(np.int64),
            "position_ids": positions,
        }
        if self.with_past:
            past = past if past is not None else self.empty_past(input_ids.shape[0])
            feeds.update(zip(self.info["inputs"][3:], past))
        outputs = self.session.run(None, feeds)
        return outputs[0], outputs[1:]

    def greedy(self, prompt_ids: list[int], new_tokens: int) -> list[int]:
        """Greedy continuation of one prompt: with the KV cache when exported with it, else full re-runs."""
        ids = np.array([prompt_ids], dtype=np.int64)
        generated: list[int] = []
        logits, past = self(ids, np.ones_like(ids))
        for _ in range(new_tokens):
            token = int(logits[0, -1].argmax())
            generated.append(token)
            ids = np.concatenate([ids, [[token]]], axis=1)
            if self.with_past:
                logits, past = self(ids[:, -1:], np.ones_like(ids), past)
            else:
                logits, _ = self(ids, np.ones_like(ids))
        return generated
