"""One rank against two on this machine: the README's convert (embedded SmolLM2-135M, default calibration),
each rank one thread, started by torchrun with the gloo backend.

Reports wall time, both runs' phase times (calibration and decomposition, from the progress bars' final
lines) and whether the two outputs hold the same tensors.

    python bench/distributed.py [--ranks 2]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.helpers import relative, tensors  # noqa: E402


def timed(command: list[str], env: dict) -> tuple[float, dict[str, float]]:
    """Wall seconds, and the elapsed time of the 'blocks' and 'tensors' progress bars (rank 0's)."""
    started = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - started
    if result.returncode:
        raise SystemExit(f"{' '.join(command)} failed:\n{result.stderr[-3000:]}")
    phases = {}
    for bar, phase in (("blocks", "calibration"), ("tensors", "decomposition and writing")):
        found = re.findall(rf"{bar}: 100%\|[^|]*\| \d+/\d+ \[(\d+):(\d+)<", result.stderr)
        if found:
            minutes, seconds = found[-1]
            phases[phase] = int(minutes) * 60 + int(seconds)
    return wall, phases


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ranks", type=int, default=2)
    settings = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="distributed-bench-"))
    bin_dir = Path(sys.executable).parent
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    subprocess.run([str(bin_dir / "corda-surgery"), "convert", "--out", str(work / "warm"), "--samples", "1",
                    "--seq-len", "8"], check=True, capture_output=True, env=env)  # fmt: skip  # fills the GGUF cache
    one_wall, one_phases = timed([str(bin_dir / "corda-surgery"), "convert", "--out", str(work / "one")], env)
    many_wall, many_phases = timed([str(bin_dir / "torchrun"), "--standalone", f"--nproc-per-node={settings.ranks}",
                                    "-m", "corda_surgery", "convert", "--out", str(work / "many")], env)  # fmt: skip
    worst = 0.0
    for folder in ("", "adapter"):
        expected, got = tensors(work / "one" / folder), tensors(work / "many" / folder)
        assert sorted(expected) == sorted(got)
        worst = max([worst, *(relative(got[k], expected[k]) for k in expected)])
    print(json.dumps({
        "threads_per_rank": 1, "ranks": settings.ranks,
        "one_rank": {"wall_s": round(one_wall, 1), **one_phases},
        f"{settings.ranks}_ranks": {"wall_s": round(many_wall, 1), **many_phases},
        "speed_up": round(one_wall / many_wall, 2), "largest_relative_tensor_difference": worst,
    }, indent=2))  # fmt: skip
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
