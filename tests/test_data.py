"""Calibration data: skipped records counted and reported, huge records cut before tokenising."""

import json

from transformers import AutoTokenizer

from corda_surgery.calib.data import MAX_CHARS_PER_TOKEN, CalibrationSpec, token_batches
from corda_surgery.calib.store import CovarianceStore
from corda_surgery.calib.stream import calibrate


def test_skipped_records_are_counted_and_reported(tiny_llama, tmp_path, caplog):
    records = [{"text": "a fine sentence about ducks"}, {"value": 1}, {"text": "   "}, {"text": "another one"}]
    data = tmp_path / "data.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    with caplog.at_level("WARNING"):
        store = calibrate(tiny_llama, CalibrationSpec(str(data), samples=8, seq_len=16), tmp_path / "c.h5",
                          progress=False)  # fmt: skip
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
