"""What a streaming model holds, in bytes, and the budget plan for it: the sizes of every
unit in compute form (packed int4 weights at their packed size), the fixed costs at a
context, and the prefill chunk a tight budget needs. The split itself is
:meth:`runtime.budget.MemoryBudget.plan`'s."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from cache.manifest import EMBED_GROUP, HEAD_GROUP, GroupEntry, TensorEntry, layer_group, layer_index
from runtime.budget import BudgetPlan, MemoryBudget, Unit, activation_bytes, kv_bytes_per_token
from runtime.packed import packed_bytes

MAX_AUTO_CONTEXT = 4096
KV_SHARE = 0.25  # share of a tight budget the automatic context may take for KV
MIN_CONTEXT = 128
MIN_PREFILL_CHUNK = 16


@dataclass(frozen=True)
class StreamingPlan:
    """The budget plan, what the model needs at its context (everything resident, and the
    least that streams), and the prefill chunk chosen."""

    plan: BudgetPlan
    full_bytes: int
    minimum_bytes: int
    prefill_chunk: int


@dataclass(frozen=True)
class ModelSizes:
    """Bytes of a variant's tensors in compute form."""

    groups: dict[str, GroupEntry]
    num_layers: int
    embed: TensorEntry
    head: TensorEntry
    tied: bool
    dtype: torch.dtype
    packed: dict[str, int]

    @property
    def element_size(self) -> int:
        return torch.empty(0, dtype=self.dtype).element_size()

    def size(self, t: TensorEntry) -> int:
        if t.name in self.packed:
            return packed_bytes(t, self.packed[t.name])
        return math.prod(t.shape) * self.element_size

    def chunk_bytes(self, e: TensorEntry) -> int:
        rows = e.chunk_rows or e.shape[0]
        return rows * math.prod(e.shape[1:]) * self.element_size

    def chunk_elems(self) -> int:
        """Elements of one chunk buffer: the largest embedding or head row chunk."""
        return max(self.chunk_bytes(self.embed), self.chunk_bytes(self.head)) // self.element_size

    def units(self) -> list[Unit]:
        out = []
        for i in range(self.num_layers):
            g = self.groups[layer_group(i)]
            out.append(Unit(layer_group(i), sum(self.size(t) for t in g.tensors), g.stored_bytes))
        out.append(Unit("head", self.size(self.head), self.head.stored_bytes, uses_slot=False))
        return out

    def small_bytes(self) -> int:
        """Norms and biases outside the layers."""
        return sum(self.size(t) for g in (EMBED_GROUP, HEAD_GROUP) for t in self.groups[g].tensors if t not in (self.embed, self.head))

    def largest_layer_tensor(self) -> int:
        return max(self.size(t) for g in self.groups.values() if layer_index(g.name) is not None for t in g.tensors)


def plan_streaming(
    sizes: ModelSizes, config, memory_budget: str | int, context_tokens: int | None, prefill_chunk: int
) -> StreamingPlan:
    """Plan a streaming model within ``memory_budget``.

    Raises:
        BudgetTooSmallError: the budget cannot hold the fixed costs plus two layer slots.
    """
    esize = sizes.element_size
    budget = MemoryBudget(memory_budget)
    units = sizes.units()
    small = sizes.small_bytes()
    # the embedding matrix is resident only when everything is (or as the tied head)
    embed_resident = 0 if sizes.tied else sizes.size(sizes.embed)
    kv_tok = kv_bytes_per_token(config, esize)
    model_ctx = min(getattr(config, "max_position_embeddings", MAX_AUTO_CONTEXT) or MAX_AUTO_CONTEXT, MAX_AUTO_CONTEXT)
    weights = embed_resident + small + sum(u.resident_bytes for u in units)  # small: norms, biases
    chunk_buf = 2 * max(sizes.chunk_bytes(sizes.embed), sizes.chunk_bytes(sizes.head))
    streaming_fixed = {"chunk buffers": chunk_buf, "decode scratch": sizes.largest_layer_tensor()}
    slot = max(u.resident_bytes for u in units if u.uses_slot)

    def fixed_for(ctx: int, chunk: int) -> dict[str, int]:
        return {
            "kv cache": kv_tok * ctx,
            "activations": activation_bytes(config, chunk_tokens=min(chunk, ctx), context_tokens=ctx, element_size=esize),
            "small tensors": small,
        }

    if context_tokens is None:
        ctx = model_ctx
        if sum(fixed_for(ctx, prefill_chunk).values()) + weights > budget.bytes:
            ctx = max(MIN_CONTEXT, min(model_ctx, int(KV_SHARE * budget.bytes) // max(kv_tok, 1)))
    else:
        ctx = int(context_tokens)
        if ctx <= 0:
            raise ValueError(f"context_tokens must be positive, got {context_tokens}")
    # a tight budget prefills in smaller chunks (more passes over the layers, smaller activations)
    while prefill_chunk > MIN_PREFILL_CHUNK and (
        sum(fixed_for(ctx, prefill_chunk).values()) + sum(streaming_fixed.values()) + 2 * slot > budget.bytes
    ) and sum(fixed_for(ctx, prefill_chunk).values()) + weights > budget.bytes:
        prefill_chunk //= 2
    fixed = fixed_for(ctx, prefill_chunk)
    plan = budget.plan(units, fixed=fixed, streaming_fixed=streaming_fixed, resident_extra={"embeddings": embed_resident},
                       context_tokens=ctx)
    return StreamingPlan(
        plan=plan,
        full_bytes=sum(fixed.values()) + weights,
        minimum_bytes=sum(fixed.values()) + sum(streaming_fixed.values()) + 2 * slot,
        prefill_chunk=prefill_chunk,
    )
