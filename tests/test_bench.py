"""The benchmark scripts that run where the suite cannot (a GPU) still run: their CPU dry runs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_the_gpu_acceptance_script_runs_every_step_on_the_cpu(tmp_path):
    out = tmp_path / "gpu_check.json"
    done = subprocess.run(
        [sys.executable, "bench/gpu_check.py", "--dry-run", "--out", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    record = json.loads(out.read_text())
    figures = record["figures"]
    assert figures["convert"]["store_relative_difference_device_vs_cpu"] == 0.0  # the CPU against itself
    assert figures["onnx"]["provider"] == "CPUExecutionProvider" and figures["onnx"]["greedy_match"]
    assert figures["big_layer"]["peak_gib"] > 0 and len(record["rows"]) == 7
    assert record["command"] == "python bench/gpu_check.py --dry-run"


def test_big_layer_measures_each_phase_against_its_plan(tmp_path):
    """`bench/big_layer.py` on a tiny Llama, both ways and under a memory budget: each phase's peak (the kernel's
    high-water mark, reset as the phase starts) beside the plan the command printed, and the budget's output
    against the first."""
    results, kept = tmp_path / "big_layer.jsonl", tmp_path / "unbounded"
    command = [sys.executable, "bench/big_layer.py", "--shape", "tiny", "--layers", "2", "--results", str(results)]
    budget = ["--memory-budget", "64GiB", "--against", str(kept)]
    for extra in (["--keep-output", str(kept)], ["--two-passes"], budget):
        done = subprocess.run(
            [*command, *extra],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert done.returncode == 0, done.stderr[-3000:]
    one, two, bounded = map(json.loads, results.read_text().splitlines())
    assert bounded["memory_budget"] == "64GiB" and bounded["largest_difference"] <= 1e-6
    assert set(one["peak_rss_gib"]) == {"setup+capture", "calibration + decomposition", "writing"}
    assert {"calibrate: calibration", "decompose: decomposition + writing"} <= set(two["peak_rss_gib"])
    for run in (one, two):
        assert {"capture", "calibration", "decomposition", "peak RAM"} <= set(run["plan_gib"])
        assert all(peak > 0 for peak in run["peak_rss_gib"].values())
