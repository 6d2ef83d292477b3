"""The world of pipeline ranks: joining it, splitting the layers, checking every rank opened
the same cache, and telling which rank is gone.

``torchrun`` (one command per host) starts the ranks and sets ``RANK``, ``WORLD_SIZE``,
``MASTER_ADDR`` and ``MASTER_PORT``; :meth:`World.join` turns them into a process group
(gloo over TCP). Two groups: the default one, with a long timeout, for the start (each rank
may first derive its slice of the packed weights), and a ring group whose timeout bounds how
long a rank waits on a neighbour that stopped answering. Every rank counts heartbeats into
the rendezvous store; after a failure, the ranks whose count stopped are the ones gone.
"""

from __future__ import annotations

import datetime
import logging
import os
import threading
import time
import uuid
from dataclasses import dataclass
from enum import Enum

import torch.distributed as dist

from runtime.sizing import Stage

logger = logging.getLogger(__name__)

START_TIMEOUT_S = 3600.0  # the start: every rank opens its cache (and may derive its packed weights) first
BEAT_KEY = "sli/beat/{rank}"


class PipelineError(RuntimeError):
    """The pipeline cannot run: a stage is gone, or the ranks disagree."""


class StageLostError(PipelineError):
    """A rank died or stopped answering; what was in flight is lost (torchrun's restart re-forms the world)."""


class WorldMismatchError(PipelineError):
    """The ranks opened different caches (another model or variant)."""


class Split(str, Enum):
    """How the layers are split over the ranks: in equal slices, or in proportion to each rank's budget."""

    EQUAL = "equal"
    BUDGET = "budget"


@dataclass(frozen=True)
class PipelineConfig:
    """Options of a pipeline run.

    Attributes:
        timeout_s: a neighbour that does not answer within this many seconds is gone.
        heartbeat_s: how often rank 0 sends a ping round the ring while idle (also how often
            every rank counts a heartbeat in the store); well under ``timeout_s``.
        split: :class:`Split` of the layers.
        micro_batches: most micro-batches a batched step is cut into so that every stage
            computes at once (0, automatic: one per stage when every stage holds its layers, and
            only steps of at least 64 tokens a micro-batch, i.e. prefill: a decode step's cost is
            reading the weights, which every micro-batch would read again; 1: never).
        backend: ``torch.distributed`` backend (default: gloo).
        restart_grace_s: after a stage is lost, how long rank 0's server keeps answering
            (``/health`` naming the stage, 503 to requests) before it exits for ``torchrun`` to
            re-form the world.
    """

    timeout_s: float = 60.0
    heartbeat_s: float = 2.0
    split: Split = Split.EQUAL
    micro_batches: int = 0
    backend: str = "gloo"
    restart_grace_s: float = 5.0

    def __post_init__(self) -> None:
        if self.timeout_s <= 0 or self.heartbeat_s <= 0:
            raise ValueError(f"timeout_s and heartbeat_s must be positive, got {self.timeout_s} and {self.heartbeat_s}")
        if self.heartbeat_s * 2 > self.timeout_s:
            raise ValueError(f"heartbeat_s ({self.heartbeat_s}) must be at most half of timeout_s ({self.timeout_s}), "
                             "or idle ranks time out between pings")
        if self.micro_batches < 0:
            raise ValueError(f"micro_batches must be 0 (automatic) or more, got {self.micro_batches}")
        object.__setattr__(self, "split", Split(self.split))


def in_world() -> bool:
    """True when this process was started as a rank of a world (``torchrun`` or the same variables)."""
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


def split_layers(num_layers: int, weights: list[float]) -> list[Stage]:
    """Contiguous stages over ``num_layers`` layers, in proportion to ``weights`` (one per
    rank), each at least one layer (largest remainders get the layers left over).

    Raises:
        ValueError: fewer layers than ranks, or a weight that is not positive.
    """
    n = len(weights)
    if n > num_layers:
        raise ValueError(f"{n} ranks cannot split a model of {num_layers} layers: each stage needs one; use at most {num_layers} ranks")
    if any(w <= 0 for w in weights):
        raise ValueError(f"every rank needs room for layers; the weights were {weights}")
    total = sum(weights)
    exact = [num_layers * w / total for w in weights]
    counts = [max(1, int(x)) for x in exact]
    while sum(counts) > num_layers:  # the minimum of one layer each took some: give back from the largest
        i = min((j for j in range(n) if counts[j] > 1), key=lambda j: (exact[j] - counts[j], -j))
        counts[i] -= 1
    for i in sorted(range(n), key=lambda j: exact[j] - counts[j], reverse=True)[: num_layers - sum(counts)]:
        counts[i] += 1
    stages, start = [], 0
    for c in counts:
        stages.append(Stage(start, start + c, num_layers))
        start += c
    return stages


class World:
    """This process's place in the world of pipeline ranks (see the module's doc).

    Args:
        config: the pipeline's options.
        rank, size: given when not started by torchrun (tests); else read from the environment.
    """

    def __init__(self, config: PipelineConfig, *, rank: int | None = None, size: int | None = None) -> None:
        self.config = config
        self._owned = not dist.is_initialized()
        if self._owned:
            rank = int(os.environ["RANK"]) if rank is None else rank
            size = int(os.environ["WORLD_SIZE"]) if size is None else size
            store = _world_store(rank, size)
            dist.init_process_group(config.backend, store=store, rank=rank, world_size=size,
                                    timeout=datetime.timedelta(seconds=START_TIMEOUT_S))
        self.rank, self.size = dist.get_rank(), dist.get_world_size()
        # neighbours' messages wait at most timeout_s: a rank that stopped answering is found in bounded time
        self.ring = dist.new_group(list(range(self.size)), timeout=datetime.timedelta(seconds=config.timeout_s),
                                   backend=config.backend)
        self.store = _default_store()
        self._beats = 0
        self._stop = threading.Event()
        self._beat_thread = threading.Thread(target=self._beat_loop, name="sli-heartbeat", daemon=True)
        self._beat_thread.start()
        logger.info("pipeline rank %d of %d joined (%s)", self.rank, self.size, config.backend)

    @property
    def next_rank(self) -> int:
        return (self.rank + 1) % self.size

    @property
    def prev_rank(self) -> int:
        return (self.rank - 1) % self.size

    def gather(self, obj) -> list:
        """Every rank's ``obj`` (a collective on the default group: every rank calls it)."""
        out = [None] * self.size
        dist.all_gather_object(out, obj)
        return out

    # -- liveness ------------------------------------------------------------------------------
    def _beat_loop(self) -> None:
        key = BEAT_KEY.format(rank=self.rank)
        while not self._stop.wait(self.config.heartbeat_s / 2):
            try:
                self.store.add(key, 1)
            except Exception:  # noqa: BLE001 - the store's host is gone: nothing left to tell
                return

    def beats(self) -> dict[int, int]:
        """Each rank's heartbeat count in the store (-1 where it cannot be read)."""
        out = {}
        for r in range(self.size):
            try:
                out[r] = int(self.store.add(BEAT_KEY.format(rank=r), 0))
            except Exception:  # noqa: BLE001
                out[r] = -1
        return out

    def silent_ranks(self, wait_s: float | None = None) -> list[int]:
        """Ranks whose heartbeat did not move over ``wait_s`` (default: two heartbeats)."""
        before = self.beats()
        time.sleep(wait_s if wait_s is not None else 2 * self.config.heartbeat_s)
        after = self.beats()
        return [r for r in range(self.size) if r != self.rank and (after[r] <= before[r] or after[r] < 0)]

    def close(self) -> None:
        self._stop.set()
        if self._beat_thread.is_alive() and self._beat_thread is not threading.current_thread():
            self._beat_thread.join(timeout=self.config.heartbeat_s)
        if self._owned and dist.is_initialized():
            try:
                dist.destroy_process_group()
            except Exception:  # noqa: BLE001 - a broken world cannot be torn down cleanly; the process ends anyway
                logger.debug("destroying the process group failed", exc_info=True)


def _world_store(rank: int, size: int):
    """This world's store: the rendezvous store under a prefix that only this formation of
    the world uses.

    torchrun's agents keep one store across restarts, so keys the ranks of a world before left
    there (each rank's gloo address among them) would lead a restarted rank to a process that
    is gone. Rank 0 clears the handshake keys, then answers each rank's hello (which the rank
    repeats until answered) with a fresh token; every rank then uses the prefix of that token.
    """
    host, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    agent = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    timeout = datetime.timedelta(seconds=START_TIMEOUT_S)
    base = dist.TCPStore(host, port, size, is_master=rank == 0 and not agent, timeout=timeout, multi_tenant=not agent)
    if size == 1:
        return dist.PrefixStore(f"sli/{uuid.uuid4().hex}/", base)
    me = uuid.uuid4().hex
    deadline = time.monotonic() + START_TIMEOUT_S
    if rank == 0:
        for r in range(1, size):
            for k in (f"sli/hello/{r}", f"sli/ready/{r}", f"sli/ack/{r}"):
                base.delete_key(k)
        pending = set(range(1, size))
        while pending:
            for r in list(pending):
                if base.check([f"sli/hello/{r}"]):
                    hello = base.get(f"sli/hello/{r}").decode()
                    base.set(f"sli/ack/{r}", f"{hello}|{me}")
                    if base.check([f"sli/ready/{r}"]) and base.get(f"sli/ready/{r}").decode() == hello:
                        pending.discard(r)
            if time.monotonic() > deadline:
                raise PipelineError(f"ranks {sorted(pending)} did not join within {START_TIMEOUT_S:.0f} s")
            time.sleep(0.05)
        token = me
    else:
        while True:
            base.set(f"sli/hello/{rank}", me)
            if base.check([f"sli/ack/{rank}"]):
                hello, _, token = base.get(f"sli/ack/{rank}").decode().partition("|")
                if hello == me:
                    base.set(f"sli/ready/{rank}", me)
                    break
            if time.monotonic() > deadline:
                raise PipelineError(f"rank 0 did not answer within {START_TIMEOUT_S:.0f} s")
            time.sleep(0.2)
    return dist.PrefixStore(f"sli/{token}/", base)


def _default_store():
    from torch.distributed import distributed_c10d

    return distributed_c10d._get_default_store()
