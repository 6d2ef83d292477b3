"""Packed-weight kernels: their private layouts derived from portable records, and proved
before they are trusted.

The cache stores int4 codes in one documented, host-independent layout (planar, see
:class:`cache.codecs.GroupIntCodec`). torch's CPU int4 kernel wants its own packing, which
differs between CPU capabilities (``default``, ``avx2``, ``avx512``) and again on CUDA, so
that packing is never written into the cache. It is produced here by torch's own converter
(``torch._convert_weight_to_int4pack_for_cpu``), and a kernel is used only after it has
multiplied a known matrix correctly in this process (:meth:`Int4CpuKernel.prove`).

Converting costs far less than decoding but more than copying, and a streamed layer is
loaded once per token, so the converted weights are kept in a *derived copy* beside the
cache (:mod:`runtime.derived`), fingerprinted by torch version and CPU capability.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
from torch.nn import functional as F

from cache.codecs import CodecName, get_codec
from cache.record import EncodedTensor

logger = logging.getLogger(__name__)

# relative error (Frobenius, output of a random activation) a kernel may show against the
# dequantized reference: bf16 activations and bf16 scales cost ~0.2-0.5%; a scrambled
# layout gives ~140%
KERNEL_TOLERANCE = 0.03
_CONVERT_ROWS = 4096  # rows converted at once (a multiple of every kernel block): bounds temporaries


class KernelError(RuntimeError):
    """A packed kernel is missing or gave wrong numbers on this host."""


def cpu_capability() -> str:
    """The CPU kernel path torch dispatches to here (``DEFAULT``, ``AVX2``, ``AVX512`` ...);
    ``ATEN_CPU_CAPABILITY`` lowers it."""
    return torch.backends.cpu.get_cpu_capability()


@dataclass(frozen=True)
class Int4Codes:
    """A weight's portable int4 codes: one or more ``int4_group`` records (planar, 4 bits, not
    permuted) stacked along the output rows, used in place (views into the cache's map).

    ``parts``: per record ``(packed [rows, in/2] uint8, scale [rows, groups], offset [rows,
    groups])`` with ``w = q * scale + offset``; low nibbles hold columns ``0 .. in/2``, high
    nibbles the rest."""

    parts: tuple[tuple[torch.Tensor, torch.Tensor, torch.Tensor], ...]
    in_features: int
    group_size: int

    @staticmethod
    def usable(enc: EncodedTensor) -> bool:
        p = enc.params
        return (enc.codec == CodecName.INT4_GROUP.value and p.get("bits", 4) == 4 and p.get("layout") == "planar"
                and not p.get("permuted") and len(enc.shape) == 2 and enc.shape[1] % int(p["group_size"]) == 0
                and enc.shape[1] % 2 == 0)

    @classmethod
    def of(cls, encs: list[EncodedTensor]) -> "Int4Codes":
        """The codes of records stacked in row order.

        Raises:
            ValueError: a record is not planar unpermuted int4, or the records disagree.
        """
        if not encs:
            raise ValueError("Int4Codes needs at least one record")
        bad = [e.params for e in encs if not cls.usable(e)]
        k, gs = encs[0].shape[1], int(encs[0].params["group_size"])
        if bad or any(e.shape[1] != k or int(e.params["group_size"]) != gs for e in encs):
            raise ValueError(f"the rows path takes planar, unpermuted int4 records of one width and group size; got {bad or 'mixed ones'}")
        return cls(tuple((e.parts["packed"].view(e.shape[0], k // 2), e.parts["scale"], e.parts["offset"]) for e in encs), k, gs)

    @property
    def out_features(self) -> int:
        return sum(p.shape[0] for p, _, _ in self.parts)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for part in self.parts for t in part)


@dataclass(frozen=True)
class PackedInt4:
    """One linear weight in the int4 kernel's own layout (never written to the main cache).

    ``packed``: ``[planes * out, in / 2]`` uint8 in the kernel's private order;
    ``scales_and_zeros``: ``[in / group_size, planes * out, 2]`` bf16 with ``w = (q - 8) *
    scale + zero``. With ``planes=2`` the weight is an 8-bit one split into two 4-bit planes
    stacked along the rows (high nibbles first): the product is the sum of the two halves'
    (see :meth:`Int4CpuKernel.split_int8`).
    """

    packed: torch.Tensor
    scales_and_zeros: torch.Tensor
    group_size: int
    planes: int = 1
    # the same weight's portable codes (:class:`Int4Codes`), attached where the
    # plan keeps them mapped, for the rows path (many rows: dequantize + GEMM); None: packed only
    codes: Int4Codes | None = None

    @property
    def out_features(self) -> int:
        return self.packed.shape[0] // self.planes

    def rows(self, r0: int, r1: int) -> "PackedInt4":
        """Output rows ``r0:r1`` (a multiple of the kernel's row block apart), as their own weight."""
        n = self.out_features
        idx = [slice(p * n + r0, p * n + r1) for p in range(self.planes)]
        packed = self.packed[idx[0]] if self.planes == 1 else torch.cat([self.packed[i] for i in idx])
        sz = torch.cat([self.scales_and_zeros[:, i] for i in idx], dim=1)
        return PackedInt4(packed, sz, self.group_size, self.planes)  # without codes: the packed kernel only

    @property
    def nbytes(self) -> int:
        return self.packed.numel() + self.scales_and_zeros.numel() * self.scales_and_zeros.element_size()


class Int4CpuKernel:
    """torch's CPU int4 matmul, ``_weight_int4pack_mm_for_cpu`` (bf16 activations)."""

    name = "torch._weight_int4pack_mm_for_cpu"
    GROUP_SIZES = (32, 64, 128, 256)
    _proved: dict[str, float] = {}  # fingerprint -> measured error, per process

    @staticmethod
    def available() -> bool:
        return hasattr(torch, "_weight_int4pack_mm_for_cpu") and hasattr(torch, "_convert_weight_to_int4pack_for_cpu")

    @classmethod
    def fingerprint(cls) -> str:
        """What the private layout depends on: torch's version and the CPU capability."""
        return f"int4cpu-torch{torch.__version__}-{cpu_capability()}".lower()

    @classmethod
    def eligible(cls, shape: list[int] | tuple[int, ...], params: dict) -> bool:
        """Whether an ``int4_group`` tensor of this shape and codec parameters can run packed."""
        if len(shape) != 2 or params.get("bits", 4) != 4 or params.get("permuted"):
            return False  # a permuted record (its columns reordered before grouping) is dequantized
        n, k = shape
        gs = int(params.get("group_size", 0))
        return gs in cls.GROUP_SIZES and k % gs == 0 and n % 16 == 0

    @staticmethod
    def shapes(shape: list[int] | tuple[int, ...], group_size: int) -> tuple[list[int], list[int]]:
        """Shapes of the packed bytes and of the scales for a ``[out, in]`` weight."""
        n, k = shape
        return [n, k // 2], [k // group_size, n, 2]

    @classmethod
    def _require(cls) -> None:
        if not cls.available():
            raise KernelError(
                f"torch {torch.__version__} has no CPU int4 kernel (torch._weight_int4pack_mm_for_cpu); "
                "install the locked torch (`make setup`) or compute in float32 (--dtype float32)"
            )

    @classmethod
    def pack(cls, enc: EncodedTensor) -> PackedInt4:
        """Convert a portable ``int4_group`` record into the kernel's layout, with torch's converter."""
        n, k = enc.shape
        gs = int(enc.params["group_size"])
        codec = get_codec(CodecName.INT4_GROUP)
        scale = enc.parts["scale"].float()  # [out, groups]
        zero = enc.parts["offset"].float() + 8 * scale  # the kernel centres codes on 8
        return cls._pack_codes(n, k, lambda plane, rows: codec.unpack(enc, rows)[:, :k], scale, zero, gs)

    @classmethod
    def _pack_codes(cls, n: int, k: int, codes_of, scale: torch.Tensor, zero: torch.Tensor, gs: int, planes: int = 1) -> PackedInt4:
        """Pack ``codes_of(plane, rows)`` ([rows, k] codes 0..15 of a slice of a plane's ``n``
        rows) with torch's converter, a block of rows at a time, planes stacked along the rows;
        ``scale``, ``zero``: ``[planes * n, k / gs]``."""
        cls._require()
        packed = torch.empty(planes * n, k // 2, dtype=torch.uint8)
        for p in range(planes):
            for r0 in range(0, n, _CONVERT_ROWS):
                rows = slice(r0, min(n, r0 + _CONVERT_ROWS))
                codes = codes_of(p, rows).to(torch.int32)
                packed[p * n + rows.start : p * n + rows.stop] = torch._convert_weight_to_int4pack_for_cpu(codes, 2)
        sz = torch.stack([scale, zero], dim=-1).transpose(0, 1).contiguous().to(torch.bfloat16)  # [groups, out, 2]
        return PackedInt4(packed, sz, gs, planes)

    @classmethod
    def split_group_size(cls, k: int) -> int | None:
        """The group size an 8-bit weight of ``k`` columns is split with (its scale is per row,
        so the largest that divides ``k``), or None when none does."""
        return next((g for g in sorted(cls.GROUP_SIZES, reverse=True) if k % g == 0), None)

    @classmethod
    def split_int8(cls, enc: EncodedTensor) -> PackedInt4:
        """An ``int8_channel`` record with bf16 scales as two 4-bit planes the int4 kernel runs:
        with ``u = q + 128 = 16 h + l``, ``w = s q = (h - 8) 16s + 8s`` plus ``(l - 8) s``.
        Every scale and zero is exact in bf16 (``s`` is stored in bf16; the others are ``s``
        times a power of two), and the kernel dequantizes and accumulates in fp32, so the two
        halves sum to the stored weights' product up to the rounding of each half's bf16
        output: as many bytes as int8, at the int4 kernel's speed."""
        n, k = enc.shape
        gs = cls.split_group_size(k)
        s = enc.parts["scale"].float()[:, None].expand(n, k // gs)
        q = enc.parts["q"]

        def codes_of(plane: int, rows: slice) -> torch.Tensor:
            u = q[rows].to(torch.int32) + 128  # [rows, k], 1..255
            return u >> 4 if plane == 0 else u & 15

        # both halves centred on their codes' middle, so neither carries a large common offset
        # whose bf16 rounding would not cancel: 16s (h - 8) + 8s  and  s (l - 8)
        return cls._pack_codes(n, k, codes_of, torch.cat([16 * s, s]), torch.cat([8 * s, torch.zeros_like(s)]), gs, planes=2)

    @classmethod
    def splittable(cls, shape: list[int] | tuple[int, ...], params: dict) -> bool:
        """Whether an ``int8_channel`` tensor can run as two planes: bf16 scales (exact in the
        kernel), rows in whole kernel blocks (64), and a group size that divides the columns."""
        return (len(shape) == 2 and params.get("scale_dtype") == "bfloat16" and shape[0] % 64 == 0
                and cls.split_group_size(shape[1]) is not None)

    @staticmethod
    def matmul(x: torch.Tensor, w: PackedInt4) -> torch.Tensor:
        """``x @ W.T`` for bf16 ``x [..., in]``."""
        x2 = x.reshape(-1, x.shape[-1])
        y = torch._weight_int4pack_mm_for_cpu(x2, w.packed, w.group_size, w.scales_and_zeros)
        if w.planes == 2:
            n = w.out_features
            y = y[:, :n] + y[:, n:]
        return y.view(*x.shape[:-1], y.shape[-1])

    @classmethod
    def check(cls, enc: EncodedTensor, w: PackedInt4, what: str, *, rows: int = 4, sample_outputs: int = 256) -> float:
        """Run the kernel on random activations against the dequantized weight (fp32 matmul of
        the same bf16 activations); return the relative error, or raise :class:`KernelError`.

        The kernel runs on the whole packed weight; the reference is computed for
        ``sample_outputs`` evenly spaced output rows (all of them when fewer), whose records are
        decoded alone: a wrong layout scrambles every row, and checking an 8 B model in full
        would cost minutes of dequantizing."""
        gen = torch.Generator().manual_seed(0)
        n = enc.shape[0]
        x = torch.randn(rows, enc.shape[1], generator=gen).to(torch.bfloat16)
        idx = torch.linspace(0, n - 1, min(n, sample_outputs)).round().long().unique()
        sub = EncodedTensor(enc.codec, (len(idx), enc.shape[1]), enc.dtype, {k: v[idx] for k, v in enc.parts.items()}, enc.params)
        ref = F.linear(x.float(), get_codec(enc.codec).decode(sub, torch.float32))
        got = cls.matmul(x, w).float()[:, idx]
        err = float((got - ref).norm() / ref.norm().clamp_min(1e-30))
        if not math.isfinite(err) or err > KERNEL_TOLERANCE:
            raise KernelError(
                f"kernel {cls.name} gives wrong numbers for {what} on this host: relative error {err:.3g} "
                f"against the dequantized weights (allowed {KERNEL_TOLERANCE}); torch {torch.__version__}, "
                f"CPU capability {cpu_capability()}. Nothing was computed with it. Compute in float32 "
                "(--dtype float32, which dequantizes) and report this"
            )
        return err

    @classmethod
    def prove(cls) -> float:
        """Once per process: quantize a known matrix, pack it with torch's converter and check
        the kernel against the dequantized reference. Returns the measured error.

        Raises:
            KernelError: the kernel is missing or wrong here.
        """
        fp = cls.fingerprint()
        if fp in cls._proved:
            return cls._proved[fp]
        gen = torch.Generator().manual_seed(1234)
        w = torch.randn(96, 256, generator=gen)
        enc = get_codec(CodecName.INT4_GROUP).encode(w, group_size=32)
        err = cls.check(enc, cls.pack(enc), "a 96x256 test matrix", rows=5)
        cls._proved[fp] = err
        logger.info("kernel %s proved on %s (relative error %.2e)", cls.name, fp, err)
        return err
