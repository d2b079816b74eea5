"""Fidelity study on SmolLM2-135M, on the CorDA papers' protocol: does KPM forget less, does IPM learn faster?

Every method starts from the embedded SmolLM2-135M-Instruct at the same rank, targets and trainable
parameters, and is fine-tuned on GSM8K train items with transformers.Trainer (the papers' schedule:
cosine, 3 % warmup, no weight decay; effective batch 16) at each learning rate of the sweep and seed.
Measured before and after, on held-out items:
- forgetting as the papers measure it: exact match of greedy answers on NQ-open dev and TriviaQA test,
  in lm-evaluation-harness's "Q: …?\\nA:" format (training uses "Question: …\\nAnswer:"), 3-shot because
  this model answers zero-shot prompts with 0 of 200 right; the gold answers' log-likelihood zero-shot in
  that format and in the training format; WikiText-2 test perplexity;
- the task: GSM8K test answer loss and greedy accuracy.
Calibration: KPM on NQ-open questions joined by blank lines into full 2048-token windows (≥ 64k tokens,
NQ-open splits disjoint from the evaluated items), IPM on GSM8K train prompts (disjoint from training);
PEFT's own CorDA (`preprocess_corda`) sees exactly the same token windows as ours.

Each (method, learning rate, seed) run is appended to OUT/runs.jsonl as it finishes, with its trained
adapter under OUT/runs/; a stopped study resumes where it stopped. `--report` (also run at the end)
writes OUT/summary.csv, OUT/table.md, OUT/pareto.png and OUT/loss_curves.png from what is there. The default
study mirrors its runs and tables into bench/results/fidelity2/ (committed), and a new checkout's first run
continues from there.

    python bench/fidelity.py --quick                    # harness check, < 10 min
    python bench/fidelity.py                            # the study (several sittings; resumes)
    python bench/fidelity.py --only corda-kpm,lora --lrs 2e-5   # a part of it
    python bench/fidelity.py --report                   # tables and plots from the runs so far

The damping arms (issue 38: `corda-kpm-mean-0.1`, `…-mean-0.001`, `corda-kpm-median`, `…-median-0.1`,
`corda-ipm-median`) run KPM, and IPM as the control, under other damping rules and levels; the table adds
their paired intervals against today's arm (PEFT's rule, λ = 0.01) and the angles between their initial
adapters and today's (bench/damping_arms.py):

    python bench/fidelity.py --only damping             # the damping arms (two parts side by side: --threads 1)

The 4-bit arms (issue 37: `qlora`, QLoRA's own start, and `corda-ipm-nf4`, `corda-kpm-nf4`, CorDA's adapters
refit to an NF4 residual) train on bitsandbytes' 4-bit base as QLoRA does; each is evaluated merged into the
dequantised residual (corda-surgery's merge: the model that trained), so "IPM learns faster than QLoRA" is
measured at equal rate and seed:

    python bench/fidelity.py --only nf4 --lrs 2e-5,2e-4 --threads 1
"""

from __future__ import annotations

import argparse
import fcntl
import json
import math
import os
import random
import re
import shutil
import string
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from damping_arms import ANGLES, REFERENCES, angle_cell, angles_to_today  # bench/ is on the path of its scripts

REPO = Path(__file__).resolve().parents[1]
DATA_ENV = "CORDA_SURGERY_EVAL_DATA"
# Files the study reads, relative to the data folder, and where each comes from.
EVAL_FILES = {
    "gsm8k/train.jsonl": "GSM8K train, openai/grade-school-math: grade_school_math/data/train.jsonl (MIT)",
    "gsm8k/test.jsonl": "GSM8K test, openai/grade-school-math: grade_school_math/data/test.jsonl (MIT)",
    "triviaqa/triviaqa-open.test.jsonl": "open-domain TriviaQA test (DPR split), castorini/anserini-tools: "
    "topics/topics.dpr.trivia.test.txt as JSON Lines {question, answer: [aliases]} (Apache-2.0)",
    "nq_open/NQ-open.dev.jsonl": "NQ-open dev, google-research-datasets/natural-questions: nq_open/NQ-open.dev.jsonl "
    "(CC BY-SA 3.0)",
    "nq_open/NQ-open.efficientqa.dev.1.1.jsonl": "EfficientQA dev, same repository (CC BY-SA 3.0)",
    "nq_open/NQ-open.efficientqa.test.1.1.jsonl": "EfficientQA test, same repository (CC BY-SA 3.0)",
    "wikitext2_raw/wiki.test.raw": "WikiText-2 raw test split, wiki.test.raw (CC BY-SA 3.0)",
}
# The study's small state and its tables are mirrored here (committed), so a new checkout resumes it.
PUBLISHED = REPO / "bench" / "results" / "fidelity2"
STATE_FILES = ("runs.jsonl", "before.json")
REPORT_FILES = ("settings.json", "summary.csv", "table.md", "pareto.png", "loss_curves.png", ANGLES)
RESERVED_NQ_DEV = 500  # NQ-open dev items 0..499 are evaluation only; calibration may use the rest
SHOTS = 3  # QA exemplars for exact match: NQ-open dev items 497..499, TriviaQA dev 8000..8002 (never evaluated)
GSM8K_TRAIN_FROM = 1024  # training items start here; IPM calibration uses items 0..calib_prompts-1


@dataclass(frozen=True)
class Method:
    surgery: str  # corda-surgery method, or "peft-corda" for PEFT's preprocess_corda
    mode: str | None = None
    calibration: str | None = None  # "knowledge" | "task"
    balance: bool = False
    damping_rule: str = "mean-diagonal"  # --damping-rule
    damping: float = 0.01  # --damping
    residual: str = "float"  # --residual: nf4 trains on bitsandbytes' 4-bit residual (QLoRA's base)


METHODS = {
    "lora": Method("lora"),
    "pissa": Method("pissa"),
    "milora": Method("milora"),
    "corda-kpm": Method("corda", "kpm", "knowledge"),
    "corda-kpm-balance": Method("corda", "kpm", "knowledge", balance=True),
    "corda-ipm": Method("corda", "ipm", "task"),
    "corda++-kpm": Method("corda++", "kpm", "knowledge"),
    "corda++-ipm": Method("corda++", "ipm", "task"),
    "peft-corda-kpm": Method("peft-corda", "kpm", "knowledge"),
    "peft-corda-ipm": Method("peft-corda", "ipm", "task"),
    # the damping arms: today's rule at other levels, the median-diagonal rule at two, IPM under it as control
    "corda-kpm-mean-0.1": Method("corda", "kpm", "knowledge", damping=0.1),
    "corda-kpm-mean-0.001": Method("corda", "kpm", "knowledge", damping=0.001),
    "corda-kpm-median": Method("corda", "kpm", "knowledge", damping_rule="median-diagonal"),
    "corda-kpm-median-0.1": Method("corda", "kpm", "knowledge", damping_rule="median-diagonal", damping=0.1),
    "corda-ipm-median": Method("corda", "ipm", "task", damping_rule="median-diagonal"),
    # the 4-bit arms (issue 37): QLoRA's own start, and CorDA's adapters refit to an NF4 residual
    "qlora": Method("lora", residual="nf4"),
    "corda-ipm-nf4": Method("corda", "ipm", "task", residual="nf4"),
    "corda-kpm-nf4": Method("corda", "kpm", "knowledge", residual="nf4"),
}
NF4_ARMS = [name for name, method in METHODS.items() if method.residual != "float"]
# each damping arm → today's arm of its mode (PEFT's rule, λ = 0.01), compared at equal rate and seed
DAMPING_ARMS = {
    name: REFERENCES[method.mode]
    for name, method in METHODS.items()
    if method.mode is not None and (method.damping_rule, method.damping) != ("mean-diagonal", 0.01)
}
PAPERS_LR = 2e-5
LLAMA_LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]  # all-linear on SmolLM2


@contextmanager
def locked(path: Path, wait: bool = True) -> Iterator[bool]:
    """Hold an exclusive flock on PATH for the block (yields False at once if another holds it and not WAIT).

    Parts of the study side by side may share methods: the lock keeps them from doing one run, conversion or
    calibration twice, and the OS releases it when a part dies, so a stopped study leaves no stale lock."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        yield True


def evaluation_data(option: Path | None) -> Path:
    """--data-dir, else $CORDA_SURGERY_EVAL_DATA, else shared/data beside the repository; checked before any work."""
    env = os.environ.get(DATA_ENV)
    folder = option or (Path(env) if env else REPO.parent / "shared" / "data")
    missing = [name for name in EVAL_FILES if not (folder / name).is_file()]
    if missing:
        sources = "\n".join(f"  {name}: {EVAL_FILES[name]}" for name in missing)
        sys.exit(f"evaluation data missing in {folder} (give --data-dir or ${DATA_ENV}); needed:\n{sources}")
    return folder


def _jsonl(path: Path, limit: int | None = None, skip: int = 0) -> list[dict]:
    rows = []
    with path.open() as handle:
        for number, line in enumerate(handle):
            if number >= skip:
                rows.append(json.loads(line))
            if limit is not None and len(rows) == limit:
                break
    return rows


def _question(text: str) -> str:
    return text if text.rstrip().endswith("?") else text.rstrip() + "?"


# ---------------------------------------------------------------------------------------------- data


def evaluation_items(settings) -> dict[str, list]:
    """Held-out items: QA (question, [aliases]), GSM8K (question, answer), training pairs."""
    n, data = settings.eval_items, settings.data_dir
    assert n <= RESERVED_NQ_DEV - SHOTS
    return {
        "nq_open_shots": [
            (_question(r["question"]), r["answer"][0])
            for r in _jsonl(data / "nq_open/NQ-open.dev.jsonl", SHOTS, skip=RESERVED_NQ_DEV - SHOTS)
        ],
        "triviaqa_shots": [
            (_question(r["question"]), r["answer"][0])
            for r in _jsonl(data / "triviaqa/triviaqa-open.dev.jsonl", SHOTS, skip=8000)
        ],
        "train": [
            (r["question"], r["answer"])
            for r in _jsonl(data / "gsm8k/train.jsonl", settings.train_items, skip=GSM8K_TRAIN_FROM)
        ],
        "gsm8k": [
            (r["question"], r["answer"])
            for r in _jsonl(data / "gsm8k/test.jsonl", max(settings.gsm8k_loss_items, settings.gsm8k_generate))
        ],
        "nq_open": [(_question(r["question"]), r["answer"]) for r in _jsonl(data / "nq_open/NQ-open.dev.jsonl", n)],
        "triviaqa": [
            (_question(r["question"]), r["answer"]) for r in _jsonl(data / "triviaqa/triviaqa-open.test.jsonl", n)
        ],
    }


def calibration_windows(settings, tokenizer, out: Path) -> dict[str, Path]:
    """Token windows, written once as pre-tokenised records that both our calibration and PEFT's read."""
    from corda_surgery.calib.data import CalibrationSpec, token_batches

    files = {}
    data = settings.data_dir
    knowledge_texts = [
        r["question"]
        for name, skip in [
            ("NQ-open.efficientqa.dev.1.1.jsonl", 0),
            ("NQ-open.efficientqa.test.1.1.jsonl", 0),
            ("NQ-open.dev.jsonl", RESERVED_NQ_DEV),
        ]
        for r in _jsonl(data / "nq_open" / name, skip=skip)
    ]
    task_texts = [
        f"Question: {r['question']}\nAnswer:" for r in _jsonl(data / "gsm8k/train.jsonl", settings.calib_prompts)
    ]
    sources = {
        "knowledge": (knowledge_texts, True, settings.knowledge_windows, settings.knowledge_window),
        "task": (task_texts, False, settings.calib_prompts, settings.seq_len),
    }
    for kind, (texts, pack, samples, seq_len) in sources.items():
        tokens_file = out / f"calibration_{kind}.jsonl"
        files[kind] = tokens_file
        if tokens_file.is_file():
            continue
        texts_file = out / f"calibration_{kind}_texts.jsonl"
        texts_file.write_text("".join(json.dumps({"prompt": t}) + "\n" for t in texts))
        spec = CalibrationSpec(
            str(texts_file),
            samples=samples,
            seq_len=seq_len,
            batch_size=1,
            text_field="prompt",
            chat_template=False,
            pack=pack,
        )
        batches, description = token_batches(spec, tokenizer, len(tokenizer))
        staging = tokens_file.with_suffix(".partial")
        staging.write_text("".join(json.dumps({"input_ids": b.input_ids[0].tolist()}) + "\n" for b in batches))
        staging.replace(tokens_file)
        print(f"{kind} calibration: {len(batches)} windows, {description['tokens']} tokens", flush=True)
    return files


def calibration_tokens(path: Path) -> list[list[int]]:
    return [json.loads(line)["input_ids"] for line in path.read_text().splitlines()]


# ------------------------------------------------------------------------------------- initialisation


def ours_store(base: Path, tokens_file: Path, settings) -> Path:
    from corda_surgery.calib.data import CalibrationSpec
    from corda_surgery.surgery.calibration import calibrate

    store = tokens_file.with_suffix(".h5")
    with locked(store.parent / "locks" / f"calibrate-{store.stem}"):
        if store.is_file():
            return store
        windows = calibration_tokens(tokens_file)
        spec = CalibrationSpec(
            str(tokens_file),
            samples=len(windows),
            seq_len=max(map(len, windows)),
            batch_size=4,
            normalisation="peft",  # the CorDA authors' covariance scaling, as PEFT computes it
        )
        calibrate(base, spec, store, compute=settings.compute, progress=False)
    return store


def peft_corda(base: Path, tokens_file: Path, mode: str, settings, out: Path) -> None:
    """PEFT's own CorDA: hooks on the whole model, preprocess_corda, the residual from unload()."""
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora.config import CordaConfig
    from peft.tuners.lora.corda import preprocess_corda
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).to(settings.device).eval()
    windows = calibration_tokens(tokens_file)
    config = LoraConfig(
        r=settings.rank,
        lora_alpha=settings.rank,
        target_modules=LLAMA_LINEARS,
        init_lora_weights="corda",
        corda_config=CordaConfig(corda_method=mode),  # preprocess_corda does not expand "all-linear"
    )

    @torch.no_grad()
    def run_model():
        for ids in windows:  # PEFT's hook supports batch size 1 only
            model(input_ids=torch.tensor([ids], device=settings.device))

    preprocess_corda(model, config, run_model=run_model)
    peft_model = get_peft_model(model, config)
    staging = out.with_name(out.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    peft_model.save_pretrained(staging / "adapter")
    adapter_config = staging / "adapter" / "adapter_config.json"  # trained weights load as they are
    adapter_config.write_text(
        json.dumps(json.loads(adapter_config.read_text()) | {"init_lora_weights": True, "corda_config": None})
    )
    peft_model.unload().save_pretrained(staging)
    AutoTokenizer.from_pretrained(base).save_pretrained(staging)
    staging.replace(out)


def initialise(name: str, base: Path, calibration: dict[str, Path], settings) -> Path:
    """The method's residual model with adapter/ (converted once, reused by every learning rate and seed)."""
    converted = settings.out / "models" / name
    with locked(settings.out / "locks" / f"convert-{name}"):
        if not (converted / "adapter" / "adapter_config.json").is_file():
            convert(name, base, calibration, settings, converted)
    return converted


def convert(name: str, base: Path, calibration: dict[str, Path], settings, converted: Path) -> None:
    from corda_surgery.surgery.options import SurgeryOptions
    from corda_surgery.surgery.run import decompose_checkpoint

    method = METHODS[name]
    started = time.time()
    if method.surgery == "peft-corda":
        peft_corda(base, calibration[method.calibration], method.mode, settings, converted)
    else:
        stores = [ours_store(base, calibration[method.calibration], settings)] if method.calibration else []
        budget = (
            {"rank_budget": settings.rank, "min_rank": 2, "max_rank": 4 * settings.rank}
            if method.surgery == "corda++"
            else {}
        )
        options = SurgeryOptions.of(
            method=method.surgery,
            mode=method.mode,
            rank=settings.rank,
            alpha=settings.rank,
            balance=method.balance,
            damping=method.damping,
            damping_rule=method.damping_rule,
            residual=method.residual,
            **budget,
        )
        decompose_checkpoint(base, converted, options, stores=stores, compute=settings.compute, progress=False)
    print(f"  initialised {name} in {time.time() - started:.0f} s", flush=True)


# ------------------------------------------------------------------------------------------ evaluation


def _normalise_answer(text: str) -> str:
    """SQuAD / lm-evaluation-harness answer normalisation: lower case, no punctuation, articles or extra spaces."""
    text = "".join(ch for ch in text.lower() if ch not in set(string.punctuation))
    return " ".join(re.sub(r"\b(a|an|the)\b", " ", text).split())


def _left_padded(tokenizer, prompts: list[str], device: str) -> dict:
    tokenizer.padding_side = "left"
    batch = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    return {k: v.to(device) for k, v in batch.items()}


@torch.no_grad()
def greedy_answers(model, tokenizer, prompts: list[str], max_new: int, device: str, batch: int = 32) -> list[str]:
    answers = []
    for start in range(0, len(prompts), batch):
        inputs = _left_padded(tokenizer, prompts[start : start + batch], device)
        out = model.generate(**inputs, max_new_tokens=max_new, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        answers += tokenizer.batch_decode(out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    return answers


def qa_prompt(shots: list[tuple[str, str]], question: str) -> str:
    """lm-evaluation-harness's NQ-open format with exemplars (not the training format)."""
    return "".join(f"Q: {q}\nA: {a}\n\n" for q, a in shots) + f"Q: {question}\nA:"


def qa_exact_match(model, tokenizer, items, shots, device: str) -> list[int]:
    """Per item 1 where the greedy answer's first line equals a gold alias after normalisation."""
    answers = greedy_answers(model, tokenizer, [qa_prompt(shots, q) for q, _ in items], 16, device)
    return [
        int(_normalise_answer(answer.strip().split("\n")[0]) in {_normalise_answer(g) for g in gold})
        for answer, (_, gold) in zip(answers, items, strict=True)
    ]


def _gsm8k_number(text: str) -> str | None:
    found = text.split("####")[-1] if "####" in text else text
    numbers = re.findall(r"-?\d[\d,]*\.?\d*", found)
    return numbers[-1].replace(",", "").rstrip(".") if numbers else None


def gsm8k_correct(model, tokenizer, items, settings) -> list[int]:
    prompts = [f"Question: {q}\nAnswer:" for q, _ in items[: settings.gsm8k_generate]]
    answers = greedy_answers(model, tokenizer, prompts, settings.gsm8k_new_tokens, settings.device, batch=50)
    return [
        int(_gsm8k_number(answer.split("Question:")[0]) == _gsm8k_number(gold))
        for answer, (_, gold) in zip(answers, items, strict=False)
    ]


def encode(tokenizer, question: str, answer: str, max_len: int, shots=None) -> tuple[list[int], list[int]]:
    """Tokens of 'Question: …\\nAnswer: …' (the training format; with ``shots`` the QA evaluation format)
    with labels on the answer only; a long prompt loses its start, never the answer."""
    text = f"Question: {question}\nAnswer:" if shots is None else qa_prompt(shots, question)  # [] zero-shot
    prompt = tokenizer(text, add_special_tokens=False)["input_ids"]
    end = tokenizer.eos_token if shots is None else "\n"
    target = tokenizer(f" {answer}{end}", add_special_tokens=False)["input_ids"][:max_len]
    prompt = prompt[max(0, len(prompt) + len(target) - max_len) :]
    return prompt + target, [-100] * len(prompt) + target


def collate(rows: list[dict], pad_id: int) -> dict:
    width = max(len(r["input_ids"]) for r in rows)
    ids = torch.full((len(rows), width), pad_id)
    labels = torch.full((len(rows), width), -100)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        n = len(r["input_ids"])
        ids[i, :n], labels[i, :n], mask[i, :n] = torch.tensor(r["input_ids"]), torch.tensor(r["labels"]), 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


@torch.no_grad()
def answer_nll(model, tokenizer, pairs, max_len: int, device: str, shots=None, batch: int = 16) -> list[float]:
    """Per item, mean negative log-likelihood per answer token."""
    values = []
    for start in range(0, len(pairs), batch):
        rows = [
            dict(zip(("input_ids", "labels"), encode(tokenizer, q, a, max_len, shots), strict=True))
            for q, a in pairs[start : start + batch]
        ]
        inputs = {k: v.to(device) for k, v in collate(rows, tokenizer.pad_token_id).items()}
        logits = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits[:, :-1].float()
        labels = inputs["labels"][:, 1:]
        nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels, ignore_index=-100, reduction="none")
        counted = (labels != -100).sum(1).clamp(min=1)
        values += (nll.sum(1) / counted).tolist()
    return values


@torch.no_grad()
def wikitext_perplexity(model, tokenizer, settings) -> float:
    text = (settings.data_dir / "wikitext2_raw" / "wiki.test.raw").read_text()
    ids = tokenizer(text[: settings.ppl_tokens * 8], add_special_tokens=False)["input_ids"][: settings.ppl_tokens]
    nll, count = 0.0, 0
    for start in range(0, len(ids) - 1, settings.seq_len):
        chunk = torch.tensor([ids[start : start + settings.seq_len]], device=settings.device)
        if chunk.shape[1] < 2:
            break
        out = model(input_ids=chunk, labels=chunk)
        nll, count = nll + float(out.loss) * (chunk.shape[1] - 1), count + chunk.shape[1] - 1
    return math.exp(nll / count)


def evaluate(model, tokenizer, items, settings) -> dict:
    """Per-item results (for bootstrap intervals) and perplexity."""
    model.eval()
    measured: dict = {}
    for qa in ("nq_open", "triviaqa"):
        shots, gold = items[f"{qa}_shots"], [(q, g[0]) for q, g in items[qa]]
        measured[f"{qa}_em"] = qa_exact_match(model, tokenizer, items[qa], shots, settings.device)
        measured[f"{qa}_nll"] = answer_nll(model, tokenizer, gold, settings.seq_len, settings.device, shots=[])
        measured[f"{qa}_nll_train_format"] = answer_nll(model, tokenizer, gold, settings.seq_len, settings.device)
    return measured | {
        "gsm8k_nll": answer_nll(
            model, tokenizer, items["gsm8k"][: settings.gsm8k_loss_items], settings.seq_len, settings.device
        ),
        "gsm8k_correct": gsm8k_correct(model, tokenizer, items["gsm8k"], settings),
        "wikitext2_ppl": wikitext_perplexity(model, tokenizer, settings),
    }


# -------------------------------------------------------------------------------------------- training


def train(model, tokenizer, items, settings, lr: float, seed: int, work: Path) -> list[float]:
    from transformers import Trainer, TrainingArguments

    dataset = [
        dict(zip(("input_ids", "labels"), encode(tokenizer, q, a, settings.seq_len), strict=True))
        for q, a in items["train"]
    ]
    args = TrainingArguments(
        output_dir=str(work / "trainer"),
        max_steps=settings.steps,
        per_device_train_batch_size=settings.batch_size,
        gradient_accumulation_steps=settings.accumulation,
        learning_rate=lr,
        lr_scheduler_type="cosine",
        warmup_steps=0.03,  # a ratio of the steps (the papers: 3 %)
        weight_decay=0.0,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=settings.device == "cpu",
        seed=seed,
        data_seed=seed,
        disable_tqdm=True,
    )
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=dataset,
        data_collator=lambda rows: collate(rows, tokenizer.pad_token_id),
    )
    trainer.train()
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


@torch.no_grad()
def adapter_product(model) -> dict[str, torch.Tensor]:
    """s·B·A of every LoRA module (float64), detached: a figure, not part of training."""
    return {
        name: m.lora_B["default"].weight.double() @ m.lora_A["default"].weight.double() * m.scaling["default"]
        for name, m in model.named_modules()
        if hasattr(m, "lora_A") and "default" in m.lora_A
    }


def run_one(name: str, lr: float, seed: int, base: Path, calibration: dict[str, Path], items, settings) -> dict:
    from peft import PeftModel
    from peft.utils.integrations import dequantize_module_weight
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from corda_surgery.export.merge import merge_adapter

    converted = initialise(name, base, calibration, settings)
    tokenizer = AutoTokenizer.from_pretrained(base)
    torch.manual_seed(seed)
    model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(converted).to(settings.device), converted / "adapter", is_trainable=True
    )
    before = adapter_product(model)
    work = settings.out / "runs" / f"{name}_lr{lr:g}_seed{seed}"
    started = time.time()
    losses = train(model, tokenizer, items, settings, lr, seed, work)
    train_seconds = time.time() - started
    moved, size = 0.0, 0.0
    modules = dict(model.named_modules())
    for module, product in adapter_product(model).items():
        moved += float(torch.linalg.matrix_norm(product - before[module])) ** 2
        weight = dequantize_module_weight(modules[module].base_layer).double()  # a 4-bit base: its float weights
        size += float(torch.linalg.matrix_norm(weight + before[module])) ** 2
    model.save_pretrained(work / "adapter")
    shutil.rmtree(work / "trainer", ignore_errors=True)
    if METHODS[name].residual == "float":
        merged = model.merge_and_unload()  # evaluation at the merged model's speed
    else:  # PEFT would quantise the merged weights again: corda-surgery's merge folds into the dequantised ones
        del model
        merged = AutoModelForCausalLM.from_pretrained(
            merge_adapter(converted, work / "adapter", work / "merged", overwrite=True, progress=False)
        ).to(settings.device)
        shutil.rmtree(work / "merged")
    started = time.time()
    measured = evaluate(merged, tokenizer, items, settings)
    return {
        "method": name,
        "lr": lr,
        "seed": seed,
        "steps": settings.steps,
        "losses": losses,
        "train_seconds": round(train_seconds, 1),
        "eval_seconds": round(time.time() - started, 1),
        "relative_weight_update": math.sqrt(moved / size),
        **measured,
    }


# --------------------------------------------------------------------------------------------- report


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values)


def bootstrap_interval(values: list[float], reference: list[float] | None = None, draws: int = 1000) -> tuple:
    """95 % percentile interval of the mean of ``values`` (minus ``reference``, paired by item) over items."""
    rng = random.Random(0)
    diffs = [v - r for v, r in zip(values, reference, strict=True)] if reference else list(values)
    means = sorted(_mean(rng.choices(diffs, k=len(diffs))) for _ in range(draws))
    return means[int(0.025 * draws)], means[int(0.975 * draws) - 1]


def figures(run: dict, before: dict) -> dict[str, float]:
    """One run's headline numbers: knowledge change (EM points, log-lik), task gain, perplexity."""
    em = {k: 100 * (_mean(run[f"{k}_em"]) - _mean(before[f"{k}_em"])) for k in ("nq_open", "triviaqa")}
    return {
        "nq_open_em_change": em["nq_open"],
        "triviaqa_em_change": em["triviaqa"],
        "knowledge_em_change": (em["nq_open"] + em["triviaqa"]) / 2,
        "qa_loglik_change": _mean(before["nq_open_nll"] + before["triviaqa_nll"])
        - _mean(run["nq_open_nll"] + run["triviaqa_nll"]),
        "qa_loglik_change_train_format": _mean(before["nq_open_nll_train_format"] + before["triviaqa_nll_train_format"])
        - _mean(run["nq_open_nll_train_format"] + run["triviaqa_nll_train_format"]),
        "gsm8k_loss": _mean(run["gsm8k_nll"]),
        "task_gain": _mean(before["gsm8k_nll"]) - _mean(run["gsm8k_nll"]),
        "gsm8k_accuracy": 100 * _mean(run["gsm8k_correct"]),
        "wikitext2_ppl": run["wikitext2_ppl"],
        "final_train_loss": _mean(run["losses"][-max(1, len(run["losses"]) // 8) :]),
        "relative_weight_update": run["relative_weight_update"],
    }


def steps_to_reach(losses: list[float], target: float, window: int = 4) -> int | None:
    """First step whose trailing mean training loss (over ``window`` steps) is at or below ``target``."""
    for step in range(window, len(losses) + 1):
        if _mean(losses[step - window : step]) <= target:
            return step
    return None


def publish(out: Path, names: tuple[str, ...]) -> None:
    """Copy the named files of OUT that exist into PUBLISHED (the default study only)."""
    PUBLISHED.mkdir(parents=True, exist_ok=True)
    with locked(out / "locks" / "publish"):  # the last copy holds every part's runs
        for name in names:
            if (out / name).is_file():
                staging = PUBLISHED / f".{name}.partial"
                shutil.copy2(out / name, staging)
                staging.replace(PUBLISHED / name)


def report(out: Path, published: bool) -> None:
    import csv

    runs = (
        [json.loads(line) for line in (out / "runs.jsonl").read_text().splitlines()]
        if (out / "runs.jsonl").is_file()
        else []
    )
    before = json.loads((out / "before.json").read_text())
    rows = []
    for run in runs:
        row = {"method": run["method"], "lr": run["lr"], "seed": run["seed"], **figures(run, before)}
        lora = next(
            (r for r in runs if r["method"] == "lora" and r["lr"] == run["lr"] and r["seed"] == run["seed"]), None
        )
        if lora:
            target = _mean(lora["losses"][-max(1, len(lora["losses"]) // 8) :])
            row["steps_to_lora_final_loss"] = steps_to_reach(run["losses"], target)
            em_run = run["nq_open_em"] + run["triviaqa_em"]
            em_lora = lora["nq_open_em"] + lora["triviaqa_em"]
            low, high = bootstrap_interval(em_run, em_lora)
            row["em_vs_lora_ci95"] = f"[{100 * low:+.1f}, {100 * high:+.1f}]"
            nll_run = run["nq_open_nll"] + run["triviaqa_nll"]
            low, high = bootstrap_interval(lora["nq_open_nll"] + lora["triviaqa_nll"], nll_run)  # > 0: keeps more
            row["loglik_vs_lora_ci95"] = f"[{low:+.3f}, {high:+.3f}]"
        low, high = bootstrap_interval(
            run["nq_open_em"] + run["triviaqa_em"], before["nq_open_em"] + before["triviaqa_em"]
        )
        row["knowledge_em_change_ci95"] = f"[{100 * low:+.1f}, {100 * high:+.1f}]"
        row |= versus_today(run, runs)
        rows.append(row)
    if not rows:
        print("no runs yet")
        return
    keys = list(dict.fromkeys(k for row in rows for k in row))
    with (out / "summary.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, keys)
        writer.writeheader()
        writer.writerows(rows)
    table = markdown_table(rows, before, angles_to_today(out, DAMPING_ARMS))
    (out / "table.md").write_text(table)
    print(table)
    plots(rows, runs, out)
    if published:
        publish(out, STATE_FILES + REPORT_FILES)


def versus_today(run: dict, runs: list[dict]) -> dict[str, str]:
    """A damping arm's paired 95 % intervals against today's arm at its rate and seed: the evaluation-format
    log-likelihood (> 0: keeps more) and the task gain (> 0: learns more), over items."""
    today = DAMPING_ARMS.get(run["method"])
    reference = next((r for r in runs if (r["method"], r["lr"], r["seed"]) == (today, run["lr"], run["seed"])), None)
    if reference is None:
        return {}
    nll_today, nll_run = reference["nq_open_nll"] + reference["triviaqa_nll"], run["nq_open_nll"] + run["triviaqa_nll"]
    low, high = bootstrap_interval(nll_today, nll_run)
    gain_low, gain_high = bootstrap_interval(reference["gsm8k_nll"], run["gsm8k_nll"])
    return {
        "loglik_vs_today_ci95": f"[{low:+.3f}, {high:+.3f}]",
        "task_gain_vs_today_ci95": f"[{gain_low:+.3f}, {gain_high:+.3f}]",
    }


def markdown_table(rows: list[dict], before: dict, angles: dict[str, dict[str, float]] | None = None) -> str:
    """Mean over seeds per (method, learning rate); ± half the range where there are two seeds or more. The
    damping arms add their intervals against today's arm and their initial adapters' angles to today's."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row["lr"], row["method"]), []).append(row)
    columns = [
        ("knowledge_em_change", "knowledge EM Δ (pts)", "{:+.2f}"),
        ("nq_open_em_change", "NQ EM Δ", "{:+.2f}"),
        ("triviaqa_em_change", "TQA EM Δ", "{:+.2f}"),
        ("qa_loglik_change", "QA log-lik Δ (Q:/A: fmt)", "{:+.3f}"),
        ("qa_loglik_change_train_format", "QA log-lik Δ (train fmt)", "{:+.3f}"),
        ("task_gain", "GSM8K loss gain", "{:.3f}"),
        ("gsm8k_accuracy", "GSM8K acc %", "{:.1f}"),
        ("wikitext2_ppl", "Wiki ppl", "{:.2f}"),
        ("final_train_loss", "final train loss", "{:.3f}"),
        ("relative_weight_update", "‖ΔW‖/‖W‖", "{:.1e}"),
    ]
    em = {k: 100 * _mean(before[f"{k}_em"]) for k in ("nq_open", "triviaqa")}
    lines = [
        f"Before training: NQ-open EM {em['nq_open']:.1f} %, TriviaQA EM {em['triviaqa']:.1f} %, GSM8K answer loss "
        f"{_mean(before['gsm8k_nll']):.3f}, GSM8K accuracy {100 * _mean(before['gsm8k_correct']):.1f} %, "
        f"WikiText-2 ppl {before['wikitext2_ppl']:.2f}.",
        "",
        "| lr | method | seeds | "
        + " | ".join(title for _, title, _ in columns)
        + " | EM Δ vs LoRA, 95 % CI | log-lik Δ (Q:/A:) vs LoRA, 95 % CI | steps to LoRA's final loss"
        + " | log-lik Δ vs today's rule, 95 % CI | task gain Δ vs today's rule, 95 % CI"
        + " | angle to today's adapter: A / B, median (max) |",
        "|---" * (len(columns) + 9) + "|",
    ]
    for (lr, method), group in sorted(groups.items(), key=lambda item: (item[0][0], list(METHODS).index(item[0][1]))):
        cells = []
        for key, _, fmt in columns:
            values = [g[key] for g in group]
            cell = fmt.format(_mean(values))
            if len(values) > 1:
                cell += " ± " + fmt.format((max(values) - min(values)) / 2).lstrip("+")
            cells.append(cell)
        intervals = [
            group[0].get(key, "") if method != "lora" else "" for key in ("em_vs_lora_ci95", "loglik_vs_lora_ci95")
        ]
        steps = ", ".join(str(g.get("steps_to_lora_final_loss") or "not reached") for g in group)
        today = [group[0].get(key, "") for key in ("loglik_vs_today_ci95", "task_gain_vs_today_ci95")]
        today.append(angle_cell((angles or {}).get(method)))
        lines.append(
            f"| {lr:g} | {method} | {len(group)} | "
            + " | ".join(cells + intervals)
            + f" | {steps} | "
            + " | ".join(today)
            + " |"
        )
    return "\n".join(lines) + "\n"


def plots(rows: list[dict], runs: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    panels = [
        ("knowledge_em_change", "knowledge: mean EM change, NQ-open & TriviaQA (points)  ↑"),
        ("qa_loglik_change", "knowledge: gold-answer log-likelihood change (Q:/A: format)  ↑"),
    ]
    for ax, (key, label) in zip(axes, panels, strict=True):
        for method in METHODS:
            by_lr: dict[float, list[dict]] = {}
            for row in rows:
                if row["method"] == method:
                    by_lr.setdefault(row["lr"], []).append(row)
            if not by_lr:
                continue
            lrs = sorted(by_lr)
            x = [_mean(r["task_gain"] for r in by_lr[lr]) for lr in lrs]
            y = [_mean(r[key] for r in by_lr[lr]) for lr in lrs]
            spread = [(max(r[key] for r in by_lr[lr]) - min(r[key] for r in by_lr[lr])) / 2 for lr in lrs]
            style = "--" if method in DAMPING_ARMS else "-"  # the damping arms, dashed
            line = ax.errorbar(x, y, yerr=spread, marker="o", ms=4, lw=1, ls=style, capsize=2, label=method)
            for xi, yi, lr in zip(x, y, lrs, strict=True):
                ax.annotate(
                    f"{lr:g}",
                    (xi, yi),
                    fontsize=6,
                    color=line[0].get_color(),
                    xytext=(3, 3),
                    textcoords="offset points",
                )
        ax.axhline(0, color="black", lw=0.5)
        ax.set_xlabel("task gain: GSM8K answer loss before − after  →")
        ax.set_ylabel(label, fontsize=8)
    axes[0].set_title("per method across learning rates (labels: lr; bars: ± half the seed range)", fontsize=9)
    axes[1].legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(out / "pareto.png", dpi=120)
    plt.close(fig)

    curves_lr = PAPERS_LR if any(run["lr"] == PAPERS_LR for run in runs) else runs[0]["lr"]
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    for run in runs:
        if run["lr"] == curves_lr and run["seed"] == runs[0]["seed"]:
            ax.plot(range(1, len(run["losses"]) + 1), run["losses"], lw=1, label=run["method"])
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(f"training loss at lr {curves_lr:g} (GSM8K answers)")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(out / "loss_curves.png", dpi=120)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------- main


def planned_runs(settings) -> list[tuple[str, float, int]]:
    """All methods at the first two learning rates, then the further seeds at the papers' rate, then the rest."""
    names = settings.only.split(",") if settings.only else list(METHODS)
    groups = {"damping": list(DAMPING_ARMS), "nf4": NF4_ARMS}
    names = [arm for name in names for arm in groups.get(name, [name])]
    unknown = [n for n in names if n not in METHODS]
    if unknown:
        sys.exit(f"--only: unknown method(s) {', '.join(unknown)}; known: {', '.join(METHODS)}")
    lrs = [float(x) for x in settings.lrs.split(",")]
    seeds = [int(x) for x in settings.seeds.split(",")]
    groups = [(lr, seeds[0]) for lr in lrs[:2]] + [(PAPERS_LR, s) for s in seeds[1:] if PAPERS_LR in lrs]
    groups += [(lr, seeds[0]) for lr in lrs[2:]]
    groups += [(lr, s) for s in seeds[1:] for lr in lrs if settings.all_seeds and (lr, s) not in groups]
    return [(n, lr, s) for lr, s in groups for n in names]


def finished_runs(out: Path) -> set[tuple[str, float, int]]:
    runs = out / "runs.jsonl"
    lines = runs.read_text().splitlines() if runs.is_file() else []
    return {(r["method"], r["lr"], r["seed"]) for r in map(json.loads, lines)}


def append_line(path: Path, line: str) -> None:
    """One write call with O_APPEND, so parts of the study running side by side never interleave their lines."""
    descriptor = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(descriptor, (line + "\n").encode())
    finally:
        os.close(descriptor)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=REPO / "out" / "fidelity2")
    parser.add_argument(
        "--only",
        default=None,
        help=f"comma-separated methods, 'damping' for the damping arms, 'nf4' for the 4-bit arms [default: all: "
        f"{', '.join(METHODS)}]",
    )
    parser.add_argument("--lrs", default="2e-5,2e-4,6e-5", help="learning rates, run in this order")
    parser.add_argument("--seeds", default="0,1", help="the first for every lr; the others at the papers' 2e-5")
    parser.add_argument("--all-seeds", action="store_true", help="every seed at every learning rate")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--steps", type=int, default=16, help="optimizer steps (a run ≤ 10 min here)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--accumulation", type=int, default=2, help="gradient accumulation (effective batch 16)")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--knowledge-windows", type=int, default=32, help="packed NQ-open windows for KPM")
    parser.add_argument("--knowledge-window", type=int, default=2048, help="tokens per KPM window")
    parser.add_argument("--calib-prompts", type=int, default=256, help="GSM8K train prompts for IPM")
    parser.add_argument("--train-items", type=int, default=256, help="one epoch of steps × 16")
    parser.add_argument("--eval-items", type=int, default=200, help="NQ-open and TriviaQA items")
    parser.add_argument("--gsm8k-loss-items", type=int, default=100, help="GSM8K test items for the answer loss")
    parser.add_argument("--gsm8k-generate", type=int, default=100, help="GSM8K items answered greedily")
    parser.add_argument("--gsm8k-new-tokens", type=int, default=160)
    parser.add_argument("--ppl-tokens", type=int, default=4096)
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU threads [default: all cores]; parts of the study side by side with one thread each keep the "
        "cores busier (evaluation runs on about one core); they may share methods: locks under OUT/locks keep "
        "any run, conversion or calibration from being done twice",
    )
    parser.add_argument("--report", action="store_true", help="only write the tables and plots from OUT")
    parser.add_argument("--quick", action="store_true", help="harness check: 2 steps, small sets, one lr and seed")
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=None,
        help=f"folder with the evaluation sets [default: ${DATA_ENV}, else shared/data beside the repository]",
    )
    settings = parser.parse_args()
    published = settings.out == parser.get_default("out") and not settings.quick  # others stay private
    if settings.report:
        report(settings.out, published)
        return
    settings.data_dir = evaluation_data(settings.data_dir)
    if settings.quick:
        settings.steps, settings.batch_size, settings.accumulation, settings.train_items = 2, 2, 1, 8
        settings.eval_items, settings.gsm8k_generate, settings.gsm8k_new_tokens, settings.ppl_tokens = 8, 4, 32, 512
        settings.gsm8k_loss_items = 8
        settings.knowledge_windows, settings.knowledge_window, settings.calib_prompts = 4, 256, 16
        settings.lrs, settings.seeds, settings.seq_len = "2e-4", "0", 128
        if settings.out == parser.get_default("out"):
            settings.out = REPO / "out" / "fidelity-quick"
    from corda_surgery.compute import ComputeOptions
    from corda_surgery.models import embedded_model_dir

    # glibc's own malloc settings, not the commands' (corda_surgery.memory): training frees and reallocates
    # ~400 MB of logits and activations every micro-batch, and returning each to the OS costs a fresh mmap and
    # page faults: 23.4 s a step with the commands' settings against 17.1 s without (measured, 2 steps each).
    if settings.device == "cpu":
        torch.set_num_threads(settings.threads or os.cpu_count() or 1)
    settings.compute = ComputeOptions(device=settings.device)
    out = settings.out
    out.mkdir(parents=True, exist_ok=True)
    plan = planned_runs(settings)
    commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True).stdout
    recorded = {k: os.path.relpath(v, REPO) if isinstance(v, Path) else v for k, v in vars(settings).items()
                if k != "compute"} | {"commit": commit.strip()}  # fmt: skip
    (out / "settings.json").write_text(json.dumps(recorded, indent=2))
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = embedded_model_dir()
    tokenizer = AutoTokenizer.from_pretrained(base)
    items = evaluation_items(settings)
    with locked(out / "locks" / "setup"):  # the first part prepares what every part shares
        for name in STATE_FILES if published and not (out / "runs.jsonl").exists() else ():
            if (PUBLISHED / name).is_file():  # a new checkout: continue the committed study
                shutil.copy2(PUBLISHED / name, out / name)
        calibration = calibration_windows(settings, tokenizer, out)
        if not (out / "before.json").is_file():
            model = AutoModelForCausalLM.from_pretrained(base).to(settings.device)
            (out / "before.json").write_text(json.dumps(evaluate(model, tokenizer, items, settings)))
    started = time.time()
    for name, lr, seed in plan:
        with locked(out / "locks" / f"run-{name}_lr{lr:g}_seed{seed}", wait=False) as ours:
            if not ours or (name, lr, seed) in finished_runs(out):  # another part runs it, or has run it
                continue
            print(f"[{time.strftime('%H:%M:%S')}] {name} lr {lr:g} seed {seed}", flush=True)
            result = run_one(name, lr, seed, base, calibration, items, settings)
            append_line(out / "runs.jsonl", json.dumps(result))
        if published:
            publish(out, STATE_FILES)
        print(f"  trained {result['train_seconds']:.0f} s, evaluated {result['eval_seconds']:.0f} s", flush=True)
    print(f"study part done in {(time.time() - started) / 60:.1f} min", flush=True)
    report(out, published)


if __name__ == "__main__":
    main()
