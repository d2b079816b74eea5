"""Fuzzing the readers of files a stranger may hand us: real files, mutated byte by byte.

The safetensors header reader, the covariance store reader and the adapter reader either accept a file or
refuse it with the product's own error naming it; none crashes, hangs or reads outside its file. Each example
runs under an alarm, so a hang fails the test instead of stalling CI; the examples are few and small, so the
whole module runs in well under a minute on two cores.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import signal
from collections.abc import Iterator
from pathlib import Path

import h5py
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from corda_surgery.calib.data import CalibrationSpec
from corda_surgery.calib.store import CovarianceStore, StoreError, check_contained
from corda_surgery.checkpoint.reader import read_safetensors_header
from corda_surgery.errors import CordaSurgeryError
from corda_surgery.export.peft_adapter import read_adapter
from corda_surgery.surgery.calibration import calibrate
from corda_surgery.surgery.options import SurgeryOptions
from corda_surgery.surgery.run import decompose_checkpoint
from tests.models import save_tiny_model

SPEC = CalibrationSpec("gsm8k", samples=4, seq_len=16, batch_size=4)
HANG_SECONDS = 10
FUZZ = settings(
    max_examples=200,
    deadline=None,  # the alarm bounds each example; a deadline would flake on a busy machine
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    database=None,
)


@pytest.fixture(scope="module")
def originals(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("fuzz")
    model = save_tiny_model(root / "model", "llama", layers=1, hidden=32)
    store = calibrate(model, SPEC, root / "cov.h5", progress=False)
    surgery = decompose_checkpoint(model, root / "surgery", SurgeryOptions.of(rank=2), stores=[store], progress=False)
    return {"weights": model / "model.safetensors", "store": store, "adapter": surgery / "adapter"}


@contextlib.contextmanager
def no_hang() -> Iterator[None]:
    def hung(signum, frame):
        raise TimeoutError(f"a reader ran longer than {HANG_SECONDS} s")

    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(HANG_SECONDS)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def _header_length(raw: bytes) -> int:
    return 8 + int.from_bytes(raw[:8], "little")


@st.composite
def mutations(draw, size: int, hot: int) -> tuple[list[tuple[int, int]], int | None]:
    """Byte overwrites, most of them in the first ``hot`` bytes (headers, metadata), and maybe a truncation."""
    count = draw(st.integers(1, 8))
    spots = [draw(st.one_of(st.integers(0, hot - 1), st.integers(0, size - 1))) for _ in range(count)]
    edits = [(spot, draw(st.integers(0, 255))) for spot in spots]
    cut = draw(st.one_of(st.none(), st.integers(0, size - 1)))
    return edits, cut


def _mutated(raw: bytes, edits: list[tuple[int, int]], cut: int | None) -> bytes:
    data = bytearray(raw)
    for spot, value in edits:
        data[spot] = value
    return bytes(data[:cut] if cut is not None else data)


def _edits(original: Path, hot: int):
    size = original.stat().st_size
    return mutations(size, min(hot, size))


@FUZZ
@given(data=st.data())
def test_safetensors_header_reader_accepts_or_refuses(originals, tmp_path_factory, data):
    raw = originals["weights"].read_bytes()
    edits, cut = data.draw(_edits(originals["weights"], _header_length(raw)))
    path = tmp_path_factory.mktemp("weights") / "model.safetensors"
    path.write_bytes(_mutated(raw, edits, cut))
    size = path.stat().st_size
    try:
        with no_hang():
            layout = read_safetensors_header(path)
    except CordaSurgeryError as exc:
        assert str(path) in str(exc)
        return
    for name, location in layout.items():  # what it accepts lies inside the file
        assert 0 <= location.start <= location.end <= size, name


@FUZZ
@given(data=st.data())
def test_store_reader_accepts_or_refuses(originals, tmp_path_factory, data):
    raw = originals["store"].read_bytes()
    edits, cut = data.draw(_edits(originals["store"], 4096))
    path = tmp_path_factory.mktemp("store") / "cov.h5"
    path.write_bytes(_mutated(raw, edits, cut))
    try:
        with no_hang(), CovarianceStore(path) as store:
            with h5py.File(path, "r") as again:
                check_contained(again, path)  # only what reads nothing outside the file gets this far
            for linear in list(store.by_linear)[:4]:
                with contextlib.suppress(StoreError):
                    store.covariance(linear)
    except StoreError as exc:
        assert str(path) in str(exc)


@FUZZ
@given(data=st.data(), target=st.sampled_from(["weights", "config"]))
def test_adapter_reader_accepts_or_refuses(originals, tmp_path_factory, data, target):
    folder = shutil.copytree(originals["adapter"], tmp_path_factory.mktemp("adapter") / "adapter")
    name = "adapter_model.safetensors" if target == "weights" else "adapter_config.json"
    original = folder / name
    raw = original.read_bytes()
    if target == "weights":
        edits, cut = data.draw(_edits(original, _header_length(raw)))
        original.write_bytes(_mutated(raw, edits, cut))
    else:
        config = json.loads(raw)
        key = data.draw(st.sampled_from(sorted(config)))
        config[key] = data.draw(
            st.recursive(
                st.none() | st.booleans() | st.integers() | st.text(max_size=8),
                lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
                max_leaves=6,
            )
        )
        original.write_text(json.dumps(config))
    try:
        with no_hang():
            read_adapter(folder)
    except CordaSurgeryError as exc:
        assert str(folder) in str(exc)
