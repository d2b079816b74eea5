"""Calibration data: skipped records counted and reported, huge records cut before tokenising."""

import json

import pytest
from transformers import AutoTokenizer

from corda_surgery.calib.data import MAX_CHARS_PER_TOKEN, CalibrationDataError, CalibrationSpec, token_batches
from corda_surgery.calib.store import CovarianceStore
from corda_surgery.surgery.calibration import calibrate
from corda_surgery.surgery.options import OptionsError


def test_skipped_records_are_counted_and_reported(tiny_llama, tmp_path, caplog):
    records = [{"text": "a fine sentence about ducks"}, {"value": 1}, {"text": "   "}, {"text": "another one"}]
    data = tmp_path / "data.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    with caplog.at_level("WARNING"):
        store = calibrate(
            tiny_llama, CalibrationSpec(str(data), samples=8, seq_len=16), tmp_path / "c.h5", progress=False
        )
    assert "skipped 2 record(s) without usable text (line 2, 3)" in caplog.text
    with CovarianceStore(store) as opened:
        assert opened.calibration["records_skipped"] == 2
        assert opened.calibration["samples_used"] == 2


class _RecordingTokenizer:
    """The test tokenizer, noting the longest text it was asked to tokenise."""

    def __init__(self, tokenizer):
        self.tokenizer, self.longest = tokenizer, 0
        self.pad_token_id, self.chat_template = tokenizer.pad_token_id, None

    def __call__(self, text, **kwargs):
        self.longest = max(self.longest, len(text))
        return self.tokenizer(text, **kwargs)


def test_a_huge_record_is_cut_before_tokenising(tiny_llama, tmp_path):
    data = tmp_path / "huge.jsonl"
    data.write_text(json.dumps({"text": "ducks lay eggs " * 700_000}) + "\n")  # a 10 MB line
    tokenizer = _RecordingTokenizer(AutoTokenizer.from_pretrained(tiny_llama))
    batches, description = token_batches(CalibrationSpec(str(data), samples=1, seq_len=64), tokenizer, 384)
    assert data.stat().st_size > 10_000_000
    assert tokenizer.longest == 64 * MAX_CHARS_PER_TOKEN
    assert batches[0].input_ids.shape == (1, 64) and description["tokens"] == 64


def test_pack_joins_records_into_full_windows(tiny_llama, tmp_path):
    """--pack: texts joined by blank lines, cut into samples × seq_len tokens, every window full; the default for
    the built-in knowledge sets (their questions alone), not for the others or with --no-pack."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    spec = CalibrationSpec("nq_open", samples=6, seq_len=48, batch_size=4)
    assert spec == CalibrationSpec("nq_open", samples=6, seq_len=48, batch_size=4, pack=True, text_field="prompt")
    assert not CalibrationSpec("gsm8k").pack and CalibrationSpec("triviaqa").pack
    assert not CalibrationSpec("nq_open", chat_template=True).pack
    batches, description = token_batches(spec, tokenizer, len(tokenizer))
    assert [tuple(b.input_ids.shape) for b in batches] == [(4, 48), (2, 48)]
    assert all(bool(b.attention_mask.all()) for b in batches)  # no padding at all
    assert description["tokens"] == 6 * 48 and description["pack"] and not description["chat_template"]
    text = tokenizer.decode(batches[0].input_ids[0])
    assert "\n\n" in text and "?" in text  # several questions in one window
    unpacked, _ = token_batches(
        CalibrationSpec("nq_open", samples=6, seq_len=48, text_field="prompt", pack=False), tokenizer, len(tokenizer)
    )
    assert sum(int(b.attention_mask.sum()) for b in unpacked) < 6 * 48  # one question per sample instead


def test_pack_refuses_chat_templates_and_pretokenised_records(tmp_path, tiny_llama):
    with pytest.raises(OptionsError, match="--pack joins plain record texts"):
        CalibrationSpec("nq_open", pack=True, chat_template=True)
    data = tmp_path / "ids.jsonl"
    data.write_text(json.dumps({"text": "fine"}) + "\n" + json.dumps({"input_ids": [1, 2, 3]}) + "\n")
    with pytest.raises(CalibrationDataError, match=r"ids\.jsonl:2: --pack joins texts"):
        token_batches(CalibrationSpec(str(data), pack=True), AutoTokenizer.from_pretrained(tiny_llama), 384)


def test_inputs_with_fewer_tokens_than_their_width_are_named(tiny_llama, tmp_path, caplog):
    with caplog.at_level("WARNING"):
        calibrate(
            tiny_llama, CalibrationSpec("gsm8k", samples=2, seq_len=16, batch_size=2), tmp_path / "c.h5", progress=False
        )
    # 2 × 16 tokens against inputs 64 (attention, gate/up) and 128 (down_proj) wide, in every layer
    assert (
        "12 of 12 inputs saw fewer calibration tokens than they are wide (e.g. model.layers.0.mlp.down_proj: "
        "32 tokens for 128 inputs)" in caplog.text
    )
