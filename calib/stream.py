"""Layer-by-layer streaming engine: input covariances of every target linear, one block in memory.

The model is a skeleton on the ``meta`` device. The stem (embeddings, rotary tables) is materialised to
record, for every calibration batch, the hidden states entering block 0 and the arguments each block
receives (masks, position embeddings, ...); then each block in turn is loaded from the safetensors
shards, run over all batches with hooks summing XᵀX over real tokens, written to the store, and freed.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import re
from pathlib import Path
from typing import cast

import torch
import transformers
from torch import nn
from tqdm.auto import tqdm
from transformers import AutoConfig, AutoTokenizer, PreTrainedModel

from corda_surgery.calib.architectures import Family, UnsupportedArchitecture, family_for
from corda_surgery.calib.data import CalibrationSpec, TokenBatch, token_batches
from corda_surgery.calib.store import CovarianceEntry, StoreWriter
from corda_surgery.calib.weights import CheckpointError, CheckpointReader
from corda_surgery.errors import CordaSurgeryError
from corda_surgery.outputs import claimed, refuse_existing

log = logging.getLogger(__name__)


class CalibrationError(CordaSurgeryError):
    """Calibration produced unusable activations (NaN/Inf); names the layer."""


class _StopForward(Exception):
    """Raised by the last recorder: everything after the blocks is never run."""


class _BlockInputRecorder(nn.Module):
    """Stands in for a block during capture: records its arguments and passes hidden states through."""

    def __init__(self, index: int, sink: list, last: bool):
        super().__init__()
        self.index, self.sink, self.last = index, sink, last

    def forward(self, hidden_states, *args, **kwargs):
        self.sink.append((self.index, hidden_states, args, kwargs))
        if self.last:
            raise _StopForward
        return hidden_states


class _Accumulator:
    """Float64 running sums (one per sampling round) of per-batch float32 XᵀX over real tokens.

    XᵀX is symmetric, so only the blocks on and above the diagonal of a ``k × k`` block grid are
    multiplied (10 of 16 for k = 4: 37.5% fewer FLOPs than one full GEMM); ``totals`` mirrors them.
    """

    MIN_BLOCK = 512  # narrower blocks make GEMMs less efficient than the FLOPs they save

    def __init__(self, dim: int, normalisation: str, rounds: int):
        self.sums = [torch.zeros(dim, dim, dtype=torch.float64) for _ in range(rounds)]
        self.counts = [0] * rounds
        self.normalisation = normalisation
        blocks = max(1, min(4, dim // self.MIN_BLOCK))
        edges = [dim * i // blocks for i in range(blocks + 1)]
        self.blocks = [slice(a, b) for a, b in itertools.pairwise(edges)]

    def add(self, x: torch.Tensor, mask: torch.Tensor, round_index: int) -> None:
        x = x.float()
        dense = bool(mask.all())  # no padding: use the activations in place instead of gathering rows
        if self.normalisation == "peft":  # PEFT's rule: each sample scaled by |max| over its real tokens
            real = x if dense else x.masked_fill(~mask[..., None], float("-inf"))
            x = x / real.amax(dim=(1, 2)).abs()[:, None, None]
        rows = x.reshape(-1, x.shape[-1]) if dense else x[mask]
        total = self.sums[round_index]
        for i, row_block in enumerate(self.blocks):
            for column_block in self.blocks[i:]:
                total[row_block, column_block] += rows[:, row_block].T @ rows[:, column_block]
        self.counts[round_index] += rows.shape[0] if self.normalisation == "tokens" else x.shape[0]

    def totals(self) -> list[torch.Tensor]:
        """The sums with their lower block triangle filled in from the upper one."""
        for total in self.sums:
            for i, row_block in enumerate(self.blocks):
                for column_block in self.blocks[i + 1 :]:
                    total[column_block, row_block] = total[row_block, column_block].T
        return self.sums


class StreamingModel:
    """A meta skeleton of a checkpoint whose blocks are materialised one at a time."""

    def __init__(self, model_dir: str | Path, dtype: torch.dtype = torch.float32):
        self.reader = CheckpointReader(model_dir)
        config_path = self.reader.model_dir / "config.json"
        try:
            self.family: Family = family_for(json.loads(config_path.read_text())["model_type"])
            self.config = AutoConfig.from_pretrained(self.reader.model_dir)
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError, ValueError) as exc:
            raise CheckpointError(f"{config_path}: not a usable transformers config ({exc})") from exc
        self.dtype = dtype
        with torch.device("meta"):
            self.model: PreTrainedModel = _build_model(self.config)
        self.model.eval()
        self.base: nn.Module = self.model.base_model
        blocks = self.base.get_submodule(self.family.layers)
        if not isinstance(blocks, nn.ModuleList):
            raise UnsupportedArchitecture(f"{self.config.model_type}: {self.family.layers} is not a block list")
        self.blocks: nn.ModuleList = blocks
        names = {id(m): n for n, m in self.model.named_modules()}
        self.blocks_prefix = names[id(self.blocks)]
        self.base_prefix: str = self.model.base_model_prefix if self.base is not self.model else ""
        for index, block in enumerate(self.blocks):
            for linear in self.family.linears:
                try:
                    block.get_submodule(linear)
                except AttributeError as exc:
                    raise UnsupportedArchitecture(
                        f"{self.config.model_type}: block {self.block_name(index)} has no {linear}"
                    ) from exc
        self._account_for_tensors()
        self._rebuild_runtime_buffers()

    def _account_for_tensors(self) -> None:
        """Every stored tensor is one the config implies, with that shape, and every implied one is stored
        (tied weights once): a config that does not match the weights is refused before any work."""
        aliases: dict[int, list[tuple[str, torch.Tensor]]] = {}
        for name, tensor in self.model.state_dict(keep_vars=True).items():
            aliases.setdefault(id(tensor), []).append((name, tensor))
        explained: set[str] = set()
        for names in aliases.values():
            stored = [(key, tensor) for name, tensor in names if (key := self.reader.find(name, self.base_prefix))]
            if not stored:
                raise CheckpointError(
                    f"{self.reader.model_dir}: tensor {names[0][0]} is missing from the checkpoint "
                    "(config.json implies it)"
                )
            for key, tensor in stored:
                shape = self.reader.spec(key)[0]
                if shape != tuple(tensor.shape):
                    raise CheckpointError(
                        f"{self.reader.model_dir}: {key} has shape {shape} but config.json implies "
                        f"{tuple(tensor.shape)}"
                    )
                explained.add(key)
        ignored = [re.compile(p) for p in getattr(self.model, "_keys_to_ignore_on_load_unexpected", None) or []]
        unexplained = sorted(
            k for k in self.reader.layout if k not in explained and not any(p.search(k) for p in ignored)
        )
        if unexplained:
            raise CheckpointError(
                f"{self.reader.model_dir}: tensor {unexplained[0]} is not explained by config.json "
                f"({len(unexplained)} such tensor(s): does the config match the weights?)"
            )

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    def block_name(self, index: int) -> str:
        return f"{self.blocks_prefix}.{index}"

    def _stem_modules(self) -> list[nn.Module]:
        """Direct children of the base model other than the block list (embeddings, norms, rotary)."""
        return [m for m in self.base.children() if m is not self.blocks]

    def _rebuild_runtime_buffers(self) -> None:
        """Non-persistent buffers (rotary inv_freq, position ids) are not in checkpoints: rebuild on CPU."""
        for module in self._stem_modules():
            for sub in module.modules():
                meta = [k for k, b in sub._buffers.items() if b is not None and b.is_meta]
                if not meta:
                    continue
                fresh = _construct_like(sub, self.config)
                for key in meta:
                    sub._buffers[key] = fresh._buffers[key]
        for name, buffer in self.blocks.named_buffers():
            if buffer.is_meta:
                raise UnsupportedArchitecture(f"{self.config.model_type}: block buffer {name} cannot be rebuilt")

    def _load(self, module: nn.Module, prefix: str) -> None:
        for name, param in list(module.named_parameters()):
            key = self.reader.resolve(f"{prefix}.{name}" if prefix else name, self.base_prefix)
            owner_name, _, leaf = name.rpartition(".")
            owner = module.get_submodule(owner_name) if owner_name else module
            tensor = self.reader.get(key)
            if tuple(tensor.shape) != tuple(param.shape):
                raise CheckpointError(
                    f"{self.reader.model_dir}: {key} has shape {tuple(tensor.shape)} but config.json "
                    f"implies {tuple(param.shape)}"
                )
            owner._parameters[leaf] = nn.Parameter(tensor.to(self.dtype), requires_grad=False)

    def load_stem(self) -> None:
        names = {id(m): n for n, m in self.model.named_modules()}
        for module in self._stem_modules():
            self._load(module, names[id(module)])

    def free_stem(self) -> None:
        for module in self._stem_modules():
            for sub in module.modules():
                for key, param in sub._parameters.items():
                    if param is not None:
                        sub._parameters[key] = nn.Parameter(param.to("meta"), requires_grad=False)

    def load_block(self, index: int) -> nn.Module:
        block = self.blocks[index]
        self._load(block, self.block_name(index))
        return block

    def free_block(self, index: int) -> None:
        self.blocks[index].to("meta")
        self.reader.release()

    @torch.no_grad()
    def capture_block_inputs(self, batches: list[TokenBatch]) -> tuple[list[torch.Tensor], list[list]]:
        """Hidden states entering block 0 per batch, and each block's other arguments per batch."""
        self.load_stem()
        originals = list(self.blocks)
        hidden, arguments = [], []
        try:
            for batch in batches:
                sink: list = []
                for i in range(self.num_blocks):
                    self.blocks[i] = _BlockInputRecorder(i, sink, last=i == self.num_blocks - 1)
                with contextlib.suppress(_StopForward):
                    self.base(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
                hidden.append(sink[0][1])
                arguments.append([(args, kwargs) for _, _, args, kwargs in sink])
        finally:
            for i, block in enumerate(originals):
                self.blocks[i] = block
            self.free_stem()
        return hidden, arguments


def _build_model(config) -> PreTrainedModel:
    """The checkpoint's own architecture class (config.architectures), else a causal LM."""
    for architecture in config.architectures or []:
        cls = getattr(transformers, architecture, None)
        if cls is not None:
            return cls(config)
    return transformers.AutoModelForCausalLM.from_config(config)


def _construct_like(module: nn.Module, config) -> nn.Module:
    with torch.device("cpu"):
        for call in (lambda: type(module)(config=config), lambda: type(module)(config)):
            try:
                return call()
            except TypeError:
                continue
    raise UnsupportedArchitecture(f"cannot rebuild the runtime buffers of {type(module).__name__}")


@torch.no_grad()
def stream_covariances(
    streaming: StreamingModel,
    batches: list[TokenBatch],
    writer: StoreWriter,
    *,
    normalisation: str = "tokens",
    rounds: int = 1,
    progress: bool = True,
) -> None:
    """Run every block over every batch and write each block's input covariances to ``writer``.

    With ``rounds`` > 1 the batches are split into that many disjoint sampling rounds, each of which
    gets its own covariance besides their sum (candidates for CorDA++'s covariance selection).
    """
    hidden, arguments = streaming.capture_block_inputs(batches)
    masks = [batch.attention_mask.bool() for batch in batches]
    for index in tqdm(range(streaming.num_blocks), desc="blocks", unit="block", disable=not progress):
        block = streaming.load_block(index)
        prefix = streaming.block_name(index)
        collect = index >= writer.layers_done
        accumulators: dict[tuple[str, ...], _Accumulator] = {}
        handles = []
        current: dict[str, torch.Tensor] = {}
        if collect:
            for group in streaming.family.input_groups:
                leader = block.get_submodule(group[0])
                weight_shape = cast(torch.Tensor, leader.weight).shape
                in_dim = weight_shape[0] if streaming.family.transposed else weight_shape[1]
                accumulator = accumulators[group] = _Accumulator(in_dim, normalisation, rounds)
                hook = lambda _m, inputs, acc=accumulator, now=current: acc.add(  # noqa: E731
                    inputs[0], now["mask"], now["round"]
                )
                handles.append(leader.register_forward_pre_hook(hook))
        try:
            batch_bar = tqdm(range(len(batches)), desc=f"block {index}", leave=False, disable=not progress)
            for b in batch_bar:
                current["mask"], current["round"] = masks[b], b * rounds // len(batches)
                args, kwargs = arguments[b][index]
                out = block(hidden[b], *args, **kwargs)
                hidden[b] = out[0] if isinstance(out, tuple) else out
        finally:
            for handle in handles:
                handle.remove()
            streaming.free_block(index)
        if collect:
            entries = []
            for group, accumulator in accumulators.items():
                name = f"{prefix}.{group[0]}"
                sums = accumulator.totals()
                if not all(torch.isfinite(s).all() for s in sums):
                    raise CalibrationError(f"{name}: input activations contain NaN or Inf")
                linears = tuple(f"{prefix}.{linear}" for linear in group)
                entry = CovarianceEntry(
                    name=name,
                    layer=index,
                    linears=linears,
                    count=sum(accumulator.counts),
                    round_counts=tuple(accumulator.counts) if rounds > 1 else (),
                )
                entries.append((entry, sums))
            writer.write_layer(index, entries)


def calibrate(
    model_dir: str | Path,
    spec: CalibrationSpec,
    out: str | Path,
    *,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Collect every target linear's input covariance of ``model_dir`` into the HDF5 store ``out``."""
    with claimed(out, [Path(model_dir), *spec.input_files()]) as out:
        refuse_existing(out, overwrite)
        streaming = StreamingModel(model_dir)
        try:
            tokenizer = AutoTokenizer.from_pretrained(streaming.reader.model_dir)
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"{model_dir}: cannot load the tokenizer ({exc})") from exc
        vocab_size = getattr(streaming.config, "vocab_size", None) or len(tokenizer)
        batches, description = token_batches(spec, tokenizer, vocab_size)
        writer = StoreWriter(
            out,
            fingerprint=streaming.reader.fingerprint(),
            calibration=description,
            num_layers=streaming.num_blocks,
            resume=resume,
        )
        try:
            stream_covariances(
                streaming, batches, writer, normalisation=spec.normalisation, rounds=spec.rounds, progress=progress
            )
            return writer.finish()
        finally:
            writer.close()
