"""Rank 0's :class:`PipelineModel` and every other rank's :class:`StageWorker`.

Rank 0 holds the embeddings, the tokenizer, the engine and the API, and the first slice of
layers; the last rank holds the head. To everything above it (generation, the engine, the
server), :class:`PipelineModel` is a streaming model: its ``forward`` runs rank 0's layers,
hands the hidden states on, and returns the logits the last rank sends back. A batched step
of several sequences is cut into micro-batches: rank 0 sends the first on and computes the
next while the stages after it compute the first, so every stage computes at once.

A neighbour that dies fails the next message at once; one that stops answering fails it
after the ring's timeout; while idle, rank 0 sends a ping round the ring every heartbeat, so
a lost stage is found within ``timeout_s`` whether or not requests are running. After a loss
the model refuses every forward with :class:`StageLostError` naming the stage (the ranks whose
heartbeat stopped), and ``on_lost`` callbacks run (the server answers ``/health`` with it,
then exits so that ``torchrun`` re-forms the world).
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from runtime.budget import MemoryBudget
from runtime.executor import StreamingModel
from runtime.kv import Block, PagedKVCache
from runtime.kvbatch import BatchedPagedCache, SeqSlice, step_layout
from runtime.pipeline.mirror import CacheKeys, KVMirror, describe
from runtime.pipeline.wire import Link
from runtime.pipeline.world import PipelineConfig, PipelineError, Split, StageLostError, World, WorldMismatchError, split_layers
from runtime.sizing import Stage

logger = logging.getLogger(__name__)

EXIT_STAGE_LOST = 75  # EX_TEMPFAIL: torchrun restarts the world (when restarts are left)
# a micro-batch of fewer tokens is bound by reading the weights, not by computing: cutting a step
# of that size only reads each stage's weights once more per micro-batch (on AVX-512, the packed
# int4 kernel's cost grows with rows from about this many on; runtime.rows measures it per host)
MIN_MICRO_TOKENS = 64


@dataclass(frozen=True)
class StageInfo:
    """What one rank planned (gathered by every rank at the start)."""

    rank: int
    host: str
    stage: Stage
    plan: str
    budget_bytes: int
    context_tokens: int
    prefill_chunk: int
    streaming: bool

    def describe(self) -> str:
        return f"stage {self.rank} on {self.host}: {self.stage.describe()} ({'streams' if self.streaming else 'holds'}); {self.plan}"

    def to_dict(self) -> dict:
        return {"rank": self.rank, "host": self.host, "layers": [self.stage.start, self.stage.stop],
                "embeddings": self.stage.first, "head": self.stage.last, "streams": self.streaming,
                "budget_bytes": self.budget_bytes, "context_tokens": self.context_tokens, "plan": self.plan}


@dataclass
class StageOutput:
    """What :meth:`PipelineModel.forward` returns (the fields callers read of transformers' output)."""

    logits: torch.Tensor
    cache: object = None


def fingerprint(model_fingerprint: str, variant_id: str, num_layers: int, dtype: torch.dtype) -> str:
    return f"model {model_fingerprint[:16]} variant {variant_id} ({num_layers} layers, {str(dtype).removeprefix('torch.')})"


def open_stage(store, variant_id: str, config: PipelineConfig, *, memory_budget, world: World | None = None,
               **model_kwargs) -> "PipelineModel | StageWorker":
    """Join the world, check every rank opened the same cache, take this rank's slice of the
    layers, plan it inside ``memory_budget`` and tell every rank what every rank planned.
    Returns rank 0's :class:`PipelineModel`, or another rank's :class:`StageWorker`.

    Raises:
        WorldMismatchError: the ranks opened different caches (every rank's fingerprint said).
        PipelineError: a rank could not plan its stage (its error said on every rank).
    """
    world = world or World(config)
    manifest = store.require_manifest(variant_id)
    num_layers = int(manifest.config["num_hidden_layers"])
    dtype = model_kwargs.get("dtype", torch.float32)
    mine = fingerprint(manifest.model_fingerprint, variant_id, num_layers, dtype)
    host = socket.gethostname()
    everyone = world.gather((host, mine))
    if len({f for _, f in everyone}) > 1:
        lines = "; ".join(f"rank {r} on {h}: {f}" for r, (h, f) in enumerate(everyone))
        raise WorldMismatchError(f"the ranks opened different caches: {lines}; give every rank a copy of the same cache "
                                 "(same model, same variant, same --dtype)")
    budget = MemoryBudget(memory_budget)
    weights = world.gather(budget.bytes) if config.split is Split.BUDGET else [1] * world.size
    stages = split_layers(num_layers, [float(w) for w in weights])
    stage = stages[world.rank]
    local, error = None, None
    try:
        local = StreamingModel(store, variant_id, memory_budget=memory_budget, stage=stage, **model_kwargs)
        info = StageInfo(world.rank, host, stage, local.plan.describe(), local.plan.budget_bytes, local.context_tokens,
                         local.prefill_chunk, local.plan.streaming)
    except Exception as e:  # every rank must hear of it, or the others would wait for this one forever
        error, info = e, f"{type(e).__name__}: {e}"
    infos = world.gather(info)
    failed = [(r, i) for r, i in enumerate(infos) if isinstance(i, str)]
    if failed:
        if local is not None:
            local.close()
        world.close()
        msg = "; ".join(f"rank {r} ({stages[r].describe()}): {i}" for r, i in failed)
        raise PipelineError(f"the pipeline could not start: {msg}") from error
    for i in infos if world.rank == 0 else [infos[world.rank]]:
        logger.info("%s", i.describe())
    if world.rank == 0:
        return PipelineModel(local, world, infos)
    return StageWorker(local, world, infos)


def _micro_groups(parts: tuple, m: int) -> list[list[int]]:
    """Contiguous groups of sequences, at most ``m``, of about equal tokens."""
    m = max(1, min(m, len(parts)))
    total = sum(p[1] for p in parts)
    groups, cur, acc = [], [], 0
    for i, p in enumerate(parts):
        cur.append(i)
        acc += p[1]
        if len(groups) < m - 1 and acc >= total * (len(groups) + 1) / m and len(parts) - i - 1 >= m - len(groups) - 1:
            groups.append(cur)
            cur = []
    if cur:
        groups.append(cur)
    return groups


class PipelineModel:
    """Rank 0's model: a streaming model whose forward runs every stage (see the module's doc).

    Attributes read by generation, the engine and the server are those of rank 0's own stage
    (``config``, ``dtype``, ``plan``, ``stats``), except ``context_tokens`` and
    ``prefill_chunk``: the least any stage planned, so every stage's pool holds the KV rank 0 addresses.
    """

    def __init__(self, local: StreamingModel, world: World, stages: list[StageInfo]) -> None:
        self.local, self.world, self.stages = local, world, stages
        self.config, self.dtype, self.stage = local.config, local.dtype, local.stage
        self.store, self.manifest, self.variant_id = local.store, local.manifest, local.variant_id
        self.context_tokens = min(s.context_tokens for s in stages)
        self.prefill_chunk = min(s.prefill_chunk for s in stages)
        cfg = world.config
        holds = not any(s.streaming for s in stages)
        self.auto_micro = cfg.micro_batches == 0
        self.micro_batches = cfg.micro_batches or (world.size if holds else 1)
        self.link = Link(world.ring)
        self.keys = CacheKeys()
        self.lost: str | None = None
        self.on_lost: list[Callable[[str], None]] = []
        self._lock = threading.RLock()
        self._last_use = time.monotonic()
        self._closed = threading.Event()
        self._pinger = threading.Thread(target=self._ping_loop, name="sli-pipeline-ping", daemon=True)
        if world.size > 1:
            self._pinger.start()

    # -- what callers read of a streaming model ---------------------------------------------------
    @property
    def plan(self):
        return self.local.plan

    @property
    def stats(self):
        return self.local.stats

    def reset_stats(self) -> None:
        self.local.reset_stats()

    def describe(self) -> str:
        return f"pipeline of {self.world.size} stages: " + " | ".join(s.describe() for s in self.stages)

    def health(self) -> dict:
        return {"status": "stage lost" if self.lost else "ok", "error": self.lost, "ranks": self.world.size,
                "micro_batches": self.micro_batches, "stages": [s.to_dict() for s in self.stages],
                "wire": self.link.stats.to_dict()}

    # -- running ---------------------------------------------------------------------------------
    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, *, cache=None, attention_mask=None, position_ids=None, logits_to_keep=0,
                use_cache=None, **kwargs) -> StageOutput:
        """transformers' forward over every stage (the arguments generation and the engine pass)."""
        if kwargs:
            raise TypeError(f"a pipeline's forward takes no {sorted(kwargs)}")
        if self.world.size == 1:
            out = self.local.forward(input_ids, cache=cache, attention_mask=attention_mask, position_ids=position_ids,
                                     logits_to_keep=logits_to_keep, use_cache=use_cache)
            return StageOutput(out.logits, out.cache)
        with self._lock:
            if self.lost:
                raise StageLostError(self.lost)
            self._last_use = time.monotonic()
            m = self._micro_batches_for(cache, logits_to_keep)
            if m > 1:
                logits = self._forward_micro(input_ids, cache, logits_to_keep, m)
            else:
                logits = self._forward_one(input_ids, cache, attention_mask, position_ids, logits_to_keep, use_cache)
            self._last_use = time.monotonic()
            return StageOutput(logits, cache)

    @torch.inference_mode()
    def logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        if input_ids.ndim == 1:
            input_ids = input_ids[None]
        return self.forward(input_ids, attention_mask=attention_mask, use_cache=False).logits.float()

    def _forward_one(self, input_ids, cache, attention_mask, position_ids, logits_to_keep, use_cache) -> torch.Tensor:
        if position_ids is None:  # what transformers would compute, made explicit for every stage
            past = cache.get_seq_length() if cache is not None else 0
            position_ids = torch.arange(past, past + input_ids.shape[1])[None]
        start = cache.held_tokens if isinstance(cache, PagedKVCache) else None
        h = self.local.run_stage(input_ids, cache=cache, attention_mask=attention_mask, position_ids=position_ids,
                                 use_cache=use_cache)
        self._send_forward(h, cache, attention_mask, position_ids, logits_to_keep, use_cache, start=start, mb=0)
        return self._receive_logits(1)[0]

    def _micro_batches_for(self, cache, logits_to_keep) -> int:
        """Micro-batches for this step: automatic (``micro_batches=0``): one per stage, but none
        under :data:`MIN_MICRO_TOKENS` tokens (a decode step stays whole: its cost is reading the
        weights, which each micro-batch would read again); else as configured."""
        if not isinstance(cache, BatchedPagedCache) or not isinstance(logits_to_keep, torch.Tensor):
            return 1
        m = min(self.micro_batches, len(cache.layout.parts))
        if self.auto_micro:
            m = min(m, cache.layout.num_tokens // MIN_MICRO_TOKENS)
        return max(m, 1)

    def _forward_micro(self, input_ids, cache: BatchedPagedCache, logits_to_keep, m: int) -> torch.Tensor:
        """A batched step in micro-batches: each is sent on as soon as rank 0's layers are done with it."""
        parts = cache.layout.parts
        keep = torch.as_tensor(logits_to_keep)
        groups = _micro_groups(parts, m)
        offsets = [0]
        for p in parts:
            offsets.append(offsets[-1] + p[1])
        for mb, g in enumerate(groups):
            t0, t1 = offsets[g[0]], offsets[g[-1] + 1]
            sub = step_layout(cache.pool, [SeqSlice([Block(i) for i in parts[j][2]], parts[j][0], parts[j][1]) for j in g],
                              self.dtype)
            sub_cache = BatchedPagedCache(cache.pool, sub, self.config.num_hidden_layers)
            sub_keep = keep[(keep >= t0) & (keep < t1)] - t0
            h = self.local.run_stage(input_ids[:, t0:t1], cache=sub_cache, attention_mask=sub.mask, position_ids=sub.position_ids,
                                     use_cache=True)
            self._send_forward(h, sub_cache, None, None, sub_keep, True, mb=mb)
        return torch.cat(self._receive_logits(len(groups)), dim=1)

    def _send_forward(self, h, cache, attention_mask, position_ids, logits_to_keep, use_cache, *, start=None, mb: int) -> None:
        desc = describe(cache, self.keys, start=start)
        tensors = [h]
        if desc[0] != "batched":
            tensors.append(position_ids)
            if attention_mask is not None:
                tensors.append(attention_mask)
        keep_tensor = isinstance(logits_to_keep, torch.Tensor)
        if keep_tensor:
            tensors.append(logits_to_keep)
        header = {"op": "fwd", "kv": desc, "mask": attention_mask is not None and desc[0] != "batched", "use_cache": use_cache,
                  "keep": None if keep_tensor else int(logits_to_keep), "mb": mb}
        self._wire(lambda: (self.link.flush(), self.link.send(self.world.next_rank, header, tensors)))

    def _receive_logits(self, n: int) -> list[torch.Tensor]:
        out = []
        for _ in range(n):
            header, tensors = self._wire(lambda: self.link.recv(self.world.prev_rank))
            if header["op"] == "error":
                self._drain_after_error(n - len(out) - 1)
                raise PipelineError(f"stage {header['rank']} failed: {header['message']}")
            out.append(tensors[0])
        self._wire(self.link.flush)
        return out

    def _drain_after_error(self, left: int) -> None:
        """After a stage failed one micro-batch, take the answers still coming for the others."""
        for _ in range(left):
            self._wire(lambda: self.link.recv(self.world.prev_rank))

    def _wire(self, fn):
        try:
            return fn()
        except (RuntimeError, OSError) as e:
            self._lose(e)

    def _lose(self, e: Exception):
        silent = self.world.silent_ranks()
        if silent:
            gone = ", ".join(f"stage {r} (rank {r}, {self.stages[r].stage.describe()}, on {self.stages[r].host})" for r in silent)
        else:
            gone = "a stage (every heartbeat still moves: one stopped answering)"
        self.lost = f"{gone} gone: {type(e).__name__}: {str(e).splitlines()[0][:300]}"
        logger.error("pipeline: %s", self.lost)
        for cb in list(self.on_lost):
            try:
                cb(self.lost)
            except Exception:  # noqa: BLE001
                logger.exception("an on_lost callback failed")
        raise StageLostError(self.lost) from e

    def _ping_loop(self) -> None:
        every = self.world.config.heartbeat_s
        while not self._closed.wait(every / 2):
            if self.lost or time.monotonic() - self._last_use < every or not self._lock.acquire(blocking=False):
                continue
            try:
                self._wire(lambda: (self.link.send(self.world.next_rank, {"op": "ping"}), self.link.recv(self.world.prev_rank),
                                    self.link.flush()))
                self._last_use = time.monotonic()
            except StageLostError:
                pass
            finally:
                self._lock.release()

    def probe_wire(self, nbytes: int, rounds: int = 20) -> float:
        """Seconds one message of ``nbytes`` (a token's hidden state: ``hidden_size`` values in
        the compute dtype) takes per hop, measured round the ring with no compute."""
        if self.world.size == 1:
            return 0.0
        payload = torch.zeros(nbytes, dtype=torch.uint8)
        with self._lock:
            best = float("inf")
            for _ in range(rounds):
                t0 = time.perf_counter()
                self._wire(lambda: (self.link.send(self.world.next_rank, {"op": "probe"}, [payload]),
                                    self.link.recv(self.world.prev_rank), self.link.flush()))
                best = min(best, time.perf_counter() - t0)
            self._last_use = time.monotonic()
        return best / self.world.size

    def remote_stats(self) -> list[dict]:
        """Every stage's wire figures (a round of the ring)."""
        with self._lock:
            if self.world.size == 1:
                return [{"rank": 0, **self.link.stats.to_dict()}]
            header = {"op": "stats", "stats": [{"rank": 0, **self.link.stats.to_dict()}]}
            self._wire(lambda: self.link.send(self.world.next_rank, header))
            back, _ = self._wire(lambda: self.link.recv(self.world.prev_rank))
            return back["stats"]

    def close(self) -> None:
        """Stop every stage (they exit 0) and leave the world."""
        if self._closed.is_set():
            return
        self._closed.set()
        with self._lock:
            if self.world.size > 1 and not self.lost:
                try:
                    self.link.flush()
                    self.link.send(self.world.next_rank, {"op": "stop"})
                    self.link.recv(self.world.prev_rank)
                    self.link.flush()
                except (RuntimeError, OSError) as e:
                    logger.warning("pipeline: a stage did not take the stop: %s", e)
        self.local.close()
        self.world.close()


class StageWorker:
    """Every rank but 0: receive, run this stage's layers, hand on (the last stage: logits back to rank 0)."""

    def __init__(self, local: StreamingModel, world: World, stages: list[StageInfo]) -> None:
        self.local, self.world, self.stages = local, world, stages
        self.stage = local.stage
        self.link = Link(world.ring)
        self.mirror = KVMirror(local)
        self.last = world.rank == world.size - 1

    def run(self) -> int:
        """Serve until rank 0 says stop (returns 0) or a neighbour is lost (returns :data:`EXIT_STAGE_LOST`)."""
        w = self.world
        try:
            while True:
                header, tensors = self.link.recv(w.prev_rank)
                op = header["op"]
                if op == "fwd":
                    self._forward(header, tensors)
                    continue
                if op == "stats":
                    header["stats"].append({"rank": w.rank, **self.link.stats.to_dict()})
                self.link.flush()
                self.link.send(w.next_rank, header, tensors)  # pings, probes, stats, stop and errors go round the ring
                if op == "stop":
                    self.link.flush()
                    return 0
        except (RuntimeError, OSError) as e:
            logger.error("pipeline stage %d (%s): a neighbour is gone: %s", w.rank, self.stage.describe(), str(e).splitlines()[0])
            return EXIT_STAGE_LOST
        finally:
            self.local.close()
            w.close()

    @torch.inference_mode()
    def _forward(self, header: dict, tensors: list[torch.Tensor]) -> None:
        w = self.world
        try:
            cache = self.mirror.cache_for(header["kv"])
            h = tensors[0]
            if header["kv"][0] == "batched":
                mask, pos = cache.layout.mask, cache.layout.position_ids
                rest = tensors[1:]
            else:
                pos = tensors[1]
                mask = tensors[2] if header["mask"] else None
                rest = tensors[3 if header["mask"] else 2:]
            keep = rest[0] if header["keep"] is None else header["keep"]
            out = self.local.run_stage(h, cache=cache, attention_mask=mask, position_ids=pos, use_cache=header["use_cache"],
                                       logits_to_keep=keep)
        except Exception as e:  # noqa: BLE001 - the request fails, with this stage's error; the stage goes on
            logger.exception("pipeline stage %d failed a forward pass", w.rank)
            self.link.flush()
            self.link.send(w.next_rank, {"op": "error", "rank": w.rank, "message": f"{type(e).__name__}: {e}"})
            return
        self.link.flush()
        if self.last:
            self.link.send(w.next_rank, {"op": "logits", "mb": header["mb"]}, [out.logits])
        else:
            self.link.send(w.next_rank, header, [out, *tensors[1:]])
