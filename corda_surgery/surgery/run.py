"""The surgery commands as functions: ``decompose_checkpoint``, ``convert_checkpoint`` and ``estimate_run``.

Everything the config, the options and the stores decide is checked first, so a mistake costs seconds,
not a calibration; then the work source hands each target's result to the writer, in one process and
under torch.distributed alike.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Sequence
from pathlib import Path

from corda_surgery.calib.data import CalibrationSpec
from corda_surgery.calib.store import CovarianceStore
from corda_surgery.calib.stream import open_view
from corda_surgery.checkpoint.view import ModelView
from corda_surgery.compute import DEFAULT_COMPUTE, ComputeOptions
from corda_surgery.distributed import barrier, samples_share
from corda_surgery.distributed import current as current_ranks
from corda_surgery.errors import OptionsError
from corda_surgery.outputs import check_disjoint, refuse_existing, staged_folder
from corda_surgery.surgery.calibration import calibrate
from corda_surgery.surgery.initialise import Initialiser
from corda_surgery.surgery.options import Method, SurgeryOptions
from corda_surgery.surgery.plan import MemoryPlan, announce, plan_run
from corda_surgery.surgery.ranks import layer_plan
from corda_surgery.surgery.targets import check_budget, chosen_targets, plan_targets, shapes
from corda_surgery.surgery.work import WorkSource, serve_share, share_of_work
from corda_surgery.surgery.writer import SurgeryOutput, write_surgery


def _check_stores_for_method(options: SurgeryOptions, stores: Sequence[str | Path], bundle_store: bool) -> None:
    method = options.method
    if method.uses_covariance and not stores:
        raise OptionsError(f"--method {method.value} needs a covariance store (--covariances)")
    if not method.uses_covariance and stores:
        raise OptionsError(f"--method {method.value} uses no covariances: drop --covariances")
    if method is Method.CORDA and len(stores) > 1:
        raise OptionsError("several covariance stores are CorDA++'s covariance selection: use --method corda++")
    if bundle_store and len(stores) != 1:
        raise OptionsError("bundle_store needs exactly one covariance store")


def decompose_checkpoint(
    model_dir: str | Path,
    out: str | Path,
    options: SurgeryOptions,
    *,
    stores: Sequence[str | Path] = (),
    compute: ComputeOptions = DEFAULT_COMPUTE,
    overwrite: bool = False,
    bundle_store: bool = False,
    progress: bool = True,
    plan: bool = True,
) -> Path:
    """Write ``out``: residual model (sharded safetensors + config + tokenizer), ``adapter/`` and surgery.json.

    ``corda++`` picks each layer's most compact candidate covariance (every store, or every sampling
    round of a store that has several) and, with a rank or parameter budget, per-layer ranks.
    The adapter names ``options.base_name`` (default ``out``) as its base model; ``bundle_store`` places
    the one store in ``out/covariances.h5``. Decompositions run on ``compute``'s device (float64), each
    weight falling back to the CPU where the device runs out of memory. ``plan``: print the memory plan and
    refuse a run that cannot fit. Under torch.distributed the linears are shared out among the ranks
    (``share_of_work``); rank 0 alone writes, and its output is what one process writes.
    """
    ranks = current_ranks()
    progress = progress and ranks.writer
    _check_stores_for_method(options, stores, bundle_store)
    model_dir, out = Path(model_dir), Path(out)
    check_disjoint(out, [model_dir, *map(Path, stores)])
    view = ModelView(model_dir, device=compute.torch_device)
    plan_targets(view, options)  # option mistakes first, before the fingerprint reads the weights
    fingerprint = view.reader.fingerprint()
    with contextlib.ExitStack() as closing:
        opened = [closing.enter_context(CovarianceStore(path)) for path in stores]
        chosen = chosen_targets(view, options, opened, fingerprint)
        if plan:
            announce(plan_run(view, compute, out, options=options, targets=shapes(chosen.targets)), progress)
        device = compute.torch_device
        targets_plan, plus = layer_plan(
            view, opened, chosen.targets, options, progress=progress, device=device, ranks=ranks
        )
        initialise = Initialiser(opened, chosen.targets, targets_plan, plus, options, device)
        owners = share_of_work(chosen.targets, targets_plan, initialise, options, ranks)
        work = WorkSource(view.reader, initialise, ranks, owners)
        if not ranks.writer:
            serve_share(work, chosen.targets, options.max_shard_size)
        else:
            with staged_folder(out, overwrite=overwrite, inputs=[model_dir, *map(Path, stores)]) as staging:
                output = SurgeryOutput(staging, out.resolve(), fingerprint, bundle_store, compute, progress)
                write_surgery(view, chosen, opened, options, work, output)
    barrier(ranks, "waiting for rank 0 to write the output")  # every result taken before any rank leaves
    return out.resolve()


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
    """Calibrate and decompose in one go, keeping the store as ``out/covariances.h5``.

    Everything the config and the options decide is checked before calibration starts; the store is
    calibrated beside ``out`` (resumable there with ``resume``) and moved inside when the surgery is done.
    Under torch.distributed every rank calibrates and decomposes its share; rank 0 alone writes.
    """
    ranks = current_ranks()
    progress = progress and ranks.writer
    out, model_dir = Path(out).resolve(), Path(model_dir)
    check_disjoint(out, [model_dir, *spec.input_files()])
    refuse_existing(out, overwrite)
    announce(estimate_run(model_dir, compute, out, spec=spec, options=options), progress)
    stores: list[Path] = []
    if options.method.uses_covariance:
        store = out.with_name(f".{out.name}.covariances.h5")
        stores.append(
            calibrate(
                model_dir,
                spec,
                store,
                compute=compute,
                resume=resume,
                overwrite=True,
                progress=progress,
                plan=False,
                damping=options.damping,
                damping_rule=options.damping_rule,
            )
        )
    decompose_checkpoint(
        model_dir,
        out,
        options,
        stores=stores,
        compute=compute,
        overwrite=overwrite,
        bundle_store=bool(stores),
        progress=progress,
        plan=False,
    )
    for store in stores if ranks.writer else []:
        store.unlink()  # out/covariances.h5 is now its only name
    return out


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
        spec = dataclasses.replace(spec, samples=samples_share(spec.samples, spec.batch_size, current_ranks()))
    return plan_run(view, compute, Path(out), spec=spec, options=options, targets=shapes(targets))
