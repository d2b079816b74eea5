"""The handoff on a 4-bit residual, measured: how far the model is from the original before any training.

On SmolLM2-135M (the embedded model), for KPM (calibrated on NQ-open) and IPM (calibrated on GSM8K, the task's
own questions), rank 16, every linear: each arm's residual + adapter is merged (``merge`` folds the adapter into
the dequantised residual: the logits a trainer starts from, as tests/test_quantised_residual.py proves) and
compared with the original model on held-out WikiText-2 test text: perplexity, the gap to the original's, and
the largest |Δlogit|. Arms:

- ``qlora``: QLoRA's own start (``--method lora --residual nf4``: the weights in NF4, B zero);
- ``peft-route``: decompose in float, NF4 the residual (``--residual nf4 --refit-rounds 0``), as PEFT's
  PiSSA/CorDA documentation suggests;
- ``nf4-refit``: the same with B refit to the quantised residual (the default: 3 rounds);
- ``int4-gptq``: GPTQ on the stored covariance (``--residual int4 --refit-rounds 0``), groups of 64 (SmolLM2's
  576-wide inputs do not split into the default 128);
- ``int4-refit``: GPTQ with B refit;
- ``int4-rtn``: a control for GPTQ, the same format and groups rounded to nearest (GPTQ damped by 10⁶ times
  the mean of diag C, so its Hessian is ≈ I and no error is passed on to the next columns).

    python bench/quantised_handoff.py            # writes bench/results/quantised_handoff.json as arms finish
                                                 # (a stopped run goes on from the arms recorded there)
    python bench/quantised_handoff.py --report   # its table again from the figures there (docs/performance.md)

No timings: it may share the machine with other work.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from corda_surgery.export.merge import merge_adapter
from corda_surgery.models import embedded_model_dir

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "wikitext2_raw" / "wiki.test.raw"
RESULTS = REPO / "bench" / "results" / "quantised_handoff.json"
MODES = {"kpm": "nq_open", "ipm": "gsm8k"}
ARMS = {
    "qlora": ["--method", "lora", "--residual", "nf4"],
    "peft-route": ["--residual", "nf4", "--refit-rounds", "0"],
    "nf4-refit": ["--residual", "nf4"],
    "int4-gptq": ["--residual", "int4", "--refit-rounds", "0", "--group-size", "64"],
    "int4-refit": ["--residual", "int4", "--group-size", "64"],
    "int4-rtn": ["--residual", "int4", "--refit-rounds", "0", "--group-size", "64", "--gptq-damping", "1e6"],
}  # SmolLM2's 576-wide inputs do not split into the default groups of 128
WINDOW = 512
LABELS = {
    "qlora": "QLoRA's start (NF4 of W, B = 0)",
    "peft-route": "PEFT's route (float decomposition, NF4 residual)",
    "nf4-refit": "ours: NF4 residual, B refit",
    "int4-gptq": "ours: GPTQ int4 residual (groups of 64)",
    "int4-refit": "ours: GPTQ int4 residual, B refit",
    "int4-rtn": "control: int4 residual rounded to nearest (groups of 64)",
}


def with_table(result: dict) -> dict:
    """``result`` with what docs/make.py renders: title, provenance, columns and rows, one row per arm."""
    commit = subprocess.run(["git", "-C", str(REPO), "log", "-1", "--format=%h %cs"], capture_output=True, text=True)
    short, date = commit.stdout.split()
    rows = [["original model", "—", f"{result['original']['perplexity']:.3f}", "—", "—", "—"]]
    order = [arm if arm == "qlora" else f"{mode}/{arm}" for mode in MODES for arm in ARMS]
    for key, figures in sorted(result["arms"].items(), key=lambda item: order.index(item[0])):
        mode, _, arm = key.rpartition("/")
        refit = figures.get("mean_quantisation_error_refit")
        error = figures.get("mean_quantisation_error")
        rows.append([
            LABELS[arm], mode.upper() or "—", f"{figures['perplexity']:.3f}",
            f"{figures['perplexity_gap'] * 100:+.1f} %", f"{figures['max_abs_logit']:.2f}",
            "—" if error is None else f"{error:.2e}" + ("" if refit is None else f" → {refit:.2e}"),
        ])  # fmt: skip
    return {
        "title": "The handoff on a 4-bit residual (SmolLM2-135M)",
        "what": f"Residual + adapter merged (the model a trainer starts from) against the original, on "
        f"{result['tokens']:,} WikiText-2 test tokens in windows of {WINDOW}; rank {result['rank']}, every "
        "linear; KPM calibrated on NQ-open, IPM on GSM8K (128 × 512 tokens each). Layer error: the mean over "
        "layers of tr(E·C·Eᵀ)/tr(W·C·Wᵀ) as surgery.json records it, without → with the refit.",
        "command": "python bench/quantised_handoff.py",
        "date": date,
        "commit": short,
        "machine": "2 cores, 24 GiB, no GPU; torch 2.13 CPU",
        "source": "written by bench/quantised_handoff.py (the machine shared with other work: no timings)",
        "columns": [
            "arm",
            "mode",
            "perplexity",
            "gap to the original",
            "max abs Δlogit (first window)",
            "layer error (mean), refit",
        ],
        "rows": rows,
    } | result


def wikitext_windows(tokenizer, tokens: int) -> torch.Tensor:
    """The first ``tokens`` tokens of WikiText-2's test split, as rows of WINDOW."""
    ids = tokenizer(DATA.read_text(encoding="utf-8"))["input_ids"][: tokens - tokens % WINDOW]
    return torch.tensor(ids).reshape(-1, WINDOW)


@torch.no_grad()
def measure(model_dir: Path, windows: torch.Tensor, reference: torch.Tensor | None) -> tuple[dict, torch.Tensor]:
    """Perplexity over ``windows``, and the largest |Δlogit| against ``reference``'s logits (the first window)."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    total, count, first = 0.0, 0, None
    for row in windows:
        out = model(row[None], labels=row[None])
        total, count = total + float(out.loss) * (WINDOW - 1), count + WINDOW - 1
        first = out.logits[0] if first is None else first
    assert first is not None
    figures = {"perplexity": math.exp(total / count)}
    if reference is not None:
        figures["max_abs_logit"] = float((first - reference).abs().max())
    return figures, first


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=16384, help="WikiText-2 test tokens to score")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--report", action="store_true", help="only render the table from --results' figures")
    args = parser.parse_args()
    if args.report:
        figures = json.loads(args.results.read_text())
        figures = {key: figures[key] for key in ("model", "rank", "tokens", "original", "torch_threads", "arms")}
        args.results.write_text(json.dumps(with_table(figures), indent=2) + "\n")
        return
    tool = str(Path(sys.executable).with_name("corda-surgery"))
    model_dir = embedded_model_dir()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    windows = wikitext_windows(tokenizer, args.tokens)
    original, reference = measure(model_dir, windows, None)
    result = {"model": "SmolLM2-135M-Instruct", "rank": args.rank, "tokens": windows.numel(), "original": original}
    result["torch_threads"], result["arms"] = torch.get_num_threads(), {}
    if args.results.is_file():  # the arms a stopped run measured on the same text and rank
        earlier = json.loads(args.results.read_text())
        if (earlier["rank"], earlier["tokens"]) == (args.rank, windows.numel()):
            result["arms"] = earlier["arms"]
    work = Path(tempfile.mkdtemp(prefix="quantised_handoff-"))
    try:
        for mode, data in MODES.items():
            store = work / f"{mode}.h5"
            left = [arm for arm in ARMS if (arm if arm == "qlora" else f"{mode}/{arm}") not in result["arms"]]
            if left != ["qlora"] and left:
                subprocess.run([tool, "calibrate", str(model_dir), "--data", data, "--out", str(store)], check=True)
            for arm in left:
                options = ARMS[arm]
                if arm == "qlora" and mode == "ipm":
                    continue  # QLoRA's start has no mode: measured once
                out, merged = work / f"{mode}-{arm}", work / f"{mode}-{arm}-merged"
                stores = [] if arm == "qlora" else ["--covariances", str(store), "--mode", mode]
                subprocess.run([tool, "decompose", str(model_dir), *stores, *options, "--rank", str(args.rank),
                                "--out", str(out)], check=True)  # fmt: skip
                merge_adapter(out, out / "adapter", merged, progress=False)
                figures, _ = measure(merged, windows, reference)
                figures["perplexity_gap"] = figures["perplexity"] / original["perplexity"] - 1
                layers = json.loads((out / "surgery.json").read_text())["layers"].values()
                for field in ("quantisation_error", "quantisation_error_refit"):
                    values = [layer[field] for layer in layers if field in layer]
                    if values:
                        figures[f"mean_{field}"] = sum(values) / len(values)
                result["arms"][arm if arm == "qlora" else f"{mode}/{arm}"] = figures
                args.results.write_text(json.dumps(with_table(result), indent=2) + "\n")
                print(arm, mode, figures, flush=True)
                shutil.rmtree(out)
                shutil.rmtree(merged)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
