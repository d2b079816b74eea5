"""The command line end to end on a tiny model: help, calibrate → decompose → inspect, one-line errors."""

import json
import os
import platform
import subprocess
import sys

import pytest
from click.testing import CliRunner

from corda_surgery.cli import main
from corda_surgery.errors import CordaSurgeryError
from corda_surgery.memory import huge_pages_environment, transparent_huge_page_mode


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def test_help_and_version():
    result = run("--help")
    assert result.exit_code == 0 and "knowledge-preserved" in result.output
    commands = ("calibrate", "decompose", "convert", "to-lora", "merge", "export-onnx", "export-adapter", "verify-onnx")
    for command in (*commands, "inspect"):
        assert run(command, "--help").exit_code == 0, command
    assert "corda-surgery, version" in run("--version").output


def test_pipeline_and_inspect_plots(tiny_llama, tmp_path):
    store = tmp_path / "cov.h5"
    result = run(
        "calibrate",
        tiny_llama,
        "--data",
        "gsm8k",
        "--samples",
        8,
        "--seq-len",
        32,
        "--batch-size",
        4,
        "--rounds",
        2,
        "--out",
        store,
    )
    assert result.exit_code == 0, result.output
    out = tmp_path / "out"
    result = run(
        "decompose",
        tiny_llama,
        "--covariances",
        store,
        "--method",
        "corda++",
        "--mode",
        "ipm",
        "--rank",
        4,
        "--rank-budget",
        4,
        "--out",
        out,
    )
    assert result.exit_code == 0, result.output
    assert json.loads((out / "surgery.json").read_text())["method"] == "corda++"
    result = run(
        "inspect",
        store,
        "--model",
        tiny_llama,
        "--mode",
        "ipm",
        "--rank",
        4,
        "--rank-budget",
        4,
        "--plot",
        tmp_path / "plots",
    )
    assert result.exit_code == 0, result.output
    assert "mean compactness" in result.output
    assert (tmp_path / "plots" / "ranks.png").stat().st_size > 1000


def test_inspect_shows_the_damping_diagnosis_per_layer(tiny_llama, tmp_path):
    """inspect prints each layer's eigenvalues below the damping level (all tokens, first half) and what limits
    them: with fewer tokens than the inputs are wide, the sample (inspected at rank 4)."""
    store = tmp_path / "few.h5"
    args = ("--data", "gsm8k", "--samples", 4, "--seq-len", 12, "--batch-size", 2, "--out", store)
    assert run("calibrate", tiny_llama, *args).exit_code == 0
    result = run("inspect", store, "--model", tiny_llama, "--mode", "kpm", "--rank", 4)
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    header = next(line.split() for line in lines if "compactness" in line and "uniform" in line)
    rows = [line.split() for line in lines if line.startswith("model.")]
    assert header[-5:] == ["below", "λ", "at", "half", "limit"]
    assert len(rows) == 21 and all(int(row[-2]) > int(row[-3]) >= 4 for row in rows)
    # o_proj reads attention outputs, heads sharing their values: low-rank in structure, not for want of tokens
    assert all(row[-1] == "sample" for row in rows if not row[0].endswith("o_proj"))
    median = tmp_path / "median.h5"  # counted at the median rule: inspected at it, or at no other
    rule = ("--damping-rule", "median-diagonal")
    assert run("calibrate", tiny_llama, *args[:-1], median, *rule).exit_code == 0
    for extra, counted in (((), False), (rule, True)):
        result = run("inspect", median, "--model", tiny_llama, "--mode", "kpm", "--rank", 4, *extra)
        rows = [line.split() for line in result.output.splitlines() if line.startswith("model.")]
        assert all((row[-3] != "-") == counted for row in rows), extra


def test_errors_are_one_line_with_nonzero_exit(tiny_llama, tmp_path):
    result = run("decompose", tiny_llama, "--covariances", tmp_path / "missing.h5", "--out", tmp_path / "o")
    assert result.exit_code == 1
    assert result.output.strip().startswith("error:") and "missing.h5" in result.output
    assert "Traceback" not in result.output


def test_huge_pages_environment_decision():
    glibc = ("glibc", "2.36")
    assert huge_pages_environment({}, glibc, "always [madvise] never")["GLIBC_TUNABLES"] == "glibc.malloc.hugetlb=1"
    kept = huge_pages_environment({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}, glibc, "[always] madvise never")
    assert kept["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"
    assert huge_pages_environment({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, glibc, "[always]") is None
    assert huge_pages_environment({}, glibc, "always madvise [never]") is None
    assert huge_pages_environment({}, ("glibc", "2.31"), "[always]") is None
    assert huge_pages_environment({}, ("", ""), "[always]") is None


@pytest.mark.skipif(
    huge_pages_environment({}, platform.libc_ver(), transparent_huge_page_mode()) is None,
    reason="needs glibc >= 2.35 and transparent huge pages enabled in the kernel",
)
def test_console_entry_restarts_itself_with_huge_page_malloc():
    script = (
        "import os, sys\nfrom corda_surgery.launcher import run\n"
        "print(os.environ.get('GLIBC_TUNABLES'))\nsys.argv = ['corda-surgery', '--version']\nrun()"
    )
    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    lines = result.stdout.splitlines()
    assert result.returncode == 0, result.stderr
    assert lines[:2] == ["None", "glibc.malloc.hugetlb=1"] and lines[2].startswith("corda-surgery, version")


def test_a_bug_shows_its_traceback_and_asks_for_a_report(tiny_llama, tmp_path, monkeypatch):
    import corda_surgery.surgery.run

    def broken(*args, **kwargs):
        raise RuntimeError("internal failure")

    monkeypatch.setattr(corda_surgery.surgery.run, "decompose_checkpoint", broken)
    result = CliRunner().invoke(main, ["decompose", str(tiny_llama), "--method", "pissa", "--out", str(tmp_path / "o")])
    assert result.exit_code == 2
    assert "Traceback" in result.stderr and "RuntimeError: internal failure" in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: this is a bug in corda-surgery")


def test_debug_keeps_the_cause_chain(tiny_llama, tmp_path):
    import shutil

    model = tmp_path / "model"
    shutil.copytree(tiny_llama, model)
    (model / "config.json").write_text("{")
    result = CliRunner().invoke(main, ["--debug", "calibrate", str(model), "--out", str(tmp_path / "c.h5")])
    assert isinstance(result.exception, CordaSurgeryError) and "config.json" in str(result.exception)
    assert isinstance(result.exception.__cause__, json.JSONDecodeError)
