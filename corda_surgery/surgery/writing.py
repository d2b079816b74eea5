"""A surgery's run once its covariances are open: the targets chosen against them, the work an interrupted run
finished, the memory plan, then the output staged and published. ``decompose`` opens stores for it; ``convert``'s
one pass hands it the covariances it streamed (``corda_surgery.surgery.convert``)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from corda_surgery.calib.store import Covariances
from corda_surgery.checkpoint.view import ModelView
from corda_surgery.compute import ComputeOptions
from corda_surgery.distributed import Ranks, barrier, broadcast_object
from corda_surgery.outputs import staged_folder
from corda_surgery.surgery.initialise import Initialiser
from corda_surgery.surgery.options import SurgeryOptions
from corda_surgery.surgery.plan import announce, plan_run
from corda_surgery.surgery.ranks import layer_plan
from corda_surgery.surgery.resume import FinishedWork, check_finished_output, run_record
from corda_surgery.surgery.targets import TargetPlan, chosen_targets, shapes
from corda_surgery.surgery.work import WorkSource, serve_share, share_of_work
from corda_surgery.surgery.writer import SurgeryOutput, write_surgery


def write_output(
    view: ModelView,
    fingerprint: str,
    out: Path,
    options: SurgeryOptions,
    stores: Sequence[Covariances],
    *,
    inputs: Sequence[Path],
    compute: ComputeOptions,
    ranks: Ranks,
    overwrite: bool,
    resume: bool,
    bundle_store: bool,
    progress: bool,
    plan: bool,
    stores_kept: bool = True,
    finished_work: FinishedWork | None = None,
) -> None:
    """Decompose what is left and write ``out`` (rank 0; the other ranks serve their share): the residual model,
    ``adapter/`` and surgery.json. ``inputs``: what ``out`` must not overlap or replace. ``bundle_store``: link
    the one store into ``out``; ``stores_kept`` False: the stores go when the run ends, so the report names none.
    ``finished_work``: what the run decomposed so far (``convert``'s one pass), else found beside ``out``."""
    chosen = chosen_targets(view, options, stores, fingerprint)
    run = run_record(options, fingerprint, stores, compute)
    if _finished_before(out, run, resume and not overwrite, ranks):
        return
    if plan:
        announce(
            plan_run(
                view, compute, out, options=options, targets=shapes(chosen.targets, options.method.uses_covariance)
            ),
            progress,
        )
    made: list[Callable[[BaseException], None]] = []
    finished = None
    if ranks.writer:
        with staged_folder(out, overwrite=overwrite, inputs=inputs, on_failure=made) as staging:
            finished = finished_work or FinishedWork(out, run, resume=resume)
            made.append(finished.discard)
            work = _work_source(view, stores, chosen, options, compute, ranks, finished, progress)
            output = SurgeryOutput(staging, out, fingerprint, bundle_store, compute, progress, stores_kept)
            write_surgery(view, chosen, stores, options, work, output)
        finished.remove()  # the output is published: nothing left to resume
    else:
        work = _work_source(view, stores, chosen, options, compute, ranks, None, progress)
        serve_share(work, chosen.targets, options.output.max_shard_size)
    barrier(ranks, "waiting for rank 0 to write the output")  # every result taken before any rank leaves


def _finished_before(out: Path, run: dict, resume: bool, ranks: Ranks) -> bool:
    """Whether ``resume`` finds ``out`` already written by this very run (checked by rank 0, told to all)."""
    finished = resume and ranks.writer and out.exists()
    if finished:
        check_finished_output(out, run)
    return bool(broadcast_object(finished, ranks, "agreeing on whether the output is finished"))


def _work_source(
    view: ModelView,
    stores: Sequence[Covariances],
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
    initialise = Initialiser(stores, chosen.targets, targets_plan, plus, options, compute)
    owners = share_of_work(chosen.targets, targets_plan, initialise, options, ranks)
    done = frozenset(finished.done) if finished is not None else frozenset()
    done = broadcast_object(done, ranks, "agreeing on the decompositions already finished")
    return WorkSource(view.reader, initialise, ranks, owners, finished, done)
