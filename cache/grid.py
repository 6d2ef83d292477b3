"""The integer grid of the group-wise codecs (int4, int3, int2), as plain tensor functions.

One group of ``group_size`` weights along a row is stored as codes ``q`` in ``0 .. 2**bits - 1``
and two 16-bit numbers, ``scale`` and ``offset``; it decodes as ``w = q * scale + offset``
(the formula every decoder and kernel of sli reads). How ``scale`` and ``offset`` are chosen
is the encoder's business, and is all this module decides:

- ``asymmetric`` (the default): the grid spans the group's range with an *integer zero
  point*: ``scale = (max - min) / levels``, ``zp = round(-min / scale)`` clamped to the codes,
  ``offset = -zp * scale``. Zero is then a grid point (up to the fp16 rounding of the offset,
  under 1% of a step), so the many weights near zero decode near zero: their rounding errors
  do not share one sign across a group, as they do when the grid starts at the group's
  minimum and zero falls anywhere between two codes.
  Before record format 3 the offset was the group's minimum itself; the integer zero point
  measures better on held-out text (``docs/results/quality.md``).
- ``symmetric``: ``scale = absmax / (levels / 2)`` and ``offset = -(levels + 1) / 2 * scale``:
  codes ``0 .. levels`` stand for ``-8 .. 7`` (4-bit), the grid of GPTQ's and
  compressed-tensors' symmetric schemes.

GPTQ (``sli.offline.gptq``) quantizes column by column on exactly this grid, so a calibrated
record is read by the same decoder and kernels as a round-to-nearest one.

Codes are packed in bit planes, each in the planar layout: a plane of ``b`` bits holds
``8 // b`` codes per byte, byte ``j`` of a row holding codes ``j, j + w, j + 2w, ...`` (``w`` =
padded columns / codes per byte) at bit offsets ``0, b, 2b, ...``. int4 and int2 have one
plane; int3 has two (its low 2 bits, then its high bit), 3 bits a weight in all.
"""

from __future__ import annotations

import torch

# bit planes per code width: (bits in the plane, shift of those bits within the code)
PLANES: dict[int, tuple[tuple[int, int], ...]] = {4: ((4, 0),), 3: ((2, 0), (1, 2)), 2: ((2, 0),)}
PLANE_PARTS = ("packed", "packed_hi")  # part names of the planes, in order


def columns_multiple(bits: int) -> int:
    """Padded columns (and group sizes) must be a multiple of this: every plane packs whole bytes."""
    return max(8 // b for b, _ in PLANES[bits])


def group_grid(
    g: torch.Tensor, bits: int, *, symmetric: bool = False, scale_dtype: torch.dtype = torch.float16
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and offset of each group, rounded to ``scale_dtype`` (what is stored).

    Args:
        g: ``[..., group_size]`` float32 weights, one group per last-dim row.
        bits: code width.
        symmetric: the symmetric grid (see the module docstring); else asymmetric with an
            integer zero point.

    Returns:
        ``scale``, ``offset``: ``g.shape[:-1]``, in ``scale_dtype``.
    """
    levels = (1 << bits) - 1
    if symmetric:
        scale = (g.abs().amax(dim=-1) / (levels / 2)).clamp_min(1e-8).to(scale_dtype)
        return scale, (-((levels + 1) // 2) * scale.float()).to(scale_dtype)
    lo, hi = torch.aminmax(g, dim=-1)
    return affine_grid(lo, hi, bits, scale_dtype=scale_dtype)


def affine_grid(lo: torch.Tensor, hi: torch.Tensor, bits: int, *, scale_dtype: torch.dtype = torch.float16) -> tuple[torch.Tensor, torch.Tensor]:
    """The asymmetric grid from each group's range ``[lo, hi]``: integer zero point, offset
    ``-zp * scale`` computed from the stored (rounded) scale."""
    levels = (1 << bits) - 1
    lo, hi = lo.clamp(max=0), hi.clamp(min=0)  # the range holds zero, so the zero point is a code
    scale = ((hi - lo) / levels).clamp_min(1e-8).to(scale_dtype)
    sf = scale.float()
    zp = torch.round(-lo / sf).clamp_(0, levels)
    return scale, (-zp * sf).to(scale_dtype)


def quantize_codes(x: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, bits: int) -> torch.Tensor:
    """Round-to-nearest codes of ``x`` on the grid (float tensor of integers; broadcasts)."""
    return torch.round((x - offset.float()) / scale.float()).clamp_(0, (1 << bits) - 1)


def pack_codes(q: torch.Tensor, bits: int) -> dict[str, torch.Tensor]:
    """Pack codes ``[rows, cols_padded]`` (uint8) into their bit planes (see the module docstring)."""
    rows, cols = q.shape
    out = {}
    for (pb, shift), name in zip(PLANES[bits], PLANE_PARTS):
        per = 8 // pb
        if cols % per:
            raise ValueError(f"{cols} padded columns do not fill whole bytes of {per} {pb}-bit codes")
        plane = ((q >> shift) & ((1 << pb) - 1)).reshape(rows, per, cols // per)
        packed = plane[:, 0].clone()
        for i in range(1, per):
            packed |= plane[:, i] << (i * pb)
        out[name] = packed.contiguous()
    return out


def unpack_codes(parts: dict[str, torch.Tensor], bits: int, rows: slice | None = None) -> torch.Tensor:
    """Codes ``[rows, cols_padded]`` (uint8) from the bit planes (``rows``: a slice of them)."""
    q = None
    for (pb, shift), name in zip(PLANES[bits], PLANE_PARTS):
        packed = parts[name] if rows is None else parts[name][rows]
        mask = (1 << pb) - 1
        plane = torch.cat([(packed >> (i * pb)) & mask for i in range(8 // pb)], dim=1)
        q = plane if q is None else q | (plane << shift)
    return q


def inverse_permutation(perm: torch.Tensor) -> torch.Tensor:
    """``inv`` with ``inv[perm[i]] = i``."""
    inv = torch.empty_like(perm)
    inv[perm.long()] = torch.arange(perm.numel(), dtype=perm.dtype)
    return inv
