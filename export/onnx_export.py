"""Export a merged causal LM to ONNX with torch.onnx.

Inputs ``input_ids``, ``attention_mask``, ``position_ids`` (and with ``with_past``
``past_key_values.{i}.key/value``); outputs ``logits`` (and ``present.{i}.key/value``) — the names of
optimum's ONNX decoders, so existing onnxruntime generation code works. Batch and sequence axes are
dynamic; the past may have length 0, so one graph serves prefill and decoding. Weights always go to
external data (``model.onnx.data``), which keeps models past 2 GB exportable.

Which torch.onnx path: the dynamo exporter is correct for every supported family but slow (about 5
minutes for SmolLM2-135M with the KV cache, 2 cores); the TorchScript tracer takes 20 s and matches it
for Llama-family models (tests check padding, batch, sequence and past lengths), while for GPT-2 it bakes
shapes into the graph and gives wrong logits. ``auto`` picks per family from TORCHSCRIPT_FAMILIES.

Fused mixture-of-experts layers run transformers' ``batched_mm`` experts implementation while exporting:
its default grouped matmul has no ONNX translation, and the eager loop's expert count depends on the data.
``batched_mm`` gathers each routed token's expert weights, so the graph's memory grows with tokens × top-k
× one expert's weights (a prefill of a long prompt on a large MoE needs far more than decoding).
"""

from __future__ import annotations

import json
import logging
import re
import sys
import warnings
from collections import Counter
from pathlib import Path
from typing import Any

import onnx
import torch
from torch import nn
from torch.export import Dim
from transformers import AutoModelForCausalLM, DynamicCache, PreTrainedModel

from corda_surgery.checkpoint.experts import find_fused_experts
from corda_surgery.checkpoint.quantised import refuse_quantised
from corda_surgery.checkpoint.reader import CheckpointError, CheckpointReader
from corda_surgery.checkpoint.writer import copy_model_files
from corda_surgery.errors import OptionsError
from corda_surgery.export.genai_config import write_genai_config
from corda_surgery.export.onnx_adapters import ADAPTER_INPUTS, inject, lift_adapter_inputs
from corda_surgery.export.onnx_checks import (
    ExportError,
    cache_geometry,
    check_genai,
    check_other_shapes,
    example_inputs,
)
from corda_surgery.export.onnx_weights import (
    DEFAULT_BLOCK_SIZE,
    QUANTISED_BITS,
    WEIGHTS,
    find_tied_head,
    quantise,
    tie_float_head,
)
from corda_surgery.export.peft_adapter import LoraAdapter, read_adapter
from corda_surgery.outputs import check_disjoint, staged_folder
from corda_surgery.paths import read_json, resolved

log = logging.getLogger(__name__)
ONNX_NAME = "model.onnx"
EXPORT_INFO = "onnx_export.json"
DTYPES = {"fp32": torch.float32, "fp16": torch.float16}  # what the graph computes in
EXPORTERS = ("auto", "dynamo", "torchscript")
TORCHSCRIPT_FAMILIES = frozenset({"llama", "mistral", "qwen2", "qwen3"})
TORCHSCRIPT_OPSET = 17
# model_type → why neither exporter gives a graph that runs at every shape (refused before loading the model)
UNEXPORTABLE = {
    "dbrx": "its experts loop in Python over the experts the router picked (nonzero/where per expert): torch.export "
    "cannot trace the data-dependent loop and the TorchScript tracer bakes the example's routing into the graph",
    "llama4_text": "its rotary embedding uses complex tensors (torch.polar, view_as_complex), which neither torch.onnx "
    "exporter translates",
    "minimax": "its lightning attention loops in Python over blocks of the sequence, so the graph only runs up to one "
    "block (block_size tokens); its linear-attention cache is no key/value cache",
    "qwen3_next": "its gated delta-net attention loops in Python over 64-token chunks of the sequence, so the exporter "
    "fixes the sequence length; its linear-attention cache is no key/value cache",
}


class _LogitsOnly(nn.Module):
    def __init__(self, model: PreTrainedModel):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, position_ids):
        return self.model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
        ).logits


class _WithPast(nn.Module):
    """Flat past/present tensors around transformers' DynamicCache (a cache object is not an ONNX input)."""

    def __init__(self, model: PreTrainedModel):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, position_ids, past):
        cache = DynamicCache(config=self.model.config)
        for layer in range(len(past) // 2):
            cache.update(past[2 * layer], past[2 * layer + 1], layer)
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=cache,
            use_cache=True,
        )
        presents = [t for layer in out.past_key_values.layers for t in (layer.keys, layer.values)]
        return (out.logits, *presents)


def io_names(num_layers: int, with_past: bool) -> tuple[list[str], list[str]]:
    inputs, outputs = ["input_ids", "attention_mask", "position_ids"], ["logits"]
    if with_past:
        inputs += [f"past_key_values.{i}.{kind}" for i in range(num_layers) for kind in ("key", "value")]
        outputs += [f"present.{i}.{kind}" for i in range(num_layers) for kind in ("key", "value")]
    return inputs, outputs


def _dynamic_shapes(layers: int, with_past: bool) -> dict:
    b, s = Dim("batch"), Dim("sequence")
    shapes: dict[str, Any] = {"input_ids": {0: b, 1: s}, "position_ids": {0: b, 1: s}}
    if with_past:
        shapes["attention_mask"] = {0: b, 1: Dim("total_sequence")}
        shapes["past"] = [{0: b, 2: Dim("past_sequence")} for _ in range(2 * layers)]
    else:
        shapes["attention_mask"] = {0: b, 1: s}
    return shapes


def _export_failure(exc: BaseException) -> str:
    """The operator torch.onnx could not translate, where the exception chain names one; else its first line."""
    chain: list[BaseException] = []
    while exc is not None and exc not in chain:
        chain.append(exc)
        exc = exc.__cause__ or exc.__context__  # type: ignore[assignment]
    for error in chain:
        match = re.search(r"No ONNX function found for <OpOverload\(op='([^']+)'", str(error))
        if match:
            return f"operator {match[1]} has no ONNX translation in torch.onnx (used by this architecture)"
    first = str(chain[0]).strip().splitlines()[0] if str(chain[0]).strip() else ""
    return f"{type(chain[0]).__name__}: {first}"


def graph_opset(path: Path) -> int:
    """The default-domain opset the written graph declares (what the exporter really used)."""
    model = onnx.load(str(path), load_external_data=False)
    return next(entry.version for entry in model.opset_import if entry.domain in ("", "ai.onnx"))


def _export_torchscript(module, args, path: Path, input_names, output_names, opset: int) -> None:
    """TorchScript tracing; weights moved to external data afterwards, as the dynamo path does."""
    axes = {
        "input_ids": {0: "batch", 1: "sequence"},
        "position_ids": {0: "batch", 1: "sequence"},
        "logits": {0: "batch", 1: "sequence"},
        "attention_mask": {0: "batch", 1: "total_sequence"},
    }
    axes.update({name: {0: "batch", 2: "past_sequence"} for name in input_names[3:]})
    axes.update({name: {0: "batch", 2: "total_sequence"} for name in output_names[1:]})
    torch.onnx.export(
        module,
        args,
        str(path),
        dynamo=False,
        input_names=input_names,
        output_names=output_names,
        dynamic_axes=axes,
        opset_version=opset,
    )
    model = onnx.load(str(path))
    onnx.save_model(
        model,
        str(path),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location=path.name + ".data",
        size_threshold=1024,
    )


def export_onnx(
    model_dir: str | Path,
    out: str | Path,
    *,
    weights: str = "fp32",
    block_size: int = DEFAULT_BLOCK_SIZE,
    with_past: bool = False,
    adapters_as_inputs: bool = False,
    opset: int | None = None,
    exporter: str = "auto",
    overwrite: bool = False,
) -> Path:
    """Write ``out/model.onnx`` (+ external data), the tokenizer/config files and ``onnx_export.json``.

    ``weights`` fp32/fp16 export a graph computing in that type; int8/int4 quantise an fp32 graph's MatMul
    weights in blocks of ``block_size`` (onnx_weights). ``adapters_as_inputs``: ``model_dir`` is a surgery's
    output, exported as its residual with each target's LoRA factors as graph inputs (onnx_adapters). Every
    graph is run at other shapes, and through onnxruntime-genai where it has a config, before it counts.
    """
    _check_options(weights, block_size, exporter)
    dtype = "fp16" if weights == "fp16" else "fp32"
    model_dir = Path(model_dir)
    model_type = _model_type(model_dir)
    if model_type in UNEXPORTABLE:
        raise ExportError(f"{model_dir}: {model_type} cannot be exported to ONNX: {UNEXPORTABLE[model_type]}")
    check_disjoint(Path(out), [model_dir])
    model, adapter = _load(model_dir, DTYPES[dtype], adapters_as_inputs)
    if exporter == "auto":
        exporter = "torchscript" if model.config.model_type in TORCHSCRIPT_FAMILIES else "dynamo"
    layers, heads, head_dim = cache_geometry(model.config)
    module: nn.Module = _WithPast(model) if with_past else _LogitsOnly(model)
    args = example_inputs(model, batch=2, sequence=3, past_length=4 if with_past else None)  # ≥ 2 everywhere,
    input_names, output_names = io_names(layers, with_past)  # or the exporter specialises that axis
    with staged_folder(out, overwrite=overwrite, inputs=[model_dir]) as staging:
        path = staging / ONNX_NAME
        exporter_warnings = _run_exporter(exporter, module, args, path, model.config, with_past, opset, model_dir)
        onnx.checker.check_model(str(path))
        check_other_shapes(path, module, model, with_past, input_names, model_dir, exporter)
        stored = _rewrite_graph(path, weights, block_size, adapter, staging)
        if weights in QUANTISED_BITS:  # the quantised graph must run too; its drift is verify-onnx --text's
            check_other_shapes(path, module, model, with_past, input_names, model_dir, exporter, exact=False)
        copy_model_files(model_dir, staging)
        info: dict[str, Any] = {
            "dtype": dtype,
            "weights": weights,
            **stored,
            "with_past": with_past,
            "num_layers": layers,
            "num_kv_heads": heads,
            "head_dim": head_dim,
            "inputs": input_names,
            "outputs": output_names,
            "opset": graph_opset(path),
            "exporter": exporter,
            "exporter_warnings": dict(exporter_warnings),
        }
        info["genai_config"] = write_genai_config(staging, model.config, info)
        if info["genai_config"]:
            check_genai(staging, model, exact=weights == "fp32")
        (staging / EXPORT_INFO).write_text(json.dumps(info, indent=2))
    return resolved(out)


def _model_type(model_dir: Path) -> str | None:
    try:
        return json.loads((model_dir / "config.json").read_text()).get("model_type")
    except (OSError, ValueError, AttributeError):
        return None  # loading the model names the problem


def _check_options(weights: str, block_size: int, exporter: str) -> None:
    if weights not in WEIGHTS:
        raise OptionsError(f"`weights` {weights!r}: must be one of {', '.join(WEIGHTS)}")
    if block_size < 16 or block_size & (block_size - 1):
        raise OptionsError(f"`block_size` {block_size}: must be a power of two ≥ 16 (onnxruntime's MatMulNBits)")
    if exporter not in EXPORTERS:
        raise OptionsError(f"`exporter` {exporter!r}: must be one of {', '.join(EXPORTERS)}")


def _load(model_dir: Path, dtype: torch.dtype, adapters_as_inputs: bool) -> tuple[PreTrainedModel, LoraAdapter | None]:
    """The model to export, with its surgery adapter's LoRA branches where ``adapters_as_inputs``."""
    CheckpointReader(model_dir)  # a folder that is no safetensors checkpoint: one line naming the file
    refuse_quantised(model_dir, read_json(model_dir / "config.json", CheckpointError))
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=dtype, trust_remote_code=False, use_safetensors=True
    ).eval()
    if find_fused_experts(model):
        model.set_experts_implementation("batched_mm")
        log.warning(
            "%s: fused experts exported with gathered per-token expert weights (batched_mm): prefill "
            "memory grows with tokens × top-k × expert size",
            model_dir,
        )
    if not adapters_as_inputs:
        return model, None
    adapter = read_adapter(model_dir / "adapter")
    inject(model, adapter, model_dir / "adapter")
    return model, adapter


def _rewrite_graph(
    path: Path, weights: str, block_size: int, adapter: LoraAdapter | None, staging: Path
) -> dict[str, Any]:
    """The adapter's factors lifted to graph inputs, then the weights as ``weights`` asks with a tied embedding
    table stored once (the factors stay float); what was done."""
    graph = onnx.load(str(path))
    lifted = lift_adapter_inputs(graph, adapter) if adapter is not None else {}
    if lifted:
        (staging / ADAPTER_INPUTS).write_text(json.dumps(lifted, indent=2))
    tied = find_tied_head(graph)
    if weights in QUANTISED_BITS:
        graph = quantise(graph, QUANTISED_BITS[weights], block_size, tied, keep_float=set(lifted))
    elif tied is not None:
        tie_float_head(graph, tied)
    elif not lifted:
        return {"tied_embeddings": False, "adapter_inputs": 0}
    data = path.with_name(path.name + ".data")
    data.unlink()
    onnx.save_model(graph, str(path), save_as_external_data=True, location=data.name, size_threshold=1024)
    onnx.checker.check_model(str(path))
    quantised = {"block_size": block_size} if weights in QUANTISED_BITS else {}
    return {"tied_embeddings": tied is not None, "adapter_inputs": len(lifted), **quantised}


def _run_exporter(
    exporter: str,
    module: nn.Module,
    args: tuple,
    path: Path,
    model_config: Any,
    with_past: bool,
    opset: int | None,
    model_dir: Path,
) -> Counter[str]:
    """Export ``module`` to ``path``; the exporter's warnings, counted (logged with -v)."""
    layers = cache_geometry(model_config)[0]
    input_names, output_names = io_names(layers, with_past)
    narrowed: list[str] = []
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            if exporter == "dynamo":
                program = torch.onnx.export(
                    module,
                    args,
                    str(path),
                    dynamo=True,
                    dynamic_shapes=_dynamic_shapes(layers, with_past),
                    input_names=input_names,
                    output_names=output_names,
                    external_data=True,
                    opset_version=opset,
                    # onnxscript folds `x + c` with |c| ≤ 1e-8 to `x`: an RMSNorm epsilon that small (Helium's)
                    # vanishes and an all-zero row (a padding token's embedding) gives NaN
                    optimize=not _tiny_epsilon(model_config),
                )
                if program is not None and program.exported_program is not None:
                    narrowed = _narrowed_axes(program.exported_program)
            else:
                _export_torchscript(module, args, path, input_names, output_names, opset or TORCHSCRIPT_OPSET)
    except OSError:
        raise  # the disk, not the model: one line naming the file
    except Exception as exc:  # the exporters raise many types; all mean "this model did not export"
        raise ExportError(f"{model_dir}: ONNX export failed: {_export_failure(exc)}") from exc
    if exporter == "dynamo" and narrowed:  # torch.onnx applies torch.export's suggested fixes without a word
        raise ExportError(
            f"{model_dir}: the dynamo export only runs for {', '.join(narrowed)}: the model's Python decides on that "
            "length (a loop over it)"
        )
    counted = Counter(f"{w.category.__name__}: {str(w.message).splitlines()[0][:120]}" for w in caught)
    for message, count in counted.items():
        log.info("exporter warning (%d×) %s", count, message)
    return counted


def _tiny_epsilon(config) -> bool:
    """Whether the config sets an epsilon the ONNX graph optimiser would take for zero (0 < eps ≤ 1e-8)."""
    values = config.get_text_config().to_dict()
    return any("eps" in key and isinstance(value, float) and 0 < value <= 1e-8 for key, value in values.items())


def _narrowed_axes(program: torch.export.ExportedProgram) -> list[str]:
    """The inputs' dynamic axes that the exporter bounded above (``input_ids[1] ≤ 16``)."""
    ranges = program.range_constraints
    narrowed = []
    for node in program.graph.nodes:
        value = node.meta.get("val") if node.op == "placeholder" else None
        for axis, size in enumerate(getattr(value, "shape", ())):
            if isinstance(size, torch.SymInt) and size.node.expr in ranges:
                upper = ranges[size.node.expr].upper
                if upper < sys.maxsize:  # unbounded is torch's int_oo
                    narrowed.append(f"{node.name}[{axis}] ≤ {upper}")
    return narrowed
