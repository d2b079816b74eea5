"""Which transformers model_types beyond tests/families.py the converter handles, and where the others fail.

For each extra model_type a tiny random checkpoint is built the way tests/families.py builds its families
(hidden 64, 2 layers, 4 heads, 2 KV heads, the test tokenizer; per-family overrides below) and run through
the same checks as tests/test_families.py, each step's exception caught and recorded:

- build: save the checkpoint and run the original model once (a failure here is "could not build a tiny
  config" or a transformers-side problem, not the converter's);
- calibrate: ``corda_surgery.surgery.calibration.calibrate``;
- covariance: streamed covariances vs whole-model hooks (``tests.helpers.reference_covariances``, ≤ 1e-5);
- handoff: KPM rank-4 surgery, PEFT adapter on the residual model reproduces the original logits (≤ 1e-4);
- onnx: merge → ONNX export → ``verify_onnx`` (max |Δlogit| ≤ 1e-4, greedy tokens equal).

A record holds ``result`` (pass, fail, could not build, no reference: the tests' hooks cannot read this model,
unknown model_type), the first failing step, its error, the innermost cause, the deepest frame in this
repository, and the figures: covariance max relative error, handoff and ONNX max |Δlogit|, how many linears
and fused expert parameters were adapted, and which block weight matrices were not. A failed covariance
check does not stop the later steps; any other failure does.

    PYTHONPATH=. .venv/bin/python bench/architectures.py                    # every extra model_type
    PYTHONPATH=. .venv/bin/python bench/architectures.py --only phi,opt     # a subset

Writes bench/results/architectures.json (one record per model_type, merged with earlier runs, rewritten after
each model_type so a partial run keeps its results).
"""

from __future__ import annotations

import argparse
import json
import re
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

from corda_surgery.calib.data import CalibrationSpec, token_batches
from corda_surgery.calib.store import CovarianceStore
from corda_surgery.checkpoint.view import ModelView
from corda_surgery.surgery.calibration import calibrate
from corda_surgery.surgery.options import Mode, SurgeryOptions
from corda_surgery.surgery.run import decompose_checkpoint
from corda_surgery.export.merge import merge_adapter
from corda_surgery.export.onnx_export import export_onnx
from corda_surgery.export.verify import verify_onnx
from tests.families import FAMILIES, HIDDEN, LAYERS, SLIDING, save_family_model
from tests.helpers import logits, reference_covariances, relative

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results" / "architectures.json"
SPEC = CalibrationSpec("gsm8k", samples=8, seq_len=32, batch_size=4)
TOLERANCE = {"covariance": 1e-5, "handoff": 1e-4, "onnx": 1e-4}
# _DECODER keys a family without them must not receive
NO_DECODER_KEYS = dict.fromkeys(
    ["hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "intermediate_size",
     "max_position_embeddings"]
)  # fmt: skip
EXPERTS = {"num_experts_per_tok": 2}
ALTERNATING = {**SLIDING, "layer_types": ["sliding_attention", "full_attention"]}

# model_type → config overrides on top of tests.families._DECODER (None removes a key)
# fmt: off
EXTRA: dict[str, dict] = {
    "glm4_moe": {**EXPERTS, "n_routed_experts": 4, "n_shared_experts": 1, "moe_intermediate_size": 32,
                 "first_k_dense_replace": 1, "n_group": 1, "topk_group": 1, "head_dim": 16},
    "granitemoe": {**EXPERTS, "num_local_experts": 4},
    "dbrx": {**NO_DECODER_KEYS, "d_model": HIDDEN, "n_heads": 4, "n_layers": LAYERS, "max_seq_len": 256,
             "attn_config": {"kv_n_heads": 2, "rope_theta": 10000.0, "clip_qkv": 8.0},  # both required by DbrxAttention
             "ffn_config": {"ffn_hidden_size": 32, "moe_num_experts": 4, "moe_top_k": 2}},
    "jamba": {**EXPERTS, "num_experts": 4, "attn_layer_period": 2, "attn_layer_offset": 1, "expert_layer_period": 2,
              "expert_layer_offset": 1, "mamba_dt_rank": 8, "use_mamba_kernels": False},
    "exaone4": {**ALTERNATING, "head_dim": 16},
    "smollm3": {"no_rope_layer_interval": 2},
    "olmo3": ALTERNATING,
    "ernie4_5": {"head_dim": 16},
    "ernie4_5_moe": {"moe_num_experts": 4, "moe_k": 2, "moe_intermediate_size": 32, "moe_num_shared_experts": 1,
                     "moe_layer_start_index": 1, "moe_layer_end_index": 1, "head_dim": 16},
    "hunyuan_v1_moe": {"num_experts": 4, "moe_topk": 2, "head_dim": 16},
    "minimax": {**EXPERTS, "num_local_experts": 4, "head_dim": 16, "block_size": 16},
    "qwen3_next": {**EXPERTS, "num_experts": 4, "moe_intermediate_size": 32, "shared_expert_intermediate_size": 32,
                   "head_dim": 16, "linear_key_head_dim": 16, "linear_value_head_dim": 16, "linear_num_key_heads": 2,
                   "linear_num_value_heads": 4, "layer_types": ["linear_attention", "full_attention"]},
    "seed_oss": {"head_dim": 16},
    "apertus": {},
    "arcee": {"head_dim": 16},
    "helium": {"head_dim": 16},
    "glm": {"head_dim": 16},
    "glm4": {"head_dim": 16},
    "nemotron": {"head_dim": 16},
    "persimmon": {"num_key_value_heads": None},
    "phi": {},
    "mpt": {**NO_DECODER_KEYS, "d_model": HIDDEN, "n_heads": 4, "n_layers": LAYERS, "expansion_ratio": 2,
            "max_seq_len": 256},
    "bloom": {**NO_DECODER_KEYS, "hidden_size": HIDDEN, "n_layer": LAYERS, "n_head": 4},
    "opt": {"num_key_value_heads": None, "intermediate_size": None, "ffn_dim": 2 * HIDDEN,
            "word_embed_proj_dim": HIDDEN},
    "gptj": {**NO_DECODER_KEYS, "n_embd": HIDDEN, "n_layer": LAYERS, "n_head": 4, "n_positions": 256, "rotary_dim": 8,
             "n_inner": 2 * HIDDEN},
    "codegen": {**NO_DECODER_KEYS, "n_embd": HIDDEN, "n_layer": LAYERS, "n_head": 4, "n_positions": 256,
                "n_ctx": 256, "rotary_dim": 8, "n_inner": 2 * HIDDEN},
    "gpt_bigcode": {**NO_DECODER_KEYS, "n_embd": HIDDEN, "n_layer": LAYERS, "n_head": 4, "n_positions": 256,
                    "n_inner": 2 * HIDDEN},
    "xglm": {**NO_DECODER_KEYS, "d_model": HIDDEN, "num_layers": LAYERS, "attention_heads": 4, "ffn_dim": 2 * HIDDEN,
             "max_position_embeddings": 256},
    "dots1": {**EXPERTS, "n_routed_experts": 4, "n_shared_experts": 1, "moe_intermediate_size": 32,
              "first_k_dense_replace": 1, "head_dim": 16},
    "llama4_text": {"num_experts_per_tok": 1, "num_local_experts": 4, "head_dim": 16, "intermediate_size": 32,
                    "intermediate_size_mlp": 2 * HIDDEN, "interleave_moe_layer_step": 2, "no_rope_layer_interval": 2,
                    "attention_chunk_size": 8},
    "mamba": {**NO_DECODER_KEYS, "hidden_size": HIDDEN, "num_hidden_layers": LAYERS, "state_size": 8,
              "time_step_rank": 8},
}
# fmt: on


def first_line(exc: BaseException) -> str:
    """Type and message, lines joined (a first line alone is often just a heading), trimmed to 200 characters."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))  # torch.onnx colours its messages
    message = " ".join(line.strip() for line in text.splitlines() if line.strip())
    return f"{type(exc).__name__}: {message}"[:200]


def root_cause(exc: BaseException) -> str | None:
    """The first line of the innermost exception this one was raised from, if any."""
    inner = exc
    while inner.__cause__ is not None:
        inner = inner.__cause__
    return first_line(inner) if inner is not exc else None


def our_frame(exc: BaseException) -> str | None:
    """The deepest traceback frame in this repository's code (calib/, export/, corda_surgery/, tests/)."""
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if f.filename.startswith(str(REPO) + "/")]
    ours = [f for f in frames if "/.venv/" not in f.filename and not f.filename.endswith("architectures.py")]
    return f"{Path(ours[-1].filename).relative_to(REPO)}:{ours[-1].lineno} {ours[-1].name}" if ours else None


def unadapted_weights(model_dir: Path, out: Path) -> list[str]:
    """Weight matrices inside the blocks that the surgery left as they were (block index replaced by *)."""
    adapted = json.loads((out / "surgery.json").read_text())["layers"]
    view = ModelView(model_dir)
    names = {
        re.sub(r"\.\d+\.", ".*.", name, count=1)
        for name, parameter in view.model.named_parameters()
        if name.startswith(view.blocks_prefix + ".") and parameter.dim() >= 2
        and name not in adapted and name.rpartition(".")[0] not in adapted
    }  # fmt: skip
    return sorted(names)


class CheckFailed(AssertionError):
    pass


class ReferenceUnavailable(Exception):
    """tests.helpers.reference_covariances could not hook this model (its own limits, not the converter's)."""


def check(value: float, step: str) -> None:
    if not value <= TOLERANCE[step]:
        raise CheckFailed(f"{step} error {value:.3g} > {TOLERANCE[step]:g}")


def run(model_type: str, root: Path, tracebacks: bool = False) -> dict:
    """Every step for one model_type; stops at the first step the later ones depend on."""
    record: dict = {"model_type": model_type, "result": "pass", "failed_step": None, "error": None, "cause": None,
                    "where": None, "figures": {}, "steps": {}}  # fmt: skip
    if model_type not in CONFIG_MAPPING_NAMES:
        return {**record, "result": "unknown model_type", "failed_step": "build"}
    FAMILIES[model_type] = EXTRA[model_type] if model_type in EXTRA else FAMILIES.get(model_type, {})
    state: dict = {}

    def build() -> None:
        state["dir"] = model_dir = save_family_model(root / "model", model_type)
        state["tokenizer"] = AutoTokenizer.from_pretrained(model_dir)
        state["model"] = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        state["reference"] = logits(state["model"], state["tokenizer"])

    def calibrate_() -> None:
        state["store"] = calibrate(state["dir"], SPEC, root / "cov.h5", progress=False)

    def covariance() -> None:
        view = ModelView(state["dir"])
        batches, _ = token_batches(SPEC, state["tokenizer"], view.config.get_text_config().vocab_size)
        try:
            expected = reference_covariances(state["model"], batches, view.blocks_prefix)
        except Exception as exc:  # the tests' hooks, not the converter: recorded as a step of its own
            raise ReferenceUnavailable(first_line(exc)) from exc
        with CovarianceStore(state["store"]) as opened:
            streamed = {name for name, entry in opened.by_linear.items() if entry.count}
            if streamed != set(expected):
                raise CheckFailed(f"linears differ: only streamed {sorted(streamed - set(expected))[:3]}, "
                                  f"only hooked {sorted(set(expected) - streamed)[:3]}")  # fmt: skip
            worst = max(relative(opened.covariance(name), ref) for name, ref in expected.items())
        record["figures"]["covariance_max_rel"] = worst
        check(worst, "covariance")

    def handoff() -> None:
        from peft import PeftModel

        out = decompose_checkpoint(state["dir"], root / "kpm", SurgeryOptions(mode=Mode.KPM, rank=4),
                                   stores=[state["store"]], progress=False)  # fmt: skip
        state["out"] = out
        record["figures"]["adapted"] = len(json.loads((out / "surgery.json").read_text())["layers"])
        record["figures"]["unadapted_weights"] = unadapted_weights(state["dir"], out)
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(out), out / "adapter").eval()
        delta = float((logits(model, state["tokenizer"]) - state["reference"]).abs().max())
        record["figures"]["handoff_max_abs_logit"] = delta
        check(delta, "handoff")

    def onnx() -> None:
        merged = merge_adapter(state["out"], state["out"] / "adapter", root / "merged", progress=False)
        onnx_dir = export_onnx(merged, root / "onnx")
        report = verify_onnx(onnx_dir, merged, new_tokens=4, prefill_tokens=8, decode_steps=2, repeats=1)
        record["figures"]["onnx_max_abs"] = report.max_abs_error
        record["figures"]["greedy_match"] = report.greedy_match
        check(report.max_abs_error, "onnx")
        if not report.greedy_match:
            raise CheckFailed("greedy tokens differ")

    # step → whether the steps after it can run without it
    steps: list[tuple[str, Callable[[], None], bool]] = [
        ("build", build, False), ("calibrate", calibrate_, False), ("covariance", covariance, True),
        ("handoff", handoff, False), ("onnx", onnx, False),
    ]  # fmt: skip
    for name, step, optional in steps:
        started = time.perf_counter()
        try:
            step()
            record["steps"][name] = f"ok ({time.perf_counter() - started:.1f}s)"
        except Exception as exc:  # every failure is a finding
            if tracebacks:
                traceback.print_exc()
            record["steps"][name] = first_line(exc)
            if record["failed_step"] is None:
                record.update(failed_step=name, error=first_line(exc), cause=root_cause(exc), where=our_frame(exc))
                record["result"] = "could not build" if name == "build" else "fail"
                if isinstance(exc, ReferenceUnavailable):
                    record.update(failed_step="covariance reference", result="no reference")
            if not optional:
                break
    return record


def readme_table() -> str:
    """The results as the README's markdown table: what was tried beyond the test matrix, and why it failed."""
    rows = ["| model_type | result | where it stops, and why |", "|---|---|---|"]
    for record in sorted(json.loads(RESULTS.read_text()), key=lambda r: (r["result"] != "pass", r["model_type"])):
        if record["model_type"] not in EXTRA:
            continue
        error = re.sub(r"/tmp/\S+?: ", "", record["error"] or "")  # the run's temporary folder
        result = "converted; ONNX export refused" if error.startswith("ExportError") else record["result"]
        why = "" if record["result"] == "pass" else f"{record['failed_step']}: {error}"
        rows.append(f"| {record['model_type']} | {result} | {why.replace('|', '/')[:220]} |")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", help="comma-separated model_types (default: all)")
    parser.add_argument("--tracebacks", action="store_true", help="print each failure's traceback")
    parser.add_argument("--table", action="store_true", help="print the README's table of the results and stop")
    args = parser.parse_args()
    if args.table:
        print(readme_table())
        return
    chosen = args.only.split(",") if args.only else list(EXTRA)
    torch.set_num_threads(1)
    records = {r["model_type"]: r for r in json.loads(RESULTS.read_text())} if RESULTS.exists() else {}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    for model_type in chosen:
        started = time.perf_counter()
        with tempfile.TemporaryDirectory() as tmp:
            record = run(model_type, Path(tmp), args.tracebacks)
        record["seconds"] = round(time.perf_counter() - started, 1)
        records[model_type] = record
        RESULTS.write_text(json.dumps(list(records.values()), indent=1) + "\n")
        print(f"{model_type}: {record['result']} {record['failed_step'] or ''} {record['error'] or ''} "
              f"{record['figures']}", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
