"""What a streaming model holds, in bytes, and the budget plan for it: the sizes of every
unit in compute form (packed int4 weights at their packed size), which of those bytes are
used in place from the cache's map, the fixed costs at a context, and the prefill chunk a
tight budget needs. The split itself is :meth:`runtime.budget.MemoryBudget.plan`'s."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from cache.codecs import CodecName
from cache.manifest import EMBED_GROUP, HEAD_GROUP, GroupEntry, TensorEntry, layer_group, layer_index
from cache.record import dtype_name
from runtime.budget import BudgetPlan, MemoryBudget, PageCacheRoom, Unit, activation_bytes, kv_bytes_per_token
from runtime.derived import DerivedTensor

MAX_AUTO_CONTEXT = 4096
KV_SHARE = 0.25  # share of a tight budget the automatic context may take for KV
MIN_CONTEXT = 128
MIN_PREFILL_CHUNK = 16


@dataclass(frozen=True)
class StreamingPlan:
    """The budget plan, what the model needs at its context (everything kept, and the least
    that streams), and the prefill chunk chosen."""

    plan: BudgetPlan
    full_bytes: int
    minimum_bytes: int
    prefill_chunk: int


def mappable(t: TensorEntry, dtype: torch.dtype) -> bool:
    """A record the runtime can use in place from the map: raw, uncompressed, in the compute
    dtype, in one record."""
    return t.codec == CodecName.RAW.value and not t.compressed and t.dtype == dtype_name(dtype) and not t.chunk_rows


@dataclass(frozen=True)
class ModelSizes:
    """Bytes of a variant's tensors in compute form. ``derived``: the packed int4 weights of
    the derived copy, by group (see :mod:`runtime.derived`)."""

    groups: dict[str, GroupEntry]
    num_layers: int
    embed: TensorEntry
    head: TensorEntry
    tied: bool
    dtype: torch.dtype
    derived: dict[str, list[DerivedTensor]] = field(default_factory=dict)

    @property
    def element_size(self) -> int:
        return torch.empty(0, dtype=self.dtype).element_size()

    def size(self, t: TensorEntry) -> int:
        return math.prod(t.shape) * self.element_size

    def covered(self, group: str) -> set[str]:
        """Tensors of a group that the derived copy holds packed."""
        return {s for d in self.derived.get(group, ()) for s in d.sources}

    @property
    def head_derived(self) -> DerivedTensor | None:
        return next((d for g in (EMBED_GROUP, HEAD_GROUP) for d in self.derived.get(g, ()) if d.sources == (self.head.name,)), None)

    def chunk_bytes(self, e: TensorEntry) -> int:
        rows = e.chunk_rows or e.shape[0]
        return rows * math.prod(e.shape[1:]) * self.element_size

    def chunk_elems(self) -> int:
        """Elements of one chunk buffer: the largest embedding or head row chunk."""
        return max(self.chunk_bytes(self.embed), self.chunk_bytes(self.head)) // self.element_size

    def layer_unit(self, i: int) -> Unit:
        g = self.groups[layer_group(i)]
        packed = self.derived.get(g.name, [])
        covered = self.covered(g.name)
        rest = [t for t in g.tensors if t.name not in covered]
        packed_bytes = sum(d.packed_bytes for d in packed)
        return Unit(
            g.name,
            resident_bytes=packed_bytes + sum(self.size(t) for t in rest),
            stored_bytes=packed_bytes + sum(t.stored_bytes for t in rest),
            mapped_bytes=packed_bytes + sum(self.size(t) for t in rest if mappable(t, self.dtype)),
        )

    def head_unit(self) -> Unit:
        d = self.head_derived
        if d is not None:
            return Unit("head", d.packed_bytes, d.packed_bytes, uses_slot=False, mapped_bytes=d.packed_bytes)
        return Unit("head", self.size(self.head), self.head.stored_bytes, uses_slot=False)

    def units(self) -> list[Unit]:
        return [self.layer_unit(i) for i in range(self.num_layers)] + [self.head_unit()]

    def small_bytes(self) -> int:
        """Norms and biases outside the layers."""
        return sum(self.size(t) for g in (EMBED_GROUP, HEAD_GROUP) for t in self.groups[g].tensors if t not in (self.embed, self.head))

    def largest_layer_tensor(self) -> int:
        return max(self.size(t) for g in self.groups.values() if layer_index(g.name) is not None for t in g.tensors)


def plan_streaming(
    sizes: ModelSizes, config, memory_budget: str | int, context_tokens: int | None, prefill_chunk: int,
    page_cache: PageCacheRoom | None = None,
) -> StreamingPlan:
    """Plan a streaming model within ``memory_budget`` (mapped weights within ``page_cache``).

    Raises:
        BudgetTooSmallError: the budget cannot hold the fixed costs plus two layer slots.
    """
    esize = sizes.element_size
    budget = MemoryBudget(memory_budget)
    units = sizes.units()
    small = sizes.small_bytes()
    kv_tok = kv_bytes_per_token(config, esize)
    model_ctx = min(getattr(config, "max_position_embeddings", MAX_AUTO_CONTEXT) or MAX_AUTO_CONTEXT, MAX_AUTO_CONTEXT)
    mapping = page_cache is not None
    anon_weights = small + sum(u.resident_bytes - (u.mapped_bytes if mapping else 0) for u in units)
    mapped_weights = sum(u.mapped_bytes for u in units) if mapping else 0
    chunk_buf = 2 * max(sizes.chunk_bytes(sizes.embed), sizes.chunk_bytes(sizes.head))
    streaming_fixed = {"chunk buffers": chunk_buf, "decode scratch": sizes.largest_layer_tensor()}
    slot = max(u.resident_bytes - (u.mapped_bytes if mapping else 0) for u in units if u.uses_slot)

    def fixed_for(ctx: int, chunk: int) -> dict[str, int]:
        return {
            "kv cache": kv_tok * ctx,
            "activations": activation_bytes(config, chunk_tokens=min(chunk, ctx), context_tokens=ctx, element_size=esize),
            "small tensors": small,
        }

    def fits(ctx: int, chunk: int) -> bool:
        anon = sum(fixed_for(ctx, chunk).values()) + anon_weights - small
        return anon <= budget.bytes and (not mapping or mapped_weights <= page_cache.for_mapped(anon))

    if context_tokens is None:
        ctx = model_ctx
        if not fits(ctx, prefill_chunk):
            ctx = max(MIN_CONTEXT, min(model_ctx, int(KV_SHARE * budget.bytes) // max(kv_tok, 1)))
    else:
        ctx = int(context_tokens)
        if ctx <= 0:
            raise ValueError(f"context_tokens must be positive, got {context_tokens}")
    # a tight budget prefills in smaller chunks (more passes over the layers, smaller activations)
    while prefill_chunk > MIN_PREFILL_CHUNK and (
        sum(fixed_for(ctx, prefill_chunk).values()) + sum(streaming_fixed.values()) + 2 * slot > budget.bytes
    ) and not fits(ctx, prefill_chunk):
        prefill_chunk //= 2
    fixed = fixed_for(ctx, prefill_chunk)
    plan = budget.plan(units, fixed=fixed, streaming_fixed=streaming_fixed, context_tokens=ctx, page_cache=page_cache)
    return StreamingPlan(
        plan=plan,
        full_bytes=sum(fixed.values()) + anon_weights - small,
        minimum_bytes=sum(fixed.values()) + sum(streaming_fixed.values()) + 2 * slot,
        prefill_chunk=prefill_chunk,
    )
