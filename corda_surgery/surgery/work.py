"""Where each target's result comes from: this process, or the rank that decomposed it.

The writer (rank 0) asks a ``WorkSource`` for each target in writing order and cannot tell the two apart;
under torchrun the other ranks ``serve_share``: they decompose their share in that same order and send each
result to rank 0. One process is the same loop with every target local.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

from corda_surgery.checkpoint.reader import CheckpointReader
from corda_surgery.checkpoint.writer import write_order
from corda_surgery.decomposition.decompose import residual_of
from corda_surgery.distributed import DistributedError, Ranks, ResultSender, receive_result
from corda_surgery.surgery.initialise import Initialised, Initialiser
from corda_surgery.surgery.options import SurgeryOptions
from corda_surgery.surgery.report import LayerRecord
from corda_surgery.surgery.resume import FinishedWork, ResumeError
from corda_surgery.surgery.targets import LayerPlan, Target


def _cost(target: Target) -> int:
    """A decomposition's arithmetic, roughly: W·C plus the eigen-decomposition of the smaller side."""
    return target.out_dim * target.in_dim**2 + min(target.out_dim, target.in_dim) ** 3


def share_of_work(
    targets: list[Target], plan: Mapping[str, LayerPlan], initialise: Initialiser, options: SurgeryOptions, ranks: Ranks
) -> dict[str, int]:
    """The rank that decomposes each linear: each input group (one shared factorisation) whole to the least
    loaded rank, costliest first. Experts' slices and LoRA's random init (seeded in writing order) stay on
    rank 0, which also reads and writes everything."""
    if ranks.world == 1 or options.mode is None:
        return {}
    groups: dict[tuple, list[Target]] = {}
    for target in targets:
        if not target.is_expert:
            key = initialise.shared.key(target.name) if plan[target.name].store is not None else (target.name,)
            groups.setdefault(key, []).append(target)
    load = [0] * ranks.world
    load[0] = sum(_cost(t) for t in targets if t.is_expert)  # experts' slices stay on rank 0
    owners: dict[str, int] = {}
    for members in sorted(groups.values(), key=lambda group: -sum(map(_cost, group))):
        rank = min(range(ranks.world), key=lambda r: (load[r], r))
        load[rank] += sum(map(_cost, members))
        owners.update(dict.fromkeys((t.name for t in members), rank))
    return owners


@dataclass
class WorkSource:
    """Each target's ``Initialised``: made here from the stored weight (an expert's: from its slice of the fused
    weight), received from the rank that owns it, or rebuilt from what an interrupted run finished."""

    reader: CheckpointReader
    initialise: Initialiser
    ranks: Ranks
    owners: dict[str, int] = field(default_factory=dict)  # target → rank, where not this one
    finished: FinishedWork | None = None  # rank 0: saves each decomposition, holds an earlier run's
    done: frozenset[str] = frozenset()  # every rank: the targets an earlier run decomposed

    def __post_init__(self) -> None:
        for name in self.done:
            self.initialise.shared.skip(name)

    def take(self, target: Target, weight: torch.Tensor | None = None) -> Initialised:
        if target.name in self.done:
            return self._rebuilt(target, weight)
        owner = self.owners.get(target.name, self.ranks.rank)
        if owner == self.ranks.rank:
            result = self.initialise(self._weight(target) if weight is None else weight, target)
        else:
            result = self._receive(target, owner)
        if self.finished is not None and result.record.damping is not None:  # decomposed (LoRA's init is instant)
            self.finished.keep(target.name, result.lora_a, result.lora_b, result.record)
        return result

    def _weight(self, target: Target) -> torch.Tensor:
        assert target.key is not None  # experts' slices come with their weight
        return self.reader.copy(target.key)

    def _rebuilt(self, target: Target, weight: torch.Tensor | None) -> Initialised:
        """An earlier run's factors and record, and the residual they leave, as ``decompose_weight`` forms it."""
        assert self.finished is not None  # only rank 0 takes finished targets
        saved = self.finished.take(target.name)
        assert saved is not None
        lora_a, lora_b, record = saved
        rank = self.initialise.plan[target.name].rank
        if tuple(lora_a.shape) != (rank, target.in_dim) or tuple(lora_b.shape) != (target.out_dim, rank):
            raise ResumeError(
                f"{target.name}: the interrupted run gave it rank {lora_a.shape[0]}, this run plans {rank}; drop "
                "`resume` to start again"
            )
        scaling = self.initialise.options.scaling * rank / rank  # decompose_weight's alpha / r, to the bit
        residual = residual_of(
            self._weight(target) if weight is None else weight,
            lora_a,
            lora_b,
            scaling,
            transposed=target.transposed,
            name=target.name,
            damping=record.damping or 0.0,
        )
        return Initialised(lora_a, lora_b, residual, record)

    def _receive(self, target: Target, owner: int) -> Initialised:
        layer, dtype = self.initialise.plan[target.name], self.initialise.options.decomposition.torch_factor_dtype
        assert target.key is not None
        (lora_a, lora_b, residual), record = receive_factors(
            target, layer.rank, dtype, owner, self.ranks, [self.reader.spec(target.key)]
        )
        return Initialised(lora_a, lora_b, residual, record)


def receive_factors(
    target: Target, rank: int, dtype: torch.dtype, owner: int, ranks: Ranks, more: Sequence[tuple] = ()
) -> tuple[list[torch.Tensor], LayerRecord]:
    """Rank 0 takes ``target``'s result from ``owner``: A, B and any ``more`` tensors (shape, dtype), and its
    record; a result for another target means the ranks disagree on the order."""
    specs = [((rank, target.in_dim), dtype), ((target.out_dim, rank), dtype), *more]
    *tensors, sent = receive_result(owner, specs, ranks)
    if sent["target"] != target.name:
        raise DistributedError(
            f"rank {owner} sent {sent['target']} where rank 0 takes {target.name}: the ranks disagree on the order"
        )
    return tensors, LayerRecord.from_json(sent["record"])


def serve_share(source: WorkSource, targets: list[Target], max_shard_size: int) -> None:
    """A rank other than 0: initialise its share, in the order rank 0 writes, and send each result there."""
    mine = {t.key: t for t in targets if source.owners.get(t.name) == source.ranks.rank and t.name not in source.done}
    reader = source.reader
    sender = ResultSender(source.ranks)
    for key in write_order({key: reader.spec(key) for key in reader.locations}, max_shard_size):
        target = mine.get(key)
        if target is not None:
            result = source.take(target)
            record = {"target": target.name, "record": result.record.to_json()}
            sender.send(record, [result.lora_a, result.lora_b, result.residual])
    sender.close()
