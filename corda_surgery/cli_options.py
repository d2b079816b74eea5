"""The command line's option tables, by concern: click destinations carry the options dataclasses' field
names, so a command builds each object in one line."""

from __future__ import annotations

import click

from corda_surgery.checkpoint.quantised import ResidualFormat
from corda_surgery.checkpoint.writer import DEFAULT_MAX_SHARD_SIZE
from corda_surgery.decomposition.gptq import DEFAULT_GPTQ_DAMPING, DEFAULT_GROUP_SIZE
from corda_surgery.decomposition.kinds import DEFAULT_DAMPING, DEFAULT_DAMPING_RULE, DampingRule
from corda_surgery.decomposition.refit import DEFAULT_REFIT_ROUNDS
from corda_surgery.surgery.options import Method


def grouped(*options):
    """One decorator applying ``options`` in their listed order (the order `--help` shows them in)."""

    def apply(command):
        for option in reversed(options):
            command = option(command)
        return command

    return apply


calibration_options = grouped(
    click.option("--data", "source", default="nq_open", show_default=True,
                 help="Built-in set (nq_open, triviaqa, gsm8k, code_alpaca, alpaca) or a .jsonl/.txt file."),
    click.option("--samples", default=128, show_default=True, help="Number of calibration samples."),
    click.option("--seq-len", default=512, show_default=True, help="Maximum tokens per sample."),
    click.option("--batch-size", default=8, show_default=True, help="Samples per forward batch."),
    click.option("--seed", default=0, show_default=True, help="Seed for sampling the calibration set."),
    click.option("--text-field", default=None,
                 help="Field of .jsonl records to use as text (default: prompt/response pairs, then 'text')."),
    click.option("--chat-template/--no-chat-template", default=None,
                 help="Format prompt/response pairs with the tokenizer's chat template [default: if it has one]."),
    click.option("--covariance-norm", "normalisation", type=click.Choice(["tokens", "peft"]), default="tokens",
                 show_default=True,
                 help="'tokens': XᵀX / number of real tokens. 'peft': PEFT's rule (each sample scaled by its "
                      "|max|, divided by the number of samples), for like-for-like comparisons."),
    click.option("--pack/--no-pack", default=None,
                 help="Join .jsonl records (their text, no chat template) with blank lines and cut the stream into "
                      "full --seq-len windows: --samples × --seq-len tokens, as the CorDA papers calibrate on "
                      "NQ-open (with --text-field prompt: the questions alone) [default: on for the built-in "
                      "knowledge sets nq_open and triviaqa, their questions alone; off otherwise]."),
    click.option("--rounds", default=1, show_default=True,
                 help="Also store the covariance of each of N disjoint sampling rounds (CorDA++ candidates)."),
    click.option("--store-dtype", type=click.Choice(["float64", "float32"]), default="float64", show_default=True,
                 help="How the store keeps each covariance (its upper triangle only): float64 raw sums, or the "
                      "normalised covariance in float32 at half the disk (what it changes in the adapters: "
                      "docs/concepts.md)."),
)  # fmt: skip

damping_option = click.option(
    "--damping", type=float, default=DEFAULT_DAMPING, show_default=True,
    help="Covariance damping λ ≥ 0: C + λ·scale·I, scale from --damping-rule. Raised (with a warning) up to "
         "1024× where C is not positive definite; a covariance that needs more is refused as unusable.",
)  # fmt: skip
damping_rule_option = click.option(
    "--damping-rule",
    type=click.Choice([rule.value for rule in DampingRule]),
    default=DEFAULT_DAMPING_RULE.value,
    show_default=True,
    help="What λ multiplies. mean-diagonal: mean(diag C), PEFT's and the CorDA papers' rule; a few massive "
    "activation dimensions make it large, so on many layers most of the spectrum lies below the level and KPM's "
    "directions are the damping's (-v says which). median-diagonal: the median input variance, which such "
    "dimensions cannot raise. The default is PEFT's because it was measured (docs/fidelity.md): on SmolLM2 the "
    "median rule made KPM forget more at equal task gain, at both learning rates tried (2e-5, 2e-4).",
)

decomposition_options = grouped(
    click.option("--method", type=click.Choice([m.value for m in Method]), default="corda", show_default=True,
                 help="corda: context-oriented SVD (needs covariances). corda++: per-layer covariance choice and "
                      "ranks. pissa / milora: largest / smallest plain-SVD components (no data). lora: PEFT's "
                      "default random init, for reference."),
    click.option("--mode", type=click.Choice(["kpm", "ipm"]), default=None,
                 help="kpm: the r smallest components train (keep knowledge); ipm: the r largest train (learn the "
                      "task) [default: kpm; pissa and milora imply theirs, lora has none]."),
    click.option("--rank", default=16, show_default=True, help="LoRA rank r per target linear."),
    click.option("--alpha", type=float, default=None, help="LoRA alpha; scaling is alpha/r [default: r]."),
    click.option("--targets", default="all-linear", show_default=True,
                 help="Comma-separated linear names (e.g. q_proj,v_proj), fused expert weights "
                      "(e.g. experts.down_proj), or all-linear (every linear and expert weight)."),
    click.option("--solver", type=click.Choice(["subspace", "gram", "svd"]), default="subspace", show_default=True,
                 help="How the singular pairs of the float64 product W·C are found. subspace: only the r kept "
                      "pairs, by block subspace iteration on its Gram matrix, each checked by its residual, where "
                      "the spectrum at the cut makes that cheaper than gram, else gram (per layer, recorded in "
                      "surgery.json); gram: full eigen-decomposition of that Gram matrix, a layer whose cut it "
                      "cannot resolve taking svd; svd: LAPACK's full float64 SVD (reference, ~2x slower)."),
    click.option("--balance", is_flag=True,
                 help="Rescale each rank-one component so that A's row and B's column have equal norms (B·A, the "
                      "residual and the handoff unchanged). KPM's A is far larger than its B, so at one learning "
                      "rate Adam moves its weights much more than PiSSA's or LoRA's; this evens the split."),
    click.option("--dtype", "factor_dtype", type=click.Choice(["float32", "float64"]), default="float32",
                 show_default=True, help="dtype of the stored adapter factors (the math is float64 either way)."),
    click.option("--base-name", default=None,
                 help="What the adapter names as its base model: where the residual will live (a path or a hub "
                      "repo id) [default: the output folder]. corda-surgery's own commands do not need it."),
    damping_option,
    damping_rule_option,
    click.option("--max-shard-size", default=DEFAULT_MAX_SHARD_SIZE, show_default=True,
                 help="Largest output shard (e.g. 500MB, 2GB, 4GiB)."),
    click.option("--rank-budget", type=float, default=None,
                 help="corda++: spread ranks across layers for this average rank (Σ(in+out)·r budget)."),
    click.option("--param-budget", type=int, default=None,
                 help="corda++: total adapter parameters Σ(in+out)·r_l instead of --rank-budget."),
    click.option("--min-rank", default=1, show_default=True, help="corda++: smallest rank a layer gets."),
    click.option("--max-rank", type=int, default=None, help="corda++: largest rank a layer gets."),
    click.option("--residual", type=click.Choice([f.value for f in ResidualFormat]), default="float",
                 show_default=True,
                 help="How the frozen residual is stored. float: as the input. nf4: bitsandbytes NF4 (QLoRA's "
                      "4-bit base; from_pretrained loads it in 4-bit, PEFT/TRL train the adapter on it). int4: GPTQ "
                      "with the calibration covariance as its Hessian, written as compressed-tensors pack-quantized "
                      "(transformers and vLLM load it). The adapter's B is refit to the quantised residual "
                      "(--refit-rounds); surgery.json records each layer's output error before and after."),
    click.option("--refit-rounds", type=int, default=None,
                 help="Quantised residual: rounds of refitting B against it in the calibration covariance's metric "
                      "(A, the mode's directions, kept); 0 quantises the residual alone, as PEFT's route does "
                      f"[default: {DEFAULT_REFIT_ROUNDS} where there is a covariance, else 0]."),
    click.option("--group-size", default=DEFAULT_GROUP_SIZE, show_default=True,
                 help="int4: input columns that share one scale."),
    click.option("--gptq-damping", type=float, default=DEFAULT_GPTQ_DAMPING, show_default=True,
                 help="int4: λ·mean(diag H) added to GPTQ's Hessian (its percdamp)."),
)  # fmt: skip


device_option = click.option(
    "--device", default="auto", show_default=True,
    help="Where blocks, covariance sums and decompositions run: auto (CUDA if present, else cpu), cpu, cuda, "
         "cuda:N. A weight whose decomposition does not fit the GPU falls back to the CPU.",
)  # fmt: skip
memory_budget_option = click.option(
    "--memory-budget", default=None,
    help="Peak RAM the whole run may use (e.g. 8GiB): the plan refuses a budget the run cannot keep, before it "
         "starts, naming the smallest it can; the hidden states get a quarter of it (unless --max-memory), and an "
         "SVD fallback what it leaves. The output is the same bits as without. Default: whatever RAM is free.",
)  # fmt: skip
dry_run_option = click.option(
    "--dry-run", is_flag=True,
    help="Print the memory plan (estimated peak RAM / GPU memory and the disk the outputs need), check it "
         "against what is free, and stop. Every run prints the plan first and refuses one that cannot fit.",
)  # fmt: skip
# what decompose takes of where it runs: no forward pass, so neither its dtype nor the hidden states' memory
decompose_compute_options = grouped(device_option, memory_budget_option, dry_run_option)
forward_options = grouped(
    device_option,
    click.option("--forward-dtype", type=click.Choice(["auto", "float32", "bfloat16", "float16"]), default="auto",
                 show_default=True,
                 help="dtype of the calibration forward pass. auto: the checkpoint's own (as PEFT runs it), except "
                      "float32 on CPUs without bfloat16/float16 units, where half precision is ~7x slower. "
                      "Covariances are summed in float32 per batch and float64 across batches either way."),
    click.option("--max-memory", default=None,
                 help="Memory for the hidden states kept between layers (e.g. 512MB, 8GiB); past it they spill "
                      "to a temporary folder beside the output, removed afterwards [default: a quarter of the "
                      "RAM / GPU memory available, or of --memory-budget]."),
    memory_budget_option,
    dry_run_option,
)  # fmt: skip
