"""Dense prefill: for a chunk of many tokens, a packed int4 linear dequantizes its portable
records into a bf16 scratch block by block and runs dense matmuls (oneDNN: AMX or AVX-512
BF16 where the CPU has them) instead of the int4 kernel, whose cost grows with every token
of the chunk. Decode (one token) stays on the packed kernel.

The portable records are the main cache's ``int4_group`` records (planar codes, fp16 scale
and offset per group): the same weights the derived copy packs, read through the same map.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.nn import functional as F

from cache.codecs import get_codec
from cache.record import EncodedTensor

# The scratch holds this many weights at most (bf16): a block of output rows is decoded into
# it and multiplied, then the next block.
SCRATCH_ELEMS = 4 << 20


@dataclass
class DenseSource:
    """The portable records a packed weight was made from, in row order (views into the map)."""

    records: list[EncodedTensor]

    @property
    def out_features(self) -> int:
        return sum(r.shape[0] for r in self.records)


class DenseScratch:
    """One bf16 buffer the dense path decodes weight blocks into (shared by every linear of a
    model: layers run one at a time)."""

    def __init__(self, elems: int = SCRATCH_ELEMS) -> None:
        self.elems = elems
        self.buf: torch.Tensor | None = None

    def block(self, rows: int, cols: int) -> torch.Tensor:
        if self.buf is None:
            self.buf = torch.empty(self.elems, dtype=torch.bfloat16)
        return self.buf[: rows * cols].view(rows, cols)

    def rows_per_block(self, cols: int) -> int:
        return max(16, self.elems // cols // 16 * 16)


def _row_slice(enc: EncodedTensor, r0: int, r1: int) -> EncodedTensor:
    """Rows ``r0:r1`` of a group-int record (every part is indexed by row): views, no copy."""
    return EncodedTensor(enc.codec, (r1 - r0, enc.shape[1]), enc.dtype, {k: v[r0:r1] for k, v in enc.parts.items()}, enc.params)


def dense_linear(x: torch.Tensor, src: DenseSource, scratch: DenseScratch) -> torch.Tensor:
    """``x @ W.T`` for bf16 ``x [..., in]``, W decoded from ``src`` one block of rows at a time."""
    x2 = x.reshape(-1, x.shape[-1])
    out = torch.empty(x2.shape[0], src.out_features, dtype=x.dtype)
    col = 0
    for enc in src.records:
        n, k = enc.shape
        codec = get_codec(enc.codec)
        step = scratch.rows_per_block(k)
        for r0 in range(0, n, step):
            r1 = min(n, r0 + step)
            w = codec.decode_into(_row_slice(enc, r0, r1), scratch.block(r1 - r0, k))
            out[:, col + r0 : col + r1] = F.linear(x2, w)
        col += n
    return out.view(*x.shape[:-1], src.out_features)


def scratch_bytes(elems: int = SCRATCH_ELEMS) -> int:
    return elems * 2


__all__ = ["DenseScratch", "DenseSource", "SCRATCH_ELEMS", "dense_linear", "scratch_bytes"]
