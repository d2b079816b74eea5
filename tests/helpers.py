"""Helpers shared by the test modules: comparisons, reading outputs back, and running the CLI."""

from __future__ import annotations

import hashlib
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from click.testing import CliRunner, Result
from safetensors import safe_open

from corda_surgery.checkpoint.experts import experts_arguments, find_fused_experts, routed_inputs
from corda_surgery.checkpoint.view import is_linear
from corda_surgery.cli import main

PROMPTS = [
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May.",
    "who wrote the declaration of independence?",
]


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    """‖a − b‖ / ‖b‖ in float64."""
    return float((a.double() - b.double()).norm() / b.double().norm())


def figures_close(report, rel: float = 1e-6):
    """``report`` (parsed JSON) with every float as ``pytest.approx``: ``other == figures_close(report)`` holds where
    the structure, strings and integers are equal and the floats agree to ``rel``. The figures a surgery records
    are reductions, whose last bits BLAS may round otherwise from one process to the next (thread count, memory
    alignment) even where the tensors written come out bit for bit."""
    if isinstance(report, dict):
        return {key: figures_close(value, rel) for key, value in report.items()}
    if isinstance(report, list):
        return [figures_close(value, rel) for value in report]
    return pytest.approx(report, rel=rel, abs=0) if isinstance(report, float) else report


def datasets(path: Path) -> dict[str, tuple[np.ndarray, dict]]:
    """Every dataset of an HDF5 file with its attributes."""
    with h5py.File(path, "r") as f:
        return {name: (np.asarray(f[name][()]), dict(f[name].attrs)) for name in f}


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of every safetensors file in ``folder``."""
    out = {}
    for shard in sorted(folder.glob("*.safetensors")):
        with safe_open(str(shard), "pt") as handle:
            out.update({key: handle.get_tensor(key) for key in handle.keys()})
    return out


def logits(model, tokenizer, prompts=PROMPTS) -> torch.Tensor:
    """Logits of a right-padded batch, zero on padding."""
    batch = tokenizer(prompts, return_tensors="pt", padding=True)
    with torch.no_grad():
        return model(**batch).logits.masked_fill(~batch["attention_mask"].bool()[..., None], 0)


def reference_covariances(model, batches, blocks_prefix: str) -> dict[str, torch.Tensor]:
    """The definition streaming must match: pre-hooks on every linear (and every fused-experts module, one
    input per expert and projection) inside the blocks of a whole model, one forward per batch, padding
    excluded; one covariance per linear (shared inputs counted for each)."""
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    current: dict[str, torch.Tensor] = {}

    def add(name: str, rows: torch.Tensor) -> None:
        rows = rows.double()
        sums[name] = sums.get(name, 0) + rows.T @ rows
        counts[name] = counts.get(name, 0) + rows.shape[0]

    handles = []
    for name, module in model.named_modules():
        if not name.startswith(blocks_prefix + "."):
            continue
        if is_linear(module):

            def hook(_module, inputs, name=name):
                x, mask = inputs[0], current["mask"]
                if x.dim() == 4 and x.shape[1] == 1:  # DeepSeek's latent attention: (batch, 1, sequence, width)
                    x = x[:, 0]
                if x.dim() == 3:
                    add(name, x[mask])
                elif x.shape[0] == mask.numel():
                    add(name, x[mask.reshape(-1)])
                else:  # the tokens routed to one expert
                    add(name, x)

            handles.append(module.register_forward_pre_hook(hook))
        for experts in find_fused_experts(module).values():
            if experts.module:
                continue  # found again as the module itself

            def experts_hook(module, args, kwargs, name=name, experts=experts):
                hidden, chosen = experts_arguments(module, args, kwargs)
                for expert, up_rows, down_rows in routed_inputs(module, experts, hidden, chosen, current["mask"]):
                    add(f"{name}.{experts.up}[{expert}]", up_rows)
                    add(f"{name}.down_proj[{expert}]", down_rows)

            handles.append(module.register_forward_pre_hook(experts_hook, with_kwargs=True))
    with torch.no_grad():
        for batch in batches:
            current["mask"] = batch.attention_mask.bool()
            model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
    for handle in handles:
        handle.remove()
    return {name: sums[name] / counts[name] for name in sums if counts[name]}


def tree_hashes(*roots: Path) -> dict[str, str]:
    """sha256 of every regular file below ``roots`` (a file root counts as itself; FIFOs are never read)."""
    hashes = {}
    for root in roots:
        for path in [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file()):
            hashes[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
    return hashes


def run_cli(*args) -> Result:
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def cli_error(*args) -> str:
    """Run the CLI expecting failure: exactly one error line on stderr (besides progress bars), no traceback."""
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code != 0, result.output
    lines = [line.rsplit("\r", 1)[-1].split("\x1b[A")[-1] for line in result.stderr.strip().splitlines()]
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    assert "Traceback" not in result.output and not result.stdout.strip()
    return errors[0]


def as_format_2(store: Path, out: Path) -> Path:
    """A copy of a packed float64 store in format 2 (each covariance a full square), as earlier versions wrote."""
    from corda_surgery.calib.packing import packed_width, read_packed

    with h5py.File(store, "r") as packed, h5py.File(out, "w") as square:
        square.attrs.update(dict(packed.attrs))
        square.attrs["format_version"] = 2
        for name in packed:
            source = packed[name]
            square.create_dataset(name, data=read_packed(source, packed_width(source.shape[0])).numpy())
            square[name].attrs.update(dict(source.attrs))
    return out


def genai_batch_greedy(folder: Path, prompts: list[str], new_tokens: int) -> list[list[int]]:
    """onnxruntime-genai's own tokenizer and generator over a padded prompt batch, from the folder alone (CPU)."""
    import onnxruntime_genai as og

    config = og.Config(str(folder))
    config.clear_providers()
    model = og.Model(config)
    batch = og.Tokenizer(model).encode_batch(prompts)
    width = batch.as_numpy().shape[1]
    params = og.GeneratorParams(model)
    params.set_search_options(do_sample=False, max_length=width + new_tokens, batch_size=len(prompts))
    generator = og.Generator(model, params)
    generator.append_tokens(batch)
    while not generator.is_done():
        generator.generate_next_token()
    return [[int(t) for t in generator.get_sequence(row)[width:]] for row in range(len(prompts))]


def transformers_batch_greedy(model_dir: Path, prompts: list[str], new_tokens: int) -> list[list[int]]:
    """transformers' greedy continuation of a left-padded prompt batch."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir, padding_side="left")
    batch = tokenizer(prompts, return_tensors="pt", padding=True)
    with torch.no_grad():
        out = AutoModelForCausalLM.from_pretrained(model_dir).generate(
            **batch, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False
        )
    return out[:, batch["input_ids"].shape[1] :].tolist()
