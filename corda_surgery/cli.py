"""The ``corda-surgery`` command line: a thin layer over the library API.

Options are gathered into one validated object per concern (``CalibrationSpec``, ``SurgeryOptions``) at the
edge: click's destinations carry those objects' field names, so each command builds them in one line and
every value is checked before any work starts.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import sys
import threading
from pathlib import Path

import click

from corda_surgery import __version__
from corda_surgery.checkpoint.writer import DEFAULT_MAX_SHARD_SIZE
from corda_surgery.cli_deploy import export_adapter, export_onnx, verify_onnx
from corda_surgery.cli_errors import fail_cleanly, terminated
from corda_surgery.cli_options import (
    calibration_options,
    damping_option,
    damping_rule_option,
    decompose_compute_options,
    decomposition_options,
    device_option,
    forward_options,
)
from corda_surgery.distributed import launched
from corda_surgery.memory import release_large_frees_to_os
from corda_surgery.models import resolve_model
from corda_surgery.outputs import check_disjoint
from corda_surgery.surgery.options import Method, SurgeryOptions

RESUME_HELP = (
    "Continue a run that was killed, from the decompositions it finished (and, for convert, its calibration); "
    "the output is what an uninterrupted run writes. A finished output of the same run: nothing to do."
)


def _compute(kwargs: dict):
    from corda_surgery.compute import ComputeOptions

    return ComputeOptions(**_split(kwargs, ComputeOptions))


def _show_plan(plan) -> None:
    """--dry-run: the plan, and whether it fits (exit status 1 when it does not)."""
    click.echo(plan.describe())
    plan.check()
    click.echo("fits: the run would start")


def _split(kwargs: dict, kind: type) -> dict:
    """Remove and return the entries of ``kwargs`` that are fields of the dataclass ``kind``."""
    return {f.name: kwargs.pop(f.name) for f in dataclasses.fields(kind) if f.name in kwargs}


def _spec(kwargs: dict):
    from corda_surgery.calib.data import CalibrationSpec

    return CalibrationSpec(**_split(kwargs, CalibrationSpec))


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(__version__, prog_name="corda-surgery")
@click.option("--debug", is_flag=True, help="Show full tracebacks (with their causes) on errors.")
@click.option("-v", "--verbose", is_flag=True, help="Log progress details (damping changes, exporter warnings).")
def main(debug: bool, verbose: bool) -> None:
    """Offline model surgery for data-driven LoRA initialisation (CorDA / CorDA++).

    Streams calibration text through a checkpoint one decoder layer at a time, stores each linear
    layer's input covariance in HDF5, and rewrites the weights into a frozen residual model plus a
    PEFT LoRA adapter initialised from the context-oriented SVD of W·C:

    \b
      kpm  knowledge-preserved: calibrate on QA / world knowledge; the r smallest
           components become the adapter, so training disturbs less of what the model knows.
      ipm  instruction-previewed: calibrate on the task's own prompts; the r largest
           components become the adapter, so training starts from the task's directions.

    The residual model plus the untouched adapter gives the original model's outputs.
    MODEL_DIR arguments take a transformers checkpoint folder (safetensors) or
    'smollm2-135m', the embedded SmolLM2-135M-Instruct. Any transformers architecture works: the
    repeated blocks, their linears and which linears share an input are discovered from the model.
    Multimodal checkpoints: the language model's blocks are converted, vision towers stay untouched.
    Mixture-of-experts: every expert of a fused (3-D) expert weight is adapted with the covariance
    of the tokens routed to it, in PEFT's target_parameters form (one rank for all experts; under
    corda++ experts keep --rank, the budget goes to the linears). Inputs are only read: an output
    that is, contains or lies inside an input is refused.
    """
    ranks = launched()
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING, format=f"%(levelname)s: {ranks.label}%(message)s"
    )
    release_large_frees_to_os()
    if threading.current_thread() is threading.main_thread():  # signal handlers live in the main thread only
        signal.signal(signal.SIGTERM, terminated)
    if not ranks.writer:  # under torchrun rank 0 reports for all; the others print only warnings and errors
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 -- for the life of the process


main.add_command(export_adapter)
main.add_command(export_onnx)
main.add_command(verify_onnx)


@main.command()
@click.argument("model_dir", required=False)
@calibration_options
@forward_options
@click.option("--out", type=click.Path(path_type=Path), default=Path("covariances.h5"), show_default=True,
              help="HDF5 covariance store to write.")  # fmt: skip
@click.option("--resume", is_flag=True, help="Continue an interrupted run from its last complete layer.")
@click.option("--overwrite", is_flag=True, help="Replace an existing store.")
@damping_option
@damping_rule_option
@fail_cleanly
def calibrate(model_dir, out, resume, overwrite, dry_run, damping, damping_rule, **calibration):
    """Collect every linear layer's input covariance into an HDF5 store.

    Streams the model one decoder layer at a time (peak memory ≈ embedding + one layer +
    calibration activations). Linears that read the same input (q/k/v, gate/up) share one
    covariance. An interrupted run resumes with --resume. Each input's covariance eigenvalues
    below the damping level (--damping, --damping-rule: give the decomposition's) are counted
    into the store, on all tokens and on half, for the diagnosis `decompose` reports.
    """
    from corda_surgery.decomposition.kinds import DampingRule
    from corda_surgery.surgery.calibration import calibrate as run_calibration

    spec, compute = _spec(calibration), _compute(calibration)
    model = resolve_model(model_dir)
    if dry_run:
        from corda_surgery.surgery.run import estimate_run

        return _show_plan(estimate_run(model, compute, out, spec=spec))
    rule = DampingRule(damping_rule)
    path = run_calibration(
        model, spec, out, compute=compute, resume=resume, overwrite=overwrite, damping=damping, damping_rule=rule
    )
    click.echo(f"covariances written to {path}")


# How a trainer loads each 4-bit residual: NF4 as it is (bitsandbytes' Linear4bit); int4 dequantised, since PEFT
# cannot wrap compressed-tensors' packed linears
_LOAD = {
    "nf4": ("", "  # NF4: bitsandbytes' 4-bit linears, as QLoRA trains"),
    "int4": (
        ", quantization_config=CompressedTensorsConfig(dequantize=True)",
        "  # int4: PEFT trains on it dequantised (from transformers import CompressedTensorsConfig)",
    ),
}


def _print_next_steps(out: Path, base_name: str | None, residual: str = "float") -> None:
    from corda_surgery.surgery.report import read_report

    click.echo(f"residual model: {out}\nadapter:        {out / 'adapter'}\nreport:         {out / 'surgery.json'}")
    if launched().writer:  # other ranks print nothing, and may not see rank 0's folder (another node)
        click.echo(read_report(out).summary())
    load, note = _LOAD.get(residual, ("", ""))
    click.echo(
        "\nTrain it like any PEFT adapter:\n"
        "  from transformers import AutoModelForCausalLM\n  from peft import PeftModel\n"
        f"  model = AutoModelForCausalLM.from_pretrained('{out}'{load}){note}\n"
        f"  model = PeftModel.from_pretrained(model, '{out / 'adapter'}', is_trainable=True)\n"
        f"The adapter names its base model as '{base_name or out}' (adapter_config.json, base_model_name_or_path),\n"
        "which AutoPeftModelForCausalLM follows: if the residual will live elsewhere (moved, copied, uploaded),\n"
        "rerun with --base-name or edit that field. corda-surgery's own commands take the residual next to the\n"
        "adapter instead. Afterwards: corda-surgery merge (plain weights) or to-lora (a LoRA on the original)."
    )


@main.command()
@click.argument("model_dir", required=False)
@click.option("--covariances", "stores", multiple=True, type=click.Path(path_type=Path),
              help="HDF5 store(s) from `calibrate` (not for pissa/milora/lora).")  # fmt: skip
@decomposition_options
@decompose_compute_options
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Output folder.")
@click.option("--resume", is_flag=True, help=RESUME_HELP)
@click.option("--overwrite", is_flag=True, help="Replace an existing output folder.")
@fail_cleanly
def decompose(model_dir, stores, out, resume, overwrite, dry_run, **surgery):
    """Rewrite target weights into a frozen residual model plus a PEFT adapter.

    Reads weights lazily tensor by tensor; writes OUT/ (residual model, sharded safetensors),
    OUT/adapter/ (PEFT LoRA) and OUT/surgery.json (ranks, damping, energy per layer).
    With --method corda++ several --covariances (or a store calibrated with --rounds) are
    candidates: each layer takes the most compact one, and --rank-budget spreads ranks.
    """
    from corda_surgery.surgery.run import decompose_checkpoint, estimate_run

    compute, options = _compute(surgery), SurgeryOptions.of(**surgery)
    model = resolve_model(model_dir)
    if dry_run:
        return _show_plan(estimate_run(model, compute, out, options=options))
    out = decompose_checkpoint(
        model, out, options, stores=list(stores), compute=compute, overwrite=overwrite, resume=resume
    )
    _print_next_steps(out, options.output.base_name, options.quantisation.residual.value)


@main.command()
@click.argument("model_dir", required=False)
@calibration_options
@decomposition_options
@forward_options
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Output folder.")
@click.option("--keep-covariances", is_flag=True,
              help="Also keep the covariance store as OUT/covariances.h5, to `decompose` again (another mode, rank "
                   "or method) without calibrating. It holds each input's covariance once: 0.4 GB for SmolLM2-135M, "
                   "~33 GB for an 8B model, ~330 GB for a 70B (half in float32), so it is off by default.")  # fmt: skip
@click.option("--resume", is_flag=True, help=RESUME_HELP)
@click.option("--overwrite", is_flag=True, help="Replace an existing output folder.")
@fail_cleanly
def convert(model_dir, out, keep_covariances, resume, overwrite, dry_run, **settings):
    """Calibrate and decompose in one go (MODEL_DIR defaults to the embedded SmolLM2-135M).

    Everything the config and the options decide (ranks against the weights' shapes, targets,
    the checkpoint's tensors, an existing output) is checked before calibration starts.
    CorDA decomposes each decoder layer as soon as its covariances are summed (one pass): no
    covariance store is written unless --keep-covariances. CorDA++ plans its ranks over all layers
    first, so it writes the whole store beside OUT, decomposes from it (two passes) and removes it
    at the end unless --keep-covariances. The memory plan printed first gives the disk each needs.
    """
    from corda_surgery.surgery.run import convert_checkpoint, estimate_run

    spec, compute = _spec(settings), _compute(settings)
    options = SurgeryOptions.of(**settings)
    model = resolve_model(model_dir)
    if dry_run:
        return _show_plan(
            estimate_run(model, compute, out, spec=spec, options=options, keep_covariances=keep_covariances)
        )
    out = convert_checkpoint(
        model,
        out,
        spec,
        options,
        compute=compute,
        overwrite=overwrite,
        resume=resume,
        keep_covariances=keep_covariances,
    )
    _print_next_steps(out, options.output.base_name, options.quantisation.residual.value)


@main.command("to-lora")
@click.argument("surgery_dir", type=click.Path(path_type=Path, exists=True, file_okay=False))
@click.argument("trained_adapter", type=click.Path(path_type=Path, exists=True, file_okay=False))
@click.option("--base", required=True, help="The original model folder the surgery started from.")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Output adapter folder.")
@click.option("--overwrite", is_flag=True, help="Replace an existing output folder.")
@fail_cleanly
def to_lora(surgery_dir, trained_adapter, base, out, overwrite):
    """Turn a trained adapter into a plain rank-2r LoRA on the original model.

    ΔW = s·(B'A' − BA): shareable and stackable like any LoRA, no residual model needed.
    The adapter must belong to SURGERY_DIR (modules, ranks, the base it names) and BASE must be
    the model the surgery started from.
    """
    from corda_surgery.export.to_lora import convert_to_lora

    path = convert_to_lora(surgery_dir, trained_adapter, resolve_model(base), out, overwrite=overwrite)
    click.echo(f"LoRA for {base} written to {path}")


@main.command()
@click.argument("surgery_dir", type=click.Path(path_type=Path, exists=True, file_okay=False))
@click.option("--adapter", "adapter_dir", type=click.Path(path_type=Path, exists=True, file_okay=False),
              help="Trained adapter folder [default: SURGERY_DIR/adapter, the untouched one].")  # fmt: skip
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Merged checkpoint folder.")
@click.option("--max-shard-size", default=DEFAULT_MAX_SHARD_SIZE, show_default=True, help="Largest output shard.")
@click.option("--overwrite", is_flag=True, help="Replace an existing output folder.")
@fail_cleanly
def merge(surgery_dir, adapter_dir, out, max_shard_size, overwrite):
    """Fold W_res + s·B·A into plain weights: a standard transformers checkpoint.

    The adapter is checked against SURGERY_DIR first (modules, ranks against its config and the
    surgery, the base it names, finite values, the residual unchanged since the surgery).
    """
    from corda_surgery.export.handoff import checked_adapter
    from corda_surgery.export.merge import merge_adapter
    from corda_surgery.sizes import parse_size

    adapter_dir = adapter_dir or surgery_dir / "adapter"
    shard_size = parse_size(max_shard_size, "--max-shard-size")
    checked_adapter(surgery_dir, adapter_dir)
    path = merge_adapter(surgery_dir, adapter_dir, out, overwrite=overwrite, max_shard_size=shard_size)
    click.echo(f"merged model written to {path}")


def _damping_columns(diagnosis: dict, rank: int) -> str:
    """inspect's damping columns: the counts, and the limit ("?" where they reach the rank, unclassified)."""
    below = diagnosis.get("covariance_eigenvalues_below_damping")
    half = diagnosis.get("covariance_eigenvalues_below_damping_half")
    limit = diagnosis.get("damping_limit") or ("?" if below is not None and below >= rank else "-")
    return f"{'-' if below is None else below:>7} {'-' if half is None else half:>7} {limit:>8}"


@main.command()
@click.argument("stores", nargs=-1, required=True, type=click.Path(path_type=Path, exists=True, dir_okay=False))
@click.option("--model", "model_dir", default=None, help="The model the stores were calibrated on [default: embedded].")
@click.option("--mode", type=click.Choice(["kpm", "ipm"]), default="kpm", show_default=True)
@click.option("--rank", default=16, show_default=True, help="Rank at which compactness is measured.")
@click.option("--rank-budget", type=float, default=None, help="Average-rank budget to allocate (CorDA++).")
@click.option("--min-rank", default=1, show_default=True)
@click.option("--max-rank", type=int, default=None)
@click.option("--targets", default="all-linear", show_default=True)
@damping_option
@damping_rule_option
@device_option
@click.option("--plot", "plot_dir", type=click.Path(path_type=Path, file_okay=False), default=None,
              help="Write spectra.png and ranks.png into this folder (needs matplotlib).")  # fmt: skip
@fail_cleanly
def inspect(stores, model_dir, plot_dir, **surgery):
    """Per layer: compactness, chosen covariance candidate and allocated rank (CorDA++)."""
    from corda_surgery.surgery.inspection import inspect_stores, plot_inspection

    compute = _compute(surgery)
    options = SurgeryOptions.of(method=Method.CORDA_PLUS, **surgery)
    model = resolve_model(model_dir)
    if plot_dir is not None:
        check_disjoint(plot_dir, [*map(Path, stores), model])
    rows, spectra = inspect_stores(model, list(stores), options, compute)
    title = options.mode.value.upper() if options.mode else ""
    plots = plot_inspection(rows, spectra, plot_dir, title) if plot_dir is not None else []  # before any output
    rank = options.rank
    # 1 − compactness is printed too: for KPM it is the tiny energy share the adapter disturbs.
    # below λ: covariance eigenvalues under the damping level (at half the tokens); limit: what limits the
    # directions of an adapter where they reach its rank (sample: more tokens help; spectrum: the damping decides).
    click.echo(
        f"{'layer':<44} {'rank':>4} {'store':>5} {'round':>5} {'compactness':>11} {'1-compact.':>10} "
        f"{'uniform r=' + str(rank):>12} {'below λ':>7} {'at half':>7} {'limit':>8}"
    )
    for row in rows:
        round_label = "-" if row["round"] is None else str(row["round"])
        click.echo(
            f"{row['layer']:<44} {row['rank']:>4} {row['store']:>5} {round_label:>5} "
            f"{row['compactness']:>11.6f} {1 - row['compactness']:>10.3e} {row['compactness_at_base_rank']:>12.6f} "
            + _damping_columns(row["damping"], row["rank"])
        )
    mean = sum(r["compactness"] for r in rows) / len(rows)
    mean_base = sum(r["compactness_at_base_rank"] for r in rows) / len(rows)
    click.echo(
        f"mean compactness {mean:.6f} (1 − c = {1 - mean:.3e}); uniform rank {rank}: {mean_base:.6f} "
        f"(1 − c = {1 - mean_base:.3e})"
    )
    for path in plots:
        click.echo(f"plot written to {path}")
