"""The deployment commands: ``export-onnx`` and ``verify-onnx`` (registered on ``corda-surgery`` by cli.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from corda_surgery.cli_errors import fail_cleanly


@click.command("export-onnx")
@click.argument("merged_dir", type=click.Path(path_type=Path, exists=True, file_okay=False))
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Output folder for model.onnx.")
@click.option(
    "--weights",
    type=click.Choice(["fp32", "fp16", "int8", "int4"]),
    default="fp32",
    show_default=True,
    help="fp16 halves weights and compute (for GPUs); int8/int4 store MatMul weights in blocks through "
    "onnxruntime's MatMulNBits (CPU and GPU) and compute in fp32. A tied embedding is stored once.",
)
@click.option("--block-size", default=32, show_default=True,
              help="Weights per quantisation block (int8/int4).")  # fmt: skip
@click.option("--with-past/--no-past", default=True, show_default=True,
              help="past_key_values.* inputs and present.* outputs for KV-cached generation (what "
                   "onnxruntime-genai runs); --no-past: one graph of logits alone.")  # fmt: skip
@click.option("--opset", type=int, default=None, help="ONNX opset [default: the exporter's].")
@click.option("--exporter", type=click.Choice(["auto", "dynamo", "torchscript"]), default="auto", show_default=True,
              help="torch.onnx path; auto: TorchScript for Llama-family models (fast; checked at shapes other "
                   "than the traced ones), dynamo otherwise.")  # fmt: skip
@click.option("--overwrite", is_flag=True, help="Replace an existing output folder.")
@fail_cleanly
def export_onnx(merged_dir, out, weights, block_size, with_past, opset, exporter, overwrite):
    """Export a merged (plain) causal LM to an ONNX folder that onnxruntime and onnxruntime-genai load.

    The folder: model.onnx (+ model.onnx.data), the tokenizer and config files, genai_config.json
    (Llama, Mistral, Qwen2/3 with the KV cache) and onnx_export.json. Dynamic batch and sequence
    axes; inputs input_ids, attention_mask, position_ids (+ past_key_values.*); outputs logits
    (+ present.*), optimum's names. Before the folder is written, the graph runs in onnxruntime at
    other shapes than the traced ones (fp32/fp16: against PyTorch) and onnxruntime-genai generates
    from the folder (fp32: PyTorch's greedy tokens); an export that fails either is not written.
    """
    from corda_surgery.export.onnx_export import export_onnx as run_export

    path = run_export(
        merged_dir, out, weights=weights, block_size=block_size, with_past=with_past, opset=opset,
        exporter=exporter, overwrite=overwrite,
    )  # fmt: skip
    click.echo(f"ONNX model written to {path}")


@click.command("verify-onnx")
@click.argument("onnx_dir", type=click.Path(path_type=Path, exists=True, file_okay=False))
@click.option("--reference", type=click.Path(path_type=Path, exists=True, file_okay=False), required=True,
              help="The merged checkpoint the ONNX model was exported from.")  # fmt: skip
@click.option("--new-tokens", default=20, show_default=True, help="Greedy tokens compared per prompt.")
@click.option("--repeats", default=5, show_default=True, help="Timed runs per latency figure (median).")
@fail_cleanly
def verify_onnx(onnx_dir, reference, new_tokens, repeats):
    """Compare onnxruntime with PyTorch: logits, greedy tokens, prefill and per-token latency.

    Runs on CUDAExecutionProvider when it loads, else on the CPU; prints the provider used.
    Exits with status 1 if the greedy tokens differ.
    """
    from corda_surgery.export.verify import verify_onnx as run_verify

    report = run_verify(onnx_dir, reference, new_tokens=new_tokens, repeats=repeats)
    click.echo(f"provider:            {report.provider}")
    click.echo(
        f"logits:              max |Δ| {report.max_abs_error:.2e}, relative {report.max_rel_error:.2e}, "
        f"argmax agreement {report.argmax_agreement:.2%}"
    )
    click.echo(f"greedy {report.greedy_tokens} tokens:    {'identical' if report.greedy_match else 'DIFFERENT'}")
    click.echo(
        f"prefill {report.prefill_tokens} tokens:  onnxruntime {report.prefill_ms_onnx:.1f} ms, "
        f"PyTorch {report.prefill_ms_torch:.1f} ms"
    )
    click.echo(
        f"decode (per token):  onnxruntime {report.decode_ms_per_token_onnx:.2f} ms, "
        f"PyTorch {report.decode_ms_per_token_torch:.2f} ms"
    )
    if not report.greedy_match:
        sys.exit(1)
