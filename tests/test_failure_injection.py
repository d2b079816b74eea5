"""A full disk at every write point of every command: one line naming the cause, and nothing left behind.

Each case makes one write fail with ENOSPC (a disk that fills up mid-run) — the store created, a layer
written, hidden states spilled, a shard half written, the adapter, the report, the bundled store, the plots,
the final rename — and checks that the command exits 1 with one error line and that the output's folder
holds nothing new: no partial store, staging folder, spill folder, lock or hidden store, and no parent folder
the run made. Plus SIGTERM, which stops a run as Ctrl-C does.
"""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from corda_surgery.calib.data import CalibrationSpec
from corda_surgery.export.merge import merge_adapter
from corda_surgery.surgery.calibration import calibrate
from corda_surgery.surgery.options import SurgeryOptions
from corda_surgery.surgery.run import decompose_checkpoint
from tests.helpers import cli_error
from tests.models import save_tiny_model

SPEC = CalibrationSpec("gsm8k", samples=8, seq_len=32, batch_size=4)
FAST = ["--samples", "8", "--seq-len", "16", "--batch-size", "4"]
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("inputs")
    model = save_tiny_model(root / "model", "llama", layers=2)
    store = calibrate(model, SPEC, root / "cov.h5", progress=False)
    surgery = decompose_checkpoint(model, root / "surgery", SurgeryOptions.of(rank=4), stores=[store], progress=False)
    merged = merge_adapter(surgery, surgery / "adapter", root / "merged", progress=False)
    return {"model": model, "store": store, "surgery": surgery, "merged": merged}


COMMANDS: dict[str, Callable[[dict[str, Path], Path], list]] = {
    "calibrate": lambda w, o: ["calibrate", w["model"], *FAST, "--max-memory", "1KB", "--out", o / "c.h5"],
    "decompose": lambda w, o: [
        "decompose",
        w["model"],
        "--covariances",
        w["store"],
        "--rank",
        "4",
        "--max-shard-size",
        "100KB",
        "--out",
        o / "out",
    ],
    "convert": lambda w, o: ["convert", w["model"], *FAST, "--rank", "4", "--out", o / "out"],
    "convert --keep-covariances": lambda w, o: [
        "convert",
        w["model"],
        *FAST,
        "--rank",
        "4",
        "--keep-covariances",
        "--out",
        o / "out",
    ],
    "merge": lambda w, o: ["merge", w["surgery"], "--out", o / "out"],
    "to-lora": lambda w, o: [
        "to-lora",
        w["surgery"],
        w["surgery"] / "adapter",
        "--base",
        w["model"],
        "--out",
        o / "out",
    ],
    "export-onnx": lambda w, o: ["export-onnx", w["merged"], "--out", o / "out"],
    "inspect": lambda w, o: ["inspect", w["store"], "--model", w["model"], "--rank", "4", "--plot", o / "plots"],
}

# (command, where the write fails, the n-th call that fails, a text the call's arguments must contain)
POINTS: dict[str, tuple[str, str, int, str]] = {
    "calibrate: store created": ("calibrate", "h5py.File", 1, ""),
    "calibrate: second layer written": ("calibrate", "corda_surgery.calib.store.StoreWriter._write_layer", 2, ""),
    "calibrate: hidden states spilled": ("calibrate", "corda_surgery.calib.activations.Activations._spill", 3, ""),
    "calibrate: final rename": ("calibrate", "os.replace", 1, "c.h5'"),
    "decompose: first shard": ("decompose", "corda_surgery.checkpoint.writer._stream_tensors", 1, ""),
    "decompose: a later shard": ("decompose", "corda_surgery.checkpoint.writer._stream_tensors", 3, ""),
    "decompose: tokenizer files": ("decompose", "shutil.copy2", 2, ""),
    "decompose: adapter": ("decompose", "corda_surgery.export.peft_adapter.save_file", 1, ""),
    "decompose: report": ("decompose", "pathlib.Path.write_text", 1, "/surgery.json"),
    "decompose: adapter provenance": ("decompose", "pathlib.Path.write_text", 1, "corda_surgery.json"),
    "decompose: final rename": ("decompose", "os.replace", 1, "out'"),
    "convert: second block spilled": ("convert", "corda_surgery.calib.store.StoreWriter._write_layer", 2, ""),
    "convert: second block finished": ("convert", "corda_surgery.surgery.resume._write_atomically", 2, "layer-"),
    "convert: first shard": ("convert", "corda_surgery.checkpoint.writer._stream_tensors", 1, ""),
    "convert --keep-covariances: second layer stored": (
        "convert --keep-covariances",
        "corda_surgery.calib.store.StoreWriter._write_layer",
        3,  # block 0 into the store, then into its one-block store, then block 1 into the store
        "",
    ),
    "convert --keep-covariances: store bundled": (
        "convert --keep-covariances",
        "corda_surgery.surgery.writer._link_or_copy",
        1,
        "",
    ),
    "convert: final rename": ("convert", "os.replace", 1, "out'"),
    "merge: first shard": ("merge", "corda_surgery.checkpoint.writer._stream_tensors", 1, ""),
    "merge: tokenizer files": ("merge", "shutil.copy2", 1, ""),
    "merge: final rename": ("merge", "os.replace", 1, "out'"),
    "to-lora: adapter weights": ("to-lora", "corda_surgery.export.peft_adapter.save_file", 1, ""),
    "to-lora: final rename": ("to-lora", "os.replace", 1, "out'"),
    "export-onnx: graph": ("export-onnx", "corda_surgery.export.onnx_export._export_torchscript", 1, ""),
    "export-onnx: tokenizer files": ("export-onnx", "shutil.copy2", 1, ""),
    "inspect: second plot": ("inspect", "matplotlib.figure.Figure.savefig", 2, ""),
}


def _full_disk(original: Callable, nth: int, match: str) -> Callable:
    """``original``, except that its ``nth`` call whose arguments mention ``match`` finds the disk full."""
    calls = []

    def write(*args, **kwargs):
        if match in repr(args):
            calls.append(1)
            if len(calls) == nth:
                paths = [
                    a
                    for a in args
                    if isinstance(a, Path) or (isinstance(a, str) and a.startswith("/") and "\n" not in a)
                ]
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(paths[-1]) if paths else None)
        return original(*args, **kwargs)

    return write


def _listing(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def test_every_command_has_write_points():
    assert {command for command, *_ in POINTS.values()} == set(COMMANDS)


@pytest.mark.parametrize("point", sorted(POINTS))
def test_a_full_disk_at_each_write_point_leaves_nothing(point, world, tmp_path, monkeypatch):
    import matplotlib.figure  # noqa: F401 -- resolvable for monkeypatch

    command, target, nth, match = POINTS[point]
    module, _, attribute = target.rpartition(".")
    owner = _resolve(module)
    monkeypatch.setattr(owner, attribute, _full_disk(getattr(owner, attribute), nth, match))
    before = _listing(tmp_path)
    message = cli_error(*COMMANDS[command](world, tmp_path / "new"))
    assert "No space left on device" in message, message
    assert str(tmp_path) in message or any(str(path) in message for path in world.values()), message
    assert _listing(tmp_path) == before, point


def _resolve(dotted: str):
    """The module or class a dotted name ends in (``corda_surgery.calib.store.StoreWriter``, ``os``)."""
    import importlib

    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            owner = importlib.import_module(".".join(parts[:cut]))
        except ModuleNotFoundError:
            continue
        for name in parts[cut:]:
            owner = getattr(owner, name)
        return owner
    raise ModuleNotFoundError(dotted)


def test_sigterm_stops_a_run_and_cleans_up(world, tmp_path):
    """A decompose stopped by SIGTERM midway: no staging folder, lock or output, and no traceback."""
    patch = (
        "import time, corda_surgery.surgery.initialise as s\n"
        "d = s.decompose_weight\n"
        "def slow(*a, **k):\n    print('working', flush=True); time.sleep(0.5); return d(*a, **k)\n"
        "s.decompose_weight = slow\n"
        "from corda_surgery.cli import main\n"
        f"main(['decompose', {str(world['model'])!r}, '--covariances', {str(world['store'])!r}, '--rank', '4', "
        f"'--out', {str(tmp_path / 'new' / 'out')!r}])\n"
    )
    process = subprocess.Popen(
        [sys.executable, "-c", patch],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=os.environ | {"PYTHONPATH": str(REPO)},
    )
    assert process.stdout is not None and "working" in process.stdout.readline()
    time.sleep(0.2)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode != 0 and "Traceback" not in stderr, stderr
    assert _listing(tmp_path) == [], _listing(tmp_path)
