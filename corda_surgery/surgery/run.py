"""The surgery commands as functions: ``decompose_checkpoint``, ``convert_checkpoint`` and ``estimate_run``.

Everything the config, the options and the stores decide is checked first, so a mistake costs seconds,
not a calibration; then the passes over the model (``corda_surgery.surgery.convert``) and the writing of the
output (``corda_surgery.surgery.writing``) run, in one process and under torch.distributed alike.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Sequence
from pathlib import Path

from corda_surgery.calib.data import CalibrationSpec, check_source
from corda_surgery.calib.store import CovarianceStore
from corda_surgery.calib.stream import open_view
from corda_surgery.checkpoint.reader import CheckpointReader
from corda_surgery.checkpoint.view import ModelView
from corda_surgery.compute import DEFAULT_COMPUTE, ComputeOptions
from corda_surgery.distributed import broadcast_object, samples_share
from corda_surgery.distributed import current as current_ranks
from corda_surgery.errors import OptionsError
from corda_surgery.outputs import check_disjoint, made_folder, refuse_existing
from corda_surgery.paths import resolved
from corda_surgery.surgery.convert import hidden_store, in_one_pass, in_two_passes
from corda_surgery.surgery.options import Method, SurgeryOptions
from corda_surgery.surgery.plan import MemoryPlan, announce, plan_run
from corda_surgery.surgery.report import read_report
from corda_surgery.surgery.resume import ResumeError, check_finished_output, run_record
from corda_surgery.surgery.targets import check_budget, plan_targets, shapes
from corda_surgery.surgery.writing import write_output


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
        write_output(
            view,
            fingerprint,
            out,
            options,
            opened,
            inputs=[model_dir, *map(Path, stores)],
            compute=compute,
            ranks=ranks,
            overwrite=overwrite,
            resume=resume,
            bundle_store=bundle_store,
            progress=progress,
            plan=plan,
        )
    return out


def convert_checkpoint(
    model_dir: str | Path,
    out: str | Path,
    spec: CalibrationSpec,
    options: SurgeryOptions,
    *,
    compute: ComputeOptions = DEFAULT_COMPUTE,
    overwrite: bool = False,
    resume: bool = False,
    keep_covariances: bool = False,
    progress: bool = True,
) -> Path:
    """Calibrate and decompose in one go, once the config and the options are checked: CorDA decomposes each
    block as soon as its covariances are summed (one pass), CorDA++ from the whole store (two passes; see
    ``corda_surgery.surgery.convert``). ``keep_covariances``: keep the store as ``out/covariances.h5`` for later
    ``decompose`` runs. An error removes what the run made; a kill or a signal leaves the finished blocks,
    decompositions and store for ``resume``. Under torch.distributed rank 0 alone writes."""
    ranks = current_ranks()
    progress = progress and ranks.writer
    out, model_dir = resolved(out), Path(model_dir)
    check_disjoint(out, [model_dir, *spec.input_files()])
    check_source(spec)
    if keep_covariances and not options.method.uses_covariance:
        raise OptionsError(
            f"`keep_covariances`: `method` {options.method.value} calibrates nothing, so there is no store"
        )
    finished = _converted_before(out, model_dir, spec, options, compute, resume and not overwrite, keep_covariances)
    if broadcast_object(finished, ranks, "agreeing on whether the output is finished"):
        return out
    refuse_existing(out, overwrite)
    plan = estimate_run(model_dir, compute, out, spec=spec, options=options, keep_covariances=keep_covariances)
    announce(plan, progress)
    with made_folder(out.parent):  # the hidden store's parents too: a failed convert leaves none
        if not options.method.uses_covariance:
            decompose_checkpoint(
                model_dir,
                out,
                options,
                compute=compute,
                overwrite=overwrite,
                resume=resume,
                progress=progress,
                plan=False,
            )
        else:
            passes = in_one_pass if options.one_pass else in_two_passes
            passes(
                model_dir,
                out,
                spec,
                options,
                compute=compute,
                overwrite=overwrite,
                resume=resume,
                keep=keep_covariances,
                progress=progress,
            )
    return out


def _converted_before(
    out: Path,
    model_dir: Path,
    spec: CalibrationSpec,
    options: SurgeryOptions,
    compute: ComputeOptions,
    resume: bool,
    keep_covariances: bool,
) -> bool:
    """Whether ``resume`` finds ``out`` already converted by this very run: the same model, options, device and
    calibration settings, and its store kept if asked (rank 0 checks; the others are told)."""
    if not (resume and current_ranks().writer and out.exists()):
        return False
    report = read_report(out)
    asked = {key: value for key, value in dataclasses.asdict(spec).items() if value is not None}  # None: auto
    for store in report.covariance_stores:  # the report records the calibration each store was made with
        differing = [key for key, value in asked.items() if store.calibration.get(key) != value]
        if keep_covariances and store.path is None:
            differing.append("keep_covariances")
        if differing:
            raise ResumeError(
                f"{out}: a finished output calibrated otherwise ({', '.join(differing)}); write elsewhere, or use "
                "`overwrite`"
            )
    stores = [_Recorded(s.model_fingerprint, s.calibration) for s in report.covariance_stores]
    check_finished_output(out, run_record(options, CheckpointReader(model_dir).fingerprint(), stores, compute))
    hidden_store(out).unlink(missing_ok=True)  # left by a kill after publishing
    return True


@dataclasses.dataclass(frozen=True)
class _Recorded:
    """A store as a finished output's report records it (``run_record`` reads these two)."""

    fingerprint: str
    calibration: dict


def estimate_run(
    model_dir: str | Path,
    compute: ComputeOptions,
    out: str | Path,
    *,
    spec: CalibrationSpec | None = None,
    options: SurgeryOptions | None = None,
    keep_covariances: bool = False,
) -> MemoryPlan:
    """The memory plan of a calibration (``spec``), a decomposition (``options``) or both (``convert``: in one
    pass for CorDA, keeping the store or not), without doing either.

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
    one_pass = spec is not None and options is not None and options.one_pass
    return plan_run(
        view,
        compute,
        Path(out),
        spec=spec,
        options=options,
        targets=shapes(targets, options is not None and options.method.uses_covariance),
        one_pass=one_pass,
        keep_store=keep_covariances or options is None,  # `calibrate` writes its store
    )
