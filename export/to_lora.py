"""Express a trained CorDA adapter as a plain LoRA on the original model (the PiSSA/CorDA conversion).

Original W = W_res + s·B·A. After training, W' = W_res + s·B'·A' = W + s·(B'A' − BA), a rank-2r update:
A'' = [A'; A], B'' = [B', −B] with the same scaling (alpha doubled along with r).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from corda_surgery.checkpoint.reader import CheckpointReader
from corda_surgery.errors import CordaSurgeryError
from corda_surgery.outputs import check_disjoint, staged_folder
from corda_surgery.surgery.report import ADAPTER_DIR
from corda_surgery.export.handoff import checked_adapter, fused_parameters
from corda_surgery.export.peft_adapter import AdapterError, LoraAdapter, expert_factors, fused_factors, read_adapter, write_adapter


def to_plain_lora(initial: LoraAdapter, trained: LoraAdapter) -> LoraAdapter:
    """The rank-2r LoRA whose update on the original weights equals the trained adapter's on the residual."""
    if initial.lora_A.keys() != trained.lora_A.keys():
        raise AdapterError("the trained adapter adapts other modules than the surgery's initial adapter")
    lora_a, lora_b, rank_pattern, alpha_pattern = {}, {}, {}, {}
    for module in initial.lora_A:
        s_initial, s_trained = initial.scaling(module), trained.scaling(module)
        rank = trained.rank_of(module) + initial.rank_of(module)
        # One scaling s for both halves: fold each half's own scaling relative to s into its B.
        halves_a = [trained.lora_A[module].float(), initial.lora_A[module].float()]
        halves_b = [trained.lora_B[module].float(), -(s_initial / s_trained) * initial.lora_B[module].float()]
        if module in initial.parameter_paths:  # concatenate within each expert
            trained_a, trained_b = expert_factors(halves_a[0], halves_b[0], trained.rank_of(module))
            initial_a, initial_b = expert_factors(halves_a[1], halves_b[1], initial.rank_of(module))
            lora_a[module], lora_b[module] = fused_factors(
                list(torch.cat([trained_a, initial_a], dim=1)), list(torch.cat([trained_b, initial_b], dim=2))
            )
        else:
            lora_a[module], lora_b[module] = torch.cat(halves_a), torch.cat(halves_b, dim=1)
        rank_pattern[module] = rank
        alpha_pattern[module] = s_trained * rank
    base_rank = 2 * trained.rank
    base_alpha = trained.alpha / trained.rank * base_rank
    return LoraAdapter(
        rank=base_rank,
        alpha=base_alpha,
        lora_A=lora_a,
        lora_B=lora_b,
        rank_pattern={m: r for m, r in rank_pattern.items() if r != base_rank},
        alpha_pattern={m: a for m, a in alpha_pattern.items() if not math.isclose(a, base_alpha)},
        fan_in_fan_out=trained.fan_in_fan_out,
        task_type=trained.task_type,
        parameter_paths=initial.parameter_paths,
    )


def convert_to_lora(
    surgery_dir: str | Path, trained_adapter: str | Path, base: str | Path, out: str | Path, *, overwrite: bool = False
) -> Path:
    """Write ``out``: a PEFT LoRA adapter for the original model ``base`` equivalent to the trained one."""
    surgery_dir, trained_adapter, base = Path(surgery_dir), Path(trained_adapter), Path(base)
    check_disjoint(Path(out), [surgery_dir, trained_adapter, base])
    trained, report = checked_adapter(surgery_dir, trained_adapter)  # also proves the residual unchanged
    initial = read_adapter(surgery_dir / ADAPTER_DIR, fused_parameters(report))
    if CheckpointReader(base).fingerprint() != report.model_fingerprint:
        raise CordaSurgeryError(f"{base}: not the model that {surgery_dir} was made from (fingerprint mismatch)")
    lora = to_plain_lora(initial, trained)
    lora.base_model_name_or_path = str(base.resolve())
    with staged_folder(out, overwrite=overwrite, inputs=[surgery_dir, trained_adapter, base]) as staging:
        write_adapter(staging, lora)
    return Path(out).resolve()
