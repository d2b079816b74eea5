"""onnxruntime sessions for exported causal LMs: CUDA when it really loads, else CPU; greedy decoding."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from corda_surgery.export.onnx_export import EXPORT_INFO, ONNX_NAME, ExportError
from corda_surgery.export.onnx_weights import WEIGHTS
from corda_surgery.paths import read_json, resolved

_NUMPY_DTYPES = {"fp32": np.float32, "fp16": np.float16}
# What the session reads from onnx_export.json, and each field's type.
_INFO_FIELDS = {
    "dtype": str,
    "with_past": bool,
    "num_layers": int,
    "num_kv_heads": int,
    "head_dim": int,
    "inputs": list,
}


def _read_info(onnx_dir: Path) -> dict:
    """onnx_export.json, its fields typed before use: a stranger's folder is refused in one line, never a crash."""
    path = onnx_dir / EXPORT_INFO
    if not path.is_file():
        raise FileNotFoundError(f"{onnx_dir}: no {EXPORT_INFO} (not an export-onnx output folder)")
    info = read_json(path, ExportError)
    bad = [
        name
        for name, kind in _INFO_FIELDS.items()
        if not isinstance(info, dict) or not isinstance(info.get(name), kind)
    ]
    if bad or info["dtype"] not in _NUMPY_DTYPES:
        raise ExportError(f"{path}: malformed ({', '.join(bad) or 'dtype'}); not written by export-onnx")
    info.setdefault("weights", info["dtype"])  # exports before --weights: their dtype
    if info["weights"] not in WEIGHTS:
        raise ExportError(f"{path}: malformed (weights); not written by export-onnx")
    return info


def _tensors(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    """Every tensor of a graph and its subgraphs: initializers, sparse values and node attributes."""
    yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield sparse.values
        yield sparse.indices
    for node in graph.node:
        for attribute in node.attribute:
            yield from ([attribute.t] if attribute.HasField("t") else [])
            yield from attribute.tensors
            for subgraph in [*([attribute.g] if attribute.HasField("g") else []), *attribute.graphs]:
                yield from _tensors(subgraph)


def check_external_data(onnx_dir: Path) -> None:
    """Every tensor's external data lies in a regular file inside ``onnx_dir`` (links followed): a graph from a
    stranger, whose locations could name any file on the machine, reads nothing but its own folder."""
    path, root = onnx_dir / ONNX_NAME, resolved(onnx_dir)
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf's DecodeError and onnx's own: all mean "no ONNX model"
        raise ExportError(f"{path}: not a readable ONNX model ({exc})") from exc
    for tensor in _tensors(model.graph):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        location = next((entry.value for entry in tensor.external_data if entry.key == "location"), "")
        target = resolved(root / location)
        if Path(location).is_absolute() or root not in target.parents or not target.is_file():
            raise ExportError(
                f"{path}: tensor {tensor.name} keeps its data in {location!r}, not a file inside {onnx_dir}; refused"
            )


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
        self.info = _read_info(onnx_dir)
        check_external_data(onnx_dir)
        ort.set_default_logger_severity(4)  # a CUDA library that fails to load is reported via `provider`
        options = ort.SessionOptions()
        options.log_severity_level = 3
        try:
            self.session = ort.InferenceSession(
                str(onnx_dir / ONNX_NAME), options, providers=providers or preferred_providers()
            )
        except Exception as exc:  # onnxruntime's own exception types: the graph does not load
            raise ExportError(f"{onnx_dir / ONNX_NAME}: onnxruntime cannot load it ({exc})") from exc
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
