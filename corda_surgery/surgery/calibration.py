"""The ``calibrate`` command's run: the calibration engine (``corda_surgery.calib.stream``) with the memory plan
printed and checked before any work, and the decomposition's diagnostic (covariance eigenvalues below a damping
level, the default's unless ``convert`` asks for its own) recorded in the store, since calibration itself does no
linear algebra."""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path

from corda_surgery.calib.activations import rank_activation_budget
from corda_surgery.calib.data import CalibrationSpec
from corda_surgery.calib.sink import RankOutput
from corda_surgery.calib.stream import BelowDamping
from corda_surgery.calib.stream import calibrate as collect_covariances
from corda_surgery.checkpoint.view import ModelView
from corda_surgery.compute import DEFAULT_COMPUTE, ComputeOptions
from corda_surgery.decomposition.diagnostics import BELOW_DAMPING_MAX_WIDTH, eigenvalues_below_damping
from corda_surgery.decomposition.kinds import DEFAULT_DAMPING, DEFAULT_DAMPING_RULE, DampingRule
from corda_surgery.distributed import current as current_ranks
from corda_surgery.distributed import samples_share
from corda_surgery.panels import Covariance, SymmetricPanels, square
from corda_surgery.surgery.plan import announce, plan_run


def _counted(total: Covariance, damping: float, rule: DampingRule) -> int | None:
    """Counted for inputs up to BELOW_DAMPING_MAX_WIDTH wide: one float64 factorisation each (of the square, made
    from a triangle and shifted in place)."""
    if total.shape[0] > BELOW_DAMPING_MAX_WIDTH:
        return None
    return eigenvalues_below_damping(square(total), damping, rule, overwrite=isinstance(total, SymmetricPanels))


def below_damping(damping: float = DEFAULT_DAMPING, rule: DampingRule = DEFAULT_DAMPING_RULE) -> BelowDamping:
    """The engine's count at λ = ``damping`` under ``rule`` (``eigenvalues_below_damping``)."""
    rule = DampingRule(rule)
    count = functools.partial(_counted, damping=damping, rule=rule)
    return BelowDamping(level=damping, count=count, rule=rule.value, max_width=BELOW_DAMPING_MAX_WIDTH)


def calibrate(
    model_dir: str | Path,
    spec: CalibrationSpec,
    out: str | Path,
    *,
    compute: ComputeOptions = DEFAULT_COMPUTE,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    plan: bool = True,
    damping: float = DEFAULT_DAMPING,
    damping_rule: DampingRule = DEFAULT_DAMPING_RULE,
    output: RankOutput | None = None,
) -> Path:
    """Collect every target linear's input covariance of ``model_dir`` into the HDF5 store ``out``, with each
    input's count of eigenvalues below the damping level (λ = ``damping`` under ``damping_rule``: the default,
    or the surgery's that follows), on all its tokens and on the first half of them.

    Hidden states past ``compute``'s activation budget spill to a temporary folder beside ``out``.
    ``plan``: print the memory plan and refuse a run that cannot fit, once the output is claimed and before
    any work (``convert`` plans both phases itself and passes False). ``output``: where the summed blocks go
    (default: the store; ``convert``'s one pass decomposes them as they come).
    """
    ranks = current_ranks()
    budget = rank_activation_budget(compute)  # once, for the plan and the run: the default depends on free memory

    def announce_plan(view: ModelView, claimed: Path) -> None:
        share = dataclasses.replace(spec, samples=samples_share(spec.samples, spec.batch_size, ranks))  # per rank
        announce(plan_run(view, compute, claimed, spec=share, activation_budget=budget), progress and ranks.writer)

    return collect_covariances(
        model_dir,
        spec,
        out,
        compute=compute,
        resume=resume,
        overwrite=overwrite,
        progress=progress,
        activation_budget=budget,
        below_damping=below_damping(damping, damping_rule),
        before_work=announce_plan if plan else None,
        output=output,
    )
