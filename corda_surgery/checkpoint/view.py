"""One checkpoint seen through its meta skeleton: its repeated blocks, their linears, and lazy tensor reading.

Calibration, surgery, inspection and merge all start from this view. Nothing about an architecture is
looked up in a table: the blocks are the module list of ``num_hidden_layers`` identical blocks (in a
multimodal checkpoint, the language model's); stored keys map to module tensors through transformers' own
conversion mapping (renamed layouts, experts stored one by one but fused in the module); the linears are
the ``nn.Linear`` (and GPT-2 ``Conv1D``)
modules inside each block; which linears read the same tensor is observed while calibrating (see
``corda_surgery.calib.stream``). Mixture-of-experts layers whose experts are fused 3-D parameters have no linear per
expert: each expert's slice is treated as one (``corda_surgery.checkpoint.experts``), and results computed for a fused
parameter are written back as the stored tensors it was fused from (transformers' reverse conversion).
"""

from __future__ import annotations

import json
import re
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
import transformers
from accelerate import init_empty_weights
from torch import nn
from transformers import AutoConfig, PreTrainedModel
from transformers.conversion_mapping import get_model_conversion_mapping
from transformers.core_model_loading import (
    WeightConverter,
    WeightRenaming,
    dot_natural_key,
    rename_source_key,
    revert_weight_conversion,
)
from transformers.pytorch_utils import Conv1D

from corda_surgery.checkpoint.experts import FusedExperts, find_fused_experts
from corda_surgery.checkpoint.quantised import DequantisingReader, refuse_quantised
from corda_surgery.checkpoint.reader import CheckpointError, CheckpointReader
from corda_surgery.errors import UnsupportedArchitecture


def _build_model(config) -> PreTrainedModel:
    """The checkpoint's own architecture class (config.architectures), else a causal LM."""
    for architecture in config.architectures or []:
        cls = getattr(transformers, architecture, None)
        if cls is not None:
            return cls(config)
    return transformers.AutoModelForCausalLM.from_config(config)


def is_linear(module: nn.Module) -> bool:
    """An ``nn.Linear`` or GPT-2 ``Conv1D`` that returns its projection. A subclass that overrides ``forward`` is
    run on a one-token input (free on the meta skeleton): Falcon's linear passes, routers that return scores
    and indices (Phi-MoE, Llama 4) are not the linear map PEFT's LoRA layer adds its update to."""
    if not isinstance(module, (nn.Linear, Conv1D)):
        return False
    if type(module).forward in (nn.Linear.forward, Conv1D.forward):
        return True
    weight = module.weight
    in_dim, out_dim = (weight.shape[1], weight.shape[0]) if isinstance(module, nn.Linear) else weight.shape
    try:
        with torch.no_grad():
            out = module(torch.zeros(1, in_dim, dtype=weight.dtype, device=weight.device))
    except Exception:  # whatever a custom forward raises, it is not a plain projection
        return False
    return isinstance(out, torch.Tensor) and tuple(out.shape) == (1, out_dim)


def _find_blocks(model: PreTrainedModel, config) -> tuple[str, nn.ModuleList]:
    """The module list of ``num_hidden_layers`` same-class blocks; the language model's where there are several."""
    layers = config.get_text_config().num_hidden_layers
    no_split = set(getattr(model, "_no_split_modules", None) or [])
    candidates = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, nn.ModuleList)
        and len(module) == layers
        and len({type(block) for block in module}) == 1
        and (not no_split or type(module[0]).__name__ in no_split)
    ]
    if len(candidates) > 1:  # e.g. a vision tower as deep as the language model: take the one generating text
        decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
        inside = [(n, m) for n, m in candidates if decoder is not None and any(m is x for x in decoder.modules())]
        candidates = inside or [(n, m) for n, m in candidates if "vision" not in n and "visual" not in n]
    if len(candidates) != 1:
        found = ", ".join(name for name, _ in candidates) or "none"
        raise UnsupportedArchitecture(
            f"{config.model_type}: cannot tell the repeated blocks apart (module lists of {layers} blocks: {found})"
        )
    return candidates[0]


# Checkpoints are data: no file of one is ever run as code, whatever its config or tokenizer config asks.
REMOTE_CODE_REFUSED = (
    "needs the checkpoint's own Python code (auto_map), which corda-surgery never runs (no trust_remote_code)"
)


class ModelView:
    """A meta skeleton of a checkpoint whose blocks are materialised one at a time."""

    def __init__(
        self,
        model_dir: str | Path,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        *,
        dequantise: bool = False,
    ):
        """``dtype`` and ``device``: what materialised blocks are cast to and placed on (the forward pass's).
        ``dequantise``: a 4-bit residual this tool wrote, read as its float weights (``DequantisingReader``)."""
        self.reader = DequantisingReader(model_dir) if dequantise else CheckpointReader(model_dir)
        config_path = self.reader.model_dir / "config.json"
        try:
            raw = json.loads(config_path.read_text())
            raw["model_type"]  # invalid JSON, no model_type: our one-line error
            self.config = AutoConfig.from_pretrained(self.reader.model_dir, trust_remote_code=False)
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError, ValueError) as exc:
            if "trust_remote_code" in str(exc):
                raise CheckpointError(f"{config_path}: {REMOTE_CODE_REFUSED}") from exc
            raise CheckpointError(f"{config_path}: not a usable transformers config ({exc})") from exc
        if not dequantise:
            refuse_quantised(self.reader.model_dir, raw)
        self.dtype, self.device = dtype, torch.device(device)
        with init_empty_weights(include_buffers=False):  # parameters on meta, runtime buffers (rotary) real
            self.model: PreTrainedModel = _build_model(self.config)
        self.model.tie_weights()  # the context re-creates each parameter, which unties shared ones
        self.model.eval()
        self.sources, self._converters = self._map_stored_keys()
        self.blocks_prefix, self.blocks = _find_blocks(self.model, self.config)
        self.runner_prefix, self.runner = self._runner()
        self.linears = [self._block_linears(i) for i in range(len(self.blocks))]
        self.experts: list[dict[str, FusedExperts]] = [find_fused_experts(block) for block in self.blocks]
        transposed = {flag for block in self.linears for flag in block.values()}
        if len(transposed) > 1:
            raise UnsupportedArchitecture(f"{self.config.model_type}: mixes Conv1D and Linear layers in its blocks")
        self.transposed = transposed == {True}
        self._account_for_tensors()

    def _map_stored_keys(self) -> tuple[dict[str, list[tuple[str | None, str]]], list[WeightConverter]]:
        """Module tensor name → its stored keys, each with the converter pattern that fuses it (None: as is);
        and the converters those patterns belong to."""
        transforms = get_model_conversion_mapping(self.model)
        renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
        converters = [t for t in transforms if isinstance(t, WeightConverter)]
        meta = self.model.state_dict(keep_vars=True)
        sources: dict[str, list[tuple[str | None, str]]] = defaultdict(list)
        for key in sorted(self.reader.layout, key=dot_natural_key):
            name, pattern = rename_source_key(key, renamings, converters, self.model.base_model_prefix, meta)
            sources[name].append((pattern, key))
        return dict(sources), converters

    def stored_key(self, name: str) -> str:
        """The stored key of a module tensor kept as it is (a linear's weight, say)."""
        stored = self.sources.get(name, [])
        if len(stored) != 1 or stored[0][0] is not None:
            raise CheckpointError(f"{self.reader.model_dir}: {name} is not stored as one tensor")
        return stored[0][1]

    def read(self, name: str) -> torch.Tensor:
        """A module tensor from the checkpoint, fused from several stored tensors where the module fuses them."""
        stored = self.sources.get(name)
        if not stored:
            raise CheckpointError(f"{self.reader.model_dir}: tensor {name} not found in the checkpoint")
        if stored[0][0] is None:
            return self.reader.get(stored[0][1])
        converter = next(c for c in self._converters if stored[0][0] in c.source_patterns)
        collected: dict = {p: [self.reader.get(k) for q, k in stored if q == p] for p in converter.source_patterns}
        for operation in converter.operations:
            collected = operation.convert(
                collected,
                source_patterns=converter.source_patterns,
                target_patterns=converter.target_patterns,
                full_layer_name=name,
                model=self.model,
                config=self.config,
            )
        [tensor] = collected.values()
        return tensor

    def stored_pieces(self, name: str, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
        """A module tensor as the stored tensors it is read from (split back where the module fuses them)."""
        stored = self.sources.get(name, [])
        if len(stored) == 1 and stored[0][0] is None:
            return {stored[0][1]: tensor}
        pieces = revert_weight_conversion(self.model, {name: tensor})
        expected = {key: self.reader.spec(key)[0] for _, key in stored}
        if {key: tuple(piece.shape) for key, piece in pieces.items()} != expected:
            raise UnsupportedArchitecture(
                f"{self.config.model_type}: {name} cannot be split back into the stored tensors it was fused from"
            )
        return pieces

    def writable(self, name: str) -> torch.Tensor:
        """A module tensor that may be overwritten: fused ones are new tensors already, others are copied out of
        the mapped shard; the shards are unmapped after."""
        tensor = self.read(name)
        if self.sources[name][0][0] is None:
            tensor = tensor.clone()
        self.reader.release()
        return tensor

    def check_stored_pieces(self, name: str) -> None:
        """Refuse up front (on a meta tensor: no data) a fused parameter that cannot be split back."""
        like = self.model.get_parameter(name)
        self.stored_pieces(name, torch.empty(like.shape, dtype=self.stored_dtype, device="meta"))

    def fused_weights(self) -> dict[str, FusedExperts]:
        """Every adaptable fused expert weight (full name) → its experts module, in definition order."""
        return {
            f"{self.block_name(i)}.{experts.module}.{parameter}": experts
            for i, found in enumerate(self.experts)
            for experts in found.values()
            for parameter in experts.parameters
        }

    def fused_parameters(self) -> dict[str, tuple[str, ...]]:
        """Module path of every fused-experts module → its adaptable parameters' names, in definition order."""
        by_module: dict[str, tuple[str, ...]] = {}
        for name in self.fused_weights():
            module = name.rpartition(".")[0]
            by_module[module] = (*by_module.get(module, ()), name)
        return by_module

    def _runner(self) -> tuple[str, nn.Module]:
        """The innermost pre-trained model around the blocks: it embeds tokens and calls them in turn."""
        names = {id(m): n for n, m in self.model.named_modules()}
        parts = self.blocks_prefix.split(".")
        for depth in range(len(parts) - 1, -1, -1):
            prefix = ".".join(parts[:depth])
            module = self.model.get_submodule(prefix)
            if isinstance(module, PreTrainedModel):
                return names[id(module)], module
        return "", self.model

    def _block_linears(self, index: int) -> dict[str, bool]:
        """Linears of block ``index`` (names relative to the block) → stored transposed (Conv1D)."""
        found = {n: isinstance(m, Conv1D) for n, m in self.blocks[index].named_modules() if is_linear(m)}
        if not found:
            raise UnsupportedArchitecture(f"{self.config.model_type}: block {self.block_name(index)} has no linears")
        return found

    @property
    def stored_dtype(self) -> torch.dtype:
        """The checkpoint's own dtype (the most common floating dtype of its tensors)."""
        floating = Counter(t.dtype for t in self.reader.layout.values() if t.dtype.is_floating_point)
        return floating.most_common(1)[0][0] if floating else torch.float32

    @property
    def model_type(self) -> str:
        return self.config.model_type

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    def block_name(self, index: int) -> str:
        return f"{self.blocks_prefix}.{index}"

    def _account_for_tensors(self) -> None:
        """Every stored tensor is one the config implies, with that shape, and every implied one is stored
        (tied weights once): a config that does not match the weights is refused before any work."""
        aliases: dict[int, list[tuple[str, torch.Tensor]]] = {}
        for name, tensor in self.model.state_dict(keep_vars=True).items():
            aliases.setdefault(id(tensor), []).append((name, tensor))
        explained: set[str] = set()
        for names in aliases.values():
            stored = [(name, tensor) for name, tensor in names if name in self.sources]
            if not stored and any(not t.is_meta for _, t in names):
                continue  # a runtime buffer the model builds itself
            if not stored:
                raise CheckpointError(
                    f"{self.reader.model_dir}: tensor {names[0][0]} is missing from the checkpoint "
                    "(config.json implies it)"
                )
            for name, tensor in stored:
                pattern, key = self.sources[name][0]
                shape = self.reader.spec(key)[0]
                if pattern is None and shape != tuple(tensor.shape):
                    raise CheckpointError(
                        f"{self.reader.model_dir}: {key} has shape {shape} but config.json implies "
                        f"{tuple(tensor.shape)}"
                    )
                explained.add(name)
        ignored = [re.compile(p) for p in getattr(self.model, "_keys_to_ignore_on_load_unexpected", None) or []]
        unexplained = sorted(
            key
            for name, keys in self.sources.items()
            if name not in explained
            for _, key in keys
            if not any(p.search(key) for p in ignored)
        )
        if unexplained:
            raise CheckpointError(
                f"{self.reader.model_dir}: tensor {unexplained[0]} is not explained by config.json "
                f"({len(unexplained)} such tensor(s): does the config match the weights?)"
            )

    def _materialise(self, module: nn.Module, prefix: str, skip: frozenset[int] = frozenset()) -> None:
        """Load the stored parameters and persistent buffers of ``module`` (named under ``prefix``)."""
        for owner_name, owner in module.named_modules():
            if id(owner) in skip:
                continue
            path = ".".join(p for p in (prefix, owner_name) if p)
            for leaf, param in owner._parameters.items():
                if param is not None:
                    owner._parameters[leaf] = nn.Parameter(self._checked(f"{path}.{leaf}", param), requires_grad=False)
            for leaf, buffer in owner._buffers.items():
                if buffer is not None and f"{path}.{leaf}" in self.sources:
                    owner._buffers[leaf] = self._checked(f"{path}.{leaf}", buffer)
                elif buffer is not None:  # a runtime buffer the model built (rotary frequencies)
                    owner._buffers[leaf] = buffer.to(self.device)

    def _checked(self, name: str, like: torch.Tensor) -> torch.Tensor:
        tensor = self.read(name)
        if tuple(tensor.shape) != tuple(like.shape):
            raise CheckpointError(
                f"{self.reader.model_dir}: {name} has shape {tuple(tensor.shape)} but config.json implies "
                f"{tuple(like.shape)}"
            )
        return tensor.to(self.device, self.dtype if tensor.is_floating_point() else tensor.dtype)

    def _release(self, module: nn.Module, skip: frozenset[int] = frozenset()) -> None:
        """Parameters back to ``meta``; buffers stay (runtime ones are not in the checkpoint)."""
        for owner in module.modules():
            if id(owner) in skip:
                continue
            for leaf, param in owner._parameters.items():
                if param is not None:
                    owner._parameters[leaf] = nn.Parameter(param.to("meta"), requires_grad=False)
        self.reader.release()

    def load_stem(self) -> None:
        """The runner's tensors outside the blocks: embeddings, final norm."""
        self._materialise(self.runner, self.runner_prefix, skip=frozenset(id(m) for m in self.blocks.modules()))

    def free_stem(self) -> None:
        self._release(self.runner, skip=frozenset(id(m) for m in self.blocks.modules()))

    def load_block(self, index: int) -> nn.Module:
        block = self.blocks[index]
        self._materialise(block, self.block_name(index))
        return block

    def free_block(self, index: int) -> None:
        self._release(self.blocks[index])


class StoredPieces:
    """Module tensors computed whole (``compute``) and handed out one stored key at a time, as the stored
    tensors they are written as; a tensor's pieces are held until the last of them has been taken."""

    def __init__(self, view: ModelView, names: Iterable[str], compute: Callable[[str], torch.Tensor]):
        self.view, self.compute = view, compute
        self.owner = {key: name for name in names for _, key in view.sources[name]}
        self.pending: dict[str, dict[str, torch.Tensor]] = {}

    def take(self, key: str) -> torch.Tensor | None:
        """The piece stored under ``key``; None where no computed tensor owns that key."""
        name = self.owner.get(key)
        if name is None:
            return None
        if name not in self.pending:
            self.pending[name] = self.view.stored_pieces(name, self.compute(name))
        pieces = self.pending[name]
        piece = pieces.pop(key)
        if not pieces:
            del self.pending[name]
        return piece
