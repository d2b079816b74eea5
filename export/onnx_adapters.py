"""One frozen residual graph, many adapters: each target's LoRA factors as graph inputs, and ``.onnx_adapter`` files.

A CorDA surgery gives one residual that every fine-tune of it shares. ``export-onnx --adapters-as-inputs``
exports that residual with, for every target linear, ``y = W_res·x + B_s·(A·x)``, where ``A`` and
``B_s = s·B`` (the LoRA scaling folded in, so adapters of any alpha fit one graph) are graph inputs whose
initializers hold the surgery's own factors: with no adapter active the graph is the original model. An
``.onnx_adapter`` (onnxruntime's ``AdapterFormat``) holds a trained adapter's factors under those input names,
in the layout the exporter stored them in (it may transpose a weight); onnxruntime feeds an active adapter's
factors as those inputs (``RunOptions.add_active_adapter``), so one session serves every adapter.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import numpy_helper
from torch import nn
from torch.nn import functional

from corda_surgery.errors import CordaSurgeryError
from corda_surgery.export.peft_adapter import LoraAdapter, read_adapter
from corda_surgery.outputs import check_disjoint, refuse_existing
from corda_surgery.paths import read_json

ADAPTER_INPUTS = "adapter_inputs.json"


class AdapterInputError(CordaSurgeryError):
    """An adapter that cannot be served by the exported graph; names the file and the module."""


class _LoraLinear(nn.Module):
    """``base(x) + (x·Aᵀ)·B_sᵀ``: the residual linear with its adapter's factors as parameters of their own."""

    def __init__(self, base: nn.Linear, lora_a: torch.Tensor, scaled_b: torch.Tensor):
        super().__init__()
        self.base = base
        self.lora_a = nn.Parameter(lora_a.to(base.weight.dtype), requires_grad=False)
        self.lora_b = nn.Parameter(scaled_b.to(base.weight.dtype), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + functional.linear(functional.linear(x, self.lora_a), self.lora_b)


def factors(adapter: LoraAdapter) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """(A, s·B) per module, in float32, as the graph computes with them."""
    return {
        module: (adapter.lora_A[module].float(), adapter.scaling(module) * adapter.lora_B[module].float())
        for module in sorted(adapter.lora_A)
    }


def inject(model: nn.Module, adapter: LoraAdapter, source: Path) -> None:
    """Wrap every target linear of ``model`` with its LoRA branch (plain nn.Linear targets only)."""
    if adapter.parameter_paths or adapter.fan_in_fan_out:
        raise AdapterInputError(
            f"{source}: --adapters-as-inputs serves nn.Linear targets; this adapter targets "
            f"{'fused experts' if adapter.parameter_paths else 'Conv1D (fan_in_fan_out)'} weights: merge instead"
        )
    for module, (lora_a, scaled_b) in factors(adapter).items():
        parent_name, _, child = module.rpartition(".")
        parent = model.get_submodule(parent_name)
        base = getattr(parent, child)
        if not isinstance(base, nn.Linear):
            raise AdapterInputError(f"{source}: {module} is a {type(base).__name__}, not an nn.Linear")
        setattr(parent, child, _LoraLinear(base, lora_a, scaled_b))


def lift_adapter_inputs(graph: onnx.ModelProto, adapter: LoraAdapter) -> dict[str, dict]:
    """Turn each factor's initializer into a graph input of the same default; its name → (module, factor,
    transposed). Initializers are found by value: the exporters rename, and may transpose, parameters."""
    found: dict[str, dict] = {}
    by_shape: dict[tuple[int, ...], list[onnx.TensorProto]] = {}
    for tensor in graph.graph.initializer:
        by_shape.setdefault(tuple(tensor.dims), []).append(tensor)
    for module, pair in factors(adapter).items():
        for kind, value in zip(("lora_A", "lora_B"), pair, strict=True):
            wanted = value.numpy()
            match = _find(by_shape, wanted)
            if match is None:
                raise AdapterInputError(f"{module}.{kind}: not found among the exported graph's initializers")
            tensor, transposed = match
            name = f"{module}.{kind}"
            for node in graph.graph.node:
                node.input[:] = [name if i == tensor.name else i for i in node.input]
            tensor.name = name
            graph.graph.input.append(onnx.helper.make_tensor_value_info(name, tensor.data_type, list(tensor.dims)))
            found[name] = {"module": module, "factor": kind, "transposed": transposed}
    return found


def _find(by_shape: dict, wanted: np.ndarray) -> tuple[onnx.TensorProto, bool] | None:
    for transposed, candidate in ((False, wanted), (True, wanted.T)):
        for tensor in by_shape.get(candidate.shape, []):
            if np.array_equal(numpy_helper.to_array(tensor), candidate.astype(numpy_helper.to_array(tensor).dtype)):
                return tensor, transposed
    return None


def adapter_parameters(adapter: LoraAdapter, inputs: dict[str, dict], source: Path) -> dict[str, np.ndarray]:
    """The trained adapter's factors under the graph's input names, in its layouts; a shape that differs
    (another rank, another model) is refused naming the module."""
    scaled = factors(adapter)
    missing = sorted({spec["module"] for spec in inputs.values()} - scaled.keys())
    extra = sorted(scaled.keys() - {spec["module"] for spec in inputs.values()})
    if missing or extra:
        what = f"lacks {missing[0]}" if missing else f"adapts {extra[0]}, which the graph does not serve"
        raise AdapterInputError(f"{source}: the adapter {what}")
    parameters = {}
    for name, spec in inputs.items():
        value = scaled[spec["module"]][0 if spec["factor"] == "lora_A" else 1].numpy()
        parameters[name] = np.ascontiguousarray(value.T if spec["transposed"] else value)
    return parameters


def _read_inputs(onnx_dir: Path) -> dict[str, dict]:
    """adapter_inputs.json, typed before use (the folder may come from a stranger)."""
    path = onnx_dir / ADAPTER_INPUTS
    if not path.is_file():
        raise AdapterInputError(f"{onnx_dir}: no {ADAPTER_INPUTS}: export the surgery with --adapters-as-inputs")
    inputs = read_json(path, AdapterInputError)
    good = isinstance(inputs, dict) and all(
        isinstance(spec, dict) and isinstance(spec.get("module"), str) and isinstance(spec.get("transposed"), bool)
        and spec.get("factor") in ("lora_A", "lora_B") for spec in inputs.values()
    )  # fmt: skip
    if not good or not inputs:
        raise AdapterInputError(f"{path}: malformed; not written by export-onnx --adapters-as-inputs")
    return inputs


def write_onnx_adapter(source: Path, onnx_dir: Path, out: Path, *, overwrite: bool = False) -> int:
    """``out``: the PEFT adapter in ``source`` in onnxruntime's AdapterFormat for the export in ``onnx_dir``
    (written beside and renamed, so no half-written file is left); the number of factors written."""
    import onnxruntime as ort

    check_disjoint(out, [source, onnx_dir])
    refuse_existing(out, overwrite)
    adapter = read_adapter(source)
    inputs = _read_inputs(onnx_dir)
    graph = onnx.load(str(onnx_dir / "model.onnx"), load_external_data=False)
    declared = {i.name: i.type.tensor_type for i in graph.graph.input}
    parameters = adapter_parameters(adapter, inputs, source)
    values = {}
    for name, value in parameters.items():
        if name not in declared:
            raise AdapterInputError(f"{onnx_dir / 'model.onnx'}: has no input {name}")
        shape = [dim.dim_value for dim in declared[name].shape.dim]
        if list(value.shape) != shape:
            raise AdapterInputError(f"{source}: {name} has shape {list(value.shape)}; the graph takes {shape}")
        dtype = onnx.helper.tensor_dtype_to_np_dtype(declared[name].elem_type)
        values[name] = ort.OrtValue.ortvalue_from_numpy(value.astype(dtype))
    adapter_format = ort.AdapterFormat()
    adapter_format.set_adapter_version(1)
    adapter_format.set_model_version(1)
    adapter_format.set_parameters(values)
    partial = out.with_name(f".{out.name}.partial")
    adapter_format.export_adapter(str(partial))
    partial.replace(out)
    return len(values)
