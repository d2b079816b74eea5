"""What comes back from training: an adapter checked against the surgery it claims to belong to.

A trained adapter saved by PEFT keeps the modules, ranks and ``base_model_name_or_path`` of the adapter the
surgery wrote; the surgery's surgery.json records those and the residual's fingerprint. ``merge`` and
``to-lora`` refuse an adapter that does not fit, naming the module, before writing anything.
"""

from __future__ import annotations

from pathlib import Path

from corda_surgery.checkpoint.reader import CheckpointReader
from corda_surgery.errors import CordaSurgeryError
from corda_surgery.surgery.report import SurgeryReport, read_report
from corda_surgery.export.peft_adapter import AdapterError, LoraAdapter, read_adapter


def checked_adapter(surgery_dir: Path, adapter_dir: Path) -> tuple[LoraAdapter, SurgeryReport]:
    """The adapter in ``adapter_dir`` and ``surgery_dir``'s report, once the adapter is proven to belong."""
    report = read_report(surgery_dir)
    adapter = read_adapter(adapter_dir, fused_parameters(report))
    layers = report.layers
    missing, extra = sorted(layers.keys() - adapter.lora_A.keys()), sorted(adapter.lora_A.keys() - layers.keys())
    if missing:
        raise AdapterError(f"{adapter_dir}: has no factors for {missing[0]}, which {surgery_dir} adapted")
    if extra:
        raise AdapterError(f"{adapter_dir}: adapts {extra[0]}, which {surgery_dir} did not")
    for module, layer in layers.items():
        if adapter.rank_of(module) != layer.rank:
            raise AdapterError(
                f"{adapter_dir}: {module} has rank {adapter.rank_of(module)}, the surgery gave it {layer.rank}"
            )
    named = adapter.base_model_name_or_path
    if named is not None and named not in (report.base_name, str(surgery_dir.resolve())):
        raise AdapterError(
            f"{adapter_dir}: names its base model {named!r}, but {surgery_dir} was made for "
            f"{report.base_name!r} (an adapter from another surgery?)"
        )
    provenance = adapter.provenance or {}
    if provenance and provenance.get("residual_fingerprint") != report.residual_fingerprint:
        raise AdapterError(f"{adapter_dir}: was made for another residual model than {surgery_dir}")
    if CheckpointReader(surgery_dir).fingerprint() != report.residual_fingerprint:
        raise CordaSurgeryError(f"{surgery_dir}: the residual weights changed after the surgery (fingerprint mismatch)")
    return adapter, report


def fused_parameters(report: SurgeryReport) -> dict[str, list[str]]:
    """The surgery's adapted fused parameters by module, in the module's order (the deeper PEFT keys a
    parameter's factors under ``base_layer``, the earlier it comes): what ``read_adapter`` resolves with."""
    by_module: dict[str, list[str]] = {}
    paths = report.adapter_parameters
    for parameter in sorted(paths, key=lambda p: -paths[p].count(".base_layer")):
        by_module.setdefault(parameter.rpartition(".")[0], []).append(parameter)
    return by_module
