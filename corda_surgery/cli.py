"""The ``corda-surgery`` command line: a thin layer over the library API."""

from __future__ import annotations

import functools
import logging
import sys
from pathlib import Path

import click

from corda_surgery import __version__
from corda_surgery.models import resolve_model

# Errors a user can cause and fix: shown as one line unless --debug.
_USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, PermissionError, OSError, RuntimeError)


def _fail_cleanly(command):
    """Turn known errors into a one-line message and exit code 1; --debug shows the traceback."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except _USER_ERRORS as exc:
            if click.get_current_context().find_root().params.get("debug"):
                raise
            click.echo(f"error: {exc}", err=True)
            sys.exit(1)

    return wrapper


def _calibration_options(command):
    options = [
        click.option("--data", default="nq_open", show_default=True,
                     help="Built-in set (nq_open, triviaqa, gsm8k, code_alpaca, alpaca) or a .jsonl/.txt file."),
        click.option("--samples", default=128, show_default=True, help="Number of calibration samples."),
        click.option("--seq-len", default=512, show_default=True, help="Maximum tokens per sample."),
        click.option("--batch-size", default=8, show_default=True, help="Samples per forward batch."),
        click.option("--seed", default=0, show_default=True, help="Seed for sampling the calibration set."),
        click.option("--text-field", default=None,
                     help="Field of .jsonl records to use as text (default: prompt/response pairs, then 'text')."),
        click.option("--chat-template/--no-chat-template", default=None,
                     help="Format prompt/response pairs with the tokenizer's chat template [default: if it has one]."),
        click.option("--covariance-norm", type=click.Choice(["tokens", "peft"]), default="tokens", show_default=True,
                     help="'tokens': XᵀX / number of real tokens. 'peft': PEFT's rule (each sample scaled by its "
                          "|max|, divided by the number of samples), for like-for-like comparisons."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="corda-surgery")
@click.option("--debug", is_flag=True, help="Show full tracebacks on errors.")
@click.option("-v", "--verbose", is_flag=True, help="Log progress details (damping changes, files written).")
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
    'smollm2-135m', the embedded SmolLM2-135M-Instruct.
    """
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s: %(message)s")


def _spec(data, samples, seq_len, batch_size, seed, text_field, chat_template):
    from calib.data import CalibrationSpec

    return CalibrationSpec(
        source=data, samples=samples, seq_len=seq_len, batch_size=batch_size, seed=seed,
        text_field=text_field, chat_template=chat_template,
    )


@main.command()
@click.argument("model_dir", required=False)
@_calibration_options
@click.option("--out", "out", type=click.Path(path_type=Path), default=Path("covariances.h5"), show_default=True,
              help="HDF5 covariance store to write.")
@click.option("--resume", is_flag=True, help="Continue an interrupted run from its last complete layer.")
@click.option("--overwrite", is_flag=True, help="Replace an existing store.")
@_fail_cleanly
def calibrate(model_dir, data, samples, seq_len, batch_size, seed, text_field, chat_template, covariance_norm,
              out, resume, overwrite):
    """Collect every linear layer's input covariance into an HDF5 store.

    Streams the model one decoder layer at a time (peak memory ≈ embedding + one layer +
    calibration activations). Linears that read the same input (q/k/v, gate/up) share one
    covariance. An interrupted run resumes with --resume.
    """
    from calib.stream import calibrate as run_calibration

    path = run_calibration(
        resolve_model(model_dir), _spec(data, samples, seq_len, batch_size, seed, text_field, chat_template), out,
        resume=resume, overwrite=overwrite, normalisation=covariance_norm,
    )
    click.echo(f"covariances written to {path}")


