"""Which tokens the next batched step computes: continuous batching over the paged KV pool.

The scheduler owns the requests' sequences, the running batch and the waiting queue; it
never touches the model. Each step it picks, in this order:

1. one token for every running sequence that is decoding;
2. chunks of the prompts of running sequences still prefilling, up to the step's token budget
   (the engine caps a step with decoding sequences so their inter-token latency stays within a
   factor of a one-token step; a prefill chunk gets at least a few tokens, so joining requests
   always make progress);
3. new sequences from the head of the waiting queue (first come, first served) while the
   pool has free blocks for their prompt; a prompt's longest prefix of full blocks already
   in the pool (or spilled to disk) is reused, and a request whose next block another running
   sequence is about to compute waits a step for it instead of computing it twice (so a system
   prompt shared by many requests is prefilled once).

Blocks are taken as tokens arrive. When the pool runs out, the most recently admitted
running sequence is preempted: its full blocks stay cached (findable by prefix), the rest is
freed, and it goes back to the head of the waiting queue, to be recomputed from its prompt
and the tokens it had generated (vLLM v1's policy). The number of running sequences is thus
what the KV blocks allow, bounded by ``max_running``.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass, field

from runtime.kv import Block, PoolExhaustedError, PrefixCachingSession, chain_hashes
from runtime.kvbatch import SeqSlice

logger = logging.getLogger(__name__)

MIN_PREFILL = 4  # prompt tokens a step computes beside decoding sequences, however tight their latency


@dataclass
class SeqState:
    """A request's sequence: its tokens (prompt, then generated), how many have KV in the pool,
    its block table and the keys of its full blocks."""

    request_id: str
    tokens: list[int]
    num_prompt: int
    max_new_tokens: int
    needs_prompt_logits: bool = False  # echo with logprobs: every prompt position's logits, so no prefix reuse
    computed: int = 0
    blocks: list[Block] = field(default_factory=list)
    hashes: list[bytes] = field(default_factory=list)  # keys of the full blocks of `tokens`, from the first
    registered: int = 0  # leading full blocks filed in the pool under their keys
    cached_tokens: int = 0  # prompt tokens whose KV was found (pool or disk) at first admission
    disk_tokens: int = 0
    preemptions: int = 0
    arrival: float = field(default_factory=time.monotonic)
    admitted: bool = False

    @property
    def num_generated(self) -> int:
        return len(self.tokens) - self.num_prompt

    @property
    def remaining(self) -> int:
        """Tokens whose KV is still to compute (1 while decoding)."""
        return len(self.tokens) - self.computed


@dataclass(frozen=True)
class Work:
    """One sequence's part of a step: ``n`` tokens from position ``start``; ``samples``: the
    chunk ends at the sequence's last token, whose logits choose the next one."""

    seq: SeqState
    n: int
    start: int = -1
    samples: bool = False

    @classmethod
    def of(cls, seq: SeqState, n: int) -> "Work":
        return cls(seq, n, seq.computed, seq.computed + n == len(seq.tokens))

    def slice(self) -> SeqSlice:
        return SeqSlice(self.seq.blocks, self.start, self.n)


class Scheduler:
    """Running batch, waiting queue and block bookkeeping (see the module's doc).

    Args:
        session: the paged pool with its prefix index and spill store.
        max_running: most sequences in the batch.
        step_tokens: tokens a step computes when sequences are prefilling (decode tokens count
            against it; a prefill chunk gets at least one block's worth).
        logits_chunk: most prompt tokens a step computes for a sequence that needs every prompt
            position's logits (echo with logprobs): each is a vocabulary-sized row.
    """

    def __init__(self, session: PrefixCachingSession, *, max_running: int, step_tokens: int, logits_chunk: int = 32) -> None:
        if min(max_running, step_tokens, logits_chunk) < 1:
            raise ValueError(f"max_running, step_tokens and logits_chunk must be >= 1, got {max_running}, {step_tokens}, {logits_chunk}")
        self.session, self.pool = session, session.pool
        self.bs = self.pool.block_size
        self.max_running, self.step_tokens, self.logits_chunk = max_running, step_tokens, logits_chunk
        self.waiting: deque[SeqState] = deque()
        self.running: list[SeqState] = []
        self.preemptions = 0

    # -- requests coming and going ---------------------------------------------------------
    def add(self, seq: SeqState) -> None:
        seq.hashes = chain_hashes(seq.tokens, self.bs, self.session.salt)
        self.waiting.append(seq)

    def remove(self, seq: SeqState) -> None:
        """Take a sequence out (finished, cancelled or failed): file its full blocks, free the rest."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self._free(seq)

    def _free(self, seq: SeqState) -> None:
        self._register(seq)
        for b in seq.blocks:
            self.pool.release(b)
        seq.blocks = []
        seq.computed = seq.registered = 0

    def _register(self, seq: SeqState) -> None:
        """File the sequence's full, computed blocks under their keys (findable by later requests)."""
        full = min(seq.computed // self.bs, len(seq.blocks))
        if len(seq.hashes) < full:
            parent = seq.hashes[-1] if seq.hashes else None
            seq.hashes += chain_hashes(seq.tokens, self.bs, self.session.salt, parent=parent, start=len(seq.hashes))
        for i in range(seq.registered, full):
            self.pool.register(seq.blocks[i], seq.hashes[i])
        seq.registered = max(seq.registered, full)

    def preempt(self, seq: SeqState) -> None:
        """Back to the head of the waiting queue, its KV freed (full blocks stay cached)."""
        self.running.remove(seq)
        self._free(seq)
        seq.preemptions += 1
        self.preemptions += 1
        self.waiting.appendleft(seq)
        logger.info("KV pool full: request %s preempted (%d tokens to recompute)", seq.request_id, len(seq.tokens))

    # -- a step ----------------------------------------------------------------------------
    def schedule(self, cap: int | None = None) -> list[Work]:
        """The next step's work (empty when there is nothing to do). ``cap``: most tokens for a
        step in which sequences decode (their inter-token latency); prefill chunks get what the
        decode tokens leave of it, and at least :data:`MIN_PREFILL` tokens, so joining requests
        still progress. Without decoding sequences (or a cap) a step computes ``step_tokens``."""
        work: list[Work] = []
        decoding = [s for s in self.running if s.remaining == 1]
        for seq in decoding:
            if seq in self.running and self._reserve(seq, seq.computed + 1, work):
                work.append(Work.of(seq, 1))
        if work and cap is not None:
            budget = max(min(cap, self.step_tokens) - len(work), MIN_PREFILL)
        else:
            budget = max(self.step_tokens - len(work), self.bs)
        for seq in [s for s in self.running if s.remaining > 1]:
            if budget <= 0:
                break
            n = min(seq.remaining, budget, self.logits_chunk if seq.needs_prompt_logits else budget)
            if seq in self.running and self._reserve(seq, seq.computed + n, work):
                work.append(Work.of(seq, n))
                budget -= n
        while budget > 0 and self.waiting and len(self.running) < self.max_running:
            seq = self.waiting[0]
            if not self._admit(seq):
                break
            n = min(seq.remaining, budget, self.logits_chunk if seq.needs_prompt_logits else budget)
            if not self._reserve(seq, seq.computed + n, work):
                break
            work.append(Work.of(seq, n))
            budget -= n
        return work

    def _reserve(self, seq: SeqState, tokens: int, work: list[Work]) -> bool:
        """Blocks for ``tokens`` of ``seq``, preempting the latest admitted sequences for room;
        False when ``seq`` itself had to go."""
        while len(seq.blocks) * self.bs < tokens:
            try:
                seq.blocks.append(self.pool.allocate())
            except PoolExhaustedError:
                victim = self.running[-1]
                work[:] = [w for w in work if w.seq is not victim]
                self.preempt(victim)
                if victim is seq:
                    return False
        return True

    def _pending(self) -> set[bytes]:
        """Keys of full blocks running sequences are about to compute."""
        return {h for s in self.running for h in s.hashes[s.registered :]}

    def _admit(self, seq: SeqState) -> bool:
        """Move the head of the queue to the batch if its prompt has room; reuse its cached prefix."""
        if not seq.blocks and not seq.needs_prompt_logits:
            limit = (len(seq.tokens) - 1) // self.bs  # the last token is always computed: its logits are needed
            pending = self._pending()
            found: list[Block] = []
            disk = 0
            for h in seq.hashes[:limit]:
                b, from_disk = self.session.find(h)
                if b is None:
                    if h in pending and self.running:  # another sequence is computing this block now: wait for it
                        for x in found:
                            self.pool.release(x)
                        return False
                    break
                found.append(b)
                disk += self.bs if from_disk else 0
            seq.blocks = found
            seq.computed = seq.registered = len(found) * self.bs
            if not seq.admitted:
                seq.cached_tokens, seq.disk_tokens = seq.computed, disk
        need = -(-len(seq.tokens) // self.bs) - len(seq.blocks)
        if need > len(self.pool.free) and self.running:
            self._free(seq)
            return False
        self.waiting.popleft()
        self.running.append(seq)
        seq.admitted = True
        return True

    def advance(self, work: list[Work]) -> None:
        """After a step's forward pass: its tokens have KV; file the blocks they filled."""
        for w in work:
            w.seq.computed += w.n
            self._register(w.seq)

    @property
    def has_work(self) -> bool:
        return bool(self.running or self.waiting)
