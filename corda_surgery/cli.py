"""The ``corda-surgery`` command line: a thin layer over the library API."""

from __future__ import annotations

import click

from corda_surgery import __version__


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="corda-surgery")
def main() -> None:
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
    """
