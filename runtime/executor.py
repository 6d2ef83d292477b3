"""`StreamingModel`: transformers' own modules, with weights streamed from the cache.

The model's skeleton is built from the manifest's config on the meta device, so it holds
no weights. The budget planner (:mod:`runtime.budget`) decides what stays resident. Every
streamed decoder layer gets a forward pre-hook that decodes its records into one of two
preallocated slots (or takes the slot a background thread already filled) and a forward
hook that hands the slot back. Embeddings, when not resident, are looked up row chunk by
row chunk; the output head, when not resident, is applied one row chunk at a time. Because
transformers' own forward drives the layers, every architecture it runs (and the registry
maps) runs here unchanged.

Records are decoded straight from LMDB's memory map into the slot (no intermediate copy of
uncompressed payloads), so a layer load allocates at most one tensor's temporaries.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from cache.codecs import CodecName, decode_tensor
from cache.manifest import EMBED_GROUP, HEAD_GROUP, GroupEntry, Manifest, TensorEntry, layer_group, layer_index
from cache.readahead import WILLNEED_SUPPORTED
from cache.store import LayerStore
from runtime.arch import ArchSpec
from runtime.budget import BudgetPlan, MemoryBudget, Unit, activation_bytes, kv_bytes_per_token
from runtime.hostmem import readahead_room
from runtime.kernels import Int4CpuKernel, PackedInt4, ensure_derived_int4, packed_from_record
from runtime.memory import bound_allocator

logger = logging.getLogger(__name__)

DEFAULT_PREFILL_CHUNK = 128  # prompt tokens per forward pass during prefill
MAX_AUTO_CONTEXT = 4096
KV_SHARE = 0.25  # share of a tight budget the automatic context may take for KV
MIN_CONTEXT = 128
MIN_PREFILL_CHUNK = 16


@dataclass
class StreamStats:
    """Counters since the last :meth:`StreamingModel.reset_stats`."""

    layers_loaded: int = 0
    chunks_loaded: int = 0  # embedding and head row chunks
    bytes_read: int = 0  # record bytes read from the cache
    load_seconds: float = 0.0  # reading + verifying + decoding (on the prefetch thread when prefetching)
    wait_seconds: float = 0.0  # time the forward pass stood waiting for weights
    prefetch_hits: int = 0  # layers that were ready when needed
    prefetch_misses: int = 0

    @property
    def prefetch_hit_rate(self) -> float:
        n = self.prefetch_hits + self.prefetch_misses
        return self.prefetch_hits / n if n else 0.0

    @property
    def hidden_io_fraction(self) -> float:
        """Share of the load time that did not stall the forward pass."""
        return max(0.0, 1.0 - self.wait_seconds / self.load_seconds) if self.load_seconds else 0.0


def config_from_manifest(manifest: Manifest):
    """Rebuild the transformers config stored in a manifest."""
    from transformers import AutoConfig

    d = dict(manifest.config)
    model_type = d.pop("model_type")
    return AutoConfig.for_model(model_type, **d)


def _nbytes(t: TensorEntry, dtype: torch.dtype) -> int:
    return math.prod(t.shape) * torch.empty(0, dtype=dtype).element_size()


def _set_param(module: nn.Module, pname: str, t: torch.Tensor) -> None:
    if pname in module._parameters:
        module._parameters[pname] = nn.Parameter(t, requires_grad=False)
    elif pname in module._buffers:
        module._buffers[pname] = t
    else:
        raise KeyError(f"{pname} from the cache has no place in {type(module).__name__}")


class _Slot:
    """Preallocated buffers for one streamed layer, one flat buffer per tensor role
    (``self_attn.q_proj.weight`` ...), sized for the largest layer that uses it."""

    def __init__(self, sizes: dict[str, tuple[int, torch.dtype]]) -> None:
        self.buffers = {role: torch.empty(n, dtype=dt) for role, (n, dt) in sizes.items()}
        self.owner: int | None = None
        self.reader = None  # an open transaction whose records the layer uses in place

    def release(self) -> None:
        if self.reader is not None:
            self.reader.close()
            self.reader = None
        self.owner = None

    def view(self, role: str, shape: list[int]) -> torch.Tensor:
        return self.buffers[role][: math.prod(shape)].view(shape)


class PackedInt4Linear(nn.Module):
    """A linear layer computing on 4-bit weights with torch's CPU kernel (bf16 activations):
    nothing is dequantized. Its weight is a :class:`PackedInt4` in the kernel's own layout,
    derived from the portable record for this host (see :mod:`runtime.kernels`)."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.bias = linear.bias  # a parameter (meta until loaded) or None
        self.weight_packed: PackedInt4 | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight_packed is None:
            raise RuntimeError("packed int4 linear ran without its weights loaded")
        y = Int4CpuKernel.matmul(x, self.weight_packed)
        return y + self.bias if self.bias is not None else y


def _plain_strides(x: torch.Tensor) -> torch.Tensor:
    """``x`` with default strides. transformers feeds the head ``hidden[:, -1:, :]``, whose
    strides (seq * hidden, hidden, 1) torch's matmul does not fold to a plain matrix product:
    it takes its batched path and copies the whole transposed weight first (192 MB for a
    1 B model's head, on every prefill; found with the memory profiler). A one-row copy of
    the activations avoids it."""
    return x if x.stride() == torch.empty(x.shape, device="meta").stride() else x.clone(memory_format=torch.contiguous_format)


class _ChunkedHead(nn.Module):
    """Stands in for the output projection when it is not resident: decodes the weight one
    row chunk at a time (the next chunk on the prefetch thread) and fills the logits."""

    def __init__(self, owner: "StreamingModel", entry: TensorEntry, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.owner, self.entry, self.bias = owner, entry, bias

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        hidden = _plain_strides(hidden)
        e = self.entry
        out = torch.empty(*hidden.shape[:-1], e.shape[0], dtype=hidden.dtype)
        o = self.owner
        n = e.num_chunks
        rows_per = e.chunk_rows or e.shape[0]
        if o._pool is None:
            for k in range(n):
                o._apply_chunk(e, k, lambda w, r0=k * rows_per: out[..., r0 : r0 + w.shape[0]].copy_(F.linear(hidden, w)))
        else:
            pending = o._submit_chunk(e, 0, 0)
            for k in range(n):
                w = o._await_chunk(pending)
                pending = o._submit_chunk(e, k + 1, (k + 1) % 2) if k + 1 < n else None
                out[..., k * rows_per : k * rows_per + w.shape[0]] = F.linear(hidden, w)
        if self.bias is not None:
            out += self.bias
        return out


class StreamingModel:
    """A causal LM whose weights stream from a :class:`LayerStore` within a memory budget.

    Args:
        store: an open cache.
        variant_id: a complete variant in it.
        memory_budget: ``"512MB"``, ``"2GiB"`` or bytes; bounds weights held, slots, chunk
            buffers, the KV cache of ``context_tokens`` and the activations of a prefill chunk.
        dtype: compute dtype; every tensor is decoded to it.
        context_tokens: tokens of KV to reserve (all sequences of a batch together). Default:
            the model's context (at most 4096), shrunk to a quarter of the budget when the
            weights do not all fit, and never under 128.
        prefill_chunk: prompt tokens per forward pass during prefill (bounds activations).
        prefetch: decode the next streamed layer (and head chunk) on a background thread
            while the current one computes. Off by default: on the 2-core machine sli is
            measured on, the decode thread competes with the compute thread for the cores
            and decode speed drops (int4 at 64 MB: 4.98 tok/s without, 3.3-3.9 with).

        readahead: ask the kernel to read the next streamed layer's records while this one
            computes (``madvise(MADV_WILLNEED)``: large reads, several in flight). Default
            (None): on when the host leaves the page cache room for the records in flight
            (:func:`readahead_room`); under a tight limit the pages read ahead were reclaimed
            before use and read again (1 B model, 300 MB budget, 837 MiB cgroup: 1.76 tok/s
            with, 2.60 without; the kernel's own fault read-ahead then does better).
        packed_int4: compute int4 linears on their packed weights with torch's CPU kernel
            (bf16 only). Default: on whenever ``dtype`` is bfloat16 and the variant has
            eligible int4 tensors; they then stay packed in slots and resident (a quarter of
            their bf16 size), so more layers fit the budget.
        attn_implementation: transformers' attention (``"sdpa"``, ``"eager"``); default: its own choice.

    Raises:
        BudgetTooSmallError: the budget cannot hold the fixed costs plus two layer slots.
    """

    def __init__(
        self,
        store: LayerStore,
        variant_id: str,
        *,
        memory_budget: str | int,
        dtype: torch.dtype = torch.float32,
        context_tokens: int | None = None,
        prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
        prefetch: bool = False,
        readahead: bool | None = None,
        packed_int4: bool | None = None,
        attn_implementation: str | None = None,
    ) -> None:
        from accelerate import init_empty_weights
        from transformers import AutoModelForCausalLM

        bound_allocator()
        self.store = store
        self.variant_id = variant_id
        self.manifest = store.require_manifest(variant_id)
        self.config = config_from_manifest(self.manifest)
        self.arch = ArchSpec(**self.manifest.arch)
        self.dtype = dtype
        self.prefill_chunk = prefill_chunk
        with init_empty_weights(include_buffers=False):  # parameters on meta, buffers (rotary) real
            extra = {"attn_implementation": attn_implementation} if attn_implementation else {}
            self.model = AutoModelForCausalLM.from_config(self.config, dtype=dtype, **extra)
        self.model.eval()
        self.layers: nn.ModuleList = self.model.get_submodule(self.arch.layers)
        self._groups: dict[str, GroupEntry] = {g.name: g for g in self.manifest.groups}
        self._entries: dict[str, TensorEntry] = self.manifest.tensors()
        embed_name, head_name = f"{self.arch.embed}.weight", f"{self.arch.head}.weight"
        self.embed_entry = self._entries[embed_name]
        self.tied = head_name not in self._entries
        self.head_entry = self.embed_entry if self.tied else self._entries[head_name]
        self.packed: dict[str, int] = self._packed_tensors() if packed_int4 is not False else {}
        if packed_int4 and not self.packed:
            raise ValueError("packed_int4=True but this variant has no int4 tensors the CPU int4 kernel can take")
        if self.packed and dtype != torch.bfloat16:
            if packed_int4:
                raise ValueError("the packed int4 kernel computes in bfloat16; pass dtype=torch.bfloat16")
            self.packed = {}
        self._swap_packed_modules()
        # the kernel's own layout, derived from the portable records for this host (built once)
        self.derived: LayerStore | None = (
            ensure_derived_int4(store, variant_id, self.manifest.groups, set(self.packed)) if self.packed else None
        )
        self.plan = self._plan(memory_budget, context_tokens)
        self.context_tokens = self.plan.context_tokens
        logger.info("%s", self.plan.describe())
        self.stats = StreamStats()
        self._hooks: list = []
        self._pending: dict[int, Future] = {}
        streamed = self.plan.streamed_layers
        self._pool = (
            ThreadPoolExecutor(max_workers=1, thread_name_prefix="sli-prefetch", initializer=torch.set_num_threads, initargs=(1,))
            if prefetch and self.plan.streaming
            else None
        )
        # read-ahead: advice to the kernel, on a thread of its own (the calls wait on the disk's
        # queue, not on a core), one streamed layer ahead of the one computing
        if readahead is None and self.plan.streaming:
            room, why = readahead_room(3 * self.plan.slot_bytes)  # the layer computing, the next, slack
            if not WILLNEED_SUPPORTED:
                room, why = False, "this platform has no madvise(MADV_WILLNEED)"
            readahead = room
            self.readahead_reason = why
            logger.info("read-ahead %s: %s", "on" if readahead else "off", why)
        else:
            self.readahead_reason = "asked for" if readahead else "turned off"
        if readahead and self.plan.streaming and not WILLNEED_SUPPORTED:
            raise ValueError("readahead=True, but this platform has no madvise(MADV_WILLNEED); leave readahead unset")
        self._readahead = (
            ThreadPoolExecutor(max_workers=1, thread_name_prefix="sli-readahead")
            if readahead and self.plan.streaming
            else None
        )
        self._head_streamed = "head" not in self.plan.resident
        self._load_fixed()
        # the streamed layer after i, wrapping to the first for the next forward pass
        self._next = {i: streamed[(k + 1) % len(streamed)] for k, i in enumerate(streamed)}
        self._slots = [_Slot(self._slot_sizes(streamed)) for _ in range(self.plan.num_slots)] if streamed else []
        for i in streamed:
            self._hooks.append(self.layers[i].register_forward_pre_hook(self._make_loader(i)))
            self._hooks.append(self.layers[i].register_forward_hook(self._make_releaser(i)))
        self.reset_stats()

    # -- packed int4 -----------------------------------------------------------------------
    def _packed_tensors(self) -> dict[str, int]:
        """Layer weights the CPU int4 kernel can take: name -> group size."""
        out = {}
        for g in self.manifest.groups:
            if layer_index(g.name) is None:
                continue
            for t in g.tensors:
                if t.codec == CodecName.INT4_GROUP.value and t.name.endswith(".weight") and Int4CpuKernel.eligible(t.shape, t.params):
                    out[t.name] = int(t.params["group_size"])
        return out

    def _swap_packed_modules(self) -> None:
        for name in list(self.packed):
            module_name = name.removesuffix(".weight")
            parent_name, _, attr = module_name.rpartition(".")
            parent = self.model.get_submodule(parent_name)
            linear = getattr(parent, attr)
            if not isinstance(linear, nn.Linear):
                del self.packed[name]  # only plain linears are swapped
                continue
            setattr(parent, attr, PackedInt4Linear(linear))

    def _packed_shapes(self, t: TensorEntry) -> tuple[list[int], list[int]]:
        return Int4CpuKernel.shapes(t.shape, self.packed[t.name])

    # -- planning --------------------------------------------------------------------------
    def _size(self, t: TensorEntry) -> int:
        if t.name in self.packed:
            pk, sz = self._packed_shapes(t)
            return math.prod(pk) + 2 * math.prod(sz)
        return _nbytes(t, self.dtype)

    def _plan(self, memory_budget: str | int, context_tokens: int | None) -> BudgetPlan:
        esize = torch.empty(0, dtype=self.dtype).element_size()
        budget = MemoryBudget(memory_budget)
        units = []
        for i in range(len(self.layers)):
            g = self._groups[layer_group(i)]
            units.append(Unit(layer_group(i), sum(self._size(t) for t in g.tensors), g.stored_bytes))
        units.append(Unit("head", self._size(self.head_entry), self.head_entry.stored_bytes, uses_slot=False))
        small = sum(
            self._size(t) for g in (EMBED_GROUP, HEAD_GROUP) for t in self._groups[g].tensors if t not in (self.embed_entry, self.head_entry)
        )
        # the embedding matrix is resident only when everything is (or as the tied head)
        embed_resident = 0 if self.tied else self._size(self.embed_entry)
        kv_tok = kv_bytes_per_token(self.config, esize)
        model_ctx = min(getattr(self.config, "max_position_embeddings", MAX_AUTO_CONTEXT) or MAX_AUTO_CONTEXT, MAX_AUTO_CONTEXT)
        weights = embed_resident + small + sum(u.resident_bytes for u in units)  # small: norms, biases

        chunk_buf = 2 * max(self._chunk_bytes(self.embed_entry), self._chunk_bytes(self.head_entry))
        scratch = max(self._size(t) for g in self.manifest.groups for t in g.tensors if layer_index(g.name) is not None)
        streaming_fixed = {"chunk buffers": chunk_buf, "decode scratch": scratch}
        slot = max(u.resident_bytes for u in units if u.uses_slot)

        def fixed_for(ctx: int, chunk: int) -> dict[str, int]:
            return {
                "kv cache": kv_tok * ctx,
                "activations": activation_bytes(self.config, chunk_tokens=min(chunk, ctx), context_tokens=ctx, element_size=esize),
                "small tensors": small,
            }

        if context_tokens is None:
            ctx = model_ctx
            if sum(fixed_for(ctx, self.prefill_chunk).values()) + weights > budget.bytes:
                ctx = max(MIN_CONTEXT, min(model_ctx, int(KV_SHARE * budget.bytes) // max(kv_tok, 1)))
        else:
            ctx = int(context_tokens)
            if ctx <= 0:
                raise ValueError(f"context_tokens must be positive, got {context_tokens}")
        # a tight budget prefills in smaller chunks (more passes over the layers, smaller activations)
        while self.prefill_chunk > MIN_PREFILL_CHUNK and (
            sum(fixed_for(ctx, self.prefill_chunk).values()) + sum(streaming_fixed.values()) + 2 * slot > budget.bytes
        ) and sum(fixed_for(ctx, self.prefill_chunk).values()) + weights > budget.bytes:
            self.prefill_chunk //= 2
        fixed = fixed_for(ctx, self.prefill_chunk)
        # what this model needs at this context: everything resident, and the least that streams
        self.full_bytes = sum(fixed.values()) + weights
        self.minimum_bytes = sum(fixed.values()) + sum(streaming_fixed.values()) + 2 * slot
        return budget.plan(
            units, fixed=fixed, streaming_fixed=streaming_fixed, resident_extra={"embeddings": embed_resident}, context_tokens=ctx
        )

    def _chunk_bytes(self, e: TensorEntry) -> int:
        rows = e.chunk_rows or e.shape[0]
        return rows * math.prod(e.shape[1:]) * torch.empty(0, dtype=self.dtype).element_size()

    def _slot_sizes(self, layers: tuple[int, ...]) -> dict[str, tuple[int, torch.dtype]]:
        sizes: dict[str, tuple[int, torch.dtype]] = {}

        def need(role: str, n: int, dt: torch.dtype) -> None:
            sizes[role] = (max(sizes.get(role, (0, dt))[0], n), dt)

        for i in layers:
            prefix = f"{self.arch.layers}.{i}."
            for t in self._groups[layer_group(i)].tensors:
                role = t.name.removeprefix(prefix)
                if t.name not in self.packed:  # packed weights are used in place, from the map
                    need(role, math.prod(t.shape), self.dtype)
        return sizes

    def _packed_view(self, enc, t: TensorEntry) -> PackedInt4:
        """A derived record's packed weight as views into the map, in the kernel's shapes."""
        src = packed_from_record(enc)
        pk, sz = self._packed_shapes(t)
        return PackedInt4(src.packed.view(pk), src.scales_and_zeros.view(sz), src.group_size)

    # -- fixed weights -----------------------------------------------------------------------
    def _load_fixed(self) -> None:
        """Small tensors always; embeddings, head and layers the plan keeps resident."""
        resident = set(self.plan.resident)
        embed_resident = not self.plan.streaming or (self.tied and "head" in resident)
        for gname in (EMBED_GROUP, HEAD_GROUP):
            for t in self._groups[gname].tensors:
                if t is self.embed_entry and not embed_resident:
                    continue
                if t is self.head_entry and not self.tied and "head" not in resident:
                    continue
                self._assign({t.name: self._read_whole(t)})
        if embed_resident and self.tied:
            self._assign({f"{self.arch.head}.weight": self.model.get_submodule(self.arch.embed).weight})
        if "head" in resident or embed_resident:
            head = self.model.get_submodule(self.arch.head)
            self._hooks.append(head.register_forward_pre_hook(lambda mod, args: (_plain_strides(args[0]), *args[1:])))
        for i in self.plan.resident_layers:
            self._assign({t.name: self._read_whole(t) for t in self._groups[layer_group(i)].tensors})
        self._chunk_bufs: list[torch.Tensor] = []
        if not embed_resident or "head" not in resident:
            self._chunk_buffers()  # now, not inside a forward: inference-mode tensors could not be refilled by the prefetch thread
        if not embed_resident:
            self._stream_embeddings()
        if "head" not in resident:
            self._stream_head()

    def _read_whole(self, t: TensorEntry):
        t0 = time.perf_counter()
        if t.name in self.packed:  # resident: owned memory, not the map
            with self.derived.reader() as r:
                v = self._packed_view(r.get(self.variant_id, t.name), t)
                out = PackedInt4(v.packed.clone(), v.scales_and_zeros.clone(), v.group_size)
            self._account(t.stored_bytes, time.perf_counter() - t0)
            return out
        out = self.store.read_tensor(self.variant_id, t, self.dtype)
        self._account(t.stored_bytes, time.perf_counter() - t0)
        return out

    def _chunk_buffers(self) -> list[torch.Tensor]:
        if not self._chunk_bufs:
            n = max(self._chunk_bytes(self.embed_entry), self._chunk_bytes(self.head_entry)) // torch.empty(0, dtype=self.dtype).element_size()
            self._chunk_bufs = [torch.empty(n, dtype=self.dtype) for _ in range(2)]
        return self._chunk_bufs

    def _chunk_view(self, e: TensorEntry, rows: int, buf: int) -> torch.Tensor:
        """``rows`` rows of ``e`` in chunk buffer ``buf``."""
        return self._chunk_buffers()[buf][: rows * math.prod(e.shape[1:])].view(rows, *e.shape[1:])

    def _decode_chunk(self, e: TensorEntry, k: int, buf: int) -> tuple[torch.Tensor, int, float]:
        """Decode row chunk ``k`` of ``e`` into chunk buffer ``buf`` (on the prefetch thread);
        (rows, stored bytes, seconds)."""
        t0 = time.perf_counter()
        with self.store.reader() as r:
            enc = r.get(self.variant_id, e.record_names()[k])
            out = decode_tensor(enc, out=self._chunk_view(e, enc.shape[0], buf))
        return out, e.stored_bytes // e.num_chunks, time.perf_counter() - t0  # a tensor's chunks are near equal

    def _apply_chunk(self, e: TensorEntry, k: int, fn) -> None:
        """Call ``fn(weight rows)`` on row chunk ``k``. An uncompressed record already in the
        compute dtype is used in place, straight from the map; others are decoded into a
        chunk buffer first."""
        t0 = time.perf_counter()
        with self.store.reader() as r:
            enc = r.get(self.variant_id, e.record_names()[k])
            data = enc.parts.get("data") if enc.codec == CodecName.RAW.value else None
            if data is not None and data.dtype == self.dtype:
                w = data.view(-1, *e.shape[1:])
            else:
                w = decode_tensor(enc, out=self._chunk_view(e, enc.shape[0], 0))
            self.stats.chunks_loaded += 1
            self._account(e.stored_bytes // e.num_chunks, time.perf_counter() - t0)
            fn(w)

    def _submit_chunk(self, e: TensorEntry, k: int, buf: int) -> Future:
        return self._pool.submit(self._decode_chunk, e, k, buf)

    def _await_chunk(self, pending: Future) -> torch.Tensor:
        t0 = time.perf_counter()
        out, stored, seconds = pending.result()
        self.stats.wait_seconds += time.perf_counter() - t0
        self.stats.chunks_loaded += 1
        self._account(stored, seconds)
        return out

    def _stream_embeddings(self) -> None:
        """Look token embeddings up chunk by chunk: before the embedding module runs, its
        weight becomes just the rows the batch uses and the ids are remapped onto them, so
        the module's own forward (scaling included) runs unchanged."""
        module = self.model.get_submodule(self.arch.embed)
        if hasattr(module, "padding_idx"):
            module.padding_idx = None  # only matters for training; it would index past the gathered rows
        e = self.embed_entry
        rows_per = e.chunk_rows or e.shape[0]

        def pre(mod: nn.Module, args):
            ids = args[0]
            uniq, inverse = torch.unique(ids, return_inverse=True)
            rows = torch.empty(len(uniq), *e.shape[1:], dtype=self.dtype)
            for k in torch.unique(uniq // rows_per).tolist():
                sel = (uniq // rows_per) == k

                def take(chunk: torch.Tensor, sel=sel, k=k) -> None:
                    rows[sel] = chunk[uniq[sel] - k * rows_per].to(self.dtype)

                self._apply_chunk(e, k, take)
            mod._parameters["weight"] = nn.Parameter(rows, requires_grad=False)
            return (inverse.view(ids.shape), *args[1:])

        def post(mod: nn.Module, args, output):
            mod._parameters["weight"] = nn.Parameter(torch.empty(e.shape, dtype=self.dtype, device="meta"), requires_grad=False)

        self._hooks.append(module.register_forward_pre_hook(pre))
        self._hooks.append(module.register_forward_hook(post))

    def _stream_head(self) -> None:
        parent_name, _, attr = self.arch.head.rpartition(".")
        parent = self.model.get_submodule(parent_name) if parent_name else self.model
        old = getattr(parent, attr)
        bias = old.bias if isinstance(old, nn.Linear) and old.bias is not None and old.bias.device.type != "meta" else None
        setattr(parent, attr, _ChunkedHead(self, self.head_entry, bias))

    # -- streamed layers -------------------------------------------------------------------
    def _account(self, stored: int, seconds: float) -> None:
        self.stats.bytes_read += stored
        self.stats.load_seconds += seconds

    def _decode_layer(self, i: int, slot: _Slot) -> tuple[dict[str, torch.Tensor], float]:
        """Layer i's tensors (thread-safe: each read has its own transaction). Packed int4
        weights are used in place, as views into the derived copy's map: their transaction
        stays open in ``slot.reader`` until the layer is released. Others are decoded into
        ``slot``."""
        t0 = time.perf_counter()
        prefix = f"{self.arch.layers}.{i}."
        out = {}
        if self.derived is not None:
            slot.reader = self.derived.open_reader()
        with self.store.reader() as r:
            for t in self._groups[layer_group(i)].tensors:
                if t.name in self.packed:
                    out[t.name] = self._packed_view(slot.reader.get(self.variant_id, t.name), t)
                    continue
                dst = slot.view(t.name.removeprefix(prefix), t.shape)
                decode_tensor(r.get(self.variant_id, t.name), out=dst)
                out[t.name] = dst
        return out, time.perf_counter() - t0

    def _advise_layer(self, i: int) -> int:
        """Have the kernel read layer i's records ahead of need, in large reads (on the
        read-ahead thread); returns the bytes advised."""
        n = 0
        with self.store.reader() as r, (self.derived.reader() if self.derived else contextlib.nullcontext()) as dr:
            for t in self._groups[layer_group(i)].tensors:
                n += (dr if t.name in self.packed else r).advise(self.variant_id, t.name)
        return n

    def _advise_head(self) -> int:
        with self.store.reader() as r:
            return sum(r.advise(self.variant_id, name) for name in self.head_entry.record_names())

    def _free_slot(self) -> _Slot:
        for s in self._slots:
            if s.owner is None:
                return s
        raise RuntimeError("no free streaming slot; a layer ran without its release hook")

    def _fetch_layer(self, i: int) -> dict[str, torch.Tensor]:
        """Layer i's tensors: from the prefetch thread when it was asked for, else decoded now."""
        fut = self._pending.pop(i, None)
        t0 = time.perf_counter()
        if fut is None:
            self.stats.prefetch_misses += 1
            slot = self._free_slot()
            slot.owner = i
            out, seconds = self._decode_layer(i, slot)
        else:
            self.stats.prefetch_hits += fut.done()
            self.stats.prefetch_misses += not fut.done()
            out, seconds = fut.result()
        self.stats.wait_seconds += time.perf_counter() - t0
        self.stats.layers_loaded += 1
        self._account(self._groups[layer_group(i)].stored_bytes, seconds)
        if self._readahead is not None:
            nxt = self._next[i]
            if nxt != i:
                self._readahead.submit(self._advise_layer, nxt)
            if i == self.plan.streamed_layers[-1] and self._head_streamed:
                self._readahead.submit(self._advise_head)
        if self._pool is not None:
            nxt = self._next[i]
            if nxt != i and nxt not in self._pending:
                slot = self._free_slot()
                slot.owner = nxt
                self._pending[nxt] = self._pool.submit(self._decode_layer, nxt, slot)
        return out

    def _assign(self, tensors: dict) -> None:
        for name, t in tensors.items():
            module_name, pname = name.rsplit(".", 1)
            if isinstance(t, PackedInt4):
                self.model.get_submodule(module_name).weight_packed = t
                continue
            try:
                _set_param(self.model.get_submodule(module_name), pname, t)
            except (KeyError, AttributeError) as e:
                raise KeyError(f"{name} from the cache has no place in the {type(self.model).__name__} skeleton") from e

    def _release(self, i: int) -> None:
        for module in self.layers[i].modules():
            if isinstance(module, PackedInt4Linear):
                module.weight_packed = None
            for pname, p in module._parameters.items():
                if p is not None:
                    module._parameters[pname] = nn.Parameter(torch.empty(p.shape, dtype=p.dtype, device="meta"), requires_grad=False)
        for s in self._slots:
            if s.owner == i:
                s.release()

    def _make_loader(self, i: int):
        def hook(module: nn.Module, args) -> None:
            self._assign(self._fetch_layer(i))

        return hook

    def _make_releaser(self, i: int):
        def hook(module: nn.Module, args, output) -> None:
            self._release(i)

        return hook

    def _abandon_pass(self) -> None:
        """After a forward pass that did not finish: wait for the prefetch, free every slot."""
        for fut in self._pending.values():
            fut.cancel()
            if not fut.cancelled():
                fut.exception()  # wait; the thread must not be writing into a slot we reuse
        self._pending.clear()
        for i in self.plan.streamed_layers:
            self._release(i)

    # -- running ---------------------------------------------------------------------------
    def reset_stats(self) -> None:
        self.stats = StreamStats()

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, **kwargs):
        """transformers' forward with streamed weights (same arguments and outputs)."""
        try:
            return self.model(input_ids=input_ids, **kwargs)
        except BaseException:
            self._abandon_pass()
            raise

    @torch.inference_mode()
    def logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Float logits ``[batch, seq, vocab]`` for validation."""
        if input_ids.ndim == 1:
            input_ids = input_ids[None]
        out = self.forward(input_ids, attention_mask=attention_mask, use_cache=False)
        return out.logits.float()

    def close(self) -> None:
        if self._pool is not None:
            self._abandon_pass()
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
        if self._readahead is not None:
            self._readahead.shutdown(wait=True, cancel_futures=True)
            self._readahead = None
        self._pending.clear()
        for slot in self._slots:
            slot.release()
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        if self.derived is not None:
            self.derived.close()
            self.derived = None
