"""`StreamingModel`: transformers' own modules, with weights streamed from the cache.

The model's skeleton is built from the manifest's config on the meta device, so it holds
no weights. The pieces, each in its own module:

- :mod:`runtime.sizing` sizes every unit and plans the budget (:mod:`runtime.budget` splits it);
- :mod:`runtime.derived` lays out and builds the packed int4 copy the kernel reads;
- :mod:`runtime.loader` maps kept weights in place, decodes the others, and reads streamed
  records into slots and chunk buffers (prefetch, read-ahead);
- :mod:`runtime.surgery` puts weights into the modules and takes them out, looks token
  embeddings up by row, and stands in for the head when it streams;
- :mod:`runtime.packed` swaps in the packed int4 linears the kernel runs.

Kept layers get their weights once, at start. Every streamed decoder layer gets a forward
pre-hook that fetches its weights from the loader and a forward hook that hands them back. Because transformers' own forward drives
the layers, every architecture it runs (and the registry maps) runs here unchanged.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from cache.manifest import EMBED_GROUP, HEAD_GROUP, GroupEntry, Manifest, TensorEntry, layer_group, layer_index
from cache.readahead import WILLNEED_SUPPORTED
from cache.store import LayerStore
from runtime.arch import ArchSpec
from runtime.budget import PageCacheRoom
from runtime.derived import derived_layout, ensure_derived
from runtime.hostmem import auto_budget, readahead_room
from runtime.loader import RecordLoader, StreamStats
from runtime.memory import bound_allocator, parse_size
from runtime.packed import PackedInt4Linear, swap_packed_modules
from runtime.rows import CROSSOVER_FILE, ROW_COUNTS, TILE_ELEMS, CrossoverTable, RowsKernel, plan_rows
from runtime.sizing import MAX_AUTO_CONTEXT, MIN_CONTEXT, ModelSizes, Stage, plan_streaming
from runtime.surgery import assign, empty_weights, lookup_embeddings, plain_strides, stream_head

logger = logging.getLogger(__name__)

DEFAULT_PREFILL_CHUNK = 128  # prompt tokens per forward pass during prefill


def page_cache_room(page_cache: str | int | None) -> PageCacheRoom | None:
    """The room for mapped weights that ``page_cache`` asks for (see :class:`StreamingModel`)."""
    if page_cache is None or page_cache == 0:
        return None
    if isinstance(page_cache, str) and page_cache.strip().lower() == "auto":
        found = auto_budget()
        return PageCacheRoom(found.budget_bytes, found.source)
    n = parse_size(page_cache)
    return PageCacheRoom(n, f"{n >> 20} MiB asked for", shared=False)


__all__ = ["DEFAULT_PREFILL_CHUNK", "MAX_AUTO_CONTEXT", "MIN_CONTEXT", "PackedInt4Linear", "StreamStats", "StreamingModel",
           "config_from_manifest"]


def config_from_manifest(manifest: Manifest):
    """Rebuild the transformers config stored in a manifest."""
    from transformers import AutoConfig

    d = dict(manifest.config)
    model_type = d.pop("model_type")
    return AutoConfig.for_model(model_type, **d)


class StreamingModel:
    """A causal LM whose weights stream from a :class:`LayerStore` within a memory budget.

    Args:
        store: an open cache.
        variant_id: a complete variant in it.
        memory_budget: ``"512MB"``, ``"2GiB"``, bytes, or ``"auto"``; bounds the memory the
            process holds: weights decoded into memory, slots, chunk buffers, the KV cache of
            ``context_tokens`` and the activations of a prefill chunk.
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
            eligible int4 tensors; they then are used in place from the derived copy's map.
        fuse: run projections that read one input (q/k/v, gate/up) as one kernel call on
            their stacked packed weight (see :mod:`runtime.derived`).
        page_cache: where weights used in place from the map (packed int4, raw records in the
            compute dtype) are planned: ``"auto"`` (default): into the room the host leaves in
            the page cache (a memory cgroup's limit less what it holds, else available RAM),
            beside the budget; a size: into that much page cache; ``0``: into the budget, like
            everything else. Kept this way, they are read once and nothing is read per token.
        attn_implementation: transformers' attention (``"sdpa"``, ``"eager"``); default: its own choice.
        rows_kernel: steps of many rows (prefill chunks, batches) on packed int4 layers run as
            dequantize + bf16 GEMM from the crossover measured on this host (see
            :mod:`runtime.rows`). Default (None): on where the plan keeps the layers' int4 codes
            mapped beside their packed copy and has room for the scratch tile; False: the packed
            kernel for every row count; True: as None, but a plan without the room is an error.
        stage: the slice of decoder layers this process runs (a pipeline stage,
            :mod:`runtime.pipeline`): only its layers (with the embeddings on the first stage,
            the final norm and head on the last) are planned, read and held; its
            :meth:`run_stage` takes and gives hidden states. Default: the whole model.

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
        fuse: bool = True,
        page_cache: str | int | None = "auto",
        attn_implementation: str | None = None,
        rows_kernel: bool | None = None,
        stage: Stage | None = None,
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
        with init_empty_weights(include_buffers=False):  # parameters on meta, buffers (rotary) real
            extra = {"attn_implementation": attn_implementation} if attn_implementation else {}
            self.model = AutoModelForCausalLM.from_config(self.config, dtype=dtype, **extra)
        self.model.eval()
        self.stage = stage or Stage.whole(self.config.num_hidden_layers)
        if self.stage.num_layers != self.config.num_hidden_layers:
            raise ValueError(f"stage {self.stage} is for a model of {self.stage.num_layers} layers; this one has {self.config.num_hidden_layers}")
        self.layers: nn.Module = self.model.get_submodule(self.arch.layers)
        if not self.stage.is_whole:
            self.layers = _keep_stage_layers(self.model, self.arch, self.stage)
        self._groups: dict[str, GroupEntry] = {g.name: g for g in self.manifest.groups}
        entries: dict[str, TensorEntry] = self.manifest.tensors()
        embed_name, head_name = f"{self.arch.embed}.weight", f"{self.arch.head}.weight"
        self.embed_entry = entries[embed_name]
        self.tied = head_name not in entries
        self.head_entry = self.embed_entry if self.tied else entries[head_name]

        # packed int4: the kernel's own layout, derived from the portable records for this host (built once)
        self.layout = derived_layout(self.manifest, head=self.arch.head, embed=self.arch.embed, fuse=fuse) if packed_int4 is not False else {}
        self.layout = _stage_layout(self.layout, self.stage, self.head_entry.name)  # tied: the head is the embedding matrix
        if packed_int4 and not self.layout:
            raise ValueError("packed_int4=True but this variant has no int4 tensors the CPU int4 kernel can take")
        if self.layout and dtype != torch.bfloat16:
            if packed_int4:
                raise ValueError("the packed int4 kernel computes in bfloat16; pass dtype=torch.bfloat16")
            self.layout = {}
        self.derived: LayerStore | None = ensure_derived(store, variant_id, self.layout) if self.layout else None
        self.rows_kernel = RowsKernel()  # the packed kernel for every row count until the plan says otherwise
        self.targets = swap_packed_modules(self.model, self.layout, self.rows_kernel)
        self.packed = {s: d.group_size for items in self.layout.values() for d in items for s in d.sources}

        sizes = ModelSizes(self._groups, self.config.num_hidden_layers, self.embed_entry, self.head_entry, self.tied, dtype, self.layout,
                           stage=self.stage)
        self.sizes = sizes
        self.head_derived = sizes.head_derived
        self.units = sizes.units()  # what each layer and the head costs, kept or streamed
        room = page_cache_room(page_cache)
        sp = plan_streaming(sizes, self.config, memory_budget, context_tokens, prefill_chunk, room)
        self.plan, self.full_bytes, self.minimum_bytes, self.prefill_chunk = sp.plan, sp.full_bytes, sp.minimum_bytes, sp.prefill_chunk
        self.rows_reason = self._choose_rows(rows_kernel, entries, room)
        self.context_tokens = self.plan.context_tokens
        logger.info("%s", self.plan.describe())

        readahead = self._choose_readahead(readahead)
        streaming = self.plan.streaming
        self.loader = RecordLoader(
            store, self.derived, variant_id, self._groups, self.arch.layers, dtype, self.layout,
            chunk_elems=sizes.chunk_elems(), prefetch=prefetch and streaming, readahead=bool(readahead and streaming),
            # streamed records leave the page cache after use when weights kept there must not go first
            pageout=bool(self.plan.streamed_layers and self.plan.mapped),
            rows_codes=self.rows_kernel.active,
        )
        self._hooks: list = []
        self._load_fixed()
        streamed = self.plan.streamed_layers
        head_streams = self.stage.last and "head" not in self.plan.resident
        self.loader.stream_layers(streamed, self.plan.num_slots, self.head_entry if head_streams else None,
                                  self.head_derived if head_streams else None)
        for i in streamed:
            self._hooks.append(self.layers[i].register_forward_pre_hook(self._make_loader(i)))
            self._hooks.append(self.layers[i].register_forward_hook(self._make_releaser(i)))
        self.reset_stats()

    def _choose_rows(self, rows_kernel: bool | None, entries: dict[str, TensorEntry], room) -> str:
        """Turn the rows path on where the plan has room for it (see ``rows_kernel``): measure
        (or reread) the crossover of each kept packed layer weight's shape beside the derived
        copy, prove the path, and add its costs to the plan. Returns why it is on or off."""
        if rows_kernel is False or not self.layout:
            return "turned off" if rows_kernel is False else "no packed int4 weights"
        kept = set(self.plan.resident_layers)
        items = [d for g, ds in self.layout.items() if layer_index(g) in kept for d in ds if d.planes == 1]
        sources = [entries[s] for d in items for s in d.sources]
        plan, why = plan_rows(self.plan, room, sum(t.stored_bytes for t in sources if not t.compressed), 2 * TILE_ELEMS,
                              held_bytes=sum(t.raw_bytes for t in sources if t.compressed))
        if plan is not None:
            table = CrossoverTable.load(self.derived.path / CROSSOVER_FILE).ensure({(d.shape[0], d.in_features, d.group_size) for d in items})
            if all(table.crossover(d.shape[0], d.in_features, d.group_size) is None for d in items):
                plan, why = None, f"the packed kernel measured faster at every row count up to {max(ROW_COUNTS)} here"
        if plan is None:
            if rows_kernel:
                raise ValueError(f"rows_kernel=True, but {why}; raise the budget or the page-cache room, or leave rows_kernel unset")
            logger.info("int4 rows path off: %s", why)
            return why
        RowsKernel.prove()
        self.rows_kernel.table, self.plan = table, plan
        logger.info("int4 rows path on: %s; crossovers %s", why, table.rows)
        return why

    def _choose_readahead(self, readahead: bool | None) -> bool | None:
        if readahead is None and self.plan.streaming:
            # the streamed records computing, read ahead and slack pass through the page cache (a
            # packed layer is read in place: its slot is empty, its records are not), beside
            # the mapped weights the plan keeps there
            streamed = set(self.plan.streamed)
            largest = max((u.stored_bytes for u in self.units if u.name in streamed), default=0)
            room, why = readahead_room(3 * max(self.plan.slot_bytes, largest) + self.plan.mapped_bytes)
            if not WILLNEED_SUPPORTED:
                room, why = False, "this platform has no madvise(MADV_WILLNEED)"
            self.readahead_reason = why
            logger.info("read-ahead %s: %s", "on" if room else "off", why)
            return room
        self.readahead_reason = "asked for" if readahead else "turned off"
        if readahead and self.plan.streaming and not WILLNEED_SUPPORTED:
            raise ValueError("readahead=True, but this platform has no madvise(MADV_WILLNEED); leave readahead unset")
        return readahead

    # -- kept weights ------------------------------------------------------------------------
    def _load_fixed(self) -> None:
        """Small tensors always; the head and the layers the plan keeps (mapped or held);
        embeddings looked up by row; the head applied by chunks when it streams."""
        kept = set(self.plan.resident)
        for gname in self.sizes.small_groups():
            for t in self._groups[gname].tensors:
                if t is not self.embed_entry and t is not self.head_entry:
                    assign(self.model, {t.name: self.loader.keep_tensor(t)})
        for i in self.plan.resident_layers:
            assign(self.model, self.loader.keep_layer(i), self.targets)
        if self.stage.last:
            self._load_head(kept)
        elif self.stage.first:
            self._hooks += lookup_embeddings(self.model.get_submodule(self.arch.embed), self.loader, self.embed_entry, self.dtype)

    def _load_head(self, kept: set[str]) -> None:
        head_path = self.arch.head
        if "head" in kept:
            if self.head_derived is not None:
                self.targets[self.head_derived.name].weight_packed = self.loader.keep_derived(self.head_derived)
            else:
                assign(self.model, {f"{head_path}.weight": self.loader.keep_tensor(self.head_entry)})
            head = self.model.get_submodule(head_path)
            self._hooks.append(head.register_forward_pre_hook(lambda mod, args: (plain_strides(args[0]), *args[1:])))
        else:
            self.loader.chunk_buffers()
            stream_head(self.model, head_path, self.loader, self.head_entry, packed=self.head_derived is not None)
        if not self.stage.first:
            return
        if self.tied and "head" in kept and self.head_derived is None:
            # the decoded head is the embedding matrix: look rows up in it rather than in the records
            emb = self.model.get_submodule(self.arch.embed)
            emb._parameters["weight"] = self.model.get_submodule(head_path).weight
        else:
            self._hooks += lookup_embeddings(self.model.get_submodule(self.arch.embed), self.loader, self.embed_entry, self.dtype)

    # -- streamed layers -------------------------------------------------------------------
    def _release(self, i: int) -> None:
        empty_weights(self.layers[i])
        self.loader.release_layer(i)

    def _make_loader(self, i: int):
        def hook(module: nn.Module, args) -> None:
            assign(self.model, self.loader.fetch_layer(i), self.targets)

        return hook

    def _make_releaser(self, i: int):
        def hook(module: nn.Module, args, output) -> None:
            self._release(i)

        return hook

    def _abandon_pass(self) -> None:
        """After a forward pass that did not finish: wait for the prefetch, free every slot."""
        self.loader.abandon()
        for i in self.plan.streamed_layers:
            self._release(i)

    # -- running ---------------------------------------------------------------------------
    @property
    def stats(self) -> StreamStats:
        return self.loader.stats

    def reset_stats(self) -> None:
        self.loader.stats = StreamStats()

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, **kwargs):
        """transformers' forward with streamed weights (same arguments and outputs)."""
        try:
            return self.model(input_ids=input_ids, **kwargs)
        except BaseException:
            self._abandon_pass()
            raise

    @torch.inference_mode()
    def run_stage(self, inputs: torch.Tensor, **kwargs):
        """This stage's part of a forward pass (transformers' own forward over its layers):
        ``inputs`` are token ids ``[batch, seq]`` on the first stage, else the hidden states
        ``[batch, seq, hidden]`` the stage before gave. Returns the model's output (logits and
        cache) on the last stage, else the hidden states after this stage's last layer."""
        if self.stage.is_whole:
            return self.forward(inputs, **kwargs)
        feed = {"input_ids": inputs} if self.stage.first else {"inputs_embeds": inputs}
        try:
            if self.stage.last:
                return self.model(**feed, **kwargs)
            kwargs.pop("logits_to_keep", None)
            base = self.model.get_submodule(self.arch.layers.rsplit(".", 1)[0])
            return base(**feed, **kwargs).last_hidden_state
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
        self.loader.close()
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        if self.derived is not None:
            self.derived.close()
            self.derived = None


class StageLayers(nn.Module):
    """The decoder layers a stage holds, under their own indices (``model.layers.12`` stays
    ``model.layers.12``), so weights find their modules by name; sliced and iterated like the
    ``ModuleList`` it stands in for, it gives transformers' forward only these layers."""

    def __init__(self, layers: dict[int, nn.Module]) -> None:
        super().__init__()
        for i, m in layers.items():
            self.add_module(str(i), m)

    def __getitem__(self, idx):
        if isinstance(idx, slice):
            return list(self._modules.values())[idx]
        return self._modules[str(idx)]

    def __iter__(self):
        return iter(self._modules.values())

    def __len__(self) -> int:
        return len(self._modules)


def _keep_stage_layers(model: nn.Module, arch: ArchSpec, stage: Stage) -> StageLayers:
    """Drop the layers outside ``stage`` from the skeleton (and, before the last stage, the
    final norm: a stage hands on the residual stream as its last layer left it)."""
    parent_name, attr = arch.layers.rsplit(".", 1)
    parent = model.get_submodule(parent_name)
    full = getattr(parent, attr)
    kept = StageLayers({i: full[i] for i in stage.layers})
    setattr(parent, attr, kept)
    if not stage.last:
        norm_parent, norm_attr = arch.norm.rsplit(".", 1)
        setattr(model.get_submodule(norm_parent), norm_attr, nn.Identity())
    return kept


def _stage_layout(layout: dict, stage: Stage, head_name: str) -> dict:
    """The derived (packed int4) tensors a stage uses: its layers', the head on the last stage
    (``head_name``: the head's own tensor, the embedding matrix when they are tied)."""
    if stage.is_whole:
        return layout
    out = {}
    for g, items in layout.items():
        i = layer_index(g)
        if i is not None:
            keep = items if i in stage.layers else []
        else:
            keep = [d for d in items if (stage.last if d.sources == (head_name,) else stage.first)]
        if keep:
            out[g] = keep
    return out
