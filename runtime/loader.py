"""Getting weights from the cache into memory the model computes from: the record loader.

Three ways a weight reaches a module:

- **mapped**: used in place from the cache's memory map for the model's lifetime (packed
  int4 weights from the derived copy, raw records already in the compute dtype). The pages
  stay in the page cache by use; nothing is copied and nothing is read per token once they
  are there. A long-lived read transaction keeps the views valid.
- **held**: decoded once into memory the process owns (a kept unit whose codec needs
  decoding: NF4, int8, a dtype change).
- **streamed**: a :class:`SlotPool` holds preallocated buffers for streamed layers;
  :meth:`RecordLoader.fetch_layer` decodes a layer's records into a slot (packed weights are
  used in place from the map, with a transaction that lives until the slot is released),
  prefetches the next layer on a thread when asked, and advises the kernel to read ahead.

Embedding rows are decoded from their records as tokens need them; the head, when it is not
kept, is applied one row chunk at a time. A device is one more loader and slot pool of this
shape (host decode, then a copy).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch

from cache.codecs import CodecName, ROW_PARTS, decode_rows, decode_tensor
from cache.manifest import GroupEntry, TensorEntry, layer_group, layer_index
from cache.store import LayerStore, RecordReader
from runtime.derived import DerivedTensor, packed_from_record
from runtime.kernels import PackedInt4
from runtime.rows import Int4Codes
from runtime.sizing import mappable


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


@dataclass
class LoadedLayer:
    """A decoded layer: tensor name (or derived name) -> tensor or :class:`PackedInt4`, and what loading cost."""

    tensors: dict[str, torch.Tensor | PackedInt4]
    seconds: float


@dataclass
class LoadedChunk:
    """A decoded row chunk of the embeddings or the head."""

    weight: torch.Tensor
    stored_bytes: int
    seconds: float


def role_sizes(groups: dict[str, GroupEntry], layers_prefix: str, layers, skip=frozenset()) -> dict[str, int]:
    """Elements a slot needs per tensor role (``self_attn.q_proj.weight`` ...): the largest
    over ``layers``; tensors named in ``skip`` take no slot buffer."""
    sizes: dict[str, int] = {}
    for i in layers:
        prefix = f"{layers_prefix}.{i}."
        for t in groups[layer_group(i)].tensors:
            if t.name not in skip:
                role = t.name.removeprefix(prefix)
                sizes[role] = max(sizes.get(role, 0), math.prod(t.shape))
    return sizes


class Slot:
    """Preallocated buffers for one streamed layer, one flat buffer per tensor role
    (``self_attn.q_proj.weight`` ...), sized for the largest layer that uses it."""

    def __init__(self, sizes: dict[str, int], dtype: torch.dtype, device: str | torch.device = "cpu") -> None:
        with torch.inference_mode(False):  # kept across passes: written in and out of inference mode
            self.buffers = {role: torch.empty(n, dtype=dtype, device=device) for role, n in sizes.items()}
        self.owner: int | None = None
        self.reader = None  # an open transaction whose records the layer uses in place

    def release(self) -> None:
        if self.reader is not None:
            self.reader.close()
            self.reader = None
        self.owner = None

    def view(self, role: str, shape: list[int]) -> torch.Tensor:
        return self.buffers[role][: math.prod(shape)].view(shape)


class SlotPool:
    """The slots streamed layers are decoded into."""

    def __init__(self, count: int, sizes: dict[str, int], dtype: torch.dtype) -> None:
        self.slots = [Slot(sizes, dtype) for _ in range(count)]

    def take(self, owner: int) -> Slot:
        for s in self.slots:
            if s.owner is None:
                s.owner = owner
                return s
        raise RuntimeError("no free streaming slot; a layer ran without its release hook")

    def release(self, owner: int) -> None:
        for s in self.slots:
            if s.owner == owner:
                s.release()

    def release_all(self) -> None:
        for s in self.slots:
            s.release()


class RecordLoader:
    """Reads and decodes a variant's records for one streaming model.

    Args:
        store, derived: the cache and (for packed int4 weights) its derived copy.
        variant_id: the variant.
        groups: group name -> entry.
        layers_prefix: the dotted path of the decoder layers (``model.layers``).
        dtype: the compute dtype every record is decoded to.
        layout: the derived copy's tensors by group (packed weights, stacked projections, the head).
        chunk_elems: elements of one chunk buffer (the largest embedding/head row chunk).
        prefetch: decode the next layer on a background thread.
        readahead: advise the kernel to read the next layer's records on a thread of its own.
        pageout: after a streamed layer has run, tell the kernel its records can leave the page
            cache now (``MADV_PAGEOUT``), so that under a memory limit they go before the
            weights kept mapped there, which every token uses too (an LRU cannot tell them apart).
        rows_codes: kept packed layer weights also carry their portable int4 codes, mapped in
            place from the cache, for the rows path (:mod:`runtime.rows`).
    """

    def __init__(
        self,
        store: LayerStore,
        derived: LayerStore | None,
        variant_id: str,
        groups: dict[str, GroupEntry],
        layers_prefix: str,
        dtype: torch.dtype,
        layout: dict[str, list[DerivedTensor]],
        *,
        chunk_elems: int,
        prefetch: bool,
        readahead: bool,
        pageout: bool = False,
        rows_codes: bool = False,
    ) -> None:
        self.store, self.derived, self.variant_id = store, derived, variant_id
        self.groups, self.layers_prefix, self.dtype, self.layout = groups, layers_prefix, dtype, layout
        self.covered = {s for items in layout.values() for d in items for s in d.sources}
        self.chunk_elems = chunk_elems
        self.stats = StreamStats()
        self.slots: SlotPool | None = None
        self.next_layer: dict[int, int] = {}
        self.head_after: int | None = None  # after this layer, the head's records are read ahead
        self._chunk_bufs: list[torch.Tensor] = []
        self._pending: dict[int, Future] = {}
        self._pool = (
            ThreadPoolExecutor(max_workers=1, thread_name_prefix="sli-prefetch", initializer=torch.set_num_threads, initargs=(1,))
            if prefetch
            else None
        )
        # advice to the kernel, on a thread of its own (the calls wait on the disk's queue, not on a core)
        self._readahead = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sli-readahead") if readahead else None
        self.pageout = pageout
        self.rows_codes = rows_codes
        self._entries = {t.name: t for g in groups.values() for t in g.tensors}
        self._head_entry: TensorEntry | None = None
        self._head_derived: DerivedTensor | None = None
        # long-lived transactions behind mapped weights (valid until close)
        self._kept: dict[str, RecordReader] = {}

    @property
    def prefetching(self) -> bool:
        return self._pool is not None

    @property
    def reading_ahead(self) -> bool:
        return self._readahead is not None

    def stream_layers(self, streamed: tuple[int, ...], slots: int, head: TensorEntry | None, head_derived: DerivedTensor | None) -> None:
        """Set up the slots for the streamed layers, in the order they run (wrapping to the
        first for the next pass); ``head``: the head entry when it streams too (and its packed
        form in the derived copy, if any)."""
        self.next_layer = {i: streamed[(k + 1) % len(streamed)] for k, i in enumerate(streamed)}
        # packed weights take no slot buffer: they are used in place, from the map
        self.slots = SlotPool(slots, role_sizes(self.groups, self.layers_prefix, streamed, self.covered), self.dtype) if streamed else None
        self.head_after = streamed[-1] if streamed and head is not None else None
        self._head_entry, self._head_derived = head, head_derived

    def account(self, stored: int, seconds: float) -> None:
        self.stats.bytes_read += stored
        self.stats.load_seconds += seconds

    # -- kept weights (mapped or held) ---------------------------------------------------------
    def _kept_reader(self, which: str) -> RecordReader:
        if which not in self._kept:
            self._kept[which] = (self.derived if which == "derived" else self.store).open_reader()
        return self._kept[which]

    def keep_derived(self, d: DerivedTensor) -> PackedInt4:
        """A derived tensor, mapped for the model's lifetime."""
        t0 = time.perf_counter()
        enc = self._kept_reader("derived").get(self.variant_id, d.name)
        w = packed_from_record(enc)
        if self.rows_codes and d.planes == 1 and layer_index(d.group) is not None:
            main = self._kept_reader("main")
            encs = [main.get(self.variant_id, r) for s in d.sources for r in self._entries[s].record_names()]
            if all(Int4Codes.usable(e) for e in encs):
                w = dataclasses.replace(w, codes=Int4Codes.of(encs))
        self.account(d.packed_bytes, time.perf_counter() - t0)
        return w

    def keep_tensor(self, t: TensorEntry) -> torch.Tensor:
        """A tensor kept for the model's lifetime: mapped where its record is usable in place,
        else decoded into owned memory."""
        t0 = time.perf_counter()
        if mappable(t, self.dtype):
            out = self._kept_reader("main").get(self.variant_id, t.name).parts["data"].view(t.shape)
        else:
            out = self.store.read_tensor(self.variant_id, t, self.dtype)
        self.account(t.stored_bytes, time.perf_counter() - t0)
        return out

    def keep_layer(self, i: int) -> dict[str, torch.Tensor | PackedInt4]:
        g = layer_group(i)
        out: dict[str, torch.Tensor | PackedInt4] = {d.name: self.keep_derived(d) for d in self.layout.get(g, ())}
        out.update({t.name: self.keep_tensor(t) for t in self.groups[g].tensors if t.name not in self.covered})
        return out

    # -- row chunks (embeddings, head) ---------------------------------------------------------
    def chunk_buffers(self) -> list[torch.Tensor]:
        """Two chunk buffers (made outside a forward pass: inference-mode tensors could not be
        refilled by the prefetch thread)."""
        if not self._chunk_bufs:
            with torch.inference_mode(False):
                self._chunk_bufs = [torch.empty(self.chunk_elems, dtype=self.dtype) for _ in range(2)]
        return self._chunk_bufs

    def _chunk_view(self, e: TensorEntry, rows: int, buf: int) -> torch.Tensor:
        return self.chunk_buffers()[buf][: rows * math.prod(e.shape[1:])].view(rows, *e.shape[1:])

    def _decode_chunk(self, e: TensorEntry, k: int, buf: int) -> LoadedChunk:
        """Decode row chunk ``k`` of ``e`` into chunk buffer ``buf`` (on the prefetch thread)."""
        t0 = time.perf_counter()
        with self.store.reader() as r:
            enc = r.get(self.variant_id, e.record_names()[k])
            out = decode_tensor(enc, out=self._chunk_view(e, enc.shape[0], buf))
        return LoadedChunk(out, e.stored_bytes // e.num_chunks, time.perf_counter() - t0)  # a tensor's chunks are near equal

    def apply_chunk(self, e: TensorEntry, k: int, fn) -> None:
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
            self.account(e.stored_bytes // e.num_chunks, time.perf_counter() - t0)
            fn(w)

    def rows(self, e: TensorEntry, ids: torch.Tensor) -> torch.Tensor:
        """Rows ``ids`` (int64, unique) of a vocabulary-sized tensor, ``[len(ids), *row shape]``
        in the compute dtype: each record decodes just the rows asked of it where its codec
        decodes row by row; others decode the chunk."""
        rows_per = e.chunk_rows or e.shape[0]
        out = torch.empty(len(ids), *e.shape[1:], dtype=self.dtype)
        chunk_of = ids // rows_per
        t0 = time.perf_counter()
        with self.store.reader() as r:
            for k in torch.unique(chunk_of).tolist():
                sel = (chunk_of == k).nonzero().squeeze(1)
                local = ids.index_select(0, sel) - k * rows_per
                enc = r.get(self.variant_id, e.record_names()[k])
                if CodecName(enc.codec) in ROW_PARTS:
                    out[sel] = decode_rows(enc, local, self.dtype)
                else:
                    out[sel] = decode_tensor(enc, out=self._chunk_view(e, enc.shape[0], 0)).index_select(0, local)
                self.stats.chunks_loaded += 1
        self.stats.load_seconds += time.perf_counter() - t0
        return out

    def submit_chunk(self, e: TensorEntry, k: int, buf: int) -> Future:
        return self._pool.submit(self._decode_chunk, e, k, buf)

    def await_chunk(self, pending: Future) -> torch.Tensor:
        t0 = time.perf_counter()
        got: LoadedChunk = pending.result()
        self.stats.wait_seconds += time.perf_counter() - t0
        self.stats.chunks_loaded += 1
        self.account(got.stored_bytes, got.seconds)
        return got.weight

    @contextlib.contextmanager
    def packed_head(self):
        """The streamed head's packed weight, mapped for one forward pass."""
        t0 = time.perf_counter()
        with self.derived.reader() as r:
            w = packed_from_record(r.get(self.variant_id, self._head_derived.name))
            self.account(self._head_derived.packed_bytes, time.perf_counter() - t0)
            yield w

    # -- streamed layers -----------------------------------------------------------------------
    def decode_layer(self, i: int, slot: Slot) -> LoadedLayer:
        """Layer i's tensors (thread-safe: each read has its own transaction). Packed int4
        weights are used in place, as views into the derived copy's map: their transaction
        stays open in ``slot.reader`` until the layer is released. Others are decoded into
        ``slot``."""
        t0 = time.perf_counter()
        g = layer_group(i)
        prefix = f"{self.layers_prefix}.{i}."
        out: dict[str, torch.Tensor | PackedInt4] = {}
        if self.layout.get(g):
            slot.reader = self.derived.open_reader()
            for d in self.layout[g]:
                out[d.name] = packed_from_record(slot.reader.get(self.variant_id, d.name))
        with self.store.reader() as r:
            for t in self.groups[g].tensors:
                if t.name in self.covered:
                    continue
                dst = slot.view(t.name.removeprefix(prefix), t.shape)
                decode_tensor(r.get(self.variant_id, t.name), out=dst)
                out[t.name] = dst
        return LoadedLayer(out, time.perf_counter() - t0)

    def _advise_layer(self, i: int, how: str = "advise") -> int:
        """Have the kernel read layer i's records ahead of need, in large reads (on the
        read-ahead thread), or (``how="pageout"``) let them go; returns the bytes advised."""
        g = layer_group(i)
        n = 0
        with self.store.reader() as r, (self.derived.reader() if self.derived else contextlib.nullcontext()) as dr:
            for d in self.layout.get(g, ()):
                n += getattr(dr, how)(self.variant_id, d.name)
            for t in self.groups[g].tensors:
                if t.name not in self.covered:
                    n += getattr(r, how)(self.variant_id, t.name)
        return n

    def _advise_head(self) -> int:
        if self._head_derived is not None:
            with self.derived.reader() as r:
                return r.advise(self.variant_id, self._head_derived.name)
        with self.store.reader() as r:
            return sum(r.advise(self.variant_id, name) for name in self._head_entry.record_names())

    def fetch_layer(self, i: int) -> dict[str, torch.Tensor | PackedInt4]:
        """Layer i's tensors: from the prefetch thread when it was asked for, else decoded now;
        then the next layer is asked for (and read ahead)."""
        fut = self._pending.pop(i, None)
        t0 = time.perf_counter()
        if fut is None:
            self.stats.prefetch_misses += 1
            got = self.decode_layer(i, self.slots.take(i))
        else:
            self.stats.prefetch_hits += fut.done()
            self.stats.prefetch_misses += not fut.done()
            got = fut.result()
        self.stats.wait_seconds += time.perf_counter() - t0
        self.stats.layers_loaded += 1
        g = layer_group(i)
        stored = sum(d.packed_bytes for d in self.layout.get(g, ())) + sum(
            t.stored_bytes for t in self.groups[g].tensors if t.name not in self.covered)
        self.account(stored, got.seconds)
        nxt = self.next_layer[i]
        if self._readahead is not None:
            if nxt != i:
                self._readahead.submit(self._advise_layer, nxt)
            if i == self.head_after:
                self._readahead.submit(self._advise_head)
        if self._pool is not None and nxt != i and nxt not in self._pending:
            self._pending[nxt] = self._pool.submit(self.decode_layer, nxt, self.slots.take(nxt))
        return got.tensors

    def release_layer(self, i: int) -> None:
        if self.slots is not None:
            self.slots.release(i)
            if self.pageout:
                self._advise_layer(i, "pageout")

    def abandon(self) -> None:
        """After a forward pass that did not finish: wait for the prefetch, free every slot."""
        for fut in self._pending.values():
            fut.cancel()
            if not fut.cancelled():
                fut.exception()  # wait; the thread must not be writing into a slot we reuse
        self._pending.clear()
        if self.slots is not None:
            self.slots.release_all()

    def close(self) -> None:
        if self._pool is not None:
            self.abandon()
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
        if self._readahead is not None:
            self._readahead.shutdown(wait=True, cancel_futures=True)
            self._readahead = None
        self._pending.clear()
        if self.slots is not None:
            self.slots.release_all()
        for r in self._kept.values():
            r.close()
        self._kept.clear()
