"""Long commands rerun with --resume: a finished store is kept as it is; a bad data file fails before the plan."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from corda_surgery.cli import main
from tests.helpers import cli_error, datasets, figures_close, run_cli, tree_hashes
from tests.test_reliability import REPO, _run_killed

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


KILLED = {  # where a run is SIGKILLed: a patch applied before it starts
    "mid-calibration": """
from corda_surgery.checkpoint.view import ModelView
load = ModelView.load_block
def patched(self, index):
    if index == 2: die()
    return load(self, index)
ModelView.load_block = patched
""",
    "mid-decomposition": """
from corda_surgery.surgery.initialise import Initialiser
call, calls = Initialiser.__call__, []
def patched(self, weight, target):
    calls.append(1)
    if len(calls) == 9: die()
    return call(self, weight, target)
Initialiser.__call__ = patched
""",
    "mid-shards": """
import corda_surgery.checkpoint.writer as writer
stream, files = writer._stream_tensors, []
def patched(path, *args):
    files.append(path)
    if len(files) == 2: die()
    return stream(path, *args)
writer._stream_tensors = patched
""",
    "final writes": """
import corda_surgery.surgery.writer as writer
writer.write_adapter = lambda *args: die()
""",
}
OPTIONS = "SurgeryOptions.of(rank=4, base_name='me/residual', max_shard_size=200_000)"
# a 4-bit residual: quantised and refit as the writer takes each result, from factors saved before the refit
NF4_OPTIONS = OPTIONS.replace("rank=4,", "rank=4, residual='nf4',")


def _same_output(one: Path, other: Path) -> None:
    """Every file the same bytes; surgery.json the same less versions and the output's own path, its figures to
    float rounding."""
    files = sorted(p.relative_to(one) for p in one.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(other) for p in other.rglob("*") if p.is_file())
    for name in files:
        if name.name == "surgery.json":
            first, second = (json.loads((root / name).read_text().replace(str(root), "OUT")) for root in (one, other))
            assert first.pop("versions") and second.pop("versions") and first == figures_close(second)
        elif name.suffix == ".h5":  # a resumed store holds the same data and attributes, laid out otherwise
            stores = [datasets(root / name) for root in (one, other)]
            assert stores[0].keys() == stores[1].keys()
            for key, (data, attrs) in stores[0].items():
                assert np.array_equal(data, stores[1][key][0]) and attrs == stores[1][key][1], key
        else:
            assert (one / name).read_bytes() == (other / name).read_bytes(), name


@pytest.mark.parametrize(
    ("command", "point", "options"),
    [
        (command, point, OPTIONS)
        for command in ("decompose", "convert")
        for point in KILLED
        if (command, point) not in {("decompose", "mid-calibration"), ("convert", "mid-shards")}
    ]
    + [("convert", "mid-decomposition", NF4_OPTIONS)],
    ids=lambda value: "nf4" if value == NF4_OPTIONS else None if value == OPTIONS else value,
)
def test_a_killed_run_resumes_to_the_uninterrupted_output(tiny_llama, tmp_path, command, point, options):
    """Three kill points a command (decompose calibrates nothing; convert writes its shards the same way)."""
    store = tmp_path / "cov.h5"
    spec = "CalibrationSpec('gsm8k', samples=8, seq_len=32, batch_size=4)"
    if command == "decompose":
        run_cli("calibrate", tiny_llama, *CALIBRATION, "--out", store)
        call = f"decompose_checkpoint({str(tiny_llama)!r}, OUT, {options}, stores=[{str(store)!r}], progress=False"
    else:
        call = f"convert_checkpoint({str(tiny_llama)!r}, OUT, {spec}, {options}, progress=False"
    body = (
        "from corda_surgery.calib.data import CalibrationSpec\n"
        "from corda_surgery.surgery import SurgeryOptions, convert_checkpoint, decompose_checkpoint\n"
    )
    whole = subprocess.run(
        [sys.executable, "-c", body + call.replace("OUT", repr(str(tmp_path / "one"))) + ")"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert whole.returncode == 0, whole.stderr
    out = tmp_path / "two"
    killed = _run_killed(KILLED[point], body + call.replace("OUT", repr(str(out))) + ")")
    assert killed.returncode == -9, killed.stderr
    assert not out.exists()
    resumed = subprocess.run(
        [sys.executable, "-c", body + call.replace("OUT", repr(str(out))) + ", resume=True)"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert resumed.returncode == 0, resumed.stderr
    if point == "mid-decomposition":
        assert "resuming: 8 target(s) already decomposed" in resumed.stderr
    _same_output(tmp_path / "one", out)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # nothing left beside


def test_resume_against_other_options_names_what_differs(tiny_llama, tmp_path):
    store = tmp_path / "cov.h5"
    run_cli("calibrate", tiny_llama, *CALIBRATION, "--out", store)
    body = (
        "from corda_surgery.surgery import SurgeryOptions, decompose_checkpoint\n"
        f"decompose_checkpoint({str(tiny_llama)!r}, {str(tmp_path / 'o')!r}, SurgeryOptions.of(rank=4), "
        f"stores=[{str(store)!r}], progress=False)"
    )
    assert _run_killed(KILLED["mid-decomposition"], body).returncode == -9
    message = cli_error(
        "decompose", tiny_llama, "--covariances", store, "--rank", "8", "--resume", "--out", tmp_path / "o"
    )
    assert "differs in options.alpha, options.rank" in message and "--resume" in message
    assert not (tmp_path / "o").exists()


def test_convert_resume_on_a_finished_output_has_nothing_to_do(tiny_llama, tmp_path, caplog):
    """With the calibration's automatic choices (chat template) resolved in the store, the same command rerun
    with --resume finds the output finished: exit 0, nothing touched."""
    out = tmp_path / "out"
    run_cli("convert", tiny_llama, *CALIBRATION, "--rank", "4", "--out", out)
    before = tree_hashes(tmp_path)
    again = run_cli("convert", tiny_llama, *CALIBRATION, "--rank", "4", "--out", out, "--resume")
    assert again.exit_code == 0 and "already complete; nothing to do" in caplog.text
    assert tree_hashes(tmp_path) == before
    message = cli_error("convert", tiny_llama, *CALIBRATION, "--rank", "8", "--out", out, "--resume")
    assert "differs in" in message and "options.rank" in message
