"""`StreamingModel`: transformers' own modules, with weights streamed from the cache.

The model's skeleton is built from the manifest's config on the meta device, so it holds
no weights. Embeddings and head are loaded once; the budget planner decides which decoder
layers stay resident; every other layer gets a forward pre-hook that reads, verifies and
decodes its records into the compute dtype just before it runs, and a forward hook that
drops them again right after. Because transformers' own forward drives the layers, every
architecture transformers runs (and the registry maps) runs here unchanged.
"""

from __future__ import annotations

import logging
import math
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch
from torch import nn

from cache.codecs import decode_tensor
from cache.manifest import GroupEntry, Manifest
from cache.store import LayerStore
from runtime.arch import EMBED_GROUP, HEAD_GROUP, ArchSpec
from runtime.budget import BudgetPlan, LayerCost, MemoryBudget
from runtime.memory import release_free_memory

logger = logging.getLogger(__name__)

DEFAULT_ACTIVATION_BYTES = 32 << 20  # allowance for activations of a short prompt; KV comes with the paged pool


@dataclass
class StreamStats:
    """Counters since the last :meth:`StreamingModel.reset_stats`."""

    layers_loaded: int = 0
    bytes_read: int = 0  # record bytes read from the cache
    load_seconds: float = 0.0  # reading + verifying + decoding (on the prefetch thread when prefetching)
    wait_seconds: float = 0.0  # time the forward pass stood waiting for a layer
    prefetch_hits: int = 0  # layers that were ready when needed
    prefetch_misses: int = 0

    @property
    def prefetch_hit_rate(self) -> float:
        n = self.prefetch_hits + self.prefetch_misses
        return self.prefetch_hits / n if n else 0.0

    @property
    def hidden_io_fraction(self) -> float:
        """Share of the load time that did not stall the forward pass."""
        return 1.0 - self.wait_seconds / self.load_seconds if self.load_seconds else 0.0


def config_from_manifest(manifest: Manifest):
    """Rebuild the transformers config stored in a manifest."""
    from transformers import AutoConfig

    d = dict(manifest.config)
    model_type = d.pop("model_type")
    return AutoConfig.for_model(model_type, **d)


def _decoded_bytes(group: GroupEntry, dtype: torch.dtype) -> int:
    size = torch.empty(0, dtype=dtype).element_size()
    return sum(math.prod(t.shape) * size for t in group.tensors)


class StreamingModel:
    """A causal LM whose decoder layers are streamed from a :class:`LayerStore` within a budget.

    Args:
        store: an open cache.
        variant_id: a complete variant in it.
        memory_budget: ``"512MB"``, ``"2GiB"`` or bytes; bounds the weights held plus
            ``activation_bytes``.
        dtype: compute dtype; every tensor is decoded to it.
        activation_bytes: allowance for activations, counted in the budget.
        prefetch: read and decode the next streamed layer on a background thread while the
            current one computes (uses the second streaming slot).

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
        activation_bytes: int = DEFAULT_ACTIVATION_BYTES,
        prefetch: bool = True,
    ) -> None:
        from accelerate import init_empty_weights
        from transformers import AutoModelForCausalLM

        self.store = store
        self.variant_id = variant_id
        self.manifest = store.require_manifest(variant_id)
        self.config = config_from_manifest(self.manifest)
        self.arch = ArchSpec(**self.manifest.arch)
        self.dtype = dtype
        # parameters on meta, buffers (rotary frequencies) real
        with init_empty_weights(include_buffers=False):
            self.model = AutoModelForCausalLM.from_config(self.config, dtype=dtype)
        self.model.eval()
        self.layers: nn.ModuleList = self.model.get_submodule(self.arch.layers)
        self._groups = {g.name: g for g in self.manifest.groups}
        self.tied = bool(getattr(self.config, "tie_word_embeddings", False)) and not any(
            t.name == f"{self.arch.head}.weight" for t in self._groups[HEAD_GROUP].tensors
        )
        costs = [
            LayerCost(i, _decoded_bytes(self._groups[f"layer.{i}"], dtype), self._groups[f"layer.{i}"].stored_bytes)
            for i in range(len(self.layers))
        ]
        fixed = {
            "embeddings": _decoded_bytes(self._groups[EMBED_GROUP], dtype),
            "head": _decoded_bytes(self._groups[HEAD_GROUP], dtype),
            "activations": activation_bytes,
        }
        self.plan: BudgetPlan = MemoryBudget(memory_budget).plan(costs, fixed=fixed)
        logger.debug("%s", self.plan.describe())
        self.stats = StreamStats()
        self._assign(self._read_group(EMBED_GROUP))
        head = self._read_group(HEAD_GROUP)
        if self.tied:
            head[f"{self.arch.head}.weight"] = self.model.get_submodule(self.arch.embed).weight
        self._assign(head)
        for i in self.plan.resident_layers:
            self._assign(self._read_group(f"layer.{i}"))
        self._hooks = []
        streamed = self.plan.streamed_layers
        # the streamed layer after i, wrapping to the first for the next forward pass
        self._next = {i: streamed[(k + 1) % len(streamed)] for k, i in enumerate(streamed)}
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sli-prefetch") if prefetch and streamed else None
        self._pending: dict[int, Future] = {}
        for i in self.plan.streamed_layers:
            layer = self.layers[i]
            self._hooks.append(layer.register_forward_pre_hook(self._make_loader(i)))
            self._hooks.append(layer.register_forward_hook(self._make_releaser(i)))
        self.reset_stats()

    # -- weights in and out ----------------------------------------------------------------
    def _decode_group(self, name: str) -> tuple[dict[str, torch.Tensor], float]:
        """Read, verify and decode one group (thread-safe: each read has its own transaction)."""
        t0 = time.perf_counter()
        out = {t.name: decode_tensor(self.store.get_record(self.variant_id, t.name), self.dtype) for t in self._groups[name].tensors}
        return out, time.perf_counter() - t0

    def _account(self, name: str, seconds: float) -> None:
        self.stats.layers_loaded += 1
        self.stats.bytes_read += self._groups[name].stored_bytes
        self.stats.load_seconds += seconds

    def _read_group(self, name: str) -> dict[str, torch.Tensor]:
        out, seconds = self._decode_group(name)
        self._account(name, seconds)
        return out

    def _fetch_layer(self, i: int) -> dict[str, torch.Tensor]:
        """Layer i's tensors: from the prefetch thread when it was asked for, else read now."""
        name = f"layer.{i}"
        fut = self._pending.pop(i, None)
        t0 = time.perf_counter()
        if fut is None:
            self.stats.prefetch_misses += 1
            out, seconds = self._decode_group(name)
        else:
            if fut.done():
                self.stats.prefetch_hits += 1
            else:
                self.stats.prefetch_misses += 1
            out, seconds = fut.result()
        self.stats.wait_seconds += time.perf_counter() - t0
        self._account(name, seconds)
        if self._pool is not None:
            nxt = self._next[i]
            if nxt != i and nxt not in self._pending:
                self._pending[nxt] = self._pool.submit(self._decode_group, f"layer.{nxt}")
        return out

    def _assign(self, tensors: dict[str, torch.Tensor]) -> None:
        for name, t in tensors.items():
            module_name, pname = name.rsplit(".", 1)
            module = self.model.get_submodule(module_name)
            if pname in module._parameters:
                module._parameters[pname] = t if isinstance(t, nn.Parameter) else nn.Parameter(t, requires_grad=False)
            elif pname in module._buffers:
                module._buffers[pname] = t
            else:
                raise KeyError(f"{name} from the cache has no place in the {type(self.model).__name__} skeleton")

    def _release(self, i: int) -> None:
        for module in self.layers[i].modules():
            for pname, p in module._parameters.items():
                if p is not None:
                    module._parameters[pname] = nn.Parameter(torch.empty(p.shape, dtype=p.dtype, device="meta"), requires_grad=False)
        release_free_memory()

    def _make_loader(self, i: int):
        def hook(module: nn.Module, args) -> None:
            self._assign(self._fetch_layer(i))

        return hook

    def _make_releaser(self, i: int):
        def hook(module: nn.Module, args, output) -> None:
            self._release(i)

        return hook

    # -- running ---------------------------------------------------------------------------
    def reset_stats(self) -> None:
        self.stats = StreamStats()

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, **kwargs):
        """transformers' forward with streamed layers (same arguments and outputs)."""
        return self.model(input_ids=input_ids, **kwargs)

    @torch.inference_mode()
    def logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Float logits ``[batch, seq, vocab]`` for validation."""
        if input_ids.ndim == 1:
            input_ids = input_ids[None]
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        return out.logits.float()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
        self._pending.clear()
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
