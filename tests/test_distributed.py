"""Calibration on torch.distributed: two gloo ranks (processes started by torch.multiprocessing, as torchrun
would start them) write the store one process writes, and a rank that dies leaves a store --resume continues."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from corda_surgery.calib.data import CalibrationSpec
from corda_surgery.surgery.calibration import calibrate
from corda_surgery.surgery.options import SurgeryOptions
from corda_surgery.surgery.run import convert_checkpoint, decompose_checkpoint
from tests.families import save_family_model
from tests.helpers import figures_close, relative, tensors

SPEC = CalibrationSpec("gsm8k", samples=12, seq_len=24, batch_size=2, rounds=2)
OPTIONS = {
    "corda": SurgeryOptions.of(rank=4),
    "corda++": SurgeryOptions.of(method="corda++", rank=4, rank_budget=4),
    # shards smaller than the largest weights: those get shards of their own, written out of the stored order
    "small shards": SurgeryOptions.of(rank=4, max_shard_size=20_000),
    "median-diagonal": SurgeryOptions.of(rank=4, damping_rule="median-diagonal"),  # the rule travels in the options
}


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _rank_main(rank: int, world: int, port: int, model_dir: str, out: str, spec: CalibrationSpec, die_at: int,
               convert: str | None, resume: bool = False, die_decomposing: int = -1, store: str | None = None,
               die_writing: bool = False) -> None:  # fmt: skip
    """One rank, with the environment torchrun gives it, converting (``convert``: the options' key), decomposing
    ``store`` with those options, or calibrating; rank 1 exits abruptly at block ``die_at``'s sums (≥ 0), or
    after ``die_decomposing`` decompositions of its own (≥ 0); rank 0 as it writes the adapter (``die_writing``)."""
    os.environ.update(WORLD_SIZE=str(world), RANK=str(rank), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), CORDA_SURGERY_DIST_TIMEOUT_MIN="2")  # fmt: skip
    import torch

    torch.set_num_threads(1)
    if rank == 1 and die_decomposing >= 0:
        from corda_surgery.surgery.initialise import Initialiser

        initialise, calls = Initialiser.__call__, []

        def dying_decomposition(self, weight, target):
            calls.append(target.name)
            if len(calls) > die_decomposing:
                os._exit(3)
            return initialise(self, weight, target)

        Initialiser.__call__ = dying_decomposition
    if rank == 1 and die_at >= 0:
        from corda_surgery.calib import stream

        reduce = stream._reduce_over_ranks

        def dying(groups, ranks, prefix):
            if prefix.endswith(f".{die_at}"):
                os._exit(3)  # as a killed process: no clean-up, no message
            reduce(groups, ranks, prefix)

        stream._reduce_over_ranks = dying
    if rank == 0 and die_writing:
        from corda_surgery.surgery import writer

        writer.write_adapter = lambda *args: os._exit(3)
    try:
        if store:
            decompose_checkpoint(model_dir, out, OPTIONS[convert], stores=[store], progress=False, resume=resume)
        elif convert:
            convert_checkpoint(model_dir, out, spec, OPTIONS[convert], progress=False, resume=resume)
        else:
            calibrate(model_dir, spec, out, progress=False)
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def _run_ranks(
    model_dir,
    out,
    spec=SPEC,
    die_at: int = -1,
    convert: str | None = None,
    resume: bool = False,
    die_decomposing: int = -1,
    store: Path | None = None,
    die_writing: bool = False,
) -> list[int]:
    context = mp.get_context("spawn")
    port = _free_port()
    arguments = (2, port, str(model_dir), str(out), spec, die_at, convert, resume, die_decomposing,
                 str(store) if store else None, die_writing)  # fmt: skip
    processes = [context.Process(target=_rank_main, args=(r, *arguments)) for r in range(2)]
    for process in processes:
        process.start()
    for process in processes:
        process.join(timeout=300)
    return [process.exitcode for process in processes]


def _datasets(path) -> dict[str, tuple[np.ndarray, dict]]:
    with h5py.File(path) as handle:
        return {name: (handle[name][()], dict(handle[name].attrs)) for name in handle}


def _assert_same_store(path, reference) -> None:
    got, expected = _datasets(path), _datasets(reference)
    assert sorted(got) == sorted(expected)
    for name, (data, attrs) in expected.items():
        other, other_attrs = got[name]
        assert np.abs(other - data).max() <= 1e-12 * np.abs(data).max(), name  # summation order differs
        assert other_attrs == attrs, name  # counts, rounds, members, eigenvalue counts: identical


@pytest.mark.parametrize("model_type", ["llama", "qwen2_moe"])
def test_two_ranks_write_the_store_one_process_writes(model_type, tmp_path):
    model_dir = save_family_model(tmp_path / model_type, model_type)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each rank: routed experts' products round by their thread count
    try:
        reference = calibrate(model_dir, SPEC, tmp_path / "one.h5", progress=False)
    finally:
        torch.set_num_threads(threads)
    assert _run_ranks(model_dir, tmp_path / "two.h5") == [0, 0]
    _assert_same_store(tmp_path / "two.h5", reference)
    assert not list(tmp_path.glob(".two.h5*"))  # no lock, partial file or spilled activations left


def test_a_rank_that_dies_leaves_a_store_that_resume_completes(tmp_path, caplog):
    model_dir = save_family_model(tmp_path / "llama", "llama")
    reference = calibrate(model_dir, SPEC, tmp_path / "one.h5", progress=False)
    out = tmp_path / "two.h5"
    codes = _run_ranks(model_dir, out, die_at=1)
    assert codes[1] == 3 and codes[0] != 0  # rank 0 stops too, with a DistributedError, not a hang
    assert not out.exists()
    with h5py.File(tmp_path / "two.h5.partial") as handle:
        assert int(handle.attrs["layers_done"]) == 1  # block 0 stored before rank 1 died in block 1
    calibrate(model_dir, SPEC, out, resume=True, progress=False)
    _assert_same_store(out, reference)


def _assert_same_output(one, two) -> None:
    for folder in ("", "adapter"):
        expected, got = tensors(one / folder), tensors(two / folder)
        assert sorted(got) == sorted(expected)
        worst = max(relative(got[key], expected[key]) for key in expected)
        assert worst <= 1e-7, (folder, worst)
    assert sorted(p.name for p in two.iterdir()) == sorted(p.name for p in one.iterdir())
    reports = [json.loads((folder / "surgery.json").read_text()) for folder in (one, two)]
    for report in reports:
        del report["base_name"], report["covariance_stores"][0]["path"]  # the output's own path
    assert reports[0]["layers"] == figures_close(reports[1]["layers"]) and reports[0] == figures_close(reports[1])


@pytest.mark.parametrize(
    ("method", "death"),
    [("corda", {"die_at": 1}), ("corda", {"die_decomposing": 2}), ("corda++", {"die_decomposing": 2})],
    ids=["one pass, summing", "one pass, decomposing its share", "two passes"],
)
def test_a_convert_whose_rank_died_resumes_on_two_ranks(method, death, tmp_path, caplog):
    """Rank 1 dies while block 1 is summed (one pass: both ranks have decomposed block 0), or after two
    decompositions of its own (in one pass too: it decomposes its share of each block): rank 0 keeps every
    result it took (those in flight when rank 1 died may be lost); the resumed run goes on from there on both
    ranks and writes what one process writes."""
    model_dir = save_family_model(tmp_path / "llama", "llama")
    one = convert_checkpoint(model_dir, tmp_path / "one", SPEC, OPTIONS[method], progress=False)
    codes = _run_ranks(model_dir, tmp_path / "two", convert=method, **death)
    assert codes[1] == 3 and codes[0] != 0 and not (tmp_path / "two").exists()
    kept = list((tmp_path / ".two.resume").glob("*.safetensors"))
    assert len(kept) < 14, kept  # not all of the 14 linears: those rank 0 took before the death
    if "die_at" in death:
        assert len(kept) == 7, kept  # block 0's, decomposed by both ranks as it was summed
        assert [p.name for p in (tmp_path / ".two.resume").glob("layer-*")] == ["layer-000000.json"]
    assert _run_ranks(model_dir, tmp_path / "two", convert=method, resume=True) == [0, 0]
    _assert_same_output(one, tmp_path / "two")
    assert not (tmp_path / ".two.resume").exists()


@pytest.mark.parametrize(
    ("command", "death"),
    [("decompose", {"die_decomposing": 2}), ("decompose", {"die_writing": True}), ("convert", {"die_writing": True})],
    ids=["decompose, decomposing", "decompose, final writes", "convert, final writes"],
)
def test_a_killed_rank_of_a_surgery_resumes_to_the_one_process_output(command, death, tmp_path):
    """The other kill points on two ranks: a `decompose` whose rank 1 dies while decomposing its share, and a
    `decompose` or `convert` whose rank 0 dies while it writes the adapter (every decomposition taken). The same
    command with --resume on two ranks writes what one process writes, and leaves nothing beside."""
    model_dir = save_family_model(tmp_path / "llama", "llama")
    store = calibrate(model_dir, SPEC, tmp_path / "c.h5", progress=False) if command == "decompose" else None
    options = OPTIONS["corda"]
    if store is not None:
        one = decompose_checkpoint(model_dir, tmp_path / "one", options, stores=[store], progress=False)
    else:
        one = convert_checkpoint(model_dir, tmp_path / "one", SPEC, options, progress=False)
    codes = _run_ranks(model_dir, tmp_path / "two", convert="corda", store=store, **death)
    assert 3 in codes and all(code != 0 for code in codes) and not (tmp_path / "two").exists()
    assert _run_ranks(model_dir, tmp_path / "two", convert="corda", store=store, resume=True) == [0, 0]
    _assert_same_output(one, tmp_path / "two")
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


@pytest.mark.parametrize("method", ["corda", "corda++", "small shards", "median-diagonal"])
def test_convert_on_two_ranks_writes_what_one_process_writes(method, tmp_path):
    """Both ranks calibrate and decompose their shares, rank 0 writes: every tensor as one process writes it
    (bit for bit here; the covariances' summation order and each rank's thread count may move a float64
    decomposition by rounding, hence the 1e-7 bound), the same files and the same surgery.json."""
    model_dir = save_family_model(tmp_path / "llama", "llama")
    one = convert_checkpoint(model_dir, tmp_path / "one", SPEC, OPTIONS[method], progress=False)
    assert _run_ranks(model_dir, tmp_path / "two", convert=method) == [0, 0]
    _assert_same_output(one, tmp_path / "two")


def test_work_is_shared_by_input_group_and_balanced(tmp_path):
    """Linears that read one input go to one rank (one shared factorisation); the ranks' loads differ by at
    most the costliest group."""
    from corda_surgery.calib.store import CovarianceStore
    from corda_surgery.checkpoint.view import ModelView
    from corda_surgery.compute import ComputeOptions
    from corda_surgery.distributed import Ranks
    from corda_surgery.surgery.initialise import Initialiser
    from corda_surgery.surgery.targets import LayerPlan, plan_targets
    from corda_surgery.surgery.work import _cost, share_of_work

    model_dir = save_family_model(tmp_path / "llama", "llama")
    store = calibrate(model_dir, SPEC, tmp_path / "c.h5", progress=False)
    targets = plan_targets(ModelView(model_dir), SurgeryOptions.of(rank=4)).targets
    plan = {t.name: LayerPlan(4, 0) for t in targets}
    with CovarianceStore(store) as opened:
        initialise = Initialiser([opened], targets, plan, {}, SurgeryOptions.of(rank=4), ComputeOptions(device="cpu"))
        shared = initialise.shared
        owners = share_of_work(targets, plan, initialise, SurgeryOptions.of(rank=4), Ranks(1, 2))
        groups = {}
        for target in targets:
            groups.setdefault(shared.key(target.name), set()).add(owners[target.name])
    assert all(len(ranks) == 1 for ranks in groups.values()) and set(owners.values()) == {0, 1}
    loads = [sum(_cost(t) for t in targets if owners[t.name] == r) for r in (0, 1)]
    assert abs(loads[0] - loads[1]) <= max(_cost(t) for t in targets) * 3
    assert share_of_work(targets, plan, initialise, SurgeryOptions.of(method="lora", rank=4), Ranks(1, 2)) == {}


def test_a_rank_that_dies_while_decomposing_leaves_no_output(tmp_path):
    model_dir = save_family_model(tmp_path / "llama", "llama")
    out = tmp_path / "two"
    codes = _run_ranks(model_dir, out, convert="corda++", die_decomposing=2)
    assert codes[1] == 3 and codes[0] != 0
    assert not out.exists() and not list(tmp_path.glob(".two.partial-*"))  # nothing under the name, no half folder


@pytest.mark.parametrize("max_shard_size", [20_000, 10**9])
def test_workers_send_in_the_order_rank_0_writes(tmp_path, max_shard_size):
    """Workers send their results in ``write_order``: exactly the order in which rank 0's shard writer asks for
    tensors, also where small shards put the larger weights ahead of smaller ones stored before them."""
    from corda_surgery.checkpoint.reader import CheckpointReader
    from corda_surgery.checkpoint.writer import write_order, write_sharded_weights

    reader = CheckpointReader(save_family_model(tmp_path / "llama", "llama"))
    specs = {key: reader.spec(key) for key in reader.locations}
    asked: list[str] = []

    def produce(key):
        asked.append(key)
        return reader.get(key)

    (tmp_path / "out").mkdir()
    write_sharded_weights(tmp_path / "out", specs, produce, max_shard_size=max_shard_size)
    assert asked == write_order(specs, max_shard_size)
    assert (asked != list(specs)) == (max_shard_size == 20_000)  # the small shards do reorder


def test_under_torchrun_rank_0_alone_reports(tiny_llama, tmp_path):
    """`python -m corda_surgery convert` as torchrun starts it on two ranks: rank 0 prints where the outputs
    are, rank 1 nothing on stdout; a bad option fails on every rank, each error naming its rank."""

    def ranks(tag: str, *options: str) -> list[subprocess.CompletedProcess]:
        command = [sys.executable, "-m", "corda_surgery", "convert", str(tiny_llama), "--data", "gsm8k",
                   "--samples", "8", "--seq-len", "16", "--batch-size", "2", "--rank", "2", *options]  # fmt: skip
        port = str(_free_port())
        environment = os.environ | {"WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
                                    "MASTER_PORT": port, "CORDA_SURGERY_DIST_TIMEOUT_MIN": "2"}  # fmt: skip
        logs = [(tmp_path / f"{tag}.{r}.out", tmp_path / f"{tag}.{r}.err") for r in range(2)]
        started = []
        try:  # output to files: a rank blocked on a full pipe would stall the other in a collective
            for r, (out, err) in enumerate(logs):
                with out.open("w") as stdout, err.open("w") as stderr:
                    rank = {"RANK": str(r), "LOCAL_RANK": str(r)}
                    started.append(subprocess.Popen(command, stdout=stdout, stderr=stderr, env=environment | rank))
            codes = [process.wait(timeout=300) for process in started]
        finally:
            for process in started:
                process.kill()
        return [subprocess.CompletedProcess(command, code, out.read_text(), err.read_text())
                for code, (out, err) in zip(codes, logs)]  # fmt: skip

    first, second = ranks("convert", "--out", str(tmp_path / "out"))
    assert first.returncode == second.returncode == 0, (first.stderr[-2000:], second.stderr[-2000:])
    assert f"residual model: {tmp_path / 'out'}" in first.stdout
    assert second.stdout == ""
    assert (tmp_path / "out" / "adapter" / "adapter_config.json").is_file()
    failed = ranks("refused", "--out", str(tmp_path / "again"), "--seq-len", "0")
    for rank, done in enumerate(failed):
        assert done.returncode != 0 and done.stdout == ""
        error = next(line for line in done.stderr.splitlines() if line.startswith("error: "))
        assert error.startswith(f"error: rank {rank} of 2: ") and error.count(" of 2: ") == 1, done.stderr[-2000:]
        assert "--seq-len" in error, error
