"""Fidelity study on SmolLM2-135M: does KPM forget less, does IPM converge faster?

For each initialisation at equal rank, targets and steps: convert the embedded model, fine-tune the
adapter on GSM8K train items with transformers.Trainer, and measure before and after
- task loss: mean answer-token loss on held-out GSM8K test items;
- knowledge: mean log-likelihood of the gold answer given the question on held-out TriviaQA test and
  NQ-open dev items (calibration draws from other splits: TriviaQA dev, EfficientQA dev);
- WikiText-2 test perplexity;
- how far training moved the weights: ‖s·(BA − B₀A₀)‖ / ‖W‖ over all adapted linears.
Writes OUT/fidelity.csv (method first), OUT/loss_curves.csv and .png, OUT/knowledge_vs_task.png.

    python bench/fidelity.py --quick            # a few steps per method, to check the harness (< 10 min)
    python bench/fidelity.py                    # the documented study (see README for its settings)
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from corda_surgery.calib.data import CalibrationSpec
from corda_surgery.calib.stream import calibrate
from corda_surgery.memory import release_large_frees_to_os, restart_with_huge_pages
from corda_surgery.models import embedded_model_dir
from corda_surgery.options import SurgeryOptions
from corda_surgery.surgery import decompose_checkpoint

REPO = Path(__file__).resolve().parents[1]
DATA_ENV = "CORDA_SURGERY_EVAL_DATA"
# Evaluation files the study reads, relative to the data folder, and where each comes from.
EVAL_FILES = {
    "gsm8k/train.jsonl": "GSM8K train, openai/grade-school-math: grade_school_math/data/train.jsonl (MIT)",
    "gsm8k/test.jsonl": "GSM8K test, openai/grade-school-math: grade_school_math/data/test.jsonl (MIT)",
    "triviaqa/triviaqa-open.test.jsonl": "open-domain TriviaQA test (DPR split), castorini/anserini-tools: "
    "topics/topics.dpr.trivia.test.txt as JSON Lines {question, answer: [aliases]} (Apache-2.0)",
    "nq_open/NQ-open.dev.jsonl": "NQ-open dev, google-research-datasets/natural-questions: nq_open/NQ-open.dev.jsonl "
    "(CC BY-SA 3.0)",
    "wikitext2_raw/wiki.test.raw": "WikiText-2 raw test split, wiki.test.raw (CC BY-SA 3.0)",
}


def evaluation_data(option: Path | None) -> Path:
    """--data-dir, else $CORDA_SURGERY_EVAL_DATA, else shared/data beside the repository; checked before any work."""
    env = os.environ.get(DATA_ENV)
    folder = option or (Path(env) if env else REPO.parent / "shared" / "data")
    missing = [name for name in EVAL_FILES if not (folder / name).is_file()]
    if missing:
        sources = "\n".join(f"  {name}: {EVAL_FILES[name]}" for name in missing)
        sys.exit(f"evaluation data missing in {folder} (give --data-dir or ${DATA_ENV}); needed:\n{sources}")
    return folder


# method name → (surgery method, mode, calibration set or None)
METHODS = {
    "lora": ("lora", None, None),
    "pissa": ("pissa", None, None),
    "milora": ("milora", None, None),
    "corda-kpm": ("corda", "kpm", "nq_open"),
    "corda-ipm": ("corda", "ipm", "gsm8k"),
    "corda++-ipm": ("corda++", "ipm", "gsm8k"),
}


def _jsonl(path: Path, limit: int, skip: int = 0) -> list[dict]:
    rows = []
    with path.open() as handle:
        for number, line in enumerate(handle):
            if number >= skip:
                rows.append(json.loads(line))
            if len(rows) == limit:
                break
    return rows


def qa_pairs(settings) -> dict[str, list[tuple[str, str]]]:
    """Held-out evaluation and training pairs (question, answer)."""
    n = settings.eval_items
    gsm_train = _jsonl(
        settings.data_dir / "gsm8k" / "train.jsonl", settings.train_items, skip=1024
    )  # calibration uses 0..511
    return {
        "train": [(r["question"], r["answer"]) for r in gsm_train],
        "gsm8k_test": [(r["question"], r["answer"]) for r in _jsonl(settings.data_dir / "gsm8k" / "test.jsonl", n)],
        "triviaqa_test": [
            (r["question"], r["answer"][0])
            for r in _jsonl(settings.data_dir / "triviaqa" / "triviaqa-open.test.jsonl", n)
        ],
        "nq_open_dev": [
            (r["question"] + "?", r["answer"][0])
            for r in _jsonl(settings.data_dir / "nq_open" / "NQ-open.dev.jsonl", n)
        ],
    }


def encode(tokenizer, question: str, answer: str, max_len: int) -> tuple[list[int], list[int]]:
    """Tokens of 'Question: …\\nAnswer: …' with labels on the answer only."""
    prompt = tokenizer(f"Question: {question}\nAnswer:", add_special_tokens=False)["input_ids"]
    target = tokenizer(f" {answer}{tokenizer.eos_token}", add_special_tokens=False)["input_ids"]
    ids = (prompt + target)[:max_len]
    labels = ([-100] * len(prompt) + target)[:max_len]
    return ids, labels


@torch.no_grad()
def answer_loss(model, tokenizer, pairs, max_len: int) -> float:
    """Mean per-token negative log-likelihood of the answers (lower = better)."""
    total, count = 0.0, 0
    for question, answer in pairs:
        ids, labels = encode(tokenizer, question, answer, max_len)
        out = model(input_ids=torch.tensor([ids]), labels=torch.tensor([labels]))
        n = sum(1 for x in labels[1:] if x != -100)
        total, count = total + float(out.loss) * n, count + n
    return total / count


@torch.no_grad()
def wikitext_perplexity(model, tokenizer, path: Path, tokens: int, window: int) -> float:
    text = path.read_text()
    ids = tokenizer(text[: tokens * 8], add_special_tokens=False)["input_ids"][:tokens]
    nll, count = 0.0, 0
    for start in range(0, len(ids) - 1, window):
        chunk = torch.tensor([ids[start : start + window]])
        if chunk.shape[1] < 2:
            break
        out = model(input_ids=chunk, labels=chunk)
        nll, count = nll + float(out.loss) * (chunk.shape[1] - 1), count + chunk.shape[1] - 1
    return math.exp(nll / count)


def evaluate(model, tokenizer, pairs, settings) -> dict[str, float]:
    model.eval()
    return {
        "gsm8k_answer_loss": answer_loss(model, tokenizer, pairs["gsm8k_test"], settings.seq_len),
        "triviaqa_answer_loglik": -answer_loss(model, tokenizer, pairs["triviaqa_test"], settings.seq_len),
        "nq_open_answer_loglik": -answer_loss(model, tokenizer, pairs["nq_open_dev"], settings.seq_len),
        "wikitext2_ppl": wikitext_perplexity(
            model,
            tokenizer,
            settings.data_dir / "wikitext2_raw" / "wiki.test.raw",
            settings.ppl_tokens,
            settings.seq_len,
        ),
    }


def train(model, tokenizer, pairs, settings, out: Path) -> list[float]:
    from transformers import Trainer, TrainingArguments

    rows = [encode(tokenizer, q, a, settings.seq_len) for q, a in pairs["train"]]
    dataset = [{"input_ids": ids, "labels": labels} for ids, labels in rows]

    def collate(batch):
        width = max(len(r["input_ids"]) for r in batch)
        ids = torch.full((len(batch), width), tokenizer.pad_token_id or 0)
        labels = torch.full((len(batch), width), -100)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for i, r in enumerate(batch):
            n = len(r["input_ids"])
            ids[i, :n], labels[i, :n], mask[i, :n] = torch.tensor(r["input_ids"]), torch.tensor(r["labels"]), 1
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}

    args = TrainingArguments(
        output_dir=str(out / "trainer"),
        max_steps=settings.steps,
        per_device_train_batch_size=settings.batch_size,
        learning_rate=settings.lr,
        lr_scheduler_type="constant",
        warmup_steps=0,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        seed=0,
        data_seed=0,
        disable_tqdm=True,
    )
    trainer = Trainer(model=model, args=args, train_dataset=dataset, data_collator=collate)
    trainer.train()
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


def adapter_factors(model) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """(A, B, scaling) of every LoRA module, copied."""
    return {
        name: (
            m.lora_A["default"].weight.detach().clone(),
            m.lora_B["default"].weight.detach().clone(),
            m.scaling["default"],
        )
        for name, m in model.named_modules()
        if hasattr(m, "lora_A") and "default" in m.lora_A
    }


def relative_update(model, initial: dict) -> float:
    """‖s·(BA − B₀A₀)‖_F / ‖W‖_F summed over adapted linears, W the model before training."""
    change, weight = 0.0, 0.0
    now = adapter_factors(model)
    modules = dict(model.named_modules())
    for name, (a0, b0, scaling) in initial.items():
        a, b, _ = now[name]
        start = b0.double() @ a0.double() * scaling
        change += float(torch.linalg.matrix_norm(b.double() @ a.double() * scaling - start)) ** 2
        weight += float(torch.linalg.matrix_norm(modules[name].base_layer.weight.double() + start)) ** 2
    return math.sqrt(change / weight)


def run_method(name: str, settings, base: Path, stores: dict[str, Path], pairs, out: Path) -> tuple[dict, list[float]]:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    method, mode, calibration = METHODS[name]
    converted = out / "models" / name
    if not (converted / "surgery.json").is_file():
        extra = (
            {"rank_budget": settings.rank, "min_rank": 2, "max_rank": 4 * settings.rank} if method == "corda++" else {}
        )
        decompose_checkpoint(
            base,
            converted,
            SurgeryOptions(method=method, mode=mode, rank=settings.rank, alpha=settings.rank, **extra),
            stores=[stores[calibration]] if calibration else [],
            overwrite=True,
            progress=False,
        )
    tokenizer = AutoTokenizer.from_pretrained(base)
    torch.manual_seed(0)
    model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(converted), converted / "adapter", is_trainable=True
    )
    initial = adapter_factors(model)
    start = time.time()
    losses = train(model, tokenizer, pairs, settings, out / "runs" / name)
    elapsed = time.time() - start
    after = evaluate(model, tokenizer, pairs, settings)
    third = max(1, len(losses) // 3)
    after.update(
        train_seconds=elapsed,
        relative_weight_update=relative_update(model, initial),
        train_loss_mean_first_third=sum(losses[:third]) / third,
        train_loss_mean_last_third=sum(losses[-third:]) / third,
    )
    return after, losses


def plot(results: dict, before: dict, curves: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    for name, losses in curves.items():
        ax.plot(range(1, len(losses) + 1), losses, label=name, lw=1)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (GSM8K answers)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "loss_curves.png", dpi=120)
    plt.close(fig)

    names = list(results)
    task_gain = [before["gsm8k_answer_loss"] - results[n]["gsm8k_answer_loss"] for n in names]
    drop = [
        (
            before["triviaqa_answer_loglik"]
            - results[n]["triviaqa_answer_loglik"]
            + before["nq_open_answer_loglik"]
            - results[n]["nq_open_answer_loglik"]
        )
        / 2
        for n in names
    ]
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    x = range(len(names))
    ax.bar([i - 0.2 for i in x], task_gain, 0.4, label="task gain (GSM8K loss ↓)")
    ax.bar([i + 0.2 for i in x], drop, 0.4, label="knowledge drop (QA log-lik ↓)")
    ax.set_xticks(list(x), names, rotation=20, fontsize=8)
    ax.axhline(0, color="black", lw=0.5)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "knowledge_vs_task.png", dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=REPO / "out" / "fidelity")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--calib-samples", type=int, default=128)
    parser.add_argument("--train-items", type=int, default=512)
    parser.add_argument("--eval-items", type=int, default=100)
    parser.add_argument("--ppl-tokens", type=int, default=8192)
    parser.add_argument(
        "--covariance-norm",
        choices=["peft", "tokens"],
        default="peft",
        help="peft: the CorDA authors' scaling (sets the A/B balance the optimiser sees)",
    )
    parser.add_argument("--quick", action="store_true", help="3 steps, 8 eval items, 32 calibration samples.")
    parser.add_argument(
        "--data-dir", type=Path, default=None,
        help=f"folder with the evaluation sets [default: ${DATA_ENV}, else shared/data beside the repository]",
    )  # fmt: skip
    settings = parser.parse_args()
    settings.data_dir = evaluation_data(settings.data_dir)
    if settings.quick:
        settings.steps, settings.eval_items, settings.calib_samples, settings.ppl_tokens = 3, 8, 32, 1024
        settings.train_items, settings.seq_len = 32, 128
    restart_with_huge_pages()
    release_large_frees_to_os()
    torch.set_num_threads(2)
    out = settings.out
    out.mkdir(parents=True, exist_ok=True)
    base = embedded_model_dir()
    names = settings.methods.split(",")
    stores = {}
    for data in {METHODS[n][2] for n in names} - {None}:
        path = out / f"{data}_{settings.calib_samples}_{settings.covariance_norm}.h5"
        if not path.exists():
            calibrate(
                base,
                CalibrationSpec(
                    data,
                    samples=settings.calib_samples,
                    seq_len=settings.seq_len,
                    batch_size=8,
                    normalisation=settings.covariance_norm,
                ),
                path,
                progress=False,
            )
        stores[data] = path
    pairs = qa_pairs(settings)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base)
    before = evaluate(AutoModelForCausalLM.from_pretrained(base), tokenizer, pairs, settings)
    results, curves = {}, {}
    for name in names:
        print(f"[{time.strftime('%H:%M:%S')}] {name}", flush=True)
        results[name], curves[name] = run_method(name, settings, base, stores, pairs, out)
    with (out / "fidelity.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["method", "measurement", "before", "after"])
        for name, after in results.items():
            for key, value in after.items():
                writer.writerow([name, key, before.get(key, ""), f"{value:.6g}"])
    with (out / "loss_curves.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["method", "step", "train_loss"])
        for name, losses in curves.items():
            writer.writerows([name, step, f"{loss:.6g}"] for step, loss in enumerate(losses, start=1))
    commit = subprocess.run(
        ["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    (out / "settings.json").write_text(json.dumps({**vars(settings), "commit": commit}, default=str, indent=2))
    plot(results, before, curves, out)
    print(f"before: {before}")
    for name, after in results.items():
        print(name, {k: round(v, 4) for k, v in after.items()})


if __name__ == "__main__":
    main()
