"""``convert``'s passes over the model: one for CorDA, two for CorDA++.

In one pass each block's targets are decomposed as soon as the block's covariances are summed: the calibration
hands every summed block to ``OnePassOutput``'s sink, which spills it to a one-block store beside the output
(``StreamedCovariances``: read back as the whole store in the run's format would give it, while memory lets go
of the sums), decomposes the block from there and saves the factors and records, with the block's entries, as
the run's finished work (``FinishedWork``). The output is then written as
a resumed decomposition writes it, every residual rebuilt from its factors bit for bit, so one pass gives what
two passes give, and a killed run resumes from its last whole block. The disk holds one block's covariances at a
time, the whole store only where kept (``keep``: written as the blocks are summed, and bundled into the output). Under
torch.distributed every rank sums each block over its share of the batches (the sums all-reduced), spills it, and
decomposes its share of the block's targets (``share_of_work``), sending the factors to rank 0, which keeps them.

CorDA++ plans its ranks and picks its covariances over every layer before it decomposes one, so it calibrates
the whole store first and decomposes from it (two passes), removing the store at the end unless kept.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager
from pathlib import Path

import torch
from tqdm.auto import tqdm

from corda_surgery.calib.data import CalibrationSpec
from corda_surgery.calib.sink import CovarianceSink, Entries, rank_output, warn_rank_deficient
from corda_surgery.calib.store import CountedLevel, Covariances, CovarianceStore
from corda_surgery.calib.window import StreamedCovariances, entry_from_json, entry_to_json
from corda_surgery.checkpoint.view import ModelView
from corda_surgery.compute import ComputeOptions
from corda_surgery.distributed import ALONE, DistributedError, ResultSender, broadcast_object
from corda_surgery.distributed import current as current_ranks
from corda_surgery.outputs import STAGING_MARK, claimed
from corda_surgery.paths import resolved
from corda_surgery.surgery.calibration import calibrate
from corda_surgery.surgery.initialise import Initialiser
from corda_surgery.surgery.options import SurgeryOptions
from corda_surgery.surgery.ranks import layer_plan
from corda_surgery.surgery.resume import FinishedWork, run_record
from corda_surgery.surgery.targets import Target, plan_targets
from corda_surgery.surgery.work import receive_factors, share_of_work
from corda_surgery.surgery.writing import write_output


def hidden_store(out: Path) -> Path:
    """Where ``convert`` writes its store until the output is published (a kill leaves it for ``resume``)."""
    return out.with_name(f".{out.name}.covariances.h5")


def _by_block(view: ModelView, targets: list[Target]) -> dict[int, list[Target]]:
    prefixes = {view.block_name(index) + ".": index for index in range(view.num_blocks)}
    blocks: dict[int, list[Target]] = {}
    for target in targets:
        index = next(i for prefix, i in prefixes.items() if target.name.startswith(prefix))
        blocks.setdefault(index, []).append(target)
    return blocks


class _DecomposingSink:
    """Takes each summed block: stores it where the store is kept, decomposes its targets, saves the block's
    entries with the finished work (rank 0). Under torch.distributed every rank takes the block (the sums are
    all-reduced), decomposes its share of it and sends the results to rank 0, which keeps them."""

    def __init__(
        self,
        view: ModelView,
        window: StreamedCovariances,
        finished: FinishedWork | None,
        store: CovarianceSink | None,
        options: SurgeryOptions,
        compute: ComputeOptions,
        progress: bool,
    ):
        self.view, self.window, self.finished_work, self.store = view, window, finished, store
        self.options, self.compute, self.device, self.progress = options, compute, compute.torch_device, progress
        self.ranks = current_ranks()
        self.targets = _by_block(view, plan_targets(view, options).targets)
        done = set(finished.done) if finished is not None else None
        self.done: set[str] = broadcast_object(done, self.ranks, "agreeing on the decompositions already finished")
        self.blocks_done = 0
        if store is None and finished is not None:  # the blocks a resumed run decomposed whole: their entries
            for entries in finished.layers():
                for data in entries:
                    window.add(*entry_from_json(data))
                self.blocks_done += 1

    @property
    def layers_done(self) -> int:
        return self.store.layers_done if self.store is not None else self.blocks_done

    @property
    def finished(self) -> bool:
        return self.store.finished if self.store is not None else self.blocks_done == self.view.num_blocks

    def write_layer(self, layer: int, entries: Entries) -> None:
        described = self._spill(layer, entries)
        try:
            self._decompose(layer)
        finally:
            self.window.release()
        if self.finished_work is not None:
            self.finished_work.keep_layer(layer, described)
        self.blocks_done = layer + 1

    def _spill(self, layer: int, entries: Entries) -> list[dict]:
        """The block into the store where kept, and into the one-block store it is decomposed from, with rank
        0's entries (its eigenvalue counts) on every rank; those entries. The sums are let go on return, so the
        decomposition never shares memory with them."""
        summed = list(entries)
        if self.store is not None:
            self.store.write_layer(layer, summed)
        ours = [entry for entry, _ in summed] if self.ranks.writer else None
        what = f"{self.view.block_name(layer)}: sharing its inputs"
        entry = {found.name: found for found in broadcast_object(ours, self.ranks, what)}
        self.window.spill(layer, [(entry[found.name], sums) for found, sums in summed])
        return [entry_to_json(entry[found.name], sums[0].shape[0]) for found, sums in summed]

    def _decompose(self, layer: int) -> None:
        """The block's targets with a covariance (those without are left out later, as two passes do), as the
        writer would decompose them: each shared input factorised once for all its readers, on the rank that
        ``share_of_work`` gives it."""
        targets = [t for t in self.targets.get(layer, []) if t.name in self.window.by_linear]
        if not targets:
            return
        plan, _ = layer_plan(
            self.view, [self.window], targets, self.options, progress=False, device=self.device, ranks=ALONE
        )
        initialise = Initialiser([self.window], targets, plan, {}, self.options, self.compute)
        for name in (t.name for t in targets if t.name in self.done):
            initialise.shared.skip(name)
        owners = share_of_work(targets, plan, initialise, self.options, self.ranks)
        sender = None if self.ranks.writer else ResultSender(self.ranks)
        fused: dict[str, torch.Tensor] = {}
        left = [t for t in targets if t.name not in self.done]
        for target in tqdm(left, desc=f"block {layer}: decomposing", leave=False, disable=not self.progress):
            owner = owners.get(target.name, 0)
            if owner == self.ranks.rank:
                result = initialise(self._weight(target, fused), target)
                found = (result.lora_a, result.lora_b, result.record)
                if sender is not None:
                    sender.send({"target": target.name, "record": result.record.to_json()}, found[:2])
            elif self.ranks.writer:
                dtype = self.options.decomposition.torch_factor_dtype
                (lora_a, lora_b), record = receive_factors(target, plan[target.name].rank, dtype, owner, self.ranks)
                found = (lora_a, lora_b, record)
            else:
                continue
            if self.finished_work is not None:
                self.finished_work.keep(target.name, *found)
        if sender is not None:
            sender.close()

    def _weight(self, target: Target, fused: dict[str, torch.Tensor]) -> torch.Tensor:
        """The stored weight, or an expert's slice of its fused weight (one fused weight held at a time)."""
        if target.parameter is None:
            assert target.key is not None
            return self.view.reader.copy(target.key)
        if target.parameter not in fused:
            fused.clear()
            fused[target.parameter] = self.view.writable(target.parameter)
        return fused[target.parameter][target.expert]

    def finish(self) -> None:
        if self.store is not None:
            self.store.finish()
        elif self.ranks.writer:
            warn_rank_deficient(self.window)

    def close(self) -> None:
        self.window.release()
        if self.store is not None:
            self.store.close()

    def discard(self) -> None:
        self.window.release()
        if self.store is not None:
            self.store.discard()


class OnePassOutput:
    """A rank's part in a one-pass calibration: each block decomposed as it is summed (its share of it under
    torch.distributed), the store written only where kept (by rank 0). Holds the covariances streamed and, on
    rank 0, the finished work, for the output's writing."""

    def __init__(self, out: Path, options: SurgeryOptions, compute: ComputeOptions, *, keep: bool, progress: bool):
        self.out, self.options, self.compute, self.keep, self.progress = out, options, compute, keep, progress
        self.ranks = current_ranks()
        self.store = rank_output(self.ranks)
        self.window: StreamedCovariances | None = None
        self.finished: FinishedWork | None = None

    def claim(
        self, out: str | Path, inputs: Sequence[Path], overwrite: bool, resume: bool
    ) -> AbstractContextManager[Path]:
        """The output's lock (rank 0's alone), since the run writes beside it; and the store's path and lock
        where it is kept."""
        return (
            self._lock(out, inputs, overwrite, resume)
            if self.ranks.writer
            else self.store.claim(out, inputs, overwrite, resume)
        )

    @contextlib.contextmanager
    def _lock(self, store: str | Path, inputs: Sequence[Path], overwrite: bool, resume: bool) -> Iterator[Path]:
        with claimed(self.out, inputs):
            if not self.keep:
                yield resolved(store)
                return
            with self.store.claim(store, inputs, overwrite, resume) as path:
                yield path

    def sink(
        self, out: Path, view: ModelView, calibration: dict, *, resume: bool, counted: CountedLevel | None
    ) -> CovarianceSink:
        writer = self.ranks.writer
        store = (
            self.store.sink(out, view, calibration, resume=resume, counted=counted) if self.keep and writer else None
        )
        fingerprint = view.reader.fingerprint()
        rank = "" if writer else f"-rank{self.ranks.rank}"
        block = self.out.with_name(f".{self.out.name}{STAGING_MARK}block{rank}.h5")  # a kill's is removed as stale
        self.window = StreamedCovariances(self.out, block, fingerprint, calibration, counted)
        run = run_record(self.options, fingerprint, [self.window], self.compute)
        self.finished = FinishedWork(self.out, run, resume=resume) if writer else None
        return _DecomposingSink(view, self.window, self.finished, store, self.options, self.compute, self.progress)


def in_one_pass(
    model_dir: Path,
    out: Path,
    spec: CalibrationSpec,
    options: SurgeryOptions,
    *,
    compute: ComputeOptions,
    overwrite: bool,
    resume: bool,
    keep: bool,
    progress: bool,
) -> None:
    """Calibrate, decomposing each block as it is summed; then write ``out`` from the finished work. An error
    removes what this run made (its store, its finished work); a kill or a signal leaves them for ``resume``."""
    ranks = current_ranks()
    store = hidden_store(out)
    earlier = store.exists()  # a killed run's, kept for --resume
    output = OnePassOutput(out, options, compute, keep=keep, progress=progress)
    try:
        _calibrate(model_dir, spec, store, options, compute, resume, progress, output)
        view = ModelView(model_dir, device=compute.torch_device)
        fingerprint = view.reader.fingerprint()
        with contextlib.ExitStack() as closing:
            if keep:
                streamed: list[Covariances] = [closing.enter_context(CovarianceStore(store))]
            else:  # every rank plans the same targets from the inputs rank 0 streamed
                window = output.window if ranks.writer else None
                streamed = [broadcast_object(window, ranks, "sharing the inputs calibrated")]
            write_output(
                view,
                fingerprint,
                out,
                options,
                streamed,
                inputs=[model_dir, *spec.input_files()],
                compute=compute,
                ranks=ranks,
                overwrite=overwrite,
                resume=False,
                bundle_store=keep,
                stores_kept=keep,
                progress=progress,
                plan=False,
                finished_work=output.finished,
            )
    except DistributedError:
        raise  # another rank stopped (a kill, a lost node): the store and the work stay for --resume
    except Exception:
        if output.finished is not None and output.finished.created:
            output.finished.remove()
        if ranks.writer and keep and not earlier:
            store.unlink(missing_ok=True)
        raise
    if ranks.writer:
        store.unlink(missing_ok=True)  # out/covariances.h5 is now its only name, or none was kept
        store.with_name(store.name + ".partial").unlink(missing_ok=True)  # a kept store's, left by a killed run


def _calibrate(
    model_dir: Path,
    spec: CalibrationSpec,
    store: Path,
    options: SurgeryOptions,
    compute: ComputeOptions,
    resume: bool,
    progress: bool,
    output: OnePassOutput | None,
) -> None:
    """``convert``'s calibration into ``store`` beside ``out`` (counted at the options' damping): decomposing each
    block as it comes where ``output`` is one pass's, plain otherwise."""
    decomposition = options.decomposition
    calibrate(
        model_dir,
        spec,
        store,
        compute=compute,
        resume=resume,
        overwrite=True,
        progress=progress,
        plan=False,
        damping=decomposition.damping,
        damping_rule=decomposition.damping_rule,
        output=output,
    )


def in_two_passes(
    model_dir: Path,
    out: Path,
    spec: CalibrationSpec,
    options: SurgeryOptions,
    *,
    compute: ComputeOptions,
    overwrite: bool,
    resume: bool,
    keep: bool,
    progress: bool,
) -> None:
    """Calibrate the whole store beside ``out``, then decompose from it, bundling it into ``out`` where kept. An
    error removes the store this run calibrated; a kill or a signal leaves it (and the decompositions finished)
    for ``resume``."""
    ranks = current_ranks()
    store = hidden_store(out)
    earlier = store.exists()
    calibrated = False
    try:
        _calibrate(model_dir, spec, store, options, compute, resume, progress, None)
        calibrated = True
        view = ModelView(model_dir, device=compute.torch_device)
        fingerprint = view.reader.fingerprint()
        with CovarianceStore(store) as opened:
            write_output(
                view,
                fingerprint,
                out,
                options,
                [opened],
                inputs=[model_dir, store],
                compute=compute,
                ranks=ranks,
                overwrite=overwrite,
                resume=resume,
                bundle_store=keep,
                stores_kept=keep,
                progress=progress,
                plan=False,
            )
    except DistributedError:
        raise
    except Exception:
        if ranks.writer and calibrated and not earlier:
            store.unlink(missing_ok=True)  # the store this run calibrated: a failed convert leaves nothing
        raise
    if ranks.writer:
        store.unlink(missing_ok=True)  # out/covariances.h5 is now its only name, or it was not kept
