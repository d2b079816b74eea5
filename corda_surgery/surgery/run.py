"""The surgery commands as functions: ``decompose_checkpoint``, ``convert_checkpoint`` and ``estimate_run``.

Everything the config, the options and the stores decide is checked first, so a mistake costs seconds,
not a calibration; then the work source hands each target's result to the writer, in one process and
under torch.distributed alike.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Sequence
from pathlib import Path

from corda_surgery.calib.data import CalibrationSpec, check_source
from corda_surgery.calib.store import CovarianceStore
from corda_surgery.calib.stream import open_view
from corda_surgery.checkpoint.reader import CheckpointReader
from corda_surgery.checkpoint.view import ModelView
from corda_surgery.compute import DEFAULT_COMPUTE, ComputeOptions
from corda_surgery.distributed import DistributedError, Ranks, barrier, broadcast_object, samples_share
from corda_surgery.distributed import current as current_ranks
from corda_surgery.errors import OptionsError
from corda_surgery.outputs import check_disjoint, made_folder, refuse_existing, staged_folder
from corda_surgery.paths import resolved
from corda_surgery.surgery.calibration import calibrate
from corda_surgery.surgery.initialise import Initialiser
from corda_surgery.surgery.options import Method, SurgeryOptions
from corda_surgery.surgery.plan import MemoryPlan, announce, plan_run
from corda_surgery.surgery.ranks import layer_plan
from corda_surgery.surgery.report import STORE_NAME
from corda_surgery.surgery.resume import FinishedWork, ResumeError, check_finished_output, run_record
from corda_surgery.surgery.targets import TargetPlan, check_budget, chosen_targets, plan_targets, shapes
from corda_surgery.surgery.work import WorkSource, serve_share, share_of_work
from corda_surgery.surgery.writer import SurgeryOutput, write_surgery


def _check_stores_for_method(options: SurgeryOptions, stores: Sequence[str | Path], bundle_store: bool) -> None:
    method = options.method
    if method.uses_covariance and not stores:
        raise OptionsError(f"`method` {method.value} needs a covariance store (`stores`)")
    if not method.uses_covariance and stores:
        raise OptionsError(f"`method` {method.value} uses no covariances: drop `stores`")
    if method is Method.CORDA and len(stores) > 1:
        raise OptionsError("several covariance stores are CorDA++'s covariance selection: use `method` corda++")
    if bundle_store and len(stores) != 1:
        raise OptionsError("`bundle_store` needs exactly one covariance store")


def decompose_checkpoint(
    model_dir: str | Path,
    out: str | Path,
    options: SurgeryOptions,
    *,
    stores: Sequence[str | Path] = (),
    compute: ComputeOptions = DEFAULT_COMPUTE,
    overwrite: bool = False,
    resume: bool = False,
    bundle_store: bool = False,
    progress: bool = True,
    plan: bool = True,
) -> Path:
    """Write ``out``: residual model (sharded safetensors + config + tokenizer), ``adapter/`` and surgery.json.

    ``corda++`` picks each layer's most compact candidate covariance (every store, or every sampling round of a
    store that has several) and, with a budget, per-layer ranks. ``bundle_store`` places the one store in
    ``out/covariances.h5``. Decompositions run on ``compute``'s device (float64; the CPU for a weight the device
    has no memory for). ``plan``: print the memory plan, refuse a run that cannot fit. ``resume``: go on from the
    decompositions a killed run finished. Under torch.distributed the ranks share the linears (``share_of_work``)
    and rank 0 alone writes what one process writes.
    """
    ranks = current_ranks()
    progress = progress and ranks.writer
    _check_stores_for_method(options, stores, bundle_store)
    model_dir, out = Path(model_dir), resolved(out)
    check_disjoint(out, [model_dir, *map(Path, stores)])
    view = ModelView(model_dir, device=compute.torch_device)
    plan_targets(view, options)  # option mistakes first, before the fingerprint reads the weights
    fingerprint = view.reader.fingerprint()
    with contextlib.ExitStack() as closing:
        opened = [closing.enter_context(CovarianceStore(path)) for path in stores]
        chosen = chosen_targets(view, options, opened, fingerprint)
        run = run_record(options, fingerprint, opened, compute)
        if _finished_before(out, run, resume and not overwrite, ranks):
            return out
        if plan:
            announce(plan_run(view, compute, out, options=options, targets=shapes(chosen.targets)), progress)
        made: list[Callable[[BaseException], None]] = []
        staged = staged_folder(out, overwrite=overwrite, inputs=[model_dir, *map(Path, stores)], on_failure=made)
        staging = closing.enter_context(staged) if ranks.writer else None
        finished = FinishedWork(out, run, resume=resume) if staging else None
        made += [finished.discard] if finished is not None else []
        work = _work_source(view, opened, chosen, options, compute, ranks, finished, progress)
        if staging is None:
            serve_share(work, chosen.targets, options.output.max_shard_size)
        else:
            output = SurgeryOutput(staging, out, fingerprint, bundle_store, compute, progress)
            write_surgery(view, chosen, opened, options, work, output)
    if finished is not None:
        finished.remove()  # the output is published: nothing left to resume
    barrier(ranks, "waiting for rank 0 to write the output")  # every result taken before any rank leaves
    return out


def _finished_before(out: Path, run: dict, resume: bool, ranks: Ranks) -> bool:
    """Whether ``resume`` finds ``out`` already written by this very run (checked by rank 0, told to all)."""
    finished = resume and ranks.writer and out.exists()
    if finished:
        check_finished_output(out, run)
    return bool(broadcast_object(finished, ranks, "agreeing on whether the output is finished"))


def _work_source(
    view: ModelView,
    stores: list[CovarianceStore],
    chosen: TargetPlan,
    options: SurgeryOptions,
    compute: ComputeOptions,
    ranks: Ranks,
    finished: FinishedWork | None,
    progress: bool,
) -> WorkSource:
    """Each target's plan and initialiser, who decomposes it, and what an interrupted run already finished."""
    device = compute.torch_device
    targets_plan, plus = layer_plan(
        view, stores, chosen.targets, options, progress=progress, device=device, ranks=ranks
    )
    initialise = Initialiser(stores, chosen.targets, targets_plan, plus, options, device)
    owners = share_of_work(chosen.targets, targets_plan, initialise, options, ranks)
    done = frozenset(finished.done) if finished is not None else frozenset()
    done = broadcast_object(done, ranks, "agreeing on the decompositions already finished")
    return WorkSource(view.reader, initialise, ranks, owners, finished, done)


def convert_checkpoint(
    model_dir: str | Path,
    out: str | Path,
    spec: CalibrationSpec,
    options: SurgeryOptions,
    *,
    compute: ComputeOptions = DEFAULT_COMPUTE,
    overwrite: bool = False,
    resume: bool = False,
    progress: bool = True,
) -> Path:
    """Calibrate and decompose in one go, keeping the store as ``out/covariances.h5``: calibrated beside ``out``
    once the config and options are checked, moved inside when done; an error removes it, a kill or a signal
    leaves it (and the decompositions finished) for ``resume``. Under torch.distributed rank 0 alone writes."""
    ranks = current_ranks()
    progress = progress and ranks.writer
    out, model_dir = resolved(out), Path(model_dir)
    check_disjoint(out, [model_dir, *spec.input_files()])
    check_source(spec)
    if _converted_before(out, model_dir, spec, options, compute, resume and not overwrite, ranks):
        return out
    refuse_existing(out, overwrite)
    announce(estimate_run(model_dir, compute, out, spec=spec, options=options), progress)
    stores: list[Path] = []
    earlier = out.with_name(f".{out.name}.covariances.h5").exists()  # a killed run's, kept for --resume
    with made_folder(out.parent):  # the hidden store's parents too: a failed convert leaves none
        try:
            if options.method.uses_covariance:
                stores.append(_hidden_store(model_dir, spec, out, options, compute, resume, progress))
            decompose_checkpoint(
                model_dir,
                out,
                options,
                stores=stores,
                compute=compute,
                overwrite=overwrite,
                resume=resume,
                bundle_store=bool(stores),
                progress=progress,
                plan=False,
            )
        except DistributedError:
            raise  # another rank stopped (a kill, a lost node): the store and the work stay for --resume
        except Exception:
            for store in stores if ranks.writer and not earlier else []:
                store.unlink(missing_ok=True)  # the hidden store this run calibrated: a failed convert leaves nothing
            raise
    for store in stores if ranks.writer else []:
        store.unlink()  # out/covariances.h5 is now its only name
    return out


def _hidden_store(
    model_dir: Path,
    spec: CalibrationSpec,
    out: Path,
    options: SurgeryOptions,
    compute: ComputeOptions,
    resume: bool,
    progress: bool,
) -> Path:
    """``convert``'s store, calibrated beside ``out`` (counted at the options' damping) until the surgery is done."""
    decomposition = options.decomposition
    store = out.with_name(f".{out.name}.covariances.h5")
    return calibrate(
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
    )


def _converted_before(
    out: Path,
    model_dir: Path,
    spec: CalibrationSpec,
    options: SurgeryOptions,
    compute: ComputeOptions,
    resume: bool,
    ranks: Ranks,
) -> bool:
    """Whether ``resume`` finds ``out`` already converted by this very run: the same model, options and device,
    and a bundled store calibrated with these settings (checked by rank 0, told to all)."""
    finished = resume and ranks.writer and out.exists()
    if finished:
        stores = [out / STORE_NAME] if options.method.uses_covariance else []
        with contextlib.ExitStack() as closing:
            opened = [closing.enter_context(CovarianceStore(path)) for path in stores]
            fingerprint = CheckpointReader(model_dir).fingerprint()
            asked = {key: value for key, value in dataclasses.asdict(spec).items() if value is not None}  # None: auto
            for store in opened:  # the store kept in ``out`` records the calibration it was made with
                differing = [key for key, value in asked.items() if store.calibration.get(key) != value]
                if differing:
                    raise ResumeError(
                        f"{out}: a finished output calibrated otherwise ({', '.join(differing)}); "
                        "write elsewhere, or use `overwrite`"
                    )
            check_finished_output(out, run_record(options, fingerprint, opened, compute))
        out.with_name(f".{out.name}.covariances.h5").unlink(missing_ok=True)  # left by a kill after publishing
    return bool(broadcast_object(finished, ranks, "agreeing on whether the output is finished"))


def estimate_run(
    model_dir: str | Path,
    compute: ComputeOptions,
    out: str | Path,
    *,
    spec: CalibrationSpec | None = None,
    options: SurgeryOptions | None = None,
) -> MemoryPlan:
    """The memory plan of a calibration (``spec``), a decomposition (``options``) or both, without doing either.

    Checks what the config and the options decide (targets, ranks) on the way, as the run would.
    """
    view = open_view(model_dir, compute)
    targets = plan_targets(view, options).targets if options is not None else []
    if options is not None:
        check_budget(targets, options)
    if options is not None and not options.method.uses_covariance:
        spec = None  # pissa, milora and lora calibrate nothing
    if spec is not None:  # per rank under torch.distributed: its share of the samples
        check_source(spec)
        spec = dataclasses.replace(spec, samples=samples_share(spec.samples, spec.batch_size, current_ranks()))
    return plan_run(view, compute, Path(out), spec=spec, options=options, targets=shapes(targets))
