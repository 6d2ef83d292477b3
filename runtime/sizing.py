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
class Stage:
    """The contiguous slice of decoder layers ``[start, stop)`` one process runs (a pipeline
    stage, :mod:`runtime.pipeline`). The first stage also holds the token embeddings, the last
    the final norm and the head; the whole model is the one stage ``[0, num_layers)``."""

    start: int
    stop: int
    num_layers: int

    def __post_init__(self) -> None:
        if not 0 <= self.start < self.stop <= self.num_layers:
            raise ValueError(f"a stage holds layers [start, stop) with 0 <= start < stop <= {self.num_layers}, "
                             f"got [{self.start}, {self.stop})")

    @classmethod
    def whole(cls, num_layers: int) -> "Stage":
        return cls(0, num_layers, num_layers)

    @property
    def layers(self) -> range:
        return range(self.start, self.stop)

    @property
    def first(self) -> bool:
        return self.start == 0

    @property
    def last(self) -> bool:
        return self.stop == self.num_layers

    @property
    def is_whole(self) -> bool:
        return self.first and self.last

    def describe(self) -> str:
        parts = [f"layers {self.start}-{self.stop - 1} of {self.num_layers}"]
        if self.first:
            parts.append("embeddings")
        if self.last:
            parts.append("head")
        return ", ".join(parts)


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
    stage: Stage | None = None  # None: the whole model

    @property
    def part(self) -> Stage:
        return self.stage or Stage.whole(self.num_layers)

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
        """Elements of one chunk buffer: the largest embedding (first stage) or head (last stage) row chunk."""
        return self.chunk_buffer_bytes() // self.element_size

    def chunk_buffer_bytes(self) -> int:
        part = self.part
        return max([self.chunk_bytes(self.embed)] * part.first + [self.chunk_bytes(self.head)] * part.last, default=0)

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
        part = self.part
        return [self.layer_unit(i) for i in part.layers] + [self.head_unit()] * part.last

    def small_groups(self) -> tuple[str, ...]:
        """The groups outside the layers this stage holds the small tensors of."""
        part = self.part
        return (EMBED_GROUP,) * part.first + (HEAD_GROUP,) * part.last

    def small_bytes(self) -> int:
        """Norms and biases outside the layers."""
        return sum(self.size(t) for g in self.small_groups() for t in self.groups[g].tensors if t not in (self.embed, self.head))

    def largest_layer_tensor(self) -> int:
        return max(self.size(t) for i in self.part.layers for t in self.groups[layer_group(i)].tensors)


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
    part = sizes.part
    kv_tok = kv_bytes_per_token(config, esize) * len(part.layers) // part.num_layers  # a stage keeps its own layers' KV
    model_ctx = min(getattr(config, "max_position_embeddings", MAX_AUTO_CONTEXT) or MAX_AUTO_CONTEXT, MAX_AUTO_CONTEXT)
    mapping = page_cache is not None
    anon_weights = small + sum(u.resident_bytes - (u.mapped_bytes if mapping else 0) for u in units)
    mapped_weights = sum(u.mapped_bytes for u in units) if mapping else 0
    chunk_buf = 2 * sizes.chunk_buffer_bytes()
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
