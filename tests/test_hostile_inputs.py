"""Hostile and mistaken inputs, as a table: every command refuses each one with exit code 1 and one line
naming the culprit, before any work; the inputs come out byte for byte unchanged; no output, staging
folder or lock is left behind. Plus a property test: merging an untouched adapter gives back the original
weights for every supported family, and any single corrupted adapter tensor is refused."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from corda_surgery.calib.data import CalibrationSpec
from corda_surgery.calib.packing import packed_width, write_packed
from corda_surgery.export.merge import merge_adapter
from corda_surgery.surgery.calibration import calibrate
from corda_surgery.surgery.options import SurgeryOptions
from corda_surgery.surgery.run import decompose_checkpoint
from tests.helpers import as_format_2, cli_error, relative, run_cli, tensors, tree_hashes
from tests.models import save_tiny_model

SPEC = CalibrationSpec("gsm8k", samples=8, seq_len=32, batch_size=4)
FAST = ["--samples", "4", "--seq-len", "16"]


@dataclass(frozen=True)
class World:
    """Inputs every case may use (read only; hashed around every case)."""

    root: Path
    model: Path
    other_model: Path
    store: Path
    other_store: Path
    surgery: Path
    sibling: Path  # another surgery of the same model, to another output
    merged: Path


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> World:
    root = tmp_path_factory.mktemp("world")
    model = save_tiny_model(root / "model", "llama")
    other = save_tiny_model(root / "other", "llama", seed=7)
    store = calibrate(model, SPEC, root / "cov.h5", progress=False)
    other_store = calibrate(other, SPEC, root / "other.h5", progress=False)
    options = SurgeryOptions.of(rank=4)
    surgery = decompose_checkpoint(model, root / "surgery", options, stores=[store], progress=False)
    sibling = decompose_checkpoint(model, root / "sibling", options, stores=[store], progress=False)
    merged = merge_adapter(surgery, surgery / "adapter", root / "merged", progress=False)
    return World(root, model, other, store, other_store, surgery, sibling, merged)


# ---- helpers that build a damaged copy of an input inside the case's own folder ----


def _copy(source: Path, target: Path) -> Path:
    if source.is_dir():
        shutil.copytree(source, target)
    else:
        shutil.copy2(source, target)
    return target


def _write(path: Path, data: bytes | str) -> Path:
    path.write_bytes(data if isinstance(data, bytes) else data.encode())
    return path


def _fifo(path: Path) -> Path:
    os.mkfifo(path)
    return path


def _edit_config(world: World, tmp: Path, **changes) -> Path:
    model = _copy(world.model, tmp / "model")
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, **changes}))
    return model


def _edit_weights(world: World, tmp: Path, edit: Callable[[dict], None]) -> Path:
    model = _copy(world.model, tmp / "model")
    weights = load_file(model / "model.safetensors")
    edit(weights)
    save_file(weights, model / "model.safetensors", metadata={"format": "pt"})
    return model


def _edit_header(world: World, tmp: Path, edit: Callable[[dict], None]) -> Path:
    """Rewrite the safetensors header in place (same length, padded), leaving the data as it is."""
    model = _copy(world.model, tmp / "model")
    path = model / "model.safetensors"
    raw = path.read_bytes()
    length = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + length])
    edit(header)
    encoded = json.dumps(header, separators=(",", ":")).encode()
    assert len(encoded) <= length
    path.write_bytes(raw[:8] + encoded.ljust(length) + raw[8 + length :])
    return model


def _edit_store(world: World, tmp: Path, edit: Callable[[h5py.File], None]) -> Path:
    store = _copy(world.store, tmp / "cov.h5")
    with h5py.File(store, "a") as handle:
        edit(handle)
    return store


def _replace_dataset(handle: h5py.File, name: str, data: np.ndarray) -> None:
    """``data`` in the store's own layout: a square packed into a triangle in format 3, else as it is."""
    attrs = dict(handle[name].attrs)
    del handle[name]
    if int(handle.attrs["format_version"]) >= 3 and data.ndim == 2:
        write_packed(handle, name, torch.from_numpy(np.ascontiguousarray(data, dtype=np.float64)), np.float64)
    else:
        handle.create_dataset(name, data=data)
    handle[name].attrs.update(attrs)


def _edit_square_store(world: World, tmp: Path, edit: Callable[[h5py.File], None]) -> Path:
    """A format-2 copy of the store (full squares, as earlier versions wrote), edited: what only it can hold."""
    store = as_format_2(world.store, tmp / "cov.h5")
    with h5py.File(store, "a") as handle:
        edit(handle)
    return store


def _indefinite(handle: h5py.File) -> None:
    """Finite, symmetric, positive diagonal, but far from positive definite: 2I − J (eigenvalue 2 − n)."""
    name = "model.layers.0.self_attn.o_proj"
    length = handle[name].shape[0]
    n = packed_width(length) if int(handle.attrs["format_version"]) >= 3 else length
    count = int(handle[name].attrs["count"])
    _replace_dataset(handle, name, (2 * np.eye(n) - np.ones((n, n))) * count)


def _edit_adapter(world: World, tmp: Path, edit: Callable[[dict, dict], None], source: str = "surgery") -> Path:
    adapter = _copy(getattr(world, source) / "adapter", tmp / "adapter")
    config = json.loads((adapter / "adapter_config.json").read_text())
    factors = load_file(adapter / "adapter_model.safetensors")
    edit(config, factors)
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    save_file(factors, adapter / "adapter_model.safetensors", metadata={"format": "pt"})
    return adapter


Q = "base_model.model.model.layers.1.self_attn.q_proj"


def _nan_in_b(config, factors):
    factors[f"{Q}.lora_B.weight"][0, 0] = float("nan")


def _drop_module(config, factors):
    del factors[f"{Q}.lora_A.weight"], factors[f"{Q}.lora_B.weight"]


def _broken_config(world: World, tmp: Path) -> Path:
    model = _copy(world.model, tmp / "model")
    _write(model / "config.json", "{")
    return model


def _fifo_weights(world: World, tmp: Path) -> Path:
    model = _copy(world.model, tmp / "model")
    (model / "model.safetensors").unlink()
    _fifo(model / "model.safetensors")
    return model


def _broken_adapter_config(world: World, tmp: Path) -> Path:
    adapter = _copy(world.surgery / "adapter", tmp / "adapter")
    _write(adapter / "adapter_config.json", "{")
    return adapter


def _link_into_model(world: World, tmp: Path) -> Path:
    (tmp / "link").symlink_to(world.model)
    return tmp / "link" / "c.h5"


def _modified_residual(world: World, tmp: Path) -> Path:
    surgery = _copy(world.surgery, tmp / "surgery")
    weights = load_file(surgery / "model.safetensors")
    weights["model.layers.0.mlp.up_proj.weight"] *= 1.01
    save_file(weights, surgery / "model.safetensors", metadata={"format": "pt"})
    return surgery


# ---- the table: id → function(world, tmp) returning (command line, output path, extra inputs, culprit) ----

Case = Callable[[World, Path], tuple[list, Path, list[Path], list[str]]]


def _calibrate(model, out, *extra):
    return ["calibrate", model, *FAST, "--out", out, *extra]


def _decompose(world, out, *extra, model=None, store=None):
    return ["decompose", model or world.model, "--covariances", store or world.store, "--rank", "4", "--out", out,
            *extra]  # fmt: skip


def _data(tmp: Path, lines: bytes | str, name: str = "data.jsonl") -> Path:
    return _write(tmp / name, lines)


CASES: dict[str, Case] = {
    # calibrate: outputs that overlap inputs
    "calibrate out is the model folder": lambda w, t: (
        _calibrate(w.model, w.model, "--overwrite"), w.model, [], ["overlaps the input", str(w.model)]),
    "calibrate out inside the model folder": lambda w, t: (
        _calibrate(w.model, w.model / "model.safetensors", "--overwrite"), w.model / "model.safetensors", [],
        ["overlaps the input"]),
    "calibrate out is the data file": lambda w, t: (
        _calibrate(w.model, d := _data(t, '{"text": "hello world"}\n'), "--data", d, "--overwrite"), d, [d],
        ["overlaps the input", "data.jsonl"]),
    "calibrate out contains the model": lambda w, t: (
        _calibrate(w.model, w.root, "--overwrite"), w.root, [], ["overlaps the input"]),
    "calibrate out through a link into the model": lambda w, t: (
        _calibrate(w.model, _link_into_model(w, t)), t / "link" / "c.h5", [], ["overlaps the input"]),
    "calibrate existing output without --overwrite": lambda w, t: (
        _calibrate(w.model, x := _write(t / "c.h5", "keep me")), x, [x], ["already exists", "--overwrite"]),
    # calibrate: calibration data
    "data invalid UTF-8": lambda w, t: (
        _calibrate(w.model, t / "c.h5", "--data", _data(t, b'{"text": "ok"}\n{"text": "\xff\xfe"}\n')), t / "c.h5",
        [t / "data.jsonl"], ["data.jsonl:2", "UTF-8"]),
    "data record not an object": lambda w, t: (
        _calibrate(w.model, t / "c.h5", "--data", _data(t, '{"text": "ok"}\n[1, 2, 3]\n')), t / "c.h5",
        [t / "data.jsonl"], ["data.jsonl:2", "JSON object"]),
    "data invalid JSON": lambda w, t: (
        _calibrate(w.model, t / "c.h5", "--data", _data(t, '{"text": "ok"}\n{oops\n')), t / "c.h5",
        [t / "data.jsonl"], ["data.jsonl:2", "not valid JSON"]),
    "data only whitespace text": lambda w, t: (
        _calibrate(w.model, t / "c.h5", "--data", _data(t, '{"text": "   "}\n{"text": "\\n\\t"}\n')), t / "c.h5",
        [t / "data.jsonl"], ["data.jsonl", "no usable text"]),
    "data token id outside the vocabulary": lambda w, t: (
        _calibrate(w.model, t / "c.h5", "--data", _data(t, '{"input_ids": [1, 2, 99999]}\n')), t / "c.h5",
        [t / "data.jsonl"], ["data.jsonl:1", "99999", "outside the model's vocabulary"]),
    "data negative token id": lambda w, t: (
        _calibrate(w.model, t / "c.h5", "--data", _data(t, '{"input_ids": [1, -3]}\n')), t / "c.h5",
        [t / "data.jsonl"], ["data.jsonl:1", "-3"]),
    "data file missing": lambda w, t: (
        _calibrate(w.model, t / "c.h5", "--data", t / "absent.jsonl"), t / "c.h5", [], ["absent.jsonl"]),
    "data file is a FIFO": lambda w, t: (
        _calibrate(w.model, t / "c.h5", "--data", _fifo(t / "pipe.jsonl")), t / "c.h5", [],
        ["pipe.jsonl", "not a regular file"]),
    "samples zero": lambda w, t: (
        _calibrate(w.model, t / "c.h5", "--samples", "0"), t / "c.h5", [], ["--samples 0"]),
    "rounds zero": lambda w, t: (_calibrate(w.model, t / "c.h5", "--rounds", "0"), t / "c.h5", [], ["--rounds 0"]),
    "more rounds than batches": lambda w, t: (
        _calibrate(w.model, t / "c.h5", "--rounds", "50"), t / "c.h5", [], ["--rounds 50"]),
    # calibrate: the checkpoint
    "config with fewer layers than the weights": lambda w, t: (
        _calibrate(_edit_config(w, t, num_hidden_layers=2), t / "c.h5"), t / "c.h5", [t / "model"],
        ["model.layers.2", "not explained by config.json"]),
    "config with more layers than the weights": lambda w, t: (
        _calibrate(_edit_config(w, t, num_hidden_layers=4), t / "c.h5"), t / "c.h5", [t / "model"],
        ["model.layers.3", "missing from the checkpoint"]),
    "config not valid JSON": lambda w, t: (
        _calibrate(_broken_config(w, t), t / "c.h5"), t / "c.h5", [t / "model"], ["config.json"]),
    "weights file is a FIFO": lambda w, t: (
        _calibrate(_fifo_weights(w, t), t / "c.h5"), t / "c.h5", [], ["model.safetensors", "not a regular file"]),
    "tensor header without offsets": lambda w, t: (
        _calibrate(_edit_header(w, t, lambda h: h["model.norm.weight"].pop("data_offsets")), t / "c.h5"),
        t / "c.h5", [t / "model"], ["model.safetensors", "model.norm.weight", "malformed"]),
    "tensor headers that overlap": lambda w, t: (
        _calibrate(_edit_header(w, t, lambda h: h["model.norm.weight"].update(
            data_offsets=h["model.layers.0.input_layernorm.weight"]["data_offsets"])), t / "c.h5"),
        t / "c.h5", [t / "model"], ["overlap"]),
    "transposed weight": lambda w, t: (
        _calibrate(_edit_weights(w, t, lambda ws: ws.update({
            "model.layers.1.mlp.up_proj.weight": ws["model.layers.1.mlp.up_proj.weight"].T.contiguous()})),
            t / "c.h5"),
        t / "c.h5", [t / "model"], ["model.layers.1.mlp.up_proj.weight", "shape"]),
    "missing weight": lambda w, t: (
        _calibrate(_edit_weights(w, t, lambda ws: ws.pop("model.layers.1.self_attn.v_proj.weight")), t / "c.h5"),
        t / "c.h5", [t / "model"], ["model.layers.1.self_attn.v_proj.weight", "missing"]),
    "orphan weight": lambda w, t: (
        _calibrate(_edit_weights(w, t, lambda ws: ws.update({"extra.weight": torch.zeros(3)})), t / "c.h5"),
        t / "c.h5", [t / "model"], ["extra.weight", "not explained"]),
    # decompose: outputs and options
    "decompose out is the model": lambda w, t: (
        _decompose(w, w.model, "--overwrite"), w.model, [], ["overlaps the input"]),
    "decompose out is the store": lambda w, t: (
        _decompose(w, w.store, "--overwrite"), w.store, [], ["overlaps the input", "cov.h5"]),
    "rank zero": lambda w, t: (_decompose(w, t / "o", "--rank", "0"), t / "o", [], ["--rank 0"]),
    "rank larger than the weights": lambda w, t: (
        _decompose(w, t / "o", "--rank", "100000"), t / "o", [], ["--rank 100000 is too large", "model.layers.0"]),
    "damping NaN": lambda w, t: (_decompose(w, t / "o", "--damping", "nan"), t / "o", [], ["--damping nan"]),
    "damping negative": lambda w, t: (_decompose(w, t / "o", "--damping", "-1"), t / "o", [], ["--damping -1"]),
    "alpha zero": lambda w, t: (_decompose(w, t / "o", "--alpha", "0"), t / "o", [], ["--alpha"]),
    "shard size unparseable": lambda w, t: (
        _decompose(w, t / "o", "--max-shard-size", "12XB"), t / "o", [], ["--max-shard-size", "12XB"]),
    "mode with pissa": lambda w, t: (
        ["decompose", w.model, "--method", "pissa", "--mode", "ipm", "--out", t / "o"], t / "o", [],
        ["--mode does not go with --method pissa"]),
    "targets that match nothing": lambda w, t: (
        _decompose(w, t / "o", "--targets", "qproj"), t / "o", [], ["qproj", "matches no linear"]),
    "budget without corda++": lambda w, t: (
        _decompose(w, t / "o", "--rank-budget", "4"), t / "o", [], ["--rank-budget", "corda++"]),
    "covariances with pissa": lambda w, t: (
        _decompose(w, t / "o", "--method", "pissa"), t / "o", [], ["--method pissa", "drop --covariances"]),
    # decompose: stores
    "store from a newer format": lambda w, t: (
        _decompose(w, t / "o", store=_edit_store(w, t, lambda h: h.attrs.__setitem__("format_version", 99))),
        t / "o", [t / "cov.h5"], ["cov.h5", "newer corda-surgery"]),
    "store from another model": lambda w, t: (
        _decompose(w, t / "o", store=w.other_store), t / "o", [], ["other.h5", "another model"]),
    "store with NaN": lambda w, t: (
        _decompose(w, t / "o", store=_edit_store(w, t, lambda h: _replace_dataset(
            h, "model.layers.0.mlp.down_proj", np.full(h["model.layers.0.mlp.down_proj"].shape, np.nan)))),
        t / "o", [t / "cov.h5"], ["model.layers.0.mlp.down_proj", "NaN"]),
    "store not symmetric": lambda w, t: (
        _decompose(w, t / "o", store=_edit_square_store(w, t, lambda h: _replace_dataset(
            h, "model.layers.0.self_attn.o_proj", np.triu(h["model.layers.0.self_attn.o_proj"][()])))),
        t / "o", [t / "cov.h5"], ["model.layers.0.self_attn.o_proj", "not symmetric"]),
    "store counts that do not add up": lambda w, t: (
        _decompose(w, t / "o", store=_edit_store(w, t, lambda h: h["model.layers.1.mlp.gate_proj"].attrs.__setitem__(
            "round_counts", "[1, 2]"))),
        t / "o", [t / "cov.h5"], ["model.layers.1.mlp.gate_proj", "do not add up"]),
    "store covariance of the wrong size": lambda w, t: (
        _decompose(w, t / "o", store=_edit_store(w, t, lambda h: _replace_dataset(
            h, "model.layers.2.mlp.down_proj", np.eye(8)))),
        t / "o", [t / "cov.h5"], ["model.layers.2.mlp.down_proj", "8×8"]),
    "store covariance unusable": lambda w, t: (
        _decompose(w, t / "o", store=_edit_store(w, t, _indefinite)), t / "o", [t / "cov.h5"],
        ["model.layers.0.self_attn.o_proj", "unusable"]),
    "store is a FIFO": lambda w, t: (
        _decompose(w, t / "o", store=_fifo(t / "pipe.h5")), t / "o", [], ["pipe.h5", "not a regular file"]),
    # convert: checked before calibration
    "convert rank larger than the weights": lambda w, t: (
        ["convert", w.model, *FAST, "--rank", "100000", "--out", t / "o"], t / "o", [], ["--rank 100000"]),
    "convert out is the model": lambda w, t: (
        ["convert", w.model, *FAST, "--out", w.model, "--overwrite"], w.model, [], ["overlaps the input"]),
    # merge
    "merge adapter rank disagrees with its config": lambda w, t: (
        ["merge", w.surgery, "--adapter", _edit_adapter(w, t, lambda c, f: c.update(r=8)), "--out", t / "m"], t / "m",
        [t / "adapter"], ["config gives rank 8"]),
    "merge adapter with NaN": lambda w, t: (
        ["merge", w.surgery, "--adapter", _edit_adapter(w, t, _nan_in_b), "--out", t / "m"], t / "m",
        [t / "adapter"], ["model.layers.1.self_attn.q_proj.lora_B", "NaN"]),
    "merge adapter from another surgery": lambda w, t: (
        ["merge", w.surgery, "--adapter", w.sibling / "adapter", "--out", t / "m"], t / "m", [],
        ["another surgery"]),
    "merge adapter missing a module": lambda w, t: (
        ["merge", w.surgery, "--adapter", _edit_adapter(w, t, _drop_module), "--out", t / "m"], t / "m",
        [t / "adapter"], ["model.layers.1.self_attn.q_proj"]),
    "merge residual changed after the surgery": lambda w, t: (
        ["merge", _modified_residual(w, t), "--out", t / "m"], t / "m", [t / "surgery"], ["residual weights changed"]),
    "merge out is the surgery": lambda w, t: (
        ["merge", w.surgery, "--out", w.surgery, "--overwrite"], w.surgery, [], ["overlaps the input"]),
    "merge adapter config not JSON": lambda w, t: (
        ["merge", w.surgery, "--adapter", _broken_adapter_config(w, t), "--out", t / "m"], t / "m", [t / "adapter"],
        ["adapter_config.json"]),
    "merge folder without surgery report": lambda w, t: (
        ["merge", w.merged, "--adapter", w.surgery / "adapter", "--out", t / "m"], t / "m", [],
        ["surgery.json", "surgery output"]),
    # to-lora
    "to-lora base of another model": lambda w, t: (
        ["to-lora", w.surgery, w.surgery / "adapter", "--base", w.other_model, "--out", t / "l"], t / "l", [],
        ["other", "not the model"]),
    "to-lora trained adapter with NaN": lambda w, t: (
        ["to-lora", w.surgery, _edit_adapter(w, t, _nan_in_b), "--base", w.model, "--out", t / "l"], t / "l",
        [t / "adapter"], ["NaN"]),
    "to-lora out is the trained adapter": lambda w, t: (
        ["to-lora", w.surgery, a := _copy(w.surgery / "adapter", t / "adapter"), "--base", w.model, "--out", a,
         "--overwrite"], a, [a], ["overlaps the input"]),
    # inspect
    "inspect plots into the model": lambda w, t: (
        ["inspect", w.store, "--model", w.model, "--plot", w.model / "plots"], w.model / "plots", [],
        ["overlaps the input"]),
    "inspect damping negative": lambda w, t: (
        ["inspect", w.store, "--model", w.model, "--damping", "-1"], t / "none", [], ["--damping -1"]),
    "inspect store from another model": lambda w, t: (
        ["inspect", w.other_store, "--model", w.model], t / "none", [], ["other.h5", "another model"]),
    # export-onnx
    "export out is the merged model": lambda w, t: (
        ["export-onnx", w.merged, "--out", w.merged, "--overwrite"], w.merged, [], ["overlaps the input"]),
    "export out inside the merged model": lambda w, t: (
        ["export-onnx", w.merged, "--out", w.merged / "onnx"], w.merged / "onnx", [], ["overlaps the input"]),
    "export a folder that is no model": lambda w, t: (
        ["export-onnx", _copy(w.surgery / "adapter", t / "adapter"), "--out", t / "x"], t / "x", [t / "adapter"],
        ["adapter"]),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(CASES))
def test_hostile_input_is_refused_and_harms_nothing(case, world, tmp_path):
    args, out, extra_inputs, culprits = CASES[case](world, tmp_path)
    inputs = [world.root, *extra_inputs]
    before = tree_hashes(*inputs)  # regular files only: a FIFO is never read
    message = cli_error(*args)
    for culprit in culprits:
        assert culprit in message, (case, message)
    assert tree_hashes(*inputs) == before, case
    if not any(out == p or p in out.parents for p in inputs):
        assert not out.exists(), case
    leftovers = [p.name for p in out.parent.glob(f".{out.name}*")] + [p.name for p in out.parent.glob("*.partial")]
    assert leftovers == [], case


def test_the_table_covers_every_command(world, tmp_path):
    commands = set()
    for index, case in enumerate(CASES):
        (tmp_path / str(index)).mkdir()
        commands.add(CASES[case](world, tmp_path / str(index))[0][0])
    assert len(CASES) >= 40
    assert commands == {"calibrate", "decompose", "convert", "merge", "to-lora", "inspect", "export-onnx"}


# ---- property: for every family, an untouched adapter merges back to the original; a corrupted one is refused

FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gpt2", "bert", "roberta")


@pytest.fixture(scope="module")
def surgeries(tmp_path_factory) -> dict[str, tuple[Path, Path]]:
    root = tmp_path_factory.mktemp("families")
    made = {}
    for family in FAMILIES:
        model = save_tiny_model(root / family, family, layers=2)
        store = calibrate(model, SPEC, root / f"{family}.h5", progress=False)
        out = decompose_checkpoint(model, root / f"{family}-out", SurgeryOptions.of(rank=4), stores=[store],
                                   progress=False)  # fmt: skip
        made[family] = (model, out)
    return made


@pytest.mark.parametrize("family", FAMILIES)
def test_untouched_adapter_merges_back_to_the_original_weights(family, surgeries, tmp_path):
    model, out = surgeries[family]
    result = run_cli("merge", out, "--out", tmp_path / "merged")
    assert result.exit_code == 0, result.output
    original, merged = tensors(model), tensors(tmp_path / "merged")
    assert original.keys() == merged.keys()
    assert max(relative(merged[k], original[k]) for k in original if original[k].is_floating_point()) < 1e-6


CORRUPTIONS = {
    "nan": lambda t: t.index_fill(0, torch.tensor([0]), float("nan")),
    "inf": lambda t: t.index_fill(1, torch.tensor([t.shape[1] - 1]), float("-inf")),
    "one rank fewer": lambda t: t[:-1].contiguous() if t.shape[0] <= t.shape[1] else t[:, :-1].contiguous(),
    "transposed": lambda t: t.T.contiguous(),
    "one row more": lambda t: torch.cat([t, t[:1]]),
}


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(family=st.sampled_from(FAMILIES), pick=st.integers(0, 10**6), corruption=st.sampled_from(sorted(CORRUPTIONS)))
def test_any_single_corrupted_adapter_tensor_is_refused(family, pick, corruption, surgeries, tmp_path_factory):
    _, out = surgeries[family]
    adapter = _copy(out / "adapter", tmp_path_factory.mktemp("corrupt") / "adapter")
    factors = load_file(adapter / "adapter_model.safetensors")
    key = sorted(factors)[pick % len(factors)]
    factors[key] = CORRUPTIONS[corruption](factors[key])
    save_file(factors, adapter / "adapter_model.safetensors", metadata={"format": "pt"})
    target = adapter.parent / "merged"
    message = cli_error("merge", out, "--adapter", adapter, "--out", target)
    module = key.removeprefix("base_model.model.").rsplit(".lora_", 1)[0]
    assert module in message, (key, corruption, message)
    assert not target.exists()
