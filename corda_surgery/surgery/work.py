"""Where each target's result comes from: this process, or the rank that decomposed it.

The writer (rank 0) asks a ``WorkSource`` for each target in writing order and cannot tell the two apart;
under torchrun the other ranks ``serve_share``: they decompose their share in that same order and send each
result to rank 0. One process is the same loop with every target local.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from corda_surgery.checkpoint.reader import CheckpointReader
from corda_surgery.checkpoint.writer import write_order
from corda_surgery.distributed import DistributedError, Ranks, ResultSender, receive_result
from corda_surgery.surgery.initialise import Initialised, Initialiser
from corda_surgery.surgery.options import SurgeryOptions
from corda_surgery.surgery.report import LayerRecord
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
    """Each target's ``Initialised``: made here from the stored weight, or received from the rank that owns it."""

    reader: CheckpointReader
    initialise: Initialiser
    ranks: Ranks
    owners: dict[str, int] = field(default_factory=dict)  # target → rank, where not this one

    def take(self, target: Target) -> Initialised:
        owner = self.owners.get(target.name, self.ranks.rank)
        if owner == self.ranks.rank:
            assert target.key is not None  # experts' slices are initialised from their fused weight
            return self.initialise(self.reader.copy(target.key), target)
        return self._receive(target, owner)

    def _receive(self, target: Target, owner: int) -> Initialised:
        layer, dtype = self.initialise.plan[target.name], self.initialise.options.decomposition.torch_factor_dtype
        assert target.key is not None
        specs = [
            ((layer.rank, target.in_dim), dtype),
            ((target.out_dim, layer.rank), dtype),
            self.reader.spec(target.key),
        ]
        lora_a, lora_b, residual, sent = receive_result(owner, specs, self.ranks)
        if sent["target"] != target.name:
            raise DistributedError(
                f"rank {owner} sent {sent['target']} where rank 0 writes {target.name}: the ranks disagree on the "
                "writing order"
            )
        return Initialised(lora_a, lora_b, residual, LayerRecord.from_json(sent["record"]))


def serve_share(source: WorkSource, targets: list[Target], max_shard_size: int) -> None:
    """A rank other than 0: initialise its share, in the order rank 0 writes, and send each result there."""
    mine = {t.key: t for t in targets if source.owners.get(t.name) == source.ranks.rank}
    reader = source.reader
    sender = ResultSender(source.ranks)
    for key in write_order({key: reader.spec(key) for key in reader.locations}, max_shard_size):
        target = mine.get(key)
        if target is not None:
            result = source.take(target)
            record = {"target": target.name, "record": result.record.to_json()}
            sender.send(record, [result.lora_a, result.lora_b, result.residual])
    sender.close()
