"""Several processes on torch.distributed (``torchrun``): each rank's share of the work and the collectives.

Every rank builds the same meta skeleton and loads the same block; calibration batches are dealt out round
robin, and each block's float64 covariance sums and token counts are all-reduced before rank 0 (the only
writer) stores the layer. One process (no ``WORLD_SIZE`` or ``WORLD_SIZE=1``) is the same code with a world
of one: no process group, no collectives.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import math
import os
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

from corda_surgery.errors import CordaSurgeryError

log = logging.getLogger(__name__)

# How long a rank waits in a collective for the others before giving up. A rank that dies breaks its
# connections, which the others notice at once; this bounds only a rank that hangs, or rank 0 planning CorDA++
# ranks (hours on a 70B model) while the others wait for the plan.
COLLECTIVE_TIMEOUT = datetime.timedelta(minutes=int(os.environ.get("CORDA_SURGERY_DIST_TIMEOUT_MIN", "720")))


class DistributedError(CordaSurgeryError):
    """Another rank stopped, or the ranks disagree (the CLI prefixes every rank's messages with its label)."""


@dataclass(frozen=True)
class Ranks:
    """This process's place among the ranks."""

    rank: int = 0
    world: int = 1

    @property
    def writer(self) -> bool:
        """Rank 0 writes every output; the others compute their share and hand it over."""
        return self.rank == 0

    @property
    def label(self) -> str:
        """The prefix of this rank's messages: ``rank r of N: `` with several ranks, nothing with one."""
        return f"rank {self.rank} of {self.world}: " if self.world > 1 else ""

    def share(self, count: int) -> list[int]:
        """Indices of ``count`` work items that are this rank's, dealt round robin."""
        return list(range(self.rank, count, self.world))


ALONE = Ranks()  # one process, no process group


def local_world() -> int:
    """How many ranks share this machine (torchrun's LOCAL_WORLD_SIZE): they share its RAM."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", "1"))


def samples_share(samples: int, batch_size: int, ranks: Ranks) -> int:
    """The most samples any rank runs: batches are dealt round robin, rank 0 gets the most."""
    batches = math.ceil(samples / batch_size)
    return min(samples, math.ceil(batches / ranks.world) * batch_size)


def launched() -> Ranks:
    """The rank and world torchrun's environment gives this process, without joining the group."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return Ranks(int(os.environ.get("RANK", "0")), world) if world > 1 else ALONE


def current() -> Ranks:
    """This process's ranks, joining the process group torchrun describes (gloo on CPUs, nccl when this
    rank has a CUDA device) the first time it is asked for."""
    if launched().world == 1:
        return ALONE
    if not dist.is_initialized():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        backend = "gloo"  # host tensors (and every result sent to rank 0) travel by gloo
        if torch.cuda.is_available() and local < torch.cuda.device_count():
            torch.cuda.set_device(local)
            backend = "cpu:gloo,cuda:nccl"  # covariance sums kept on the GPU are all-reduced by nccl
        dist.init_process_group(backend, timeout=COLLECTIVE_TIMEOUT)
        log.info("joined the process group (%s)", backend)
    return Ranks(dist.get_rank(), dist.get_world_size())


@contextlib.contextmanager
def _collective(what: str) -> Iterator[None]:
    """A collective's failure (a peer that died, a timeout: RuntimeError from gloo / nccl) as a message saying so."""
    try:
        yield
    except RuntimeError as error:
        first_line = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise DistributedError(
            f"{what} failed, another rank has probably stopped ({first_line}); "
            "a calibration store written so far continues with `resume`"
        ) from error


def all_reduce_sum(tensor: torch.Tensor, ranks: Ranks, what: str) -> None:
    """Sum ``tensor`` over the ranks, in place (nothing to do for one process)."""
    if ranks.world == 1:
        return
    with _collective(what):
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)


def gather_objects(value, ranks: Ranks, what: str) -> list:
    """Every rank's ``value`` (picklable), in rank order."""
    if ranks.world == 1:
        return [value]
    gathered: list = [None] * ranks.world
    with _collective(what):
        dist.all_gather_object(gathered, value)
    return gathered


def broadcast_object(value, ranks: Ranks, what: str):
    """Rank 0's ``value`` on every rank."""
    if ranks.world == 1:
        return value
    box = [value if ranks.writer else None]
    with _collective(what):
        dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier(ranks: Ranks, what: str) -> None:
    if ranks.world > 1:
        with _collective(what):
            dist.barrier()


class ResultSender:
    """Sends results (a JSON-able record and tensors) to rank 0 in the order it will take them, up to
    LOOKAHEAD results ahead of it (each held until taken), so this rank keeps decomposing meanwhile."""

    LOOKAHEAD = 4

    def __init__(self, ranks: Ranks):
        self.ranks = ranks
        self.pending: deque[tuple[list, list[torch.Tensor]]] = deque()

    def send(self, record: dict, tensors: Sequence[torch.Tensor]) -> None:
        payload = torch.frombuffer(bytearray(json.dumps(record).encode()), dtype=torch.uint8)
        parts = [torch.tensor([payload.numel()], dtype=torch.int64), payload]
        parts += [t.cpu().contiguous().view(-1).view(torch.uint8) for t in tensors]  # bytes: any dtype travels
        with _collective("sending a result to rank 0"):
            self.pending.append(([dist.isend(part, dst=0) for part in parts], parts))
            while len(self.pending) > self.LOOKAHEAD:
                self._wait_oldest()

    def _wait_oldest(self) -> None:
        works, _parts = self.pending.popleft()
        for work in works:
            work.wait()

    def close(self) -> None:
        with _collective("sending the last results to rank 0"):
            while self.pending:
                self._wait_oldest()


def receive_result(source: int, specs: Sequence[tuple[Sequence[int], torch.dtype]], ranks: Ranks) -> tuple:
    """Rank 0 takes ``source``'s next result: its tensors (``specs``: shape and dtype of each), then the record."""
    with _collective(f"receiving a result from rank {source}"):
        header = torch.empty(1, dtype=torch.int64)
        dist.recv(header, src=source)
        payload = torch.empty(int(header.item()), dtype=torch.uint8)
        dist.recv(payload, src=source)
        tensors = []
        for shape, dtype in specs:
            raw = torch.empty(math.prod(shape) * dtype.itemsize, dtype=torch.uint8)
            dist.recv(raw, src=source)
            tensors.append(raw.view(dtype).reshape(tuple(shape)))
    return (*tensors, json.loads(payload.numpy().tobytes()))
