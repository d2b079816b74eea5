"""PEFT LoRA adapter folders (``adapter_config.json`` + ``adapter_model.safetensors``), read and written.

Only the small subset of PEFT's format that a LoRA adapter needs, so that the converter does not depend on
PEFT at run time; ``PeftModel.from_pretrained`` loads what is written here (a test proves it). Fused
expert parameters are adapted as PEFT's ``target_parameters`` do: one rank for all experts, expert e's
factors at rows e·r… of A and columns k·E+e of B, stored under the module's path with one ``base_layer``
per wrapper nested above it (PEFT wraps a module's targeted parameters in their definition order).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import safetensors
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers.conversion_mapping import _MODEL_TO_CONVERSION_PATTERN

from corda_surgery.checkpoint.reader import CheckpointError, read_safetensors_header
from corda_surgery.errors import CordaSurgeryError
from corda_surgery.numerics import all_finite
from corda_surgery.paths import read_json

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
# What the adapter was made for (fingerprints of the residual and of the original model, rank per module).
# PEFT ignores extra files, and does not copy this one when it saves a trained adapter: a surgery's own
# surgery.json keeps the same record.
PROVENANCE_NAME = "corda_surgery.json"
_KEY = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<factor>[AB])\.weight$")


class AdapterError(CordaSurgeryError):
    """The adapter folder is missing, not a LoRA adapter, or does not fit the model; names the file."""


@dataclass
class LoraAdapter:
    """LoRA factors per module (full module path) with PEFT's rank/alpha (pattern) semantics."""

    rank: int
    alpha: float
    lora_A: dict[str, torch.Tensor]
    lora_B: dict[str, torch.Tensor]
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    fan_in_fan_out: bool = False
    task_type: str | None = "CAUSAL_LM"
    base_model_name_or_path: str | None = None
    provenance: dict | None = None
    parameter_paths: dict[str, str] = field(default_factory=dict)  # fused parameter → the path PEFT keys it by

    def rank_of(self, module: str) -> int:
        return _pattern_value(self.rank_pattern, module, self.rank)

    def scaling(self, module: str) -> float:
        """alpha / r of one module, honouring rank_pattern / alpha_pattern as PEFT does."""
        rank = self.rank_of(module)
        alpha = _pattern_value(self.alpha_pattern, module, self.alpha)
        return alpha / rank

    def delta(self, module: str) -> torch.Tensor:
        """s·B·A in float32, in the (out, in) layout of nn.Linear; (experts, out, in) for a fused parameter."""
        lora_a, lora_b = self.lora_A[module].float(), self.lora_B[module].float()
        if module in self.parameter_paths:
            lora_a, lora_b = expert_factors(lora_a, lora_b, self.rank_of(module))
        return self.scaling(module) * (lora_b @ lora_a)


# PEFT's layout of a fused experts parameter's factors (its ParamWrapper): one rank r for all E experts,
# expert e's A rows at e·r … e·r+r-1 of A (E·r, in) and its B columns at k·E+e of B (out, r·E).
def expert_factors(lora_a: torch.Tensor, lora_b: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Views of fused factors per expert: A as (experts, r, in), B as (experts, out, r)."""
    experts = lora_a.shape[0] // rank
    return lora_a.reshape(experts, rank, lora_a.shape[-1]), lora_b.reshape(lora_b.shape[0], rank, experts).permute(
        2, 0, 1
    )


def fused_factors(
    factors_a: Sequence[torch.Tensor], factors_b: Sequence[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-expert A (r, in) and B (out, r), expert by expert, in PEFT's fused layout."""
    return torch.cat(list(factors_a)), torch.stack(list(factors_b), dim=-1).flatten(1)


# The names PEFT (0.21) re-targets when it loads any LoRA config on transformers 5 for a model type that
# transformers converts like these (peft.utils.transformers_weight_conversion._convert_peft_config_moe, meant
# for adapters trained on transformers 4, whose experts were linears): a target_modules entry with such a name
# becomes a fused-experts target_parameters entry, with gate_up_proj at twice the rank. A linear of that name
# would lose its factors and the experts' would no longer load.
_PEFT_RETARGETED = {
    "mixtral": frozenset({"w1", "w2", "w3", "gate"}),
    "qwen2_moe": frozenset({"gate_proj", "up_proj", "down_proj", "gate"}),
}


def peft_retargeted(model_type: str) -> frozenset[str]:
    """Linear names PEFT re-targets as fused experts on ``model_type`` (see _PEFT_RETARGETED); none elsewhere."""
    pattern = "mixtral" if model_type == "mixtral" else _MODEL_TO_CONVERSION_PATTERN.get(model_type)
    return _PEFT_RETARGETED.get(pattern or "", frozenset())


def parameter_paths(fused: Mapping[str, Sequence[str]], targeted: Collection[str]) -> dict[str, str]:
    """Where PEFT keeps each targeted parameter's factors: its module's path, plus one ``.base_layer`` per
    targeted parameter defined after it in that module (``fused``: module → its parameters in order)."""
    paths = {}
    for module, parameters in fused.items():
        chosen = [p for p in parameters if p in targeted]
        for i, parameter in enumerate(chosen):
            paths[parameter] = module + ".base_layer" * (len(chosen) - 1 - i)
    return paths


def _pattern_value(pattern: dict, module: str, default):
    for key, value in pattern.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def write_adapter(folder: Path, adapter: LoraAdapter) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    config = {
        "peft_type": "LORA",
        "task_type": adapter.task_type,
        "base_model_name_or_path": adapter.base_model_name_or_path,
        "r": adapter.rank,
        "lora_alpha": adapter.alpha,
        # [] rather than None with target_parameters: PEFT fills a None from its per-model default list
        "target_modules": sorted(adapter.lora_A.keys() - adapter.parameter_paths.keys()),
        "rank_pattern": adapter.rank_pattern,
        "alpha_pattern": adapter.alpha_pattern,
        "fan_in_fan_out": adapter.fan_in_fan_out,
        "lora_dropout": 0.0,
        "bias": "none",
        "use_rslora": False,
        "init_lora_weights": True,
        "inference_mode": False,
        "modules_to_save": None,
    }
    if adapter.parameter_paths:
        config["target_parameters"] = sorted(adapter.parameter_paths)
    (folder / CONFIG_NAME).write_text(json.dumps(config, indent=2))
    tensors = {}
    for module in adapter.lora_A:
        path = adapter.parameter_paths.get(module, module)
        tensors[f"base_model.model.{path}.lora_A.weight"] = adapter.lora_A[module].contiguous()
        tensors[f"base_model.model.{path}.lora_B.weight"] = adapter.lora_B[module].contiguous()
    save_file(tensors, str(folder / WEIGHTS_NAME), metadata={"format": "pt"})
    if adapter.provenance is not None:
        (folder / PROVENANCE_NAME).write_text(json.dumps(adapter.provenance, indent=2))


def _check_factors(adapter: LoraAdapter, weights_path: Path) -> None:
    """Every module's A is (r, in) and B (out, r) with the rank its config gives (a fused parameter's:
    (experts·r, in) and (out, experts·r)), and both are finite."""
    for module, lora_a in adapter.lora_A.items():
        lora_b, rank = adapter.lora_B[module], adapter.rank_of(module)
        inner = lora_a.shape[0] if module in adapter.parameter_paths and lora_a.shape[0] % rank == 0 else rank
        if lora_a.dim() != 2 or lora_b.dim() != 2 or lora_a.shape[0] != inner or lora_b.shape[1] != inner:
            raise AdapterError(
                f"{weights_path}: {module} has lora_A {tuple(lora_a.shape)} and lora_B {tuple(lora_b.shape)}, "
                f"but its config gives rank {rank}"
            )
        for factor, tensor in (("lora_A", lora_a), ("lora_B", lora_b)):
            if not all_finite(tensor):
                raise AdapterError(f"{weights_path}: {module}.{factor} contains NaN or Inf")


def _parameter_paths(config_path: Path, config: dict, fused: Mapping[str, Sequence[str]]) -> dict[str, str]:
    """The config's ``target_parameters`` (full names or suffixes, as PEFT matches them) resolved on the model."""
    patterns = config.get("target_parameters") or []
    everywhere = [parameter for parameters in fused.values() for parameter in parameters]
    for pattern in patterns:
        if not any(p == pattern or p.endswith("." + pattern) for p in everywhere):
            raise AdapterError(
                f"{config_path}: target_parameters names {pattern}, which is no fused expert parameter of the model"
            )
    targeted = {p for p in everywhere if any(p == t or p.endswith("." + t) for t in patterns)}
    return parameter_paths(fused, targeted)


# The configuration's fields this reader uses, and the JSON types each may have (None aside).
_FIELD_TYPES: dict[str, tuple[type, ...]] = {
    "lora_alpha": (int, float),
    "rank_pattern": (dict,),
    "alpha_pattern": (dict,),
    "fan_in_fan_out": (bool,),
    "task_type": (str,),
    "base_model_name_or_path": (str,),
    "target_parameters": (list,),
}
_PATTERN_LENGTH = 512  # rank_pattern / alpha_pattern keys are regular expressions, matched against every module
_QUANTIFIERS = re.compile(r"(?<!\\)(?:[*+?]|\{\d)")


def _whole(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _check_pattern(config_path: Path, key: object) -> None:
    """A pattern key PEFT would match as a regular expression, refused where matching it could take
    exponential time (a quantified group, many quantifiers) or where it does not compile."""
    if not isinstance(key, str) or len(key) > _PATTERN_LENGTH:
        raise AdapterError(f"{config_path}: pattern key {str(key)[:80]!r} is not a module pattern")
    if re.search(r"\)[*+?{]", key) or len(_QUANTIFIERS.findall(key)) > 3:
        raise AdapterError(f"{config_path}: pattern key {key[:80]!r} repeats too much to be matched safely")
    try:
        re.compile(key)
    except re.error as exc:
        raise AdapterError(f"{config_path}: pattern key {key[:80]!r} is no regular expression ({exc})") from exc


def _check_config(config_path: Path, config: dict) -> None:
    """Every field this reader uses has its JSON type before any is used: a stranger's config is refused
    naming the field, never a crash (tests/test_fuzz.py)."""
    if config.get("peft_type") != "LORA":
        raise AdapterError(f"{config_path}: peft_type {config.get('peft_type')!r} is not LORA")
    if config.get("use_rslora") or config.get("use_dora"):
        raise AdapterError(f"{config_path}: rsLoRA/DoRA adapters are not supported")
    if not _whole(config.get("r")):
        raise AdapterError(f"{config_path}: r {config.get('r')!r}: ranks must be whole numbers ≥ 1")
    for name, kinds in _FIELD_TYPES.items():
        value = config.get(name)
        if value is not None and (not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds)):
            raise AdapterError(f"{config_path}: {name} {str(value)[:80]!r} is not of type {kinds[0].__name__}")
    if isinstance(config.get("lora_alpha"), float) and not math.isfinite(config["lora_alpha"]):
        raise AdapterError(f"{config_path}: lora_alpha {config['lora_alpha']!r} is not a finite number")
    for key, rank in (config.get("rank_pattern") or {}).items():
        _check_pattern(config_path, key)
        if not _whole(rank):
            raise AdapterError(f"{config_path}: rank_pattern {key}: ranks must be whole numbers ≥ 1")
    for key, alpha in (config.get("alpha_pattern") or {}).items():
        _check_pattern(config_path, key)
        if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not math.isfinite(alpha):
            raise AdapterError(f"{config_path}: alpha_pattern {key}: {alpha!r} is not a finite number")
    if not all(isinstance(name, str) for name in config.get("target_parameters") or []):
        raise AdapterError(f"{config_path}: target_parameters must be a list of names")


def _read_factors(weights_path: Path, named: Mapping[str, str]) -> dict[str, dict[str, torch.Tensor]]:
    """The A and B factors by module, after the header is validated as a checkpoint shard's is."""
    factors: dict[str, dict[str, torch.Tensor]] = {"A": {}, "B": {}}
    try:
        read_safetensors_header(weights_path)  # offsets, dtypes, truncation; the OS's own error when unreadable
    except CheckpointError as exc:
        raise AdapterError(str(exc)) from exc
    try:
        with safe_open(str(weights_path), framework="pt", device="cpu") as handle:
            for key in handle.keys():
                match = _KEY.match(key.replace(".default.", "."))
                if match is None:
                    raise AdapterError(f"{weights_path}: unexpected tensor {key} (only LoRA A/B weights are supported)")
                factors[match["factor"]][named.get(match["module"], match["module"])] = handle.get_tensor(key)
    except (OSError, RuntimeError, safetensors.SafetensorError) as exc:
        raise AdapterError(f"{weights_path}: unreadable ({exc})") from exc
    if not factors["A"] and not factors["B"]:
        raise AdapterError(f"{weights_path}: holds no LoRA factors (an adapter that adapts nothing)")
    return factors


def read_adapter(folder: str | Path, fused: Mapping[str, Sequence[str]] | None = None) -> LoraAdapter:
    """The adapter in ``folder``; ``fused`` (the model's fused-experts modules → their parameters, in order,
    see ``ModelView.fused_parameters``) resolves the factors of targeted parameters to their names."""
    folder = Path(folder)
    config_path, weights_path = folder / CONFIG_NAME, folder / WEIGHTS_NAME
    if not config_path.is_file() or not weights_path.is_file():
        raise AdapterError(f"{folder}: not a PEFT adapter folder ({CONFIG_NAME} and {WEIGHTS_NAME} needed)")
    config = read_json(config_path, AdapterError)
    if not isinstance(config, dict):
        raise AdapterError(f"{config_path}: not a JSON object")
    _check_config(config_path, config)
    paths = _parameter_paths(config_path, config, fused or {})
    named = {path: parameter for parameter, path in paths.items()}
    factors = _read_factors(weights_path, named)
    unpaired = sorted(factors["A"].keys() ^ factors["B"].keys())
    if unpaired:
        raise AdapterError(f"{weights_path}: {unpaired[0]} has only one of lora_A and lora_B")
    provenance_path = folder / PROVENANCE_NAME
    try:
        adapter = LoraAdapter(
            rank=int(config["r"]),
            alpha=float(config.get("lora_alpha") or config["r"]),
            lora_A=factors["A"],
            lora_B=factors["B"],
            rank_pattern=config.get("rank_pattern") or {},
            alpha_pattern=config.get("alpha_pattern") or {},
            fan_in_fan_out=bool(config.get("fan_in_fan_out", False)),
            task_type=config.get("task_type"),
            base_model_name_or_path=config.get("base_model_name_or_path"),
            provenance=json.loads(provenance_path.read_text()) if provenance_path.is_file() else None,
            parameter_paths=paths,
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise AdapterError(f"{folder}: malformed adapter configuration ({exc!r})") from exc
    if adapter.rank < 1 or not all(isinstance(r, int) and r >= 1 for r in adapter.rank_pattern.values()):
        raise AdapterError(f"{config_path}: ranks must be whole numbers ≥ 1")
    _check_factors(adapter, weights_path)
    return adapter
