"""Paged KV cache: fixed-size token blocks from a pool inside the memory budget, reused by
token prefix, evicted least recently used, spilled to disk.

* :class:`BlockPool` owns one preallocated tensor ``[layers, 2, kv_heads, blocks, block, width]``
  (blocks inside, so one layer's blocks gather into a contiguous ``[2, heads, tokens, width]`` in one copy).
  Its blocks hold the KV in the compute dtype (``width = head_dim``), or as int8 codes with an
  fp16 scale per token and head (:class:`KVDtype` ``int8``, ``width = head_dim + 2``: the scale's
  two bytes follow the codes of its row, so a block stays one tensor, spilled and reloaded as it is).
  Blocks have reference counts. A full block is keyed by a hash chain
  ``hash(parent hash, its token ids, model/variant key)``, so equal prefixes map to equal
  blocks. Unreferenced blocks stay cached in an LRU free queue and are evicted oldest first
  when the pool needs room; an evicted block is handed to the spill store first.
* :class:`PagedKVCache` is a transformers ``Cache`` whose layers write into and read from
  the blocks of one sequence, so transformers' own attention runs on it for every
  architecture without sliding-window layers. :mod:`runtime.kvbatch` has the cache of a
  batched step (many sequences in one forward pass).
* :class:`PrefixCachingSession` turns a token sequence into a cache: it reuses the longest
  run of full blocks already in the pool or in the spill store, and after the request
  registers the new full blocks and spills them.

The design follows vLLM v1's block pool (ref counts, hash-keyed full blocks, a free queue
that doubles as the LRU); the code is written for sli's streaming runtime.
"""

from __future__ import annotations

import hashlib
import logging
from collections import OrderedDict
from dataclasses import dataclass, field
from enum import Enum

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

logger = logging.getLogger(__name__)

DEFAULT_BLOCK_SIZE = 16
SCALE_BYTES = 2  # an int8 row's fp16 scale, stored after its codes
INT8_MAX = 127


class KVDtype(str, Enum):
    """How KV blocks are stored: in the compute dtype, or as int8 with per-token, per-head scales."""

    AUTO = "auto"
    INT8 = "int8"


class PoolExhaustedError(RuntimeError):
    """Every block is referenced by a live sequence: nothing can be evicted."""


def block_hash(parent: bytes | None, tokens: list[int] | tuple[int, ...], salt: str) -> bytes:
    """Key of a full block: its parent's key, its token ids, and the model/variant it was computed by."""
    h = hashlib.sha256()
    h.update(parent or b"root")
    h.update(salt.encode())
    h.update(b",".join(str(t).encode() for t in tokens))
    return h.digest()[:16]


def chain_hashes(tokens: list[int], block_size: int, salt: str, *, parent: bytes | None = None, start: int = 0) -> list[bytes]:
    """Keys of the full blocks of ``tokens`` from block ``start`` on (``parent``: the key of block ``start - 1``)."""
    out = []
    for i in range(start, len(tokens) // block_size):
        parent = block_hash(parent, tokens[i * block_size : (i + 1) * block_size], salt)
        out.append(parent)
    return out


def quantize_kv(x: torch.Tensor) -> torch.Tensor:
    """Rows ``[..., dim]`` as int8 rows ``[..., dim + 2]``: symmetric codes over the row's absmax
    and the row's fp16 scale in the last two bytes. Codes are rounded against the fp16 scale
    as stored, so dequantizing multiplies back exactly what was divided."""
    x32 = x.float()
    scale = (x32.abs().amax(dim=-1, keepdim=True) / INT8_MAX).to(torch.float16)  # [..., 1]
    scale = torch.nan_to_num(scale, posinf=torch.finfo(torch.float16).max)
    s32 = scale.float()
    codes = torch.where(s32 > 0, x32 / s32.clamp_min(torch.finfo(torch.float32).tiny), 0.0)
    codes = codes.round_().clamp_(-INT8_MAX, INT8_MAX).to(torch.int8)
    return torch.cat([codes, scale.view(torch.int8)], dim=-1)


def dequantize_kv(rows: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """int8 rows ``[..., dim + 2]`` (see :func:`quantize_kv`) back to ``[..., dim]`` in ``dtype``."""
    scale = rows[..., -SCALE_BYTES:].contiguous().view(torch.float16)  # [..., 1]
    return rows[..., :-SCALE_BYTES].to(dtype) * scale.to(dtype)


def kv_shape(config) -> tuple[int, int, int]:
    """(layers, kv heads, head dim) of a transformers config."""
    heads = config.num_attention_heads
    return (config.num_hidden_layers, getattr(config, "num_key_value_heads", None) or heads,
            getattr(config, "head_dim", None) or config.hidden_size // heads)


def kv_token_bytes(config, dtype: torch.dtype, kv_dtype: KVDtype | str = KVDtype.AUTO) -> int:
    """Bytes one token's KV takes in a pool of ``kv_dtype`` (all layers, keys and values)."""
    layers, heads, dim = kv_shape(config)
    if KVDtype(kv_dtype) is KVDtype.INT8:
        return 2 * layers * heads * (dim + SCALE_BYTES)
    return 2 * layers * heads * dim * torch.empty(0, dtype=dtype).element_size()


@dataclass
class Block:
    index: int
    ref_count: int = 0
    hash: bytes | None = None  # set once the block is full and registered


class BlockPool:
    """Fixed-size KV blocks for all layers, with reference counts, hash lookup and LRU eviction.

    Args:
        num_blocks: blocks in the pool.
        num_layers, kv_heads, head_dim: the model's KV shape.
        block_size: tokens per block.
        dtype: the compute dtype (what :meth:`read` returns and :meth:`write` takes).
        kv_dtype: how blocks are stored: ``auto`` (the compute dtype) or ``int8`` (codes with
            an fp16 scale per token and head, see :func:`quantize_kv`).
        on_evict: called with (hash, block tensor) before a cached block is reused for
            something else (the spill store's hook).
        first_layer: the model layer the pool's first layer is (a pipeline stage's pool holds
            the KV of its own layers ``first_layer .. first_layer + num_layers - 1``).
    """

    def __init__(self, num_blocks: int, *, num_layers: int, kv_heads: int, head_dim: int, block_size: int = DEFAULT_BLOCK_SIZE,
                 dtype: torch.dtype = torch.float32, kv_dtype: KVDtype | str = KVDtype.AUTO, on_evict=None,
                 device: str | torch.device = "cpu", first_layer: int = 0) -> None:
        if num_blocks < 1:
            raise ValueError(f"a block pool needs at least one block, got {num_blocks}")
        self.block_size = block_size
        self.first_layer = first_layer
        self.dtype = dtype
        self.kv_dtype = KVDtype(kv_dtype)
        self.quantized = self.kv_dtype is KVDtype.INT8
        self.head_dim = head_dim
        width = head_dim + SCALE_BYTES if self.quantized else head_dim
        store = torch.int8 if self.quantized else dtype
        with torch.inference_mode(False):  # kept across requests: filled in forward passes and from the spill outside them
            self.data = torch.zeros(num_layers, 2, kv_heads, num_blocks, block_size, width, dtype=store, device=device)
        self.blocks = [Block(i) for i in range(num_blocks)]
        # unreferenced blocks, least recently used first; cached (hashed) blocks stay findable until evicted
        self.free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self.by_hash: dict[bytes, int] = {}
        self.on_evict = on_evict
        self.evictions = 0

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def layers(self) -> range:
        """The model layers whose KV the pool holds."""
        return range(self.first_layer, self.first_layer + self.data.shape[0])

    @property
    def device(self) -> torch.device:
        return self.data.device

    def block(self, idx: int) -> torch.Tensor:
        """One block's stored KV for all layers, ``[layers, 2, heads, block, width]`` (a view)."""
        return self.data[:, :, :, idx]

    @property
    def block_shape(self) -> tuple[int, ...]:
        d = self.data.shape
        return (d[0], d[1], d[2], d[4], d[5])

    @property
    def bytes(self) -> int:
        return self.data.numel() * self.data.element_size()

    def write(self, layer: int, slots: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Store new tokens' KV at ``layer``: ``keys``/``values`` ``[heads, n, head_dim]`` go to
        ``slots`` ``[n]`` (``block index * block_size + offset``)."""
        flat = self.data[layer - self.first_layer].view(2, self.data.shape[2], -1, self.data.shape[-1])  # [2, heads, blocks * bs, width]
        if self.quantized:
            keys, values = quantize_kv(keys), quantize_kv(values)
        flat[0, :, slots] = keys.to(flat.dtype)
        flat[1, :, slots] = values.to(flat.dtype)

    def read(self, layer: int, blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values ``[heads, len(blocks) * block_size, head_dim]`` of ``blocks`` at ``layer``
        in the compute dtype (one gather; int8 blocks dequantized)."""
        kv = self.data[layer - self.first_layer].index_select(2, blocks)  # [2, heads, nblocks, bs, width]
        kv = kv.view(2, kv.shape[1], -1, kv.shape[-1])
        if self.quantized:
            kv = dequantize_kv(kv, self.dtype)
        return kv[0], kv[1]

    def allocate(self) -> Block:
        """Take the least recently used free block (evicting its cached contents)."""
        if not self.free:
            raise PoolExhaustedError(
                f"all {self.num_blocks} KV blocks ({self.num_blocks * self.block_size} tokens) are in use; "
                "raise the memory budget or context_tokens, or shorten the request"
            )
        idx, _ = self.free.popitem(last=False)
        b = self.blocks[idx]
        if b.hash is not None:
            if self.on_evict is not None:
                self.on_evict(b.hash, self.block(idx))
            del self.by_hash[b.hash]
            b.hash = None
            self.evictions += 1
        b.ref_count = 1
        return b

    def lookup(self, h: bytes) -> Block | None:
        """A cached block with this hash, now referenced once more; None if absent."""
        idx = self.by_hash.get(h)
        if idx is None:
            return None
        b = self.blocks[idx]
        if b.ref_count == 0:
            self.free.pop(idx, None)
        b.ref_count += 1
        return b

    def register(self, b: Block, h: bytes) -> None:
        """Make a full block findable by its hash (a block with the same hash already cached wins)."""
        if b.hash is None and h not in self.by_hash:
            b.hash = h
            self.by_hash[h] = b.index

    def release(self, b: Block) -> None:
        """Drop one reference; an unreferenced block joins the free queue as most recently used."""
        if b.ref_count <= 0:
            raise RuntimeError(f"block {b.index} released more often than taken")
        b.ref_count -= 1
        if b.ref_count == 0:
            self.free[b.index] = None


@dataclass
class Sequence:
    """One sequence's block table and the token ids whose KV it holds."""

    blocks: list[Block] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    hashes: list[bytes] = field(default_factory=list)  # of the full blocks, in order


def slots_for(blocks: list[Block], start: int, n: int, block_size: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Pool slots ``[n]`` of positions ``start .. start + n - 1`` of a sequence with these blocks."""
    pos = torch.arange(start, start + n)
    table = torch.tensor([b.index for b in blocks[start // block_size : (start + n - 1) // block_size + 1]])
    return (table[pos // block_size - start // block_size] * block_size + pos % block_size).to(device)


class PagedLayer(CacheLayerMixin):
    """One decoder layer's view of a sequence's blocks (a transformers cache layer)."""

    is_sliding = False

    def __init__(self, cache: "PagedKVCache", layer: int) -> None:
        super().__init__()
        self.cache, self.layer = cache, layer
        self.is_initialized = True

    def lazy_initialization(self, key_states, value_states) -> None:  # the pool is preallocated
        pass

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        c = self.cache
        if key_states.shape[0] != 1:
            raise ValueError("the paged KV cache holds one sequence; batched prompts use the plain cache")
        start = c.length(self.layer)
        n = key_states.shape[-2]
        c.ensure_capacity(start + n)
        c.pool.write(self.layer, slots_for(c.seq.blocks, start, n, c.pool.block_size, c.pool.device), key_states[0], value_states[0])
        c.lengths[self.layer] = start + n
        return c.gather(self.layer, start + n)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def get_seq_length(self) -> int:
        return self.cache.length(self.layer)

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.cache.lengths[self.layer] = 0

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("the paged KV cache does not crop")


class PagedKVCache(Cache):
    """A transformers ``Cache`` over one :class:`Sequence` of a :class:`BlockPool` (for the
    layers the pool holds; any other layer, run by another pipeline stage, is a dummy)."""

    def __init__(self, pool: BlockPool, seq: Sequence, num_layers: int, cached_tokens: int = 0) -> None:
        self.pool, self.seq = pool, seq
        self._idx: torch.Tensor | None = None
        self.lengths = {i: cached_tokens for i in pool.layers}
        super().__init__(layers=stage_layers(num_layers, pool.layers, lambda i: PagedLayer(self, i)))

    def length(self, layer: int) -> int:
        return self.lengths[layer]

    @property
    def held_tokens(self) -> int:
        """Tokens whose KV every layer of the cache holds."""
        return min(self.lengths.values())

    def ensure_capacity(self, tokens: int) -> None:
        while len(self.seq.blocks) * self.pool.block_size < tokens:
            self.seq.blocks.append(self.pool.allocate())

    def truncate(self, tokens: int) -> None:
        """Keep the KV of the first ``tokens`` tokens only (a rejected draft's leave): blocks past
        them go back to the pool unhashed, so no rejected token is ever registered or spilled;
        the slots after ``tokens`` in the last kept block are written again by the next tokens.

        Raises:
            ValueError: ``tokens`` beyond what the cache holds, or inside the reused prefix
                (its blocks are shared and keyed by their tokens).
        """
        bs = self.pool.block_size
        if not len(self.seq.hashes) * bs <= tokens <= self.held_tokens:
            raise ValueError(f"cannot truncate a cache of {self.held_tokens} tokens to {tokens}: keep between the "
                             f"{len(self.seq.hashes) * bs} reused prefix tokens and what it holds")
        keep = -(-tokens // bs)
        for b in self.seq.blocks[keep:]:
            self.pool.release(b)
        del self.seq.blocks[keep:]
        self.lengths = dict.fromkeys(self.lengths, tokens)
        self._idx = None  # the table changed: a block added later may take another index

    def _index(self, nblocks: int) -> torch.Tensor:
        if self._idx is None or len(self._idx) != nblocks:  # the table only changes when a block is added
            self._idx = torch.tensor([b.index for b in self.seq.blocks[:nblocks]], device=self.pool.device)
        return self._idx

    def gather(self, layer: int, tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values ``[1, kv_heads, tokens, head_dim]`` of this sequence at ``layer``."""
        nblocks = -(-tokens // self.pool.block_size)
        k, v = self.pool.read(layer, self._index(nblocks))
        return k[None, :, :tokens], v[None, :, :tokens]


class PrefixCachingSession:
    """Builds caches that reuse computed prefixes, and files their blocks afterwards.

    Args:
        pool: the block pool.
        salt: what the KV depends on besides the tokens (variant id, compute dtype, KV dtype).
        spill: optional :class:`cache.kvstore.KVSpillStore` for blocks evicted or finished.
        num_layers: the model's layer count.
    """

    def __init__(self, pool: BlockPool, *, salt: str, num_layers: int, spill=None) -> None:
        self.pool, self.salt, self.num_layers, self.spill = pool, salt, num_layers, spill
        if spill is not None:
            pool.on_evict = self._spill_one

    def _spill_one(self, h: bytes, data: torch.Tensor) -> None:
        self.spill.put(h, data)

    def hashes(self, tokens: list[int]) -> list[bytes]:
        return chain_hashes(tokens, self.pool.block_size, self.salt)

    def find(self, h: bytes) -> tuple[Block | None, bool]:
        """The block with key ``h``, referenced once more: from the pool, else loaded from the
        spill store into a new block while the pool has one free. Returns (block or None, whether it came from disk)."""
        b = self.pool.lookup(h)
        if b is None and self.spill is not None and self.pool.free:
            data = self.spill.get(h, shape=self.pool.block_shape, dtype=self.pool.data.dtype)
            if data is not None:
                b = self.pool.allocate()
                self.pool.block(b.index).copy_(data)
                self.pool.register(b, h)
                return b, True
        return b, False

    def start(self, tokens: list[int]) -> tuple[PagedKVCache, int, int]:
        """A cache for ``tokens`` holding the longest reusable prefix.

        Returns (cache, cached tokens, of which loaded from disk). At least the last token is
        always left to prefill, so its logits are computed.
        """
        seq = Sequence()
        bs = self.pool.block_size
        cached = from_disk = 0
        limit = (len(tokens) - 1) // bs  # full blocks that may be reused
        for h in self.hashes(tokens)[:limit]:
            b, disk = self.find(h)
            if b is None:
                break
            from_disk += bs if disk else 0
            seq.blocks.append(b)
            seq.hashes.append(h)
            cached += bs
        seq.tokens = list(tokens[:cached])
        return PagedKVCache(self.pool, seq, self.num_layers, cached), cached, from_disk

    def finish(self, cache: PagedKVCache, tokens: list[int]) -> None:
        """After a request: register its full blocks (``tokens`` = all tokens whose KV the
        cache holds), write them to the spill store, and release the sequence's blocks."""
        seq = cache.seq
        held = min(len(tokens), cache.held_tokens)
        bs = self.pool.block_size
        hashes = self.hashes(tokens[:held])
        for i, h in enumerate(hashes):
            b = seq.blocks[i]
            self.pool.register(b, h)
            if self.spill is not None and b.hash == h:
                self.spill.put(h, self.pool.block(b.index))
        for b in seq.blocks:
            self.pool.release(b)
        seq.blocks = []
        logger.debug("request filed: %d full blocks of %d tokens", len(hashes), bs)


def stage_layers(num_layers: int, held: range, make) -> list:
    """A cache's layer list: ``make(i)`` for the layers in ``held``, transformers' dummy layer
    (no KV, skipped when masks are sized) for the layers other pipeline stages run."""
    from transformers.cache_utils import DummyLayer

    return [make(i) if i in held else DummyLayer() for i in range(num_layers)]


def check_paged(config) -> None:
    """Refuse what the paged cache cannot hold.

    Raises:
        ValueError: the model uses sliding-window attention.
    """
    if getattr(config, "sliding_window", None) and any(
        t == "sliding_attention" for t in (getattr(config, "layer_types", None) or ["sliding_attention"])
    ):
        raise ValueError(
            f"{config.model_type} uses sliding-window attention, which the paged KV cache does not handle; "
            "pass prefix_cache=False"
        )


def pool_for(model, *, kv_dtype: KVDtype | str = KVDtype.AUTO, block_size: int = DEFAULT_BLOCK_SIZE) -> BlockPool:
    """A :class:`BlockPool` in the KV memory a streaming model's plan reserved (``model.context_tokens``
    tokens in the compute dtype): int8 blocks take about half of a bf16 block (a quarter of an
    fp32 one), so the same bytes hold about twice the tokens (four times)."""
    check_paged(model.config)
    layers, heads, dim = kv_shape(model.config)
    from runtime.sizing import Stage

    stage = getattr(model, "stage", None)  # a pipeline stage holds its own layers' KV
    held = stage.layers if isinstance(stage, Stage) else range(layers)
    return BlockPool(
        pool_blocks(model, kv_dtype=kv_dtype, block_size=block_size), block_size=block_size, num_layers=len(held),
        kv_heads=heads, head_dim=dim, dtype=model.dtype, kv_dtype=kv_dtype, first_layer=held.start,
        device=getattr(model, "device", "cpu"),  # the GPU's memory for a CUDA model
    )


def pool_blocks(model, *, kv_dtype: KVDtype | str = KVDtype.AUTO, block_size: int = DEFAULT_BLOCK_SIZE,
                context_tokens: int | None = None) -> int:
    """Blocks of a pool in the KV memory reserved for ``context_tokens`` (default the plan's) in the compute dtype."""
    ctx = model.context_tokens if context_tokens is None else context_tokens
    kv_bytes = ctx * kv_token_bytes(model.config, model.dtype)
    per_block = block_size * kv_token_bytes(model.config, model.dtype, kv_dtype)
    return max(1, kv_bytes // per_block)


def prefix_session_for(model, *, spill=None, block_size: int = DEFAULT_BLOCK_SIZE,
                       kv_dtype: KVDtype | str = KVDtype.AUTO) -> PrefixCachingSession:
    """A :class:`PrefixCachingSession` for a streaming model: a pool in the KV memory its
    budget planned (:func:`pool_for`), keyed by its variant, its dtype and the KV dtype.

    Raises:
        ValueError: the model uses sliding-window attention, which the paged cache does not handle.
    """
    pool = pool_for(model, kv_dtype=kv_dtype, block_size=block_size)
    salt = f"{model.variant_id}:{model.dtype}" + (f":kv-{pool.kv_dtype.value}" if pool.quantized else "")
    return PrefixCachingSession(pool, salt=salt, num_layers=model.config.num_hidden_layers, spill=spill)
