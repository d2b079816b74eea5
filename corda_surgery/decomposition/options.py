"""How each weight is decomposed: one frozen, validated object; errors name the field (`mode`, `damping`)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum
from typing import Any

import torch

from corda_surgery.decomposition.kinds import (
    DEFAULT_DAMPING,
    DEFAULT_DAMPING_RULE,
    FACTOR_DTYPES,
    DampingRule,
    Mode,
    Solver,
)
from corda_surgery.errors import OptionsError


def member(kind: type[Enum], value: Any, field: str) -> Any:
    """``kind(value)``, or an error naming ``field`` and the choices."""
    try:
        return kind(value)
    except ValueError:
        choices = ", ".join(str(choice.value) for choice in kind)
        raise OptionsError(f"`{field}` {value!r}: must be one of {choices}") from None


def require(condition: bool, message: str) -> None:
    if not condition:
        raise OptionsError(message)


@dataclass(frozen=True)
class DecompositionOptions:
    """``mode`` None: the method's (``SurgeryOptions`` resolves it), and once resolved, none: LoRA's random
    init. The maths is float64 whatever ``factor_dtype``, the dtype the adapter's factors are stored in."""

    mode: Mode | None = None
    solver: Solver = Solver.SUBSPACE
    damping: float = DEFAULT_DAMPING
    damping_rule: DampingRule = DEFAULT_DAMPING_RULE  # what ``damping`` multiplies
    factor_dtype: str = "float32"
    balance: bool = False  # each rank-one component's A row and B column rescaled to equal norms

    def __post_init__(self) -> None:
        if self.mode is not None:
            object.__setattr__(self, "mode", member(Mode, self.mode, "mode"))
        object.__setattr__(self, "solver", member(Solver, self.solver, "solver"))
        object.__setattr__(self, "damping_rule", member(DampingRule, self.damping_rule, "damping_rule"))
        require(self.factor_dtype in FACTOR_DTYPES, f"`factor_dtype` {self.factor_dtype!r}: must be float32 or float64")
        require(
            isinstance(self.damping, (int, float)) and math.isfinite(self.damping) and self.damping >= 0,
            f"`damping` {self.damping!r}: must be a finite number ≥ 0",
        )

    @property
    def torch_factor_dtype(self) -> torch.dtype:
        return FACTOR_DTYPES[self.factor_dtype]
