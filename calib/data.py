"""Calibration sources (built-in sets, .jsonl, .txt) turned into padded token batches."""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

BUILTIN_DIR = Path(__file__).parent / "builtin"
# Field pairs recognised in .jsonl records, in order of preference.
_PAIR_FIELDS = (("prompt", "response"), ("question", "answer"), ("instruction", "output"))


class CalibrationDataError(ValueError):
    """The calibration source is missing, empty, or has no usable text; names the file."""


def builtin_sets() -> list[str]:
    return sorted(p.stem for p in BUILTIN_DIR.glob("*.jsonl"))


@dataclass(frozen=True)
class CalibrationSpec:
    """What to calibrate on; everything that changes the covariances is in here."""

    source: str  # a built-in set name or a .jsonl / .txt path
    samples: int = 128
    seq_len: int = 512
    batch_size: int = 8
    seed: int = 0
    text_field: str | None = None
    chat_template: bool | None = None  # None: use the tokenizer's template when it has one


@dataclass(frozen=True)
class TokenBatch:
    input_ids: torch.Tensor  # (batch, length), right-padded
    attention_mask: torch.Tensor  # (batch, length), 1 on real tokens


def _source_path(source: str) -> Path:
    if source in builtin_sets():
        return BUILTIN_DIR / f"{source}.jsonl"
    path = Path(source)
    if not path.is_file():
        raise CalibrationDataError(
            f"{source}: not a file and not a built-in set (built-in: {', '.join(builtin_sets())})"
        )
    if path.suffix not in (".jsonl", ".txt"):
        raise CalibrationDataError(f"{path}: calibration files must be .jsonl or .txt")
    return path


def _record_text(record: dict, text_field: str | None, tokenizer, chat_template: bool) -> str | None:
    if text_field is not None:
        value = record.get(text_field)
        return value if isinstance(value, str) else None
    for prompt_key, response_key in _PAIR_FIELDS:
        if prompt_key in record and response_key in record:
            prompt, response = record[prompt_key], record[response_key]
            if isinstance(response, list):
                response = response[0] if response else ""
            if not isinstance(prompt, str) or not isinstance(response, str):
                return None
            if chat_template:
                messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
                return tokenizer.apply_chat_template(messages, tokenize=False)
            return f"{prompt}\n{response}"
    value = record.get("text")
    return value if isinstance(value, str) else None


def _jsonl_token_lists(path: Path, spec: CalibrationSpec, tokenizer, chat_template: bool) -> list[list[int]]:
    """Texts from the records, tokenised; records with an ``input_ids`` list are used as they are."""
    texts: list[str | list[int]] = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise CalibrationDataError(f"{path}:{number}: not valid JSON ({exc.msg})") from None
        if isinstance(record, dict) and isinstance(record.get("input_ids"), list):
            texts.append([int(t) for t in record["input_ids"]])
            continue
        text = _record_text(record, spec.text_field, tokenizer, chat_template) if isinstance(record, dict) else None
        if text and text.strip():
            texts.append(text)
    random.Random(spec.seed).shuffle(texts)
    ids = [
        (text if isinstance(text, list) else tokenizer(text, add_special_tokens=not chat_template)["input_ids"])
        for text in texts[: spec.samples]
    ]
    return [x[: spec.seq_len] for x in ids if x]


def _txt_token_lists(path: Path, spec: CalibrationSpec, tokenizer) -> list[list[int]]:
    """Plain text is tokenised whole and cut into seq_len-token chunks, of which `samples` are drawn."""
    ids = tokenizer(path.read_text(encoding="utf-8"), add_special_tokens=False)["input_ids"]
    chunks = [ids[i : i + spec.seq_len] for i in range(0, len(ids), spec.seq_len)]
    chunks = [c for c in chunks if c]
    random.Random(spec.seed).shuffle(chunks)
    return chunks[: spec.samples]


def _pad(token_lists: list[list[int]], pad_id: int) -> TokenBatch:
    length = max(len(x) for x in token_lists)
    ids = torch.full((len(token_lists), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(token_lists), length), dtype=torch.long)
    for row, tokens in enumerate(token_lists):
        ids[row, : len(tokens)] = torch.tensor(tokens)
        mask[row, : len(tokens)] = 1
    return TokenBatch(ids, mask)


def token_batches(spec: CalibrationSpec, tokenizer) -> tuple[list[TokenBatch], dict]:
    """Tokenised, right-padded batches plus a description of the calibration set for the store."""
    for option in ("samples", "seq_len", "batch_size"):
        if getattr(spec, option) < 1:
            raise CalibrationDataError(f"--{option.replace('_', '-')} must be at least 1")
    path = _source_path(spec.source)
    chat_template = spec.chat_template
    if chat_template is None:
        chat_template = bool(getattr(tokenizer, "chat_template", None))
    if path.suffix == ".txt":
        token_lists = _txt_token_lists(path, spec, tokenizer)
    else:
        token_lists = _jsonl_token_lists(path, spec, tokenizer, chat_template)
    if not token_lists:
        field = f" in field {spec.text_field!r}" if spec.text_field else ""
        raise CalibrationDataError(f"{path}: no usable text{field}")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    batches = [_pad(token_lists[i : i + spec.batch_size], pad_id) for i in range(0, len(token_lists), spec.batch_size)]
    description = asdict(spec) | {
        "chat_template": chat_template,
        "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
        "samples_used": len(token_lists),
        "tokens": sum(len(x) for x in token_lists),
    }
    return batches, description
