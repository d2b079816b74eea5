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
@click.option(
    "--adapters-as-inputs",
    is_flag=True,
    help="MERGED_DIR is a surgery's output: export its frozen residual with each target's LoRA factors "
    "as graph inputs (their defaults: the surgery's adapter, the original model), so one session "
    "serves every adapter trained from it (export-adapter).",
)
@click.option("--opset", type=int, default=None, help="ONNX opset [default: the exporter's].")
@click.option("--exporter", type=click.Choice(["auto", "dynamo", "torchscript"]), default="auto", show_default=True,
              help="torch.onnx path; auto: TorchScript for Llama-family models (fast; checked at shapes other "
                   "than the traced ones), dynamo otherwise.")  # fmt: skip
@click.option("--overwrite", is_flag=True, help="Replace an existing output folder.")
@fail_cleanly
def export_onnx(merged_dir, out, weights, block_size, with_past, adapters_as_inputs, opset, exporter, overwrite):
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
        adapters_as_inputs=adapters_as_inputs, exporter=exporter, overwrite=overwrite,
    )  # fmt: skip
    click.echo(f"ONNX model written to {path}")


@click.command("export-adapter")
@click.argument("trained_adapter", type=click.Path(path_type=Path, exists=True, file_okay=False))
@click.option(
    "--onnx",
    "onnx_dir",
    type=click.Path(path_type=Path, exists=True, file_okay=False),
    required=True,
    help="The export-onnx --adapters-as-inputs folder of the surgery the adapter was trained from.",
)
@click.option(
    "--out", type=click.Path(path_type=Path, dir_okay=False), required=True, help="The .onnx_adapter file to write."
)
@click.option("--overwrite", is_flag=True, help="Replace an existing file.")
@fail_cleanly
def export_adapter(trained_adapter, onnx_dir, out, overwrite):
    """Write a trained PEFT adapter as an onnxruntime .onnx_adapter for an --adapters-as-inputs export.

    At run time: adapter = onnxruntime.LoraAdapter(); adapter.Load(FILE);
    run_options.add_active_adapter(adapter); session.run(..., run_options) gives that fine-tune's
    logits from the one residual session (s·B folded in, so any lora_alpha fits).
    """
    from corda_surgery.export.onnx_adapters import write_onnx_adapter

    count = write_onnx_adapter(trained_adapter, onnx_dir, out, overwrite=overwrite)
    click.echo(f"{count} LoRA factors written to {out}")


@click.command("verify-onnx")
@click.argument("onnx_dir", type=click.Path(path_type=Path, exists=True, file_okay=False))
@click.option(
    "--reference",
    type=click.Path(path_type=Path, exists=True, file_okay=False),
    required=True,
    help="The merged checkpoint the ONNX model was exported from.",
)
@click.option("--new-tokens", default=20, show_default=True, help="Greedy tokens compared per prompt.")
@click.option("--repeats", default=5, show_default=True, help="Timed runs per latency figure (median).")
@click.option(
    "--text",
    "text_file",
    type=click.Path(path_type=Path, exists=True, dir_okay=False),
    help="A UTF-8 text file: the perplexity of both on its first --text-tokens tokens.",
)
@click.option("--text-tokens", default=4096, show_default=True, help="Tokens of --text scored.")
@click.option("--text-window", default=512, show_default=True, help="Tokens per scored window of --text.")
@click.option("--max-drift", default=0.10, show_default=True,
              help="Largest perplexity drift (ONNX / PyTorch − 1) a quantised export may have.")  # fmt: skip
@fail_cleanly
def verify_onnx(onnx_dir, reference, new_tokens, repeats, text_file, text_tokens, text_window, max_drift):
    """Compare onnxruntime with PyTorch: logits, greedy tokens, perplexity, latency and size.

    Runs on CUDAExecutionProvider when it loads, else on the CPU; prints the provider used.
    Exit status 1: a float export (fp32/fp16) whose greedy tokens differ, or a quantised one
    (int8/int4) whose perplexity on --text drifts past --max-drift (without --text its drift is
    not judged: it says so).
    """
    from corda_surgery.export.verify import verify_onnx as run_verify

    text = text_file.read_text(encoding="utf-8") if text_file else None
    report = run_verify(onnx_dir, reference, new_tokens=new_tokens, repeats=repeats, text=text,
                        text_tokens=text_tokens, text_window=text_window)  # fmt: skip
    click.echo(f"provider:            {report.provider}")
    click.echo(f"weights:             {report.weights}, {report.size_bytes / 2**20:.1f} MiB")
    click.echo(
        f"logits:              max |Δ| {report.max_abs_error:.2e}, relative {report.max_rel_error:.2e}, "
        f"argmax agreement {report.argmax_agreement:.2%}"
    )
    click.echo(
        f"greedy {report.greedy_tokens} tokens:    {'identical' if report.greedy_match else 'DIFFERENT'} "
        f"(agreement {report.greedy_agreement:.0%}: tokens before the first that differs)"
    )
    click.echo(
        f"prefill {report.prefill_tokens} tokens:  onnxruntime {report.prefill_ms_onnx:.1f} ms, "
        f"PyTorch {report.prefill_ms_torch:.1f} ms"
    )
    click.echo(
        f"decode (per token):  onnxruntime {report.decode_ms_per_token_onnx:.2f} ms, "
        f"PyTorch {report.decode_ms_per_token_torch:.2f} ms"
    )
    sys.exit(_verdict(report, max_drift))


def _verdict(report, max_drift: float) -> int:
    """Print what the figures mean for this export; the exit status."""
    if report.text_tokens:
        click.echo(
            f"perplexity:          onnxruntime {report.perplexity_onnx:.3f}, PyTorch {report.perplexity_torch:.3f} "
            f"({report.perplexity_drift:+.2%} over {report.text_tokens:,} tokens)"
        )
    if report.weights in ("fp32", "fp16"):
        return 0 if report.greedy_match else 1
    if not report.text_tokens:
        click.echo(f"drift:               not judged: a {report.weights} export is judged on --text's perplexity")
        return 0
    if abs(report.perplexity_drift) > max_drift:
        click.echo(f"drift:               TOO FAR: {report.perplexity_drift:+.2%} is past --max-drift {max_drift:.0%}")
        return 1
    click.echo(f"drift:               within --max-drift {max_drift:.0%}")
    return 0
