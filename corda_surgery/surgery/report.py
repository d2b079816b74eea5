"""surgery.json: the one schema of what a surgery did, written here and read back by every later command.

``merge``, ``to-lora``, ``handoff`` and ``inspect`` read the report through ``read_report``, so a field is
named in one place; a report from a stranger is checked field by field and refused in one line.
"""

from __future__ import annotations

import json
import platform
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from corda_surgery import __version__
from corda_surgery.errors import CordaSurgeryError

ADAPTER_DIR = "adapter"
REPORT_NAME = "surgery.json"
STORE_NAME = "covariances.h5"  # where `convert` keeps its store, inside the output

# A decomposed target's fields, always written (store and round may be null); the rest only when known.
_DECOMPOSED = ("damping", "adapter_energy", "solver", "store", "round")
_OPTIONAL = (
    "damping_rule",
    "damping_level",
    "covariance_eigenvalues_below_damping",
    "covariance_eigenvalues_below_damping_half",
    "half_tokens",
    "damping_limit",
    "tokens",
    "covariance",
    "candidate_compactness",
    "compactness",
    "quantisation_error",
    "quantisation_error_refit",
)


class ReportError(CordaSurgeryError):
    """surgery.json is missing, unreadable or not of this schema; names the file."""


@dataclass
class LayerRecord:
    """What one target linear (or one expert's slice) got."""

    rank: int
    damping: float | None = None  # None: not decomposed (LoRA's random init)
    adapter_energy: float | None = None
    solver: str | None = None  # what found the singular pairs, with the fallback said in words
    store: int | None = None
    round: int | None = None
    damping_rule: str | None = None  # what λ multiplied, where not the default (DampingRule) …
    damping_level: float | None = None  # … and λ·scale / mean(diag C), comparable across rules
    covariance_eigenvalues_below_damping: int | None = None
    covariance_eigenvalues_below_damping_half: int | None = None  # the same count on part of the tokens …
    half_tokens: int | None = None  # … this many
    damping_limit: str | None = None  # where the count reaches the rank: "sample" or "spectrum" (DampingLimit)
    tokens: int | None = None  # an expert's routed tokens
    covariance: str | None = None  # why an expert went without one
    candidate_compactness: list[float] | None = None  # CorDA++: every candidate's, at the base rank
    compactness: float | None = None  # CorDA++: the chosen candidate's, at the planned rank
    quantisation_error: float | None = None  # quantised residual: tr(E·C·Eᵀ) / tr(W·C·Wᵀ), E = W − Q − s·B·A …
    quantisation_error_refit: float | None = None  # … and with B refit to Q (``refit_adapter``)

    def to_json(self) -> dict[str, Any]:
        record: dict[str, Any] = {"rank": self.rank}
        if self.damping is not None:
            record |= {name: getattr(self, name) for name in _DECOMPOSED}
        return record | {name: getattr(self, name) for name in _OPTIONAL if getattr(self, name) is not None}

    @classmethod
    def from_json(cls, record: dict[str, Any]) -> LayerRecord:
        return cls(**record)


@dataclass
class ExpertsRecord:
    """A fused experts parameter: one rank for all experts, a record per expert."""

    rank: int
    experts: list[LayerRecord]

    def to_json(self) -> dict[str, Any]:
        return {"rank": self.rank, "experts": [expert.to_json() for expert in self.experts]}


@dataclass
class StoreRecord:
    path: str | None  # None: not kept (convert without --keep-covariances)
    model_fingerprint: str
    calibration: dict[str, Any]
    eigenvalues_below_damping_level: float | None  # λ of the store's counts …
    eigenvalues_below_damping_rule: str | None = None  # … and its rule, where not the default (omitted)

    def to_json(self) -> dict[str, Any]:
        return {name: value for name, value in vars(self).items() if value is not None or name != _STORE_RULE}


_STORE_RULE = "eigenvalues_below_damping_rule"


@dataclass
class SurgeryReport:
    """Everything surgery.json holds, in its order: the options first, flattened as they were given."""

    options: dict[str, Any]
    compute: dict[str, Any]
    base_name: str
    model_fingerprint: str
    residual_fingerprint: str
    covariance_stores: list[StoreRecord]
    layers: dict[str, LayerRecord | ExpertsRecord]
    input_groups: list[tuple[str, ...]]
    left_out: dict[str, str]
    adapter_parameters: dict[str, str]
    unadapted_weights: list[str]
    versions: dict[str, str] = field(
        default_factory=lambda: {
            "corda_surgery": __version__,
            "torch": torch.__version__,
            "python": platform.python_version(),
        }
    )

    def rank_of(self, name: str) -> int:
        return self.layers[name].rank

    def summary(self) -> str:
        """One line on what the surgery adapted, and what it left out (the details are in ``left_out``)."""
        line = f"adapted:        {len(self.layers)} target(s)"
        if self.left_out:
            name, reason = next(iter(self.left_out.items()))
            line += f"; {len(self.left_out)} left out (e.g. {name}: {reason}; all in {REPORT_NAME} left_out)"
        return line

    def to_json(self) -> dict[str, Any]:
        return {
            **self.options,
            "compute": self.compute,
            "base_name": self.base_name,
            "model_fingerprint": self.model_fingerprint,
            "residual_fingerprint": self.residual_fingerprint,
            "covariance_stores": [store.to_json() for store in self.covariance_stores],
            "layers": {name: layer.to_json() for name, layer in self.layers.items()},
            "input_groups": self.input_groups,
            "left_out": self.left_out,
            "adapter_parameters": self.adapter_parameters,
            "unadapted_weights": self.unadapted_weights,
            "versions": self.versions,
        }

    def write(self, folder: Path) -> None:
        (folder / REPORT_NAME).write_text(json.dumps(self.to_json(), indent=2))


_REPORT_FIELDS = (
    "compute",
    "base_name",
    "model_fingerprint",
    "residual_fingerprint",
    "covariance_stores",
    "layers",
    "input_groups",
    "left_out",
    "adapter_parameters",
    "unadapted_weights",
    "versions",
)


def _layer(record: Any) -> LayerRecord | ExpertsRecord:
    if "experts" in record:
        return ExpertsRecord(record["rank"], [LayerRecord.from_json(expert) for expert in record["experts"]])
    return LayerRecord.from_json(record)


def read_report(surgery_dir: Path) -> SurgeryReport:
    """surgery.json of a surgery output, or a one-line error naming the file."""
    path = surgery_dir / REPORT_NAME
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ReportError(f"{path}: not a readable surgery report ({exc}); is {surgery_dir} a surgery output?") from exc
    if not isinstance(data, dict) or any(name not in data for name in _REPORT_FIELDS):
        missing = [name for name in _REPORT_FIELDS if not isinstance(data, dict) or name not in data]
        raise ReportError(f"{path}: not a surgery report of this version (no {', '.join(missing)})")
    try:
        return SurgeryReport(
            options={name: value for name, value in data.items() if name not in _REPORT_FIELDS},
            compute=data["compute"],
            base_name=data["base_name"],
            model_fingerprint=data["model_fingerprint"],
            residual_fingerprint=data["residual_fingerprint"],
            covariance_stores=[StoreRecord(**store) for store in data["covariance_stores"]],
            layers={name: _layer(record) for name, record in data["layers"].items()},
            input_groups=[tuple(group) for group in data["input_groups"]],
            left_out=data["left_out"],
            adapter_parameters=data["adapter_parameters"],
            unadapted_weights=data["unadapted_weights"],
            versions=data["versions"],
        )
    except (TypeError, AttributeError, KeyError) as exc:
        raise ReportError(f"{path}: malformed surgery report ({exc})") from exc
