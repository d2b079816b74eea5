"""SmolLM2-135M in the formats people deploy: one table of size, perplexity, agreement and speed (issue 36).

Rows: PyTorch eager (fp32), our ONNX exports (`export-onnx --weights fp32 / fp16 / int8 / int4`, fp16 only
where onnxruntime's CUDA provider runs) and onnxruntime-genai's own model builder's int4
(`python -m onnxruntime_genai.models.builder -p int4 -e cpu`) from the same checkpoint. Every ONNX row runs
through onnxruntime-genai (the same runtime and generation loop for ours and the builder's):

- size: the folder's model files (MiB);
- perplexity: WikiText-2 test, its first --ppl-tokens tokens in disjoint --window windows;
- greedy agreement with eager: 3 prompts × --new-tokens tokens, the share before the first token that differs;
- prefill: median time to run a --prefill-token prompt; decode: tokens/s generating --new-tokens after it
  (batch 1).

The model is the embedded SmolLM2-135M-Instruct: merging an untrained surgery gives its weights back to
1e-5 (tests/test_smollm2.py), so it stands for "SmolLM2 merged". Run alone on the machine:

    PYTHONPATH=. .venv/bin/python bench/deploy.py

Writes bench/results/deploy.json (docs/performance.md is made from it by docs/make.py).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from bench.store_dtype import _machine as machine
from corda_surgery.export.verify import greedy_agreement, median_ms, negative_log_likelihoods

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results" / "deploy.json"
PROMPTS = (
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May.",
    "The history of the Roman Empire begins",
    "Question: Who wrote the novel Pride and Prejudice?\nAnswer:",
)


def wikitext(data_dir: Path, tokenizer, tokens: int) -> np.ndarray:
    text = (data_dir / "wikitext2_raw" / "wiki.test.raw").read_text(encoding="utf-8")
    return np.array(tokenizer(text[: 40 * tokens])["input_ids"][:tokens], dtype=np.int64)


class Eager:
    name = "PyTorch eager (fp32)"

    def __init__(self, model_dir: Path):
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()

    def logits(self, ids: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return self.model(torch.from_numpy(ids[None])).logits[0].numpy()

    def greedy(self, ids: list[int], new_tokens: int) -> list[int]:
        with torch.no_grad():
            prompt = torch.tensor([ids])
            out = self.model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens,
                                      min_new_tokens=new_tokens, do_sample=False)  # fmt: skip
        return out[0, len(ids) :].tolist()

    def prefill(self, ids: np.ndarray) -> None:
        self.logits(ids)


class Genai:
    """An ONNX folder through onnxruntime-genai on the CPU (or CUDA where asked)."""

    def __init__(self, name: str, folder: Path, cuda: bool = False):
        import onnxruntime_genai as og

        self.og, self.name, self.folder = og, name, folder
        config = og.Config(str(folder))
        config.clear_providers()
        if cuda:
            config.append_provider("cuda")
        self.model = og.Model(config)

    def _generator(self, length: int, min_length: int = 0):
        params = self.og.GeneratorParams(self.model)
        params.set_search_options(do_sample=False, max_length=length, min_length=min_length)
        return self.og.Generator(self.model, params)

    def logits(self, ids: np.ndarray) -> np.ndarray:
        generator = self._generator(len(ids) + 1)
        generator.append_tokens(ids[None].astype(np.int32))
        return np.asarray(generator.get_output("logits"))[0].astype(np.float32)

    def greedy(self, ids: list[int], new_tokens: int) -> list[int]:
        generator = self._generator(len(ids) + new_tokens, len(ids) + new_tokens)
        generator.append_tokens(np.array([ids], dtype=np.int32))
        while not generator.is_done():
            generator.generate_next_token()
        return [int(t) for t in generator.get_sequence(0)[len(ids) :]]

    def prefill(self, ids: np.ndarray) -> None:
        self.logits(ids)


def measure(runner, reference: dict, settings, text: np.ndarray, prompts: list[list[int]]) -> dict:
    windows = [text[s : s + settings.window] for s in range(0, len(text) - 1, settings.window)]
    losses = [negative_log_likelihoods(runner.logits(w)[:-1], w[1:]) for w in windows if len(w) > 1]
    greedy = [runner.greedy(ids, settings.new_tokens) for ids in prompts]
    agreements = [greedy_agreement(ours, theirs) for ours, theirs in zip(greedy, reference.get("greedy", greedy))]
    prompt = text[: settings.prefill]
    prefill = median_ms(lambda: runner.prefill(prompt), settings.repeats) / 1e3
    generate = median_ms(lambda: runner.greedy(prompt.tolist(), settings.new_tokens), settings.repeats) / 1e3
    return {
        "perplexity": float(np.exp(np.concatenate(losses).mean())),
        "greedy": greedy,
        "greedy_agreement": float(np.mean(agreements)),
        "prefill_ms": prefill * 1e3,
        "decode_tokens_per_s": settings.new_tokens / max(generate - prefill, 1e-9),
    }


def folder_mib(folder: Path) -> float:
    return sum(p.stat().st_size for p in folder.glob("model*") if p.is_file()) / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=REPO / "out" / "deploy")
    parser.add_argument("--data-dir", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument("--ppl-tokens", type=int, default=4096)
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--prefill", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--block-size", type=int, default=32)
    settings = parser.parse_args()
    from corda_surgery.export.onnx_export import export_onnx
    from corda_surgery.models import embedded_model_dir

    model_dir = embedded_model_dir()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    text = wikitext(settings.data_dir, tokenizer, settings.ppl_tokens)
    prompts = [tokenizer(p)["input_ids"] for p in PROMPTS]
    eager = measure(Eager(model_dir), {}, settings, text, prompts)
    sizes = {"PyTorch eager (fp32)": sum(p.stat().st_size for p in model_dir.glob("*.safetensors")) / 2**20}
    results = {"PyTorch eager (fp32)": eager}
    cuda = "CUDAExecutionProvider" in ort.get_available_providers() and torch.cuda.is_available()
    for weights in ("fp32", "fp16", "int8", "int4"):
        name = f"ONNX {weights} (export-onnx)"
        if weights == "fp16" and not cuda:
            results[name] = {"skipped": "no CUDA GPU here: fp16 runs on onnxruntime's CUDA provider"}
            continue
        started = time.perf_counter()
        folder = export_onnx(model_dir, settings.work / weights, weights=weights, block_size=settings.block_size,
                             with_past=True, overwrite=True)  # fmt: skip
        exported = time.perf_counter() - started
        results[name] = {**measure(Genai(name, folder, cuda=weights == "fp16"), eager, settings, text, prompts),
                         "export_s": exported}  # fmt: skip
        sizes[name] = folder_mib(folder)
        print(name, results[name]["perplexity"], flush=True)
    name = "ONNX int4 (onnxruntime-genai builder)"
    builder = settings.work / "builder-int4"
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(model_dir), "-o", str(builder),
                    "-p", "int4", "-e", "cpu", "-c", str(settings.work / "builder-cache")],
                   check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})  # else it asks the hub  # fmt: skip
    results[name] = {**measure(Genai(name, builder), eager, settings, text, prompts),
                     "export_s": time.perf_counter() - started}  # fmt: skip
    sizes[name] = folder_mib(builder)
    write(results, sizes, settings)


def write(results: dict, sizes: dict, settings) -> None:
    fp32 = results["ONNX fp32 (export-onnx)"]["perplexity"]
    rows = []
    for name, r in results.items():
        if "skipped" in r:
            rows.append([name, "—", "—", "—", "—", "—", f"not run: {r['skipped']}"])
            continue
        rows.append([name, f"{sizes[name]:.0f}", f"{r['perplexity']:.3f} ({r['perplexity'] / fp32 - 1:+.1%})",
                     f"{r['greedy_agreement']:.0%}", f"{r['prefill_ms']:.0f}", f"{r['decode_tokens_per_s']:.1f}",
                     f"export {r['export_s']:.0f} s" if "export_s" in r else ""])  # fmt: skip
    commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    record = {
        "title": "Deployment formats of SmolLM2-135M (bench/deploy.py)",
        "what": f"The embedded SmolLM2-135M-Instruct; every ONNX row through onnxruntime-genai on the CPU. Perplexity: "
        f"WikiText-2 test, first {settings.ppl_tokens} tokens in {settings.window}-token windows (change against "
        f"our fp32 export); greedy agreement with eager: 3 prompts × {settings.new_tokens} tokens, share before the "
        f"first that differs; prefill {settings.prefill} tokens (median of {settings.repeats}); decode at batch 1.",
        "command": "PYTHONPATH=. .venv/bin/python bench/deploy.py",
        "date": date.today().isoformat(),
        "commit": commit.stdout.strip(),
        "machine": f"{machine()}, onnxruntime {ort.__version__}",
        "source": "bench/deploy.py",
        "columns": ["format", "size (MiB)", "perplexity", "greedy agreement", "prefill (ms)", "decode (tokens/s)", ""],
        "rows": rows,
        "raw": results,
    }
    RESULTS.write_text(json.dumps(record, indent=1) + "\n")
    print(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
