"""PEFT LoRA adapter folders (``adapter_config.json`` + ``adapter_model.safetensors``), read and written.

Only the small subset of PEFT's format that a LoRA adapter needs, so that the converter does not depend on
PEFT at run time; ``PeftModel.from_pretrained`` loads what is written here (a test proves it).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
_KEY = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<factor>[AB])\.weight$")


class AdapterError(ValueError):
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

    def scaling(self, module: str) -> float:
        """alpha / r of one module, honouring rank_pattern / alpha_pattern as PEFT does."""
        rank = _pattern_value(self.rank_pattern, module, self.rank)
        alpha = _pattern_value(self.alpha_pattern, module, self.alpha)
        return alpha / rank

    def delta(self, module: str) -> torch.Tensor:
        """s·B·A in float32, in the (out, in) layout of nn.Linear."""
        return self.scaling(module) * (self.lora_B[module].float() @ self.lora_A[module].float())


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
        "target_modules": sorted(adapter.lora_A),
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
    (folder / CONFIG_NAME).write_text(json.dumps(config, indent=2))
    tensors = {}
    for module in adapter.lora_A:
        tensors[f"base_model.model.{module}.lora_A.weight"] = adapter.lora_A[module].contiguous()
        tensors[f"base_model.model.{module}.lora_B.weight"] = adapter.lora_B[module].contiguous()
    save_file(tensors, str(folder / WEIGHTS_NAME), metadata={"format": "pt"})


def read_adapter(folder: str | Path) -> LoraAdapter:
    folder = Path(folder)
    config_path, weights_path = folder / CONFIG_NAME, folder / WEIGHTS_NAME
    if not config_path.is_file() or not weights_path.is_file():
        raise AdapterError(f"{folder}: not a PEFT adapter folder ({CONFIG_NAME} and {WEIGHTS_NAME} needed)")
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as exc:
        raise AdapterError(f"{config_path}: not valid JSON ({exc.msg})") from None
    if config.get("peft_type") != "LORA":
        raise AdapterError(f"{config_path}: peft_type {config.get('peft_type')!r} is not LORA")
    if config.get("use_rslora") or config.get("use_dora"):
        raise AdapterError(f"{config_path}: rsLoRA/DoRA adapters are not supported")
    factors: dict[str, dict[str, torch.Tensor]] = {"A": {}, "B": {}}
    try:
        with safe_open(str(weights_path), framework="pt", device="cpu") as handle:
            for key in handle.keys():
                match = _KEY.match(key.replace(".default.", "."))
                if match is None:
                    raise AdapterError(f"{weights_path}: unexpected tensor {key} (only LoRA A/B weights are supported)")
                factors[match["factor"]][match["module"]] = handle.get_tensor(key)
    except (OSError, RuntimeError) as exc:
        raise AdapterError(f"{weights_path}: unreadable ({exc})") from None
    if factors["A"].keys() != factors["B"].keys():
        raise AdapterError(f"{weights_path}: lora_A and lora_B cover different modules")
    return LoraAdapter(
        rank=int(config["r"]),
        alpha=float(config.get("lora_alpha", config["r"])),
        lora_A=factors["A"],
        lora_B=factors["B"],
        rank_pattern=config.get("rank_pattern") or {},
        alpha_pattern=config.get("alpha_pattern") or {},
        fan_in_fan_out=bool(config.get("fan_in_fan_out", False)),
        task_type=config.get("task_type"),
        base_model_name_or_path=config.get("base_model_name_or_path"),
    )
