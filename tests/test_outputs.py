"""Where outputs go: parents created (and removed on failure), one run per output, no stale leftovers,
ordinary permissions; and an installed distribution that claims one import name."""

import json
import os
import stat
import subprocess
import sys

import pytest

from corda_surgery.outputs import OutputError, staged_folder

HOLD_LOCK = (
    "import sys, time\nfrom corda_surgery.outputs import claimed\n"
    "with claimed(sys.argv[1]):\n    print('held', flush=True)\n    time.sleep(120)"
)


def test_missing_parents_are_created_and_removed_again_on_failure(tmp_path):
    out = tmp_path / "a" / "b" / "out"
    with pytest.raises(RuntimeError, match="simulated"), staged_folder(out):
        raise RuntimeError("simulated failure")
    assert list(tmp_path.iterdir()) == []  # neither the output, its staging, its lock nor the new parents
    with staged_folder(out) as staging:
        (staging / "weights").write_text("x")
    assert (out / "weights").read_text() == "x"
    assert sorted(p.name for p in out.parent.iterdir()) == ["out"]


def test_a_second_run_on_the_same_output_refuses_at_once(tmp_path):
    out = tmp_path / "out"
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(OutputError, match="another corda-surgery run is writing"), staged_folder(out):
            pass
    finally:
        holder.kill()
        holder.wait()
    with staged_folder(out):  # a killed holder's lock dies with it
        pass
    assert out.is_dir()


def test_stale_staging_of_a_killed_run_is_removed_and_said(tmp_path, caplog):
    stale = tmp_path / ".out.partial-k1ll3d"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"\0" * 4096)
    retired = tmp_path / ".out.old-k1ll3d"
    retired.mkdir()
    unrelated = tmp_path / ".other.partial-abc"
    unrelated.mkdir()
    with caplog.at_level("WARNING"), staged_folder(tmp_path / "out"):
        pass
    assert not stale.exists() and not retired.exists() and unrelated.exists()
    assert f"removed {stale}" in caplog.text and "left by an interrupted run" in caplog.text


def test_finished_outputs_get_the_permissions_of_the_umask(tmp_path):
    previous = os.umask(0o022)
    try:
        with staged_folder(tmp_path / "out") as staging:
            (staging / "adapter").mkdir()
    finally:
        os.umask(previous)
    for folder in (tmp_path / "out", tmp_path / "out" / "adapter"):
        assert stat.S_IMODE(folder.stat().st_mode) == 0o755, folder


def test_installed_distribution_claims_only_corda_surgery(tmp_path):
    """calib and export are taken names on the package index: installed, they live under corda_surgery."""
    code = (
        "import importlib.util as u, json\n"
        "names = ('calib', 'export', 'calib', 'export')\n"
        "from corda_surgery.calib.data import builtin_sets\n"
        "print(json.dumps({'found': [u.find_spec(n) is not None for n in names], 'sets': builtin_sets()}))"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["found"] == [False, False, True, True]
    assert report["sets"] == ["alpaca", "code_alpaca", "gsm8k", "nq_open", "triviaqa"]
