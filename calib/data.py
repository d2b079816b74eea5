"""Calibration sources (built-in sets, .jsonl, .txt) turned into padded token batches."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import random
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from corda_surgery.errors import CordaSurgeryError, OptionsError
from corda_surgery.paths import resolved

log = logging.getLogger(__name__)
BUILTIN_DIR = Path(__file__).parent / "builtin"
# Field pairs recognised in .jsonl records, in order of preference.
_PAIR_FIELDS = (("prompt", "response"), ("question", "answer"), ("instruction", "output"))


class CalibrationDataError(CordaSurgeryError):
    """The calibration source is missing, empty, or has no usable text; names the file."""


def builtin_sets() -> list[str]:
    return sorted(p.stem for p in BUILTIN_DIR.glob("*.jsonl"))


# Records are cut to this many characters per token of --seq-len before tokenising, so a huge record costs
# no more than a normal one (a token is rarely over 16 characters; whitespace runs in code can reach 64).
MAX_CHARS_PER_TOKEN = 64
NORMALISATIONS = ("tokens", "peft")
# Built-in knowledge sets are packed by default, their questions alone, as the CorDA papers calibrate KPM: one
# short record per sample would leave a 1536-wide input with fewer tokens than directions.
PACKED_BY_DEFAULT = ("nq_open", "triviaqa")


@dataclass(frozen=True)
class CalibrationSpec:
    """What to calibrate on; everything that changes the covariances is in here, validated on creation."""

    source: str  # a built-in set name or a .jsonl / .txt path
    samples: int = 128
    seq_len: int = 512
    batch_size: int = 8
    seed: int = 0
    text_field: str | None = None
    chat_template: bool | None = None  # None: use the tokenizer's template when it has one
    normalisation: str = "tokens"  # "tokens": XᵀX / real tokens; "peft": PEFT's per-sample max scaling
    rounds: int = 1  # disjoint sampling rounds stored separately too (CorDA++ candidates)
    pack: bool | None = None  # records joined by blank lines into full seq_len windows (the CorDA authors'
    # protocol); None: for PACKED_BY_DEFAULT (with text_field "prompt", the questions) unless a chat template is asked
    store_dtype: str = "float64"  # float64: the raw sums; float32: the normalised covariances, half the disk

    def __post_init__(self) -> None:
        if self.pack is None:
            object.__setattr__(self, "pack", self.source in PACKED_BY_DEFAULT and not self.chat_template)
        if self.pack and self.text_field is None and self.source in PACKED_BY_DEFAULT:
            object.__setattr__(self, "text_field", "prompt")
        for option in ("samples", "seq_len", "batch_size", "rounds"):
            value = getattr(self, option)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise OptionsError(f"`{option}` {value!r}: must be a whole number ≥ 1")
        if self.normalisation not in NORMALISATIONS:
            raise OptionsError(f"`normalisation` {self.normalisation!r}: must be one of {', '.join(NORMALISATIONS)}")
        if self.store_dtype not in ("float64", "float32"):
            raise OptionsError(f"`store_dtype` {self.store_dtype!r}: must be float64 or float32")
        if self.pack and self.chat_template:
            raise OptionsError("`pack` joins plain record texts into windows: it does not go with `chat_template`")

    def input_files(self) -> list[Path]:
        """The data file this spec reads, if it is not a built-in set."""
        return [] if self.source in builtin_sets() else [Path(self.source)]


@dataclass(frozen=True)
class TokenBatch:
    input_ids: torch.Tensor  # (batch, length), right-padded
    attention_mask: torch.Tensor  # (batch, length), 1 on real tokens


def _source_path(source: str) -> Path:
    if source in builtin_sets():
        return BUILTIN_DIR / f"{source}.jsonl"
    path = Path(source)
    resolved(path)  # a symlink loop or an unusable name: one line naming it
    if not path.exists():
        raise CalibrationDataError(
            f"{source}: not a file and not a built-in set (built-in: {', '.join(builtin_sets())})"
        )
    if not path.is_file():
        raise CalibrationDataError(f"{path}: not a regular file")
    if path.suffix not in (".jsonl", ".txt"):
        raise CalibrationDataError(f"{path}: calibration files must be .jsonl or .txt")
    return path


def _decode(raw: bytes, path: Path, first_line: int = 1) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = first_line + raw[: exc.start].count(b"\n")
        raise CalibrationDataError(f"{path}:{line}: not valid UTF-8 (byte {raw[exc.start]:#04x})") from exc


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


def _token_ids(value, path: Path, number: int, vocab_size: int) -> list[int]:
    """A record's pre-tokenised ``input_ids``, checked against the model's vocabulary."""
    if not all(isinstance(t, int) and not isinstance(t, bool) for t in value):
        raise CalibrationDataError(f"{path}:{number}: input_ids must be a list of whole numbers")
    outside = [t for t in value if not 0 <= t < vocab_size]
    if outside:
        raise CalibrationDataError(
            f"{path}:{number}: token id {outside[0]} is outside the model's vocabulary (0..{vocab_size - 1})"
        )
    return value


def _records(path: Path) -> Iterator[tuple[int, dict]]:
    """(line number, record) of every non-blank line of a .jsonl file; a bad line names file and line."""
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, 1):
            line = _decode(raw, path, number)
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise CalibrationDataError(f"{path}:{number}: not valid JSON ({exc.msg})") from exc
            if not isinstance(record, dict):
                raise CalibrationDataError(
                    f"{path}:{number}: a record must be a JSON object, got {type(record).__name__}"
                )
            yield number, record


def _jsonl_token_lists(
    path: Path, spec: CalibrationSpec, tokenizer, chat_template: bool, vocab_size: int
) -> tuple[list[list[int]], list[int]]:
    """Token lists from the records (``input_ids`` records as they are), and the numbers of skipped lines."""
    texts: list[tuple[int, str | list[int]]] = []
    skipped: list[int] = []
    limit = spec.seq_len * MAX_CHARS_PER_TOKEN
    for number, record in _records(path):
        if isinstance(record.get("input_ids"), list):
            texts.append((number, _token_ids(record["input_ids"][: spec.seq_len], path, number, vocab_size)))
            continue
        text = _record_text(record, spec.text_field, tokenizer, chat_template)
        if text and text.strip():
            texts.append((number, text[:limit]))
        else:
            skipped.append(number)
    random.Random(spec.seed).shuffle(texts)
    token_lists = []
    for number, item in texts[: spec.samples]:
        if isinstance(item, list):  # pre-tokenised: checked when read
            ids = item
        else:  # the tokenizer may know more ids than the model's embedding
            ids = _token_ids(
                tokenizer(item, add_special_tokens=not chat_template)["input_ids"][: spec.seq_len],
                path,
                number,
                vocab_size,
            )
        if ids:
            token_lists.append(ids)
    return token_lists, skipped


def _packed_token_lists(
    path: Path, spec: CalibrationSpec, tokenizer, vocab_size: int
) -> tuple[list[list[int]], list[int]]:
    """Record texts (no chat template) in seeded random order joined by blank lines, tokenised and cut into
    ``samples`` windows of exactly ``seq_len`` tokens (a shorter last one only where the data runs out)."""
    texts: list[str] = []
    skipped: list[int] = []
    for number, record in _records(path):
        if isinstance(record.get("input_ids"), list):
            raise CalibrationDataError(f"{path}:{number}: `pack` joins texts; this record is pre-tokenised")
        text = _record_text(record, spec.text_field, tokenizer, chat_template=False)
        if text and text.strip():
            texts.append(text.strip())
        else:
            skipped.append(number)
    random.Random(spec.seed).shuffle(texts)
    wanted, budget, chosen = spec.samples * spec.seq_len, spec.samples * spec.seq_len * MAX_CHARS_PER_TOKEN, []
    for text in texts:  # enough text for the windows, without tokenising a huge file whole
        chosen.append(text[:budget])
        budget -= len(chosen[-1]) + 2
        if budget <= 0:
            break
    ids = tokenizer("\n\n".join(chosen), add_special_tokens=False)["input_ids"][:wanted]
    windows = [_token_ids(ids[i : i + spec.seq_len], path, 1, vocab_size) for i in range(0, len(ids), spec.seq_len)]
    return windows, skipped


def _txt_token_lists(path: Path, spec: CalibrationSpec, tokenizer, vocab_size: int) -> list[list[int]]:
    """Plain text is tokenised whole and cut into seq_len-token chunks, of which `samples` are drawn."""
    text = _decode(path.read_bytes(), path)
    if not text.strip():  # blank tokens would calibrate the model on nothing
        raise CalibrationDataError(f"{path}: only whitespace, no usable text")
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    chunks = [ids[i : i + spec.seq_len] for i in range(0, len(ids), spec.seq_len)]
    chunks = [c for c in chunks if c]
    random.Random(spec.seed).shuffle(chunks)
    return [_token_ids(c, path, 1, vocab_size) for c in chunks[: spec.samples]]


def _pad(token_lists: list[list[int]], pad_id: int) -> TokenBatch:
    length = max(len(x) for x in token_lists)
    ids = torch.full((len(token_lists), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(token_lists), length), dtype=torch.long)
    for row, tokens in enumerate(token_lists):
        ids[row, : len(tokens)] = torch.tensor(tokens)
        mask[row, : len(tokens)] = 1
    return TokenBatch(ids, mask)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def check_source(spec: CalibrationSpec) -> None:
    """The calibration file readable, parseable and holding some text, checked before any plan or model is
    loaded, so a bad file is one line naming it and its line, not a failure after the memory plan."""
    path = _source_path(spec.source)
    if path.suffix == ".txt":
        if not _decode(path.read_bytes(), path).strip():
            raise CalibrationDataError(f"{path}: no text (only whitespace)")
        return
    usable = False
    for number, record in _records(path):
        if isinstance(record.get("input_ids"), list):
            if spec.pack:
                raise CalibrationDataError(f"{path}:{number}: `pack` joins texts; this record is pre-tokenised")
            usable = True
            continue
        text = _record_text(record, spec.text_field, tokenizer=None, chat_template=False)
        usable = usable or bool(text and text.strip())
    if not usable:
        field = f" in field {spec.text_field!r}" if spec.text_field else ""
        raise CalibrationDataError(f"{path}: no usable text{field}")


def token_batches(spec: CalibrationSpec, tokenizer, vocab_size: int) -> tuple[list[TokenBatch], dict]:
    """Tokenised, right-padded batches plus a description of the calibration set for the store."""
    path = _source_path(spec.source)
    chat_template = spec.chat_template
    if chat_template is None:
        chat_template = bool(getattr(tokenizer, "chat_template", None))
    skipped: list[int] = []
    if path.suffix == ".txt":
        token_lists = _txt_token_lists(path, spec, tokenizer, vocab_size)
    elif spec.pack:
        chat_template = False
        token_lists, skipped = _packed_token_lists(path, spec, tokenizer, vocab_size)
    else:
        token_lists, skipped = _jsonl_token_lists(path, spec, tokenizer, chat_template, vocab_size)
    if skipped:
        lines = ", ".join(map(str, skipped[:5])) + (", ..." if len(skipped) > 5 else "")
        log.warning("%s: skipped %d record(s) without usable text (line %s)", path, len(skipped), lines)
    if not token_lists:
        field = f" in field {spec.text_field!r}" if spec.text_field else ""
        raise CalibrationDataError(f"{path}: no usable text{field}")
    batch_count = math.ceil(len(token_lists) / spec.batch_size)
    if spec.rounds > batch_count:
        raise OptionsError(f"`rounds` {spec.rounds}: more than the {batch_count} batches the calibration set gives")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    batches = [_pad(token_lists[i : i + spec.batch_size], pad_id) for i in range(0, len(token_lists), spec.batch_size)]
    description = asdict(spec) | {
        "chat_template": chat_template,
        "sha256": _sha256(path),
        "samples_used": len(token_lists),
        "records_skipped": len(skipped),
        "tokens": sum(len(x) for x in token_lists),
    }
    return batches, description
