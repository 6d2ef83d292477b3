"""The KV cache of one batched step: many sequences' new tokens in one forward pass.

A step's tokens (one per decoding sequence, a chunk per prefilling one) are flattened into a
single row ``[1, T]`` with their own positions. Each decoder layer's attention then calls
:meth:`BatchedLayer.update`, which writes every new token's K/V into its sequence's blocks
(one indexed store for the whole step) and returns the K/V of all scheduled sequences'
blocks, gathered in one copy and laid end to end ``[1, heads, S, dim]``. A 4-D additive mask
``[1, 1, T, S]`` lets a token see only its own sequence, causally, and never a block's unused
tail. transformers passes a 4-D mask to the attention function as it is, so its own attention
(eager or SDPA) runs unchanged, and every layer runs once per step for the whole batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from runtime.kv import Block, BlockPool, stage_layers


@dataclass(frozen=True)
class SeqSlice:
    """One sequence's part of a step: its block table (covering ``start + n`` tokens), the
    position of its first new token, and how many new tokens it brings."""

    blocks: list[Block]
    start: int
    n: int


@dataclass(frozen=True)
class StepLayout:
    """Where a step's tokens go and what they attend to.

    Attributes:
        slots: ``[T]`` pool slot (``block * block_size + offset``) each new token's KV is written to.
        blocks: ``[NB]`` blocks gathered for attention, sequence after sequence.
        mask: ``[1, 1, T, NB * block_size]`` additive (0 where a token may attend, the dtype's minimum elsewhere).
        position_ids: ``[1, T]`` each new token's position in its sequence.
        last: ``[B]`` index in ``[0, T)`` of each sequence's last new token.
        parts: each sequence's (first new position, new tokens, block indices): what another
            pipeline stage needs to lay out the same step over its own pool.
    """

    slots: torch.Tensor
    blocks: torch.Tensor
    mask: torch.Tensor
    position_ids: torch.Tensor
    last: torch.Tensor
    parts: tuple[tuple[int, int, tuple[int, ...]], ...] = ()

    @property
    def num_tokens(self) -> int:
        return int(self.slots.numel())

    @property
    def kv_tokens(self) -> int:
        return int(self.mask.shape[-1])


def step_layout(pool: BlockPool, parts: list[SeqSlice], dtype: torch.dtype) -> StepLayout:
    """The layout of a step over ``parts`` (each sequence's block table must already hold its new tokens).

    Raises:
        ValueError: no part, a part without new tokens, or a block table too short for its tokens.
    """
    if not parts:
        raise ValueError("a step needs at least one sequence")
    bs = pool.block_size
    slots, blocks, q_seq, q_pos, k_seq, lasts, spans = [], [], [], [], [], [], []
    t = 0
    for i, p in enumerate(parts):
        if p.n < 1:
            raise ValueError(f"sequence {i} of the step brings {p.n} new tokens")
        nb = -(-(p.start + p.n) // bs)
        if len(p.blocks) < nb:
            raise ValueError(f"sequence {i} holds {len(p.blocks)} blocks; its {p.start + p.n} tokens need {nb}")
        indices = tuple(b.index for b in p.blocks[:nb])
        spans.append((p.start, p.n, indices))
        table = torch.tensor(indices)
        pos = torch.arange(p.start, p.start + p.n)
        slots.append(table[pos // bs] * bs + pos % bs)
        blocks.append(table)
        q_seq.append(torch.full((p.n,), i))
        q_pos.append(pos)
        k_seq.append(torch.full((nb * bs,), i))
        t += p.n
        lasts.append(t - 1)
    k_seq_t = torch.cat(k_seq)
    # a key's position in its own sequence: its index in the gathered row less where its sequence starts
    starts = torch.zeros(len(parts), dtype=torch.long)
    starts[1:] = torch.tensor([len(k) for k in k_seq[:-1]]).cumsum(0)
    k_pos = torch.arange(k_seq_t.numel()) - starts[k_seq_t]
    q_seq_t, q_pos_t = torch.cat(q_seq), torch.cat(q_pos)
    allowed = (q_seq_t[:, None] == k_seq_t[None, :]) & (k_pos[None, :] <= q_pos_t[:, None])  # [T, S]
    mask = torch.zeros(allowed.shape, dtype=dtype).masked_fill_(~allowed, torch.finfo(dtype).min)
    dev = pool.device
    return StepLayout(
        slots=torch.cat(slots).to(dev),
        blocks=torch.cat(blocks).to(dev),
        mask=mask[None, None].to(dev),
        position_ids=q_pos_t[None].to(dev),
        last=torch.tensor(lasts, device=dev),
        parts=tuple(spans),
    )


class BatchedLayer(CacheLayerMixin):
    """One decoder layer's view of a step (a transformers cache layer)."""

    is_sliding = False

    def __init__(self, cache: "BatchedPagedCache", layer: int) -> None:
        super().__init__()
        self.cache, self.layer = cache, layer
        self.is_initialized = True

    def lazy_initialization(self, key_states, value_states) -> None:  # the pool is preallocated
        pass

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Write the step's new K/V ``[1, heads, T, dim]``; return every scheduled sequence's K/V ``[1, heads, S, dim]``."""
        c = self.cache
        c.pool.write(self.layer, c.layout.slots, key_states[0], value_states[0])
        k, v = c.pool.read(self.layer, c.layout.blocks)
        return k[None], v[None]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.cache.layout.kv_tokens, 0

    def get_seq_length(self) -> int:
        return self.cache.layout.kv_tokens

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        raise NotImplementedError("a batched step's cache is rebuilt every step")

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("the paged KV cache does not crop")


class BatchedPagedCache(Cache):
    """A transformers ``Cache`` for one batched step over a :class:`BlockPool` (see the module's doc)."""

    def __init__(self, pool: BlockPool, layout: StepLayout, num_layers: int) -> None:
        self.pool, self.layout = pool, layout
        super().__init__(layers=stage_layers(num_layers, pool.layers, lambda i: BatchedLayer(self, i)))


def forward_step(model, pool: BlockPool, layout: StepLayout, input_ids: torch.Tensor, keep: torch.Tensor):
    """One forward pass of a step: ``input_ids`` ``[T]`` laid out by ``layout``; returns float
    logits ``[len(keep), vocab]`` at the flattened positions ``keep``."""
    cache = BatchedPagedCache(pool, layout, model.config.num_hidden_layers)
    out = model.forward(input_ids[None].to(pool.device), cache=cache, use_cache=True, attention_mask=layout.mask,
                        position_ids=layout.position_ids, logits_to_keep=keep.to(pool.device))
    return out.logits[0].float()
