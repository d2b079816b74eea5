"""The surgery's options: one frozen, validated object built once at the edge (the CLI) and passed whole.

Closed sets are enums; every value is checked here, before any work, and an error names the option.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import Enum

import torch

from corda_surgery.checkpoint.writer import DEFAULT_MAX_SHARD_SIZE
from corda_surgery.decomposition.kinds import (
    DEFAULT_DAMPING,
    DEFAULT_DAMPING_RULE,
    FACTOR_DTYPES,
    DampingRule,
    Mode,
    Solver,
)
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
        raise OptionsError(f"--targets {value!r}: give comma-separated linear names or {ALL_LINEAR}")
    return () if names == (ALL_LINEAR,) else names


def _enum(kind: type[Enum], value, option: str):
    try:
        return kind(value)
    except ValueError:
        choices = ", ".join(str(member.value) for member in kind)
        raise OptionsError(f"{option} {value!r}: must be one of {choices}") from None


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise OptionsError(message)


@dataclass(frozen=True)
class SurgeryOptions:
    """How every target weight is split into a frozen residual and LoRA factors.

    ``mode`` None means: KPM for corda / corda++, the method's own for pissa / milora, none for lora;
    giving a mode to a method that implies one is an error, not silently overridden.
    """

    method: Method = Method.CORDA
    mode: Mode | None = None
    rank: int = 16
    alpha: float | None = None  # None: the rank (scaling 1)
    targets: tuple[str, ...] = ()  # linear or fused expert weight names (suffixes); (): all of them
    solver: Solver = Solver.SUBSPACE
    factor_dtype: str = "float32"
    damping: float = DEFAULT_DAMPING
    damping_rule: DampingRule = DEFAULT_DAMPING_RULE  # what --damping multiplies
    rank_budget: float | None = None
    param_budget: int | None = None
    min_rank: int = 1
    max_rank: int | None = None
    max_shard_size: int = field(default_factory=lambda: parse_size(DEFAULT_MAX_SHARD_SIZE, "--max-shard-size"))
    base_name: str | None = None
    seed: int = 0
    balance: bool = False  # each rank-one component's A row and B column rescaled to equal norms

    def __post_init__(self) -> None:
        def set_(name: str, value) -> None:
            object.__setattr__(self, name, value)

        method = _enum(Method, self.method, "--method")
        set_("method", method)
        if self.mode is not None and method in _IMPLIED_MODES:
            implied = _IMPLIED_MODES[method]
            what = (
                "has no mode (random init)"
                if implied is None
                else (f"always trains the {'largest' if implied is Mode.IPM else 'smallest'} components")
            )
            raise OptionsError(f"--mode does not go with --method {method.value}, which {what}")
        mode = _enum(Mode, self.mode, "--mode") if self.mode is not None else _IMPLIED_MODES.get(method, Mode.KPM)
        set_("mode", mode)
        set_("solver", _enum(Solver, self.solver, "--solver"))
        set_("damping_rule", _enum(DampingRule, self.damping_rule, "--damping-rule"))
        set_("targets", parse_targets(self.targets) if self.targets else ())
        set_("max_shard_size", parse_size(self.max_shard_size, "--max-shard-size"))
        _require(self.factor_dtype in FACTOR_DTYPES, f"--dtype {self.factor_dtype!r}: must be float32 or float64")
        _require(_is_int(self.rank) and self.rank >= 1, f"--rank {self.rank!r}: must be a whole number ≥ 1")
        alpha = float(self.rank if self.alpha is None else self.alpha)
        _require(math.isfinite(alpha) and alpha > 0, f"--alpha {self.alpha!r}: must be a finite number > 0")
        set_("alpha", alpha)
        _require(
            isinstance(self.damping, (int, float)) and math.isfinite(self.damping) and self.damping >= 0,
            f"--damping {self.damping!r}: must be a finite number ≥ 0",
        )
        _require(_is_int(self.min_rank) and self.min_rank >= 1, f"--min-rank {self.min_rank!r}: must be ≥ 1")
        if self.max_rank is not None:
            _require(
                _is_int(self.max_rank) and self.max_rank >= self.min_rank,
                f"--max-rank {self.max_rank!r}: must be a whole number ≥ --min-rank ({self.min_rank})",
            )
        budgets = [
            name
            for name, value in (("--rank-budget", self.rank_budget), ("--param-budget", self.param_budget))
            if value is not None
        ]
        _require(len(budgets) < 2, "--rank-budget and --param-budget are two ways to say one thing: give one")
        if budgets:
            _require(method is Method.CORDA_PLUS, f"{budgets[0]} needs --method corda++")
            budget = self.rank_budget if self.rank_budget is not None else self.param_budget
            _require(
                isinstance(budget, (int, float)) and math.isfinite(budget) and budget > 0,
                f"{budgets[0]} {budget!r}: must be a finite number > 0",
            )
        if method is not Method.CORDA_PLUS:
            for name, value, default in (("--min-rank", self.min_rank, 1), ("--max-rank", self.max_rank, None)):
                _require(value == default, f"{name} needs --method corda++")
        _require(not (self.balance and mode is None), "--balance needs a decomposition: LoRA's B starts at zero")

    @property
    def scaling(self) -> float:
        """LoRA scaling alpha / r."""
        assert self.alpha is not None  # set in __post_init__
        return self.alpha / self.rank

    @property
    def torch_factor_dtype(self) -> torch.dtype:
        return FACTOR_DTYPES[self.factor_dtype]

    def record(self) -> dict:
        """The options as surgery.json records them."""
        return {
            "method": self.method.value,
            "mode": self.mode.value if self.mode else None,
            "rank": self.rank,
            "alpha": self.alpha,
            "targets": list(self.targets) or ALL_LINEAR,
            "solver": self.solver.value,
            "factor_dtype": self.factor_dtype,
            "damping": self.damping,
            "damping_rule": self.damping_rule.value,
            "rank_budget": self.rank_budget,
            "param_budget": self.param_budget,
            "min_rank": self.min_rank,
            "max_rank": self.max_rank,
            "balance": self.balance,
        }


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
