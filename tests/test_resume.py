"""Long commands rerun with --resume: a finished store is kept as it is; a bad data file fails before the plan."""

from __future__ import annotations

from click.testing import CliRunner

from corda_surgery.cli import main
from tests.helpers import cli_error, run_cli, tree_hashes

CALIBRATION = ("--data", "gsm8k", "--samples", "8", "--seq-len", "32", "--batch-size", "4")


def test_calibrate_resume_on_a_finished_store_says_so_and_keeps_it(tiny_llama, tmp_path, caplog):
    store = tmp_path / "cov.h5"
    run_cli("calibrate", tiny_llama, *CALIBRATION, "--out", store)
    before = tree_hashes(tmp_path)
    again = run_cli("calibrate", tiny_llama, *CALIBRATION, "--out", store, "--resume")
    assert again.exit_code == 0 and "already complete; nothing to do" in caplog.text
    assert tree_hashes(tmp_path) == before


def test_calibrate_resume_against_other_settings_names_them(tiny_llama, tmp_path):
    store = tmp_path / "cov.h5"
    run_cli("calibrate", tiny_llama, *CALIBRATION, "--out", store)
    before = tree_hashes(tmp_path)
    other = [*CALIBRATION[:-1], "2"]  # --batch-size 2
    message = cli_error("calibrate", tiny_llama, *other, "--out", store, "--resume")
    assert "other calibration settings (batch_size)" in message and "--resume" in message
    assert tree_hashes(tmp_path) == before


def test_a_data_file_that_is_not_json_fails_before_the_memory_plan(tiny_llama, tmp_path):
    data = tmp_path / "bad.jsonl"
    data.write_text('{"text": "fine"}\nnot json\n')
    for command in ("convert", "calibrate"):
        result = CliRunner().invoke(main, [command, str(tiny_llama), "--data", str(data), "--out", str(tmp_path / "o")])
        assert result.exit_code == 1
        assert "bad.jsonl:2: not valid JSON" in result.stderr and "memory plan" not in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl"]


def test_whitespace_is_no_calibration_text(tiny_llama, tmp_path):
    data = tmp_path / "blank.txt"
    data.write_text(" \n\t\n   \n")
    message = cli_error("calibrate", tiny_llama, "--data", data, "--out", tmp_path / "c.h5")
    assert "blank.txt: no text (only whitespace)" in message
    assert not (tmp_path / "c.h5").exists()
