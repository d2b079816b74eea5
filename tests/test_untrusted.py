"""Files from strangers: a covariance store reads only itself, and a run that did nothing is no success.

Each crafted store would, without its check, make ``decompose`` read another file's bytes (or inflate a
compressed bomb) and exit 0; each is refused in one line naming the entry, before any dataset is read,
with nothing written beside the output.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
from click.testing import CliRunner
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from corda_surgery.calib.data import CalibrationSpec
from corda_surgery.calib.store import CovarianceStore, StoreError
from corda_surgery.cli import main
from corda_surgery.surgery.calibration import calibrate
from tests.helpers import cli_error, run_cli, tree_hashes
from tests.models import save_tiny_model

SPEC = CalibrationSpec("gsm8k", samples=8, seq_len=32, batch_size=4)
ENTRY = "model.layers.0.self_attn.o_proj"
FAST = ["--samples", "4", "--seq-len", "16"]
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("untrusted")
    model = save_tiny_model(root / "model", "llama", layers=2)
    return model, calibrate(model, SPEC, root / "cov.h5", progress=False)


def _replace(handle: h5py.File, name: str, make) -> None:
    """Replace dataset ``name`` by what ``make(handle, name, data)`` puts there, keeping its attributes."""
    data, attrs = handle[name][()], dict(handle[name].attrs)
    del handle[name]
    make(handle, name, data)
    handle[name].attrs.update(attrs)  # through a link: on its target, so only the check stands in the way


def _external_storage(handle, name, data):
    raw = Path(handle.filename).with_name("elsewhere.bin")
    data.astype("<f8").tofile(raw)
    handle.create_dataset(name, shape=data.shape, dtype="<f8", external=[(str(raw), 0, data.nbytes)])


def _elsewhere(handle, data) -> str:
    other = Path(handle.filename).with_name("elsewhere.h5")
    with h5py.File(other, "w") as elsewhere:
        elsewhere.create_dataset("x", data=data)
    return str(other)


def _external_link(handle, name, data):
    handle[name] = h5py.ExternalLink(_elsewhere(handle, data), "/x")


def _virtual(handle, name, data):
    layout = h5py.VirtualLayout(shape=data.shape, dtype=data.dtype)
    layout[:] = h5py.VirtualSource(_elsewhere(handle, data), "x", shape=data.shape)
    handle.create_virtual_dataset(name, layout)


def _soft_link(handle, name, data):
    handle.create_dataset("hidden", data=data)
    handle[name] = h5py.SoftLink("/hidden")


def _unknown_filter(handle, name, data):
    handle.create_dataset(name, data=data, chunks=data.shape, compression=32123, allow_unknown_filter=True)


def _bomb(handle, name, data):
    """gzip of zeros: a few kB on disk, 20 GB once read."""
    handle.create_dataset(name, data=data)
    handle.create_dataset("bomb", shape=(50_000, 50_000), dtype="f8", chunks=(1000, 1000), compression="gzip")
    handle["bomb"][:1000, :1000] = 0.0
    handle["bomb"].attrs.update(layer=0, linears='["unused"]', count=1)


def _integers(handle, name, data):
    handle.create_dataset(name, data=data.astype(np.int64))


def _big_chunks(handle, name, data):
    handle.create_dataset(name, data=data, chunks=(1 << 20,) * data.ndim, maxshape=(None,) * data.ndim)


CRAFTED = {
    "external raw storage": (_external_storage, [ENTRY, "another file", "elsewhere.bin"]),
    "external link": (_external_link, [ENTRY, "ExternalLink", "elsewhere.h5"]),
    "virtual dataset": (_virtual, [ENTRY, "virtual dataset"]),
    "soft link": (_soft_link, [ENTRY, "SoftLink"]),
    "unknown filter": (_unknown_filter, [ENTRY, "filters this tool does not write"]),
    "gzip bomb": (_bomb, ["bomb", "filters this tool does not write", "deflate"]),
    "integer data": (_integers, [ENTRY, "int64"]),
    "chunks larger than the data": (_big_chunks, [ENTRY, "chunks"]),
}


def _crafted(store: Path, folder: Path, make) -> Path:
    copy = folder / "crafted.h5"
    shutil.copy2(store, copy)
    with h5py.File(copy, "a") as handle:
        _replace(handle, ENTRY, make)
    return copy


@pytest.mark.parametrize("case", sorted(CRAFTED))
def test_crafted_store_is_refused_before_any_data_is_read(case, inputs, tmp_path, monkeypatch):
    model, store = inputs
    make, culprits = CRAFTED[case]
    crafted = _crafted(store, tmp_path, make)
    reads: list[str] = []
    original = h5py.Dataset.__getitem__

    def spy(self, *args, **kwargs):
        reads.append(self.name)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(h5py.Dataset, "__getitem__", spy)
    before, listing = tree_hashes(tmp_path, model), sorted(p.name for p in tmp_path.iterdir())
    message = cli_error("decompose", model, "--covariances", crafted, "--rank", "4", "--out", tmp_path / "out")
    for culprit in culprits:
        assert culprit in message, message
    assert "refused before reading" in message
    assert reads == []
    assert tree_hashes(tmp_path, model) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == listing


@pytest.mark.parametrize("case", ["external raw storage", "external link"])
def test_crafted_store_is_refused_by_inspect_and_the_library(case, inputs, tmp_path):
    model, store = inputs
    crafted = _crafted(store, tmp_path, CRAFTED[case][0])
    assert ENTRY in cli_error("inspect", crafted, "--model", model)
    with pytest.raises(StoreError, match=ENTRY):
        CovarianceStore(crafted)


def test_missing_sampling_round_is_refused_when_opened(inputs, tmp_path):
    _, store = inputs
    copy = tmp_path / "rounds.h5"
    shutil.copy2(store, copy)
    with h5py.File(copy, "a") as handle:
        handle[ENTRY].attrs["round_counts"] = f"[{int(handle[ENTRY].attrs['count'])}]"
    with pytest.raises(StoreError, match=f"{ENTRY}@round0 is missing"):
        CovarianceStore(copy)


def test_untouched_store_still_decomposes(inputs, tmp_path):
    model, store = inputs
    result = run_cli("decompose", model, "--covariances", store, "--rank", "4", "--out", tmp_path / "out")
    assert result.exit_code == 0, result.output


# ---- a success means the work was done ----


def _relabelled(store: Path, folder: Path, keep: int) -> Path:
    """A copy whose entries after the first ``keep`` name linears this model does not have."""
    copy = folder / "relabelled.h5"
    shutil.copy2(store, copy)
    with h5py.File(copy, "a") as handle:
        for name in sorted(n for n in handle if "@round" not in n)[keep:]:
            handle[name].attrs["linears"] = json.dumps([f"elsewhere.{name}"])
    return copy


def test_decompose_with_a_store_that_covers_no_target_fails(inputs, tmp_path):
    model, store = inputs
    relabelled = _relabelled(store, tmp_path, keep=0)
    message = cli_error("decompose", model, "--covariances", relabelled, "--rank", "4", "--out", tmp_path / "out")
    assert "relabelled.h5" in message and "no covariance for any" in message and "adapt nothing" in message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["relabelled.h5"]


def test_a_partial_surgery_says_so_in_its_summary(inputs, tmp_path):
    model, store = inputs
    relabelled = _relabelled(store, tmp_path, keep=3)
    result = run_cli("decompose", model, "--covariances", relabelled, "--rank", "4", "--out", tmp_path / "out")
    assert result.exit_code == 0, result.output
    summary = next(line for line in result.stdout.splitlines() if line.startswith("adapted:"))
    assert "left out (e.g. model.layers." in summary and "never called" in summary, summary
    complete = run_cli("decompose", model, "--covariances", store, "--rank", "4", "--out", tmp_path / "whole")
    assert "adapted:        14 target(s)\n" in complete.stdout


@pytest.mark.parametrize("command", ["calibrate", "convert"])
def test_whitespace_only_text_is_refused_before_any_forward(command, inputs, tmp_path, monkeypatch):
    import corda_surgery.calib.stream

    model, _ = inputs
    data = tmp_path / "blank.txt"
    data.write_text("  \n\t\n   \n" * 100)
    forwards: list[int] = []
    monkeypatch.setattr(corda_surgery.calib.stream, "stream_covariances", lambda *args, **kwargs: forwards.append(1))
    message = cli_error(command, model, "--data", data, "--out", tmp_path / "out")
    assert "blank.txt" in message and "only whitespace" in message
    assert forwards == [] and sorted(p.name for p in tmp_path.iterdir()) == ["blank.txt"]


def test_an_adapter_without_factors_is_refused(inputs, tmp_path):
    model, store = inputs
    surgery = tmp_path / "surgery"
    assert run_cli("decompose", model, "--covariances", store, "--rank", "4", "--out", surgery).exit_code == 0
    empty = shutil.copytree(surgery / "adapter", tmp_path / "empty")
    save_file({}, empty / "adapter_model.safetensors")
    message = cli_error("merge", surgery, "--adapter", empty, "--out", tmp_path / "merged")
    assert "adapter_model.safetensors" in message and "adapts nothing" in message
    assert not (tmp_path / "merged").exists()


# ---- the operating system's refusals are input errors: one line naming the path, exit 1 ----


def _loop(folder: Path) -> Path:
    """A symlink that points at itself through a second one."""
    (folder / "loop-b").symlink_to(folder / "loop")
    (folder / "loop").symlink_to(folder / "loop-b")
    return folder / "loop"


LOOPS = {
    "calibrate model": lambda m, s, loop, t: ["calibrate", loop, "--out", t / "c.h5"],
    "calibrate data": lambda m, s, loop, t: ["calibrate", m, "--data", loop, "--out", t / "c.h5"],
    "calibrate out": lambda m, s, loop, t: ["calibrate", m, "--out", loop],
    "decompose model": lambda m, s, loop, t: ["decompose", loop, "--covariances", s, "--out", t / "o"],
    "decompose store": lambda m, s, loop, t: ["decompose", m, "--covariances", loop, "--out", t / "o"],
    "decompose out": lambda m, s, loop, t: ["decompose", m, "--covariances", s, "--rank", "4", "--out", loop],
    "convert model": lambda m, s, loop, t: ["convert", loop, "--out", t / "o"],
    "convert data": lambda m, s, loop, t: ["convert", m, "--data", loop, "--out", t / "o"],
    "inspect model": lambda m, s, loop, t: ["inspect", s, "--model", loop],
    "to-lora base": lambda m, s, loop, t: ["to-lora", t, t, "--base", loop, "--out", t / "l"],
}


@pytest.mark.parametrize("case", sorted(LOOPS))
def test_a_symlink_loop_is_one_line_naming_it(case, inputs, tmp_path):
    model, store = inputs
    loop = _loop(tmp_path)
    message = cli_error(*LOOPS[case](model, store, loop, tmp_path))
    assert str(loop) in message and "Too many levels of symbolic links" in message, message
    assert "bug" not in message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["loop", "loop-b"]


@pytest.mark.parametrize("where", ["out", "out folder", "data", "store", "model"])
def test_a_name_too_long_is_one_line_naming_it(where, inputs, tmp_path):
    model, store = inputs
    long = tmp_path / ("x" * 300)
    args = {
        "out": ["calibrate", model, "--out", long],
        "out folder": ["decompose", model, "--covariances", store, "--rank", "4", "--out", long / "o"],
        "data": ["calibrate", model, "--data", f"{long}.jsonl", "--out", tmp_path / "c.h5"],
        "store": ["decompose", model, "--covariances", long, "--out", tmp_path / "o"],
        "model": ["decompose", long, "--covariances", store, "--out", tmp_path / "o"],
    }[where]
    message = cli_error(*args)
    assert "x" * 300 in message and "File name too long" in message and "bug" not in message, message
    assert list(tmp_path.iterdir()) == []


def _without_dac_override() -> list[str]:
    """A prefix under which permission bits bind: none needed for other users; for root, a user namespace in
    which root is not mapped (so mode 000 stops it, as it stops anyone)."""
    if os.geteuid() != 0:
        return []
    if shutil.which("unshare") is None or subprocess.run(["unshare", "-U", "true"]).returncode != 0:
        pytest.skip("running as root without user namespaces: permission bits do not bind")
    return ["unshare", "-U"]


def _unreadable(source: Path, folder: Path, name: str) -> tuple[Path, Path]:
    copy = shutil.copytree(source, folder / source.name) if source.is_dir() else shutil.copy2(source, folder)
    culprit = Path(copy) / name if name else Path(copy)
    culprit.chmod(0)
    return Path(copy), culprit


PERMISSIONS = {
    "config.json": ("model", "config.json"),
    "model.safetensors": ("model", "model.safetensors"),
    "tokenizer.json": ("model", "tokenizer.json"),
    "the store": ("store", ""),
    "the adapter's weights": ("surgery", "adapter/adapter_model.safetensors"),
    "the data file": ("data", ""),
    "the output's folder": ("folder", ""),
}


@pytest.mark.parametrize("case", sorted(PERMISSIONS))
def test_permission_denied_is_one_line_naming_the_path(case, inputs, tmp_path):
    model, store = inputs
    prefix = _without_dac_override()
    kind, name = PERMISSIONS[case]
    data = tmp_path / "sources" / "data.jsonl"
    data.parent.mkdir()
    data.write_text('{"text": "hello world"}\n')
    if kind == "surgery":
        surgery = tmp_path / "sources" / "surgery"
        assert run_cli("decompose", model, "--covariances", store, "--rank", "4", "--out", surgery).exit_code == 0
        _, culprit = _unreadable(surgery / "adapter", tmp_path, "adapter_model.safetensors")
        args = ["merge", surgery, "--adapter", culprit.parent, "--out", tmp_path / "out"]
    elif kind == "folder":
        culprit = tmp_path / "read-only"
        culprit.mkdir(mode=0o555)
        args = ["calibrate", model, "--samples", "2", "--seq-len", "8", "--out", culprit / "out"]
    else:
        copy, culprit = _unreadable({"model": model, "store": store, "data": data}[kind], tmp_path, name)
        args = {
            "model": ["calibrate", copy, "--data", data, "--samples", "2", "--seq-len", "8", "--out", tmp_path / "o"],
            "store": ["decompose", model, "--covariances", copy, "--rank", "4", "--out", tmp_path / "o"],
            "data": ["calibrate", model, "--data", copy, "--samples", "2", "--seq-len", "8", "--out", tmp_path / "o"],
        }[kind]
    listing = sorted(p.name for p in tmp_path.iterdir())
    done = subprocess.run(
        [*prefix, sys.executable, "-m", "corda_surgery", *map(str, args)],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=os.environ | {"PYTHONPATH": str(REPO)},
        timeout=300,
    )
    lines = [line for line in done.stderr.splitlines() if line.startswith(("error:", "Error:", "Traceback"))]
    assert done.returncode in (1, 2) and len(lines) == 1, done.stderr
    assert str(culprit.name) in lines[0] and ("Permission denied" in lines[0] or "not readable" in lines[0]), lines
    assert "bug" not in lines[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == listing


def test_convert_that_refuses_a_weight_after_calibrating_leaves_nothing(inputs, tmp_path):
    model, _ = inputs
    copy = shutil.copytree(model, tmp_path / "model")
    weights = load_file(copy / "model.safetensors")
    weights["model.layers.1.mlp.down_proj.weight"][0, 0] = float("nan")  # its output is no block's input
    save_file(weights, copy / "model.safetensors", metadata={"format": "pt"})
    message = cli_error("convert", copy, "--samples", "4", "--seq-len", "16", "--rank", "4", "--out", tmp_path / "o")
    assert "model.layers.1.mlp.down_proj" in message and "NaN" in message, message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


# ---- the same care for every file read from a user: config and tokenizer code, ONNX folders ----


def _with_code(model: Path, folder: Path, config_file: str) -> tuple[Path, Path]:
    """A copy of ``model`` whose ``config_file`` asks, through auto_map, for Python code that leaves a mark."""
    copy = shutil.copytree(model, folder / "model")
    mark = folder / "code-ran"
    (copy / "custom_code.py").write_text(f"open({str(mark)!r}, 'w').write('ran')\n")
    config = json.loads((copy / config_file).read_text())
    if config_file == "config.json":
        config["model_type"] = "custom_code"
        config["auto_map"] = {"AutoConfig": "custom_code.Config", "AutoModelForCausalLM": "custom_code.Model"}
    else:
        config["auto_map"] = {"AutoTokenizer": ["custom_code.Tokenizer", None]}
    (copy / config_file).write_text(json.dumps(config))
    return copy, mark


def test_a_config_asking_for_its_own_code_is_refused_and_never_run(inputs, tmp_path):
    model, _ = inputs
    copy, mark = _with_code(model, tmp_path, "config.json")
    result = CliRunner().invoke(main, ["calibrate", str(copy), "--out", str(tmp_path / "c.h5")], input="y\n")
    assert result.exit_code == 1 and "Do you wish to run" not in result.output, result.output
    assert "config.json" in result.stderr and "never runs (no trust_remote_code)" in result.stderr
    assert not mark.exists() and not (tmp_path / "c.h5").exists()


def test_a_tokenizer_asking_for_its_own_code_never_runs_it(inputs, tmp_path):
    model, _ = inputs
    copy, mark = _with_code(model, tmp_path, "tokenizer_config.json")
    CliRunner().invoke(main, ["calibrate", str(copy), *FAST, "--out", str(tmp_path / "c.h5")], input="y\n")
    assert not mark.exists()


@pytest.fixture(scope="module")
def onnx_folder(inputs, tmp_path_factory) -> Path:
    from corda_surgery.export.merge import merge_adapter
    from corda_surgery.export.onnx_export import export_onnx
    from corda_surgery.surgery.options import SurgeryOptions
    from corda_surgery.surgery.run import decompose_checkpoint

    model, store = inputs
    root = tmp_path_factory.mktemp("onnx")
    surgery = decompose_checkpoint(model, root / "surgery", SurgeryOptions.of(rank=4), stores=[store], progress=False)
    merged = merge_adapter(surgery, surgery / "adapter", root / "merged", progress=False)
    return export_onnx(merged, root / "onnx")


def _relocated(onnx_dir: Path, folder: Path, location: str) -> Path:
    """A copy whose first externally stored tensor names ``location`` for its data."""
    import onnx

    copy = shutil.copytree(onnx_dir, folder / "onnx")
    graph = onnx.load(str(copy / "model.onnx"), load_external_data=False)
    tensor = next(t for t in graph.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL)
    next(entry for entry in tensor.external_data if entry.key == "location").value = location
    onnx.save(graph, str(copy / "model.onnx"))
    return copy


ONNX_CASES = {
    "data outside the folder": lambda d, t: (_relocated(d, t, "../secret.bin"), ["secret.bin", "not a file inside"]),
    "data at an absolute path": lambda d, t: (_relocated(d, t, str(t / "secret.bin")), ["not a file inside"]),
    "graph that is no ONNX": lambda d, t: (_garbled(d, t, "model.onnx", b"\x08\xff" * 64), ["model.onnx"]),
    "run info not JSON": lambda d, t: (_garbled(d, t, "onnx_export.json", b"{"), ["onnx_export.json"]),
    "run info of another shape": lambda d, t: (_garbled(d, t, "onnx_export.json", b'{"dtype": 3}'), ["malformed"]),
}


def _garbled(onnx_dir: Path, folder: Path, name: str, data: bytes) -> Path:
    copy = shutil.copytree(onnx_dir, folder / "onnx")
    (copy / name).write_bytes(data)
    return copy


@pytest.mark.parametrize("case", sorted(ONNX_CASES))
def test_a_strangers_onnx_folder_is_refused_in_one_line(case, onnx_folder, inputs, tmp_path):
    (tmp_path / "secret.bin").write_bytes(bytes(1 << 20))
    folder, culprits = ONNX_CASES[case](onnx_folder, tmp_path)
    message = cli_error("verify-onnx", folder, "--reference", onnx_folder.parent / "merged", "--repeats", "1")
    for culprit in culprits:
        assert culprit in message, message


@pytest.mark.parametrize("shard", ["../elsewhere.safetensors", "/etc/hostname", "sub/model.safetensors"])
def test_an_index_naming_a_shard_outside_the_folder_is_refused(shard, inputs, tmp_path):
    model, _ = inputs
    copy = shutil.copytree(model, tmp_path / "model")
    shutil.copy2(copy / "model.safetensors", tmp_path / "elsewhere.safetensors")
    with safe_open(str(copy / "model.safetensors"), "pt") as handle:
        names = list(handle.keys())
    weight_map = dict.fromkeys(names, "model.safetensors") | {names[0]: shard}
    (copy / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    message = cli_error("calibrate", copy, "--out", tmp_path / "c.h5")
    assert "model.safetensors.index.json" in message and repr(shard) in message, message
