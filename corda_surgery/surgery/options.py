"""The surgery's options, by concern: what to adapt (method, targets), how each weight is decomposed
(``DecompositionOptions``), the ranks (``RankBudget``) and the output (``OutputOptions``). Each is frozen and
validated once where it is built; an error names the field (`rank`), which the command line shows as its flag.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, replace
from enum import Enum
from typing import Any

from corda_surgery.checkpoint.quantised import ResidualFormat
from corda_surgery.checkpoint.writer import DEFAULT_MAX_SHARD_SIZE
from corda_surgery.decomposition.gptq import DEFAULT_GPTQ_DAMPING, DEFAULT_GROUP_SIZE
from corda_surgery.decomposition.kinds import Mode
from corda_surgery.decomposition.options import DecompositionOptions, member, require
from corda_surgery.decomposition.refit import DEFAULT_REFIT_ROUNDS
from corda_surgery.errors import OptionsError
from corda_surgery.sizes import parse_size

ALL_LINEAR = "all-linear"


class Method(str, Enum):
    CORDA = "corda"
    CORDA_PLUS = "corda++"
    PISSA = "pissa"
    MILORA = "milora"
    LORA = "lora"

    @property
    def uses_covariance(self) -> bool:
        return self in (Method.CORDA, Method.CORDA_PLUS)


# Methods whose mode is part of the method itself: PiSSA trains the largest plain-SVD components, MiLoRA
# the smallest, LoRA has none.
_IMPLIED_MODES = {Method.PISSA: Mode.IPM, Method.MILORA: Mode.KPM, Method.LORA: None}


def parse_targets(value: str | tuple[str, ...]) -> tuple[str, ...]:
    """``all-linear`` → (); ``q_proj, v_proj`` → ("q_proj", "v_proj")."""
    names = tuple(p.strip() for p in value.split(",")) if isinstance(value, str) else tuple(value)
    if any(not name for name in names) or not names:
        raise OptionsError(f"`targets` {value!r}: give comma-separated linear names or {ALL_LINEAR}")
    return () if names == (ALL_LINEAR,) else names


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _positive(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


@dataclass(frozen=True)
class RankBudget:
    """The rank every target gets, or CorDA++'s budget spread across the linears between the bounds."""

    rank: int = 16
    alpha: float | None = None  # None: the rank (scaling 1)
    rank_budget: float | None = None
    param_budget: int | None = None
    min_rank: int = 1
    max_rank: int | None = None

    def __post_init__(self) -> None:
        require(_is_int(self.rank) and self.rank >= 1, f"`rank` {self.rank!r}: must be a whole number ≥ 1")
        alpha = float(self.rank if self.alpha is None else self.alpha)
        require(math.isfinite(alpha) and alpha > 0, f"`alpha` {self.alpha!r}: must be a finite number > 0")
        object.__setattr__(self, "alpha", alpha)
        require(_is_int(self.min_rank) and self.min_rank >= 1, f"`min_rank` {self.min_rank!r}: must be ≥ 1")
        if self.max_rank is not None:
            require(
                _is_int(self.max_rank) and self.max_rank >= self.min_rank,
                f"`max_rank` {self.max_rank!r}: must be a whole number ≥ `min_rank` ({self.min_rank})",
            )
        require(
            self.rank_budget is None or self.param_budget is None,
            "`rank_budget` and `param_budget` are two ways to say one thing: give one",
        )
        for name in ("rank_budget", "param_budget"):
            value = getattr(self, name)
            require(value is None or _positive(value), f"`{name}` {value!r}: must be a finite number > 0")

    @property
    def budgeted(self) -> str | None:
        """The field of the budget given, if any."""
        return "rank_budget" if self.rank_budget is not None else "param_budget" if self.param_budget else None

    @property
    def scaling(self) -> float:
        """LoRA scaling alpha / r."""
        assert self.alpha is not None  # set in __post_init__
        return self.alpha / self.rank


@dataclass(frozen=True)
class OutputOptions:
    max_shard_size: int = field(default_factory=lambda: parse_size(DEFAULT_MAX_SHARD_SIZE, "max_shard_size"))
    base_name: str | None = None  # where the residual will live, named by the adapter; None: the output folder

    def __post_init__(self) -> None:
        object.__setattr__(self, "max_shard_size", parse_size(self.max_shard_size, "max_shard_size"))


@dataclass(frozen=True)
class QuantisationOptions:
    """How the frozen residual is stored: as the input had it, or in 4 bits with the adapter refit to it."""

    residual: ResidualFormat = ResidualFormat.FLOAT
    group_size: int = DEFAULT_GROUP_SIZE  # int4: columns per scale
    gptq_damping: float = DEFAULT_GPTQ_DAMPING  # int4: λ·mean(diag H) added to GPTQ's Hessian
    refit_rounds: int | None = None  # None: DEFAULT_REFIT_ROUNDS where a covariance is, else 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "residual", member(ResidualFormat, self.residual, "residual"))
        require(_is_int(self.group_size) and self.group_size >= 1, f"`group_size` {self.group_size!r}: must be ≥ 1")
        require(_positive(self.gptq_damping), f"`gptq_damping` {self.gptq_damping!r}: must be a finite number > 0")
        rounds = self.refit_rounds
        require(rounds is None or (_is_int(rounds) and rounds >= 0), f"`refit_rounds` {rounds!r}: must be ≥ 0")

    @property
    def quantised(self) -> bool:
        return self.residual is not ResidualFormat.FLOAT

    def record(self) -> dict[str, Any]:
        """What surgery.json adds for a quantised residual (nothing for a float one)."""
        if not self.quantised:
            return {}
        record: dict[str, Any] = {"residual": self.residual.value, "refit_rounds": self.refit_rounds}
        if self.residual is ResidualFormat.INT4:
            record |= {"group_size": self.group_size, "gptq_damping": self.gptq_damping}
        return record


@dataclass(frozen=True)
class SurgeryOptions:
    """How every target weight is split into a frozen residual and LoRA factors.

    The decomposition's ``mode`` None means: KPM for corda / corda++, the method's own for pissa / milora,
    none for lora; giving a mode to a method that implies one is an error, not silently overridden.
    ``SurgeryOptions.of(method=..., rank=..., damping=...)`` builds one from flat fields.
    """

    method: Method = Method.CORDA
    targets: tuple[str, ...] = ()  # linear or fused expert weight names (suffixes); (): all of them
    seed: int = 0  # LoRA's random A
    decomposition: DecompositionOptions = field(default_factory=DecompositionOptions)
    ranks: RankBudget = field(default_factory=RankBudget)
    output: OutputOptions = field(default_factory=OutputOptions)
    quantisation: QuantisationOptions = field(default_factory=QuantisationOptions)

    @classmethod
    def of(cls, **flat: Any) -> SurgeryOptions:
        """From flat fields (``rank=16, mode="ipm"``), each given to the concern that owns it."""

        def part(kind: type) -> dict[str, Any]:
            return {f.name: flat.pop(f.name) for f in fields(kind) if f.name in flat}

        decomposition = DecompositionOptions(**part(DecompositionOptions))
        ranks, output = RankBudget(**part(RankBudget)), OutputOptions(**part(OutputOptions))
        quantisation = QuantisationOptions(**part(QuantisationOptions))
        return cls(**flat, decomposition=decomposition, ranks=ranks, output=output, quantisation=quantisation)

    def __post_init__(self) -> None:
        method = member(Method, self.method, "method")
        object.__setattr__(self, "method", method)
        object.__setattr__(self, "targets", parse_targets(self.targets) if self.targets else ())
        decomposition = self.decomposition
        if decomposition.mode is not None and method in _IMPLIED_MODES:
            implied = _IMPLIED_MODES[method]
            what = (
                "has no mode (random init)"
                if implied is None
                else "always trains the " + ("largest components" if implied is Mode.IPM else "smallest components")
            )
            raise OptionsError(f"`mode` does not go with `method` {method.value}, which {what}")
        if decomposition.mode is None:
            decomposition = replace(decomposition, mode=_IMPLIED_MODES.get(method, Mode.KPM))
            object.__setattr__(self, "decomposition", decomposition)
        require(
            not (decomposition.balance and method is Method.LORA),
            "`balance` needs a decomposition: LoRA's B starts at zero",
        )
        self._check_quantisation()
        budgeted = self.ranks.budgeted
        require(budgeted is None or method is Method.CORDA_PLUS, f"`{budgeted}` needs `method` corda++")
        if method is not Method.CORDA_PLUS:
            for name, default in (("min_rank", 1), ("max_rank", None)):
                require(getattr(self.ranks, name) == default, f"`{name}` needs `method` corda++")

    def _check_quantisation(self) -> None:
        """GPTQ and the refit weigh errors by the calibration covariance: only corda and corda++ have one."""
        quantisation, calibrated = self.quantisation, self.method.uses_covariance
        require(
            quantisation.residual is not ResidualFormat.INT4 or calibrated,
            f"`residual` int4 rounds with GPTQ on the calibration covariance, which `method` {self.method.value} "
            "does not collect: use nf4, or corda / corda++",
        )
        require(
            quantisation.quantised or not quantisation.refit_rounds,
            "`refit_rounds` refits the adapter to a quantised residual: give `residual` nf4 or int4",
        )
        require(
            not quantisation.refit_rounds or calibrated,
            f"`refit_rounds` refits the adapter in the calibration covariance's metric, which `method` "
            f"{self.method.value} does not collect",
        )
        if quantisation.refit_rounds is None:
            rounds = DEFAULT_REFIT_ROUNDS if calibrated and quantisation.quantised else 0
            object.__setattr__(self, "quantisation", replace(quantisation, refit_rounds=rounds))

    @property
    def one_pass(self) -> bool:
        """Whether ``convert`` decomposes each block as soon as it is calibrated. CorDA++ plans over every layer
        first, and a quantised residual needs each covariance again when the residual is written (GPTQ, the
        refit): both decompose from the whole store (two passes)."""
        return self.method is Method.CORDA and not self.quantisation.quantised

    # The fields every layer below reads, named once here.
    @property
    def mode(self) -> Mode | None:
        return self.decomposition.mode

    @property
    def rank(self) -> int:
        return self.ranks.rank

    @property
    def scaling(self) -> float:
        return self.ranks.scaling

    def record(self) -> dict[str, Any]:
        """The options as surgery.json records them."""
        decomposition, ranks = self.decomposition, self.ranks
        return {
            "method": self.method.value,
            "mode": decomposition.mode.value if decomposition.mode else None,
            "rank": ranks.rank,
            "alpha": ranks.alpha,
            "targets": list(self.targets) or ALL_LINEAR,
            "solver": decomposition.solver.value,
            "factor_dtype": decomposition.factor_dtype,
            "damping": decomposition.damping,
            "damping_rule": decomposition.damping_rule.value,
            "rank_budget": ranks.rank_budget,
            "param_budget": ranks.param_budget,
            "min_rank": ranks.min_rank,
            "max_rank": ranks.max_rank,
            "balance": decomposition.balance,
        } | self.quantisation.record()
