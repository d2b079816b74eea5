"""``convert`` in one pass: each block decomposed as soon as its covariances are summed, no store on disk
unless kept, and the same output as calibrating the whole store and decomposing from it."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from corda_surgery.calib.data import CalibrationSpec
from corda_surgery.calib.store import StoreWriter
from corda_surgery.compute import DEFAULT_COMPUTE
from corda_surgery.surgery.calibration import calibrate
from corda_surgery.surgery.options import SurgeryOptions
from corda_surgery.surgery.run import convert_checkpoint, decompose_checkpoint, estimate_run
from tests.families import save_family_model
from tests.helpers import datasets, tensors

SPEC = CalibrationSpec("gsm8k", samples=8, seq_len=32, batch_size=4)


def _two_passes(model: Path, root: Path, spec: CalibrationSpec, options: SurgeryOptions) -> Path:
    """The whole store first, then the decomposition from it: what one pass must give."""
    store = calibrate(model, spec, root / "whole.h5", progress=False)
    return decompose_checkpoint(model, root / "two", options, stores=[store], progress=False)


def _assert_same_surgery(one: Path, two: Path) -> None:
    """Every tensor and adapter file the same bytes, the JSON files the same but for the output's own path;
    surgery.json the same but for where its store is."""
    files = sorted(p.relative_to(one) for p in one.rglob("*") if p.is_file() and p.suffix != ".h5")
    assert files == sorted(p.relative_to(two) for p in two.rglob("*") if p.is_file() and p.suffix != ".h5")
    for name in files:
        if name.suffix == ".json":
            reports = [json.loads((root / name).read_text().replace(str(root), "OUT")) for root in (one, two)]
            for report in reports if name.name == "surgery.json" else []:
                report.pop("versions")
                for store in report["covariance_stores"]:
                    store.pop("path")
            assert reports[0] == reports[1], name
        else:
            assert (one / name).read_bytes() == (two / name).read_bytes(), name


@pytest.mark.parametrize("mode", ["kpm", "ipm"])
def test_one_pass_gives_the_two_pass_output_bit_for_bit(tiny_llama, tmp_path, monkeypatch, mode):
    options = SurgeryOptions.of(rank=4, mode=mode, max_shard_size=200_000)
    two = _two_passes(tiny_llama, tmp_path, SPEC, options)

    written, write = [], StoreWriter.__init__

    def recorded(self, path, **kwargs):
        written.append((Path(path).name, kwargs["num_layers"]))
        write(self, path, **kwargs)

    monkeypatch.setattr(StoreWriter, "__init__", recorded)
    one = convert_checkpoint(tiny_llama, tmp_path / "one", SPEC, options, progress=False)
    _assert_same_surgery(one, two)
    block = ".one.partial-block.h5"
    assert written == [(block, 1), (block, 2), (block, 3)]  # one block at a time
    assert json.loads((one / "surgery.json").read_text())["covariance_stores"][0]["path"] is None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one", "two", "whole.h5"]  # nothing left beside


def test_one_pass_on_fused_experts_equals_two_passes(tmp_path):
    """Every expert's slice decomposed from its routed tokens as its block is summed."""
    model = save_family_model(tmp_path / "model", "mixtral")
    options = SurgeryOptions.of(rank=4)
    two = _two_passes(model, tmp_path, SPEC, options)
    one = convert_checkpoint(model, tmp_path / "one", SPEC, options, progress=False)
    _assert_same_surgery(one, two)
    report = json.loads((one / "surgery.json").read_text())
    assert any("experts" in record for record in report["layers"].values())


def test_float32_storage_reads_back_the_same_in_one_pass(tiny_llama, tmp_path):
    """The covariances are rounded through float32 as the store would round them, so one pass still equals
    decomposing from a float32 store."""
    spec = dataclasses.replace(SPEC, store_dtype="float32")
    options = SurgeryOptions.of(rank=4)
    two = _two_passes(tiny_llama, tmp_path, spec, options)
    one = convert_checkpoint(tiny_llama, tmp_path / "one", spec, options, progress=False)
    _assert_same_surgery(one, two)


def test_keep_covariances_bundles_the_store_as_two_passes_write_it(tiny_llama, tmp_path):
    options = SurgeryOptions.of(rank=4)
    _two_passes(tiny_llama, tmp_path, SPEC, options)
    kept = convert_checkpoint(tiny_llama, tmp_path / "kept", SPEC, options, keep_covariances=True, progress=False)
    _assert_same_surgery(kept, tmp_path / "two")
    report = json.loads((kept / "surgery.json").read_text())
    assert Path(report["covariance_stores"][0]["path"]) == kept / "covariances.h5"
    ours, whole = datasets(kept / "covariances.h5"), datasets(tmp_path / "whole.h5")
    assert ours.keys() == whole.keys()
    for name, (data, attrs) in whole.items():
        assert (ours[name][0] == data).all() and ours[name][1] == attrs, name


def test_corda_plus_converts_in_two_passes_and_removes_its_store(tiny_llama, tmp_path):
    options = SurgeryOptions.of(method="corda++", rank=4, rank_budget=4)
    out = convert_checkpoint(tiny_llama, tmp_path / "out", SPEC, options, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert not (out / "covariances.h5").exists()
    assert json.loads((out / "surgery.json").read_text())["covariance_stores"][0]["path"] is None
    assert tensors(out)  # a complete residual model


def test_keep_covariances_without_a_calibration_is_refused(tiny_llama, tmp_path):
    from tests.helpers import cli_error

    message = cli_error("convert", tiny_llama, "--method", "pissa", "--keep-covariances", "--out", tmp_path / "o")
    assert "--keep-covariances" in message and "pissa calibrates nothing" in message
    assert not (tmp_path / "o").exists()


def test_a_killed_runs_spilled_block_is_removed_by_the_next_run(tiny_llama, tmp_path, caplog):
    (tmp_path / ".out.partial-block.h5").write_bytes(b"left by a kill")
    convert_checkpoint(tiny_llama, tmp_path / "out", SPEC, SurgeryOptions.of(rank=4), progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert "left by an interrupted run" in caplog.text


def test_the_disk_plan_says_what_each_choice_writes(tiny_llama, tmp_path):
    def disk(method: str, keep: bool) -> dict[str, int]:
        options = SurgeryOptions.of(method=method, rank=4)
        plan = estimate_run(
            tiny_llama, DEFAULT_COMPUTE, tmp_path / "o", spec=SPEC, options=options, keep_covariances=keep
        )
        return plan.disk

    one, kept, plus = disk("corda", False), disk("corda", True), disk("corda++", False)
    block = "one block's covariances (while it is decomposed)"
    assert "covariance store" not in one and one["covariance store (removed at the end)"] == 0
    assert kept["covariance store"] == plus["covariance store (removed at the end)"] == 3 * one[block] > 0
    assert block not in plus and kept[block] == one[block]
    assert one["finished work"] == one["adapter"] > 0
