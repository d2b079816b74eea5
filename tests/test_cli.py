"""The command line end to end on a tiny model: help, calibrate → decompose → inspect, one-line errors."""

import json

from click.testing import CliRunner

from corda_surgery.cli import main


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def test_help_and_version():
    result = run("--help")
    assert result.exit_code == 0 and "knowledge-preserved" in result.output
    for command in ("calibrate", "decompose", "convert", "to-lora", "merge", "export-onnx", "verify-onnx", "inspect"):
        assert run(command, "--help").exit_code == 0, command
    assert "corda-surgery, version" in run("--version").output


def test_pipeline_and_inspect_plots(tiny_llama, tmp_path):
    store = tmp_path / "cov.h5"
    result = run("calibrate", tiny_llama, "--data", "gsm8k", "--samples", 8, "--seq-len", 32, "--batch-size", 4,
                 "--rounds", 2,
                 "--out", store)
    assert result.exit_code == 0, result.output
    out = tmp_path / "out"
    result = run("decompose", tiny_llama, "--covariances", store, "--method", "corda++", "--mode", "ipm",
                 "--rank", 4, "--rank-budget", 4, "--out", out)
    assert result.exit_code == 0, result.output
    assert json.loads((out / "surgery.json").read_text())["method"] == "corda++"
    result = run("inspect", store, "--model", tiny_llama, "--mode", "ipm", "--rank", 4, "--rank-budget", 4,
                 "--plot", tmp_path / "plots")
    assert result.exit_code == 0, result.output
    assert "mean compactness" in result.output
    assert (tmp_path / "plots" / "ranks.png").stat().st_size > 1000


def test_errors_are_one_line_with_nonzero_exit(tiny_llama, tmp_path):
    result = run("decompose", tiny_llama, "--covariances", tmp_path / "missing.h5", "--out", tmp_path / "o")
    assert result.exit_code == 1
    assert result.output.strip().startswith("error:") and "missing.h5" in result.output
    assert "Traceback" not in result.output
