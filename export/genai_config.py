"""``genai_config.json``: what onnxruntime-genai's ``Model(folder)`` needs to load and generate from an export.

Written beside ``model.onnx`` for a KV-cached export of a family onnxruntime-genai knows. The graph keeps its
own attention (``Concat`` caches, ``position_ids`` and an ``attention_mask`` as inputs), so the config maps
those names and turns ``past_present_share_buffer`` off, which in-place caches (the builder's
GroupQueryAttention) need. Search defaults come from ``generation_config.json``, as the builder takes them.
The session has no provider options: onnxruntime-genai runs it on the CPU unless the caller appends one
(``config.append_provider("cuda")``).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from corda_surgery.errors import CordaSurgeryError

log = logging.getLogger(__name__)
GENAI_CONFIG = "genai_config.json"
# model types onnxruntime-genai 0.18 runs as a plain decoder over a graph like ours (tested in tests/test_genai.py)
GENAI_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3"})
_SEARCH_DEFAULTS = {"do_sample": False, "temperature": 1.0, "top_k": 50, "top_p": 1.0, "repetition_penalty": 1.0}


class GenaiError(CordaSurgeryError):
    """onnxruntime-genai does not load or run the exported folder as the export wrote it."""


def _first(value: Any) -> Any:
    return value[0] if isinstance(value, list) and value else value


def genai_config(config: Any, generation: dict[str, Any], info: dict[str, Any]) -> dict[str, Any]:
    """The config for a KV-cached export of ``config`` (a transformers config), with ``info``'s graph names."""
    eos = generation.get("eos_token_id", getattr(config, "eos_token_id", None))
    bos = generation.get("bos_token_id", getattr(config, "bos_token_id", None))
    pad = generation.get("pad_token_id", getattr(config, "pad_token_id", None))
    context = int(getattr(config, "max_position_embeddings", 0) or 0)
    search = {name: generation.get(name, default) for name, default in _SEARCH_DEFAULTS.items()}
    return {
        "model": {
            "type": config.model_type,
            "bos_token_id": _first(bos),
            "eos_token_id": eos,
            "pad_token_id": _first(pad) if pad is not None else _first(eos),
            "context_length": context,
            "vocab_size": config.vocab_size,
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "filename": "model.onnx",
                "head_size": info["head_dim"],
                "hidden_size": config.hidden_size,
                "num_attention_heads": config.num_attention_heads,
                "num_hidden_layers": info["num_layers"],
                "num_key_value_heads": info["num_kv_heads"],
                "inputs": {
                    "input_ids": "input_ids",
                    "attention_mask": "attention_mask",
                    "position_ids": "position_ids",
                    "past_key_names": "past_key_values.%d.key",
                    "past_value_names": "past_key_values.%d.value",
                },
                "outputs": {
                    "logits": "logits",
                    "present_key_names": "present.%d.key",
                    "present_value_names": "present.%d.value",
                },
            },
        },
        "search": {
            **search,
            "max_length": context,
            "min_length": 0,
            "num_beams": 1,
            "num_return_sequences": 1,
            "past_present_share_buffer": False,
            "early_stopping": True,
            "length_penalty": 1.0,
            "diversity_penalty": 0.0,
            "no_repeat_ngram_size": 0,
        },
    }


def write_genai_config(folder: Path, config: Any, info: dict[str, Any]) -> bool:
    """Write ``folder/genai_config.json`` where onnxruntime-genai can run the export; whether it was written."""
    if not info["with_past"] or config.model_type not in GENAI_TYPES:
        reason = "exported without --with-past" if not info["with_past"] else f"model type {config.model_type}"
        log.warning("%s: no %s (onnxruntime-genai: %s)", folder, GENAI_CONFIG, reason)
        return False
    generation_path = folder / "generation_config.json"
    generation = json.loads(generation_path.read_text()) if generation_path.is_file() else {}
    (folder / GENAI_CONFIG).write_text(json.dumps(genai_config(config, generation, info), indent=2))
    return True


def genai_greedy(folder: Path, prompt_ids: list[int], new_tokens: int) -> list[int]:
    """onnxruntime-genai's greedy continuation of ``prompt_ids`` from the folder alone, on the CPU."""
    import onnxruntime_genai as og

    try:
        config = og.Config(str(folder))
        config.clear_providers()
        model = og.Model(config)
        params = og.GeneratorParams(model)
        params.set_search_options(do_sample=False, max_length=len(prompt_ids) + new_tokens)
        generator = og.Generator(model, params)
        generator.append_tokens(np.array([prompt_ids], dtype=np.int32))
        while not generator.is_done():
            generator.generate_next_token()
    except Exception as exc:  # onnxruntime-genai raises bare RuntimeErrors: the folder does not run
        raise GenaiError(f"{folder}: onnxruntime-genai cannot run the export: {str(exc).splitlines()[0]}") from exc
    return [int(token) for token in generator.get_sequence(0)[len(prompt_ids) :]]
