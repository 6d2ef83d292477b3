"""A stage's view of the KV cache rank 0 addresses.

Rank 0 owns every decision about the KV: which blocks of the paged pool a sequence holds,
which prefix is reused, what is evicted. Each message says where the step's KV goes (a
*descriptor*, :func:`describe`), and every other stage lays the same step out over the same
block indices of its own pool, which holds its own layers' KV (:class:`KVMirror`). A plain
(dynamic) cache of rank 0 gets a dynamic cache of the stage's layers on every stage, kept
under a key until rank 0's cache is gone.
"""

from __future__ import annotations

import weakref

from transformers.cache_utils import Cache, DynamicCache, DynamicLayer

from runtime.kv import Block, BlockPool, KVDtype, PagedKVCache, Sequence, kv_shape, pool_blocks, stage_layers
from runtime.kvbatch import BatchedPagedCache, SeqSlice, step_layout
from runtime.pipeline.world import PipelineError


class UnsupportedCacheError(PipelineError):
    """A cache the pipeline cannot mirror on its other stages."""


def pool_spec(pool: BlockPool) -> tuple[int, int, str]:
    return pool.num_blocks, pool.block_size, pool.kv_dtype.value


class CacheKeys:
    """Rank 0's side: a key for each dynamic cache, and the keys of those since dropped
    (told to the other stages with the next message, which drop theirs)."""

    def __init__(self) -> None:
        self._keys: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self._next = 0
        self.released: list[int] = []

    def key(self, cache) -> int:
        k = self._keys.get(cache)
        if k is None:
            k = self._keys[cache] = self._next
            self._next += 1
            weakref.finalize(cache, self.released.append, k)
        return k

    def take_released(self) -> list[int]:
        out, self.released = self.released, []
        return out


def describe(cache, keys: CacheKeys, *, start: int | None = None) -> tuple:
    """Where a forward pass's KV goes, for the other stages. ``start``: tokens a paged cache
    held before the pass (taken before rank 0's own layers ran).

    Raises:
        UnsupportedCacheError: a cache type the pipeline does not mirror.
    """
    if cache is None:
        return ("none", keys.take_released())
    if isinstance(cache, BatchedPagedCache):
        return ("batched", keys.take_released(), pool_spec(cache.pool), cache.layout.parts)
    if isinstance(cache, PagedKVCache):
        return ("paged", keys.take_released(), pool_spec(cache.pool), tuple(b.index for b in cache.seq.blocks), start)
    if isinstance(cache, DynamicCache):
        return ("dynamic", keys.take_released(), keys.key(cache))
    raise UnsupportedCacheError(f"a pipeline runs with the paged, batched or dynamic KV cache, not {type(cache).__name__}")


class KVMirror:
    """A stage's KV: its own pool (the blocks rank 0 names) and its dynamic caches."""

    def __init__(self, model) -> None:
        self.model = model
        self.pool: BlockPool | None = None
        self.dynamic: dict[int, Cache] = {}

    def _pool(self, spec: tuple[int, int, str]) -> BlockPool:
        num_blocks, block_size, kv_dtype = spec
        if self.pool is None or pool_spec(self.pool) != tuple(spec):
            planned = pool_blocks(self.model, kv_dtype=kv_dtype, block_size=block_size)
            if num_blocks > planned:
                raise PipelineError(f"rank 0 addresses {num_blocks} KV blocks of {block_size} tokens; this stage's budget "
                                    f"planned {planned}; give this rank a larger --memory-budget")
            _, heads, dim = kv_shape(self.model.config)
            stage = self.model.stage
            self.pool = None  # the old pool goes before the new one is made
            self.pool = BlockPool(num_blocks, num_layers=len(stage.layers), kv_heads=heads, head_dim=dim, block_size=block_size,
                                  dtype=self.model.dtype, kv_dtype=KVDtype(kv_dtype), first_layer=stage.start)
        return self.pool

    def cache_for(self, desc: tuple):
        """The cache a forward pass described by ``desc`` runs with; also drops released dynamic caches."""
        kind, released = desc[0], desc[1]
        for k in released:
            self.dynamic.pop(k, None)
        n = self.model.config.num_hidden_layers
        if kind == "none":
            return None
        if kind == "dynamic":
            key = desc[2]
            if key not in self.dynamic:
                self.dynamic[key] = Cache(layers=stage_layers(n, self.model.stage.layers, lambda i: DynamicLayer()))
            return self.dynamic[key]
        pool = self._pool(desc[2])
        if kind == "paged":
            blocks, start = desc[3], desc[4]
            return PagedKVCache(pool, Sequence(blocks=[Block(i) for i in blocks]), n, cached_tokens=start)
        if kind == "batched":
            parts = [SeqSlice([Block(i) for i in idx], start, count) for start, count, idx in desc[3]]
            return BatchedPagedCache(pool, step_layout(pool, parts, self.model.dtype), n)
        raise PipelineError(f"unknown KV descriptor {kind!r} (ranks of different sli versions?)")
