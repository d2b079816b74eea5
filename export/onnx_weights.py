"""The exported graph's weights as deployments want them: tied embeddings stored once, and int8/int4 weights.

Quantisation is onnxruntime's own (``MatMulNBitsQuantizer`` into ``MatMulNBits``), no kernels of ours:
int8 rounds each block to nearest; int4 fits each block with HQQ, since round-to-nearest in 4 bits costs
SmolLM2-135M 27–48 % of its WikiText-2 perplexity (ours and onnxruntime-genai's builder alike) and HQQ about
0.1 % with the head kept out of it; the output head takes 8 bits in either case (docs/concepts.md).

A tied output head (``lm_head`` = the embedding table, as in SmolLM2 and most small models) is written by
the exporter as a second, transposed copy of the table; here it becomes one tensor again:

- float weights: the head multiplies by ``Transpose(table)`` (onnxruntime folds it once when it loads);
- quantised weights: the head's ``MatMulNBits`` is quantised from the table's exact transpose, and the
  embedding lookup becomes a ``GatherBlockQuantized`` reading the same packed bytes, scales and zero points
  (onnxruntime's layout for both is one row of blocks per vocabulary entry), so the table is stored once, in
  8 bits, and looked up as the head computes with it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

log = logging.getLogger(__name__)
WEIGHTS = ("fp32", "fp16", "int8", "int4")
QUANTISED_BITS = {"int8": 8, "int4": 4}
DEFAULT_BLOCK_SIZE = 32
HEAD_BITS = 8  # the output head (and a table tied to it), whatever the body's bits
# MatMulNBits' accuracy_level 4 (int8 activations in its blocks) for 8-bit weights: the only fast CPU kernel for
# them in onnxruntime 1.31 (64 against 4.5 tokens/s decoding SmolLM2); the CUDA provider ignores it
INT8_COMPUTE = 4


@dataclass(frozen=True)
class TiedHead:
    """The embedding lookup and the output head's MatMul that share one table (the head's is its transpose)."""

    gather: onnx.NodeProto
    matmul: onnx.NodeProto
    table: str  # the embedding table's initializer, [vocab, hidden]
    head_weight: str  # the head's transposed copy, [hidden, vocab]


def find_tied_head(model: onnx.ModelProto) -> TiedHead | None:
    """The head whose weight is exactly the transpose of an embedding table, if the graph has one."""
    initializers = {tensor.name: tensor for tensor in model.graph.initializer}
    tables = {
        node.input[0]: node
        for node in model.graph.node
        if node.op_type == "Gather" and node.input[0] in initializers and len(initializers[node.input[0]].dims) == 2
    }
    for node in model.graph.node:
        if node.op_type != "MatMul" or node.input[1] not in initializers:
            continue
        dims = list(initializers[node.input[1]].dims)
        for table, gather in tables.items():
            if dims != list(initializers[table].dims)[::-1]:
                continue
            head = numpy_helper.to_array(initializers[node.input[1]])
            if np.array_equal(head, numpy_helper.to_array(initializers[table]).T):
                return TiedHead(gather, node, table, node.input[1])
    return None


def _drop_initializer(model: onnx.ModelProto, name: str) -> None:
    for tensor in model.graph.initializer:
        if tensor.name == name:
            model.graph.initializer.remove(tensor)
            return


def tie_float_head(model: onnx.ModelProto, tied: TiedHead) -> None:
    """The head multiplies by the transposed table; its own copy goes."""
    transposed = f"{tied.table}.transposed"
    node = helper.make_node("Transpose", [tied.table], [transposed], name=f"{tied.matmul.name}/tied_weight")
    model.graph.node.insert(list(model.graph.node).index(tied.matmul), node)
    _drop_initializer(model, tied.head_weight)
    tied.matmul.input[1] = transposed


def quantise(
    model: onnx.ModelProto, bits: int, block_size: int, tied: TiedHead | None, keep_float: set[str]
) -> onnx.ModelProto:
    """Every MatMul with a constant weight into onnxruntime's MatMulNBits, but those reading ``keep_float``
    tensors (graph inputs with defaults: adapter factors). The output head takes 8 bits whatever ``bits``
    (round to nearest): it decides every token; a ``tied`` table is stored once, as the head's (above). 4-bit
    weights are fitted with HQQ (half-quadratic: each block's scale and zero point optimised against the
    rounding error, no data needed), onnxruntime's own; 8-bit ones rounded to nearest."""
    from onnxruntime.quantization.matmul_nbits_quantizer import (
        DefaultWeightOnlyQuantConfig,
        HQQWeightOnlyQuantConfig,
        MatMulNBitsQuantizer,
    )

    head = (
        tied.matmul
        if tied is not None
        else next((node for node in model.graph.node if node.op_type == "MatMul" and "logits" in node.output), None)
    )
    floats = [node.name for node in model.graph.node if keep_float.intersection(node.input)]
    body: Any = (
        HQQWeightOnlyQuantConfig(block_size=block_size, bits=4)
        if bits == 4
        else DefaultWeightOnlyQuantConfig(block_size=block_size, bits=8, accuracy_level=INT8_COMPUTE)
    )
    heads = [head.name] if head is not None else []
    model = _run_quantizer(MatMulNBitsQuantizer(model, nodes_to_exclude=floats + heads, algo_config=body))
    if head is not None:  # what is left is the head (nodes_to_include adds to the op types, it does not narrow)
        head_config = DefaultWeightOnlyQuantConfig(block_size=block_size, bits=HEAD_BITS, accuracy_level=INT8_COMPUTE)
        model = _run_quantizer(MatMulNBitsQuantizer(model, nodes_to_exclude=floats, algo_config=head_config))
    if tied is not None:
        _gather_from_head(model, tied, HEAD_BITS, block_size)
    return model


def _run_quantizer(quantizer: Any) -> onnx.ModelProto:
    quiet = logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer")
    level, quiet.level = quiet.level, logging.WARNING  # it logs every node at INFO
    try:
        with np.errstate(divide="ignore", invalid="ignore"):  # all-zero blocks (a padding row): scale 0, kept 0
            quantizer.process()
    finally:
        quiet.setLevel(level)
    return quantizer.model.model


def _gather_from_head(model: onnx.ModelProto, tied: TiedHead, bits: int, block_size: int) -> None:
    """Replace the float embedding lookup by a GatherBlockQuantized over the head's MatMulNBits tensors."""
    head = next(n for n in model.graph.node if n.op_type == "MatMulNBits" and n.input[0] == tied.matmul.input[0])
    vocab = next(numpy_helper.to_array(t).shape[0] for t in model.graph.initializer if t.name == tied.table)
    rows = f"{tied.table}.rows"
    model.graph.initializer.append(numpy_helper.from_array(np.array([vocab, -1], dtype=np.int64), rows))
    packed, zero_points = f"{tied.table}.packed", f"{tied.table}.zero_points"
    reshapes = [
        helper.make_node("Reshape", [head.input[1], rows], [packed], name=f"{tied.gather.name}/tied_data"),
        helper.make_node("Reshape", [head.input[3], rows], [zero_points], name=f"{tied.gather.name}/tied_zero_points"),
    ]
    lookup = helper.make_node(
        "GatherBlockQuantized",
        [packed, tied.gather.input[1], head.input[2], zero_points],
        list(tied.gather.output),
        name=tied.gather.name,
        domain="com.microsoft",
        bits=bits,
        block_size=block_size,
        gather_axis=0,
        quantize_axis=1,
    )
    at = list(model.graph.node).index(next(n for n in model.graph.node if n.name == tied.gather.name))
    model.graph.node.remove(model.graph.node[at])
    for offset, node in enumerate([*reshapes, lookup]):
        model.graph.node.insert(at + offset, node)
    _drop_initializer(model, tied.table)
