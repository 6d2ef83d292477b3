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
cache (``<cache>/derived/<fingerprint>``), fingerprinted by torch version and CPU
capability: a cache moved to another host derives its own copy on first use. Every derived
tensor is checked against its dequantized reference when it is written.
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass

import torch
from torch.nn import functional as F
from tqdm.auto import tqdm

from cache.codecs import CodecName, get_codec
from cache.manifest import GroupEntry, TensorEntry
from cache.record import EncodedTensor, encode_record
from cache.store import LayerStore

logger = logging.getLogger(__name__)

# relative error (Frobenius, output of a random activation) a kernel may show against the
# dequantized reference: bf16 activations and bf16 scales cost ~0.2-0.5%; a scrambled
# layout gives ~140%
KERNEL_TOLERANCE = 0.03
DERIVED_DIR = "derived"
_CONVERT_ROWS = 4096  # rows converted at once (a multiple of every kernel block): bounds temporaries


class KernelError(RuntimeError):
    """A packed kernel is missing or gave wrong numbers on this host."""


def cpu_capability() -> str:
    """The CPU kernel path torch dispatches to here (``DEFAULT``, ``AVX2``, ``AVX512`` ...);
    ``ATEN_CPU_CAPABILITY`` lowers it."""
    return torch.backends.cpu.get_cpu_capability()


@dataclass(frozen=True)
class PackedInt4:
    """One linear weight in the int4 kernel's own layout (never written to the main cache).

    ``packed``: ``[out, in / 2]`` uint8 in the kernel's private order; ``scales_and_zeros``:
    ``[in / group_size, out, 2]`` bf16 with ``w = (q - 8) * scale + zero``.
    """

    packed: torch.Tensor
    scales_and_zeros: torch.Tensor
    group_size: int

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
    def pack(cls, enc: EncodedTensor) -> PackedInt4:
        """Convert a portable ``int4_group`` record into the kernel's layout, with torch's converter."""
        if not cls.available():
            raise KernelError(
                f"torch {torch.__version__} has no CPU int4 kernel (torch._weight_int4pack_mm_for_cpu); "
                "install the locked torch (`make setup`) or compute in float32 (--dtype float32)"
            )
        n, k = enc.shape
        gs = int(enc.params["group_size"])
        codec = get_codec(CodecName.INT4_GROUP)
        packed = torch.empty(n, k // 2, dtype=torch.uint8)
        for r0 in range(0, n, _CONVERT_ROWS):
            rows = slice(r0, min(n, r0 + _CONVERT_ROWS))
            codes = codec.unpack(enc, rows)[:, :k].to(torch.int32)  # [rows, in]
            packed[rows] = torch._convert_weight_to_int4pack_for_cpu(codes, 2)
            del codes
        scale = enc.parts["scale"].float()  # [out, groups]
        zero = enc.parts["offset"].float() + 8 * scale  # the kernel centres codes on 8
        sz = torch.stack([scale, zero], dim=-1).transpose(0, 1).contiguous().to(torch.bfloat16)  # [groups, out, 2]
        return PackedInt4(packed, sz, gs)

    @staticmethod
    def matmul(x: torch.Tensor, w: PackedInt4) -> torch.Tensor:
        """``x @ W.T`` for bf16 ``x [..., in]``."""
        x2 = x.reshape(-1, x.shape[-1])
        y = torch._weight_int4pack_mm_for_cpu(x2, w.packed, w.group_size, w.scales_and_zeros)
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


def derived_store_path(cache_path, fingerprint: str):
    """Where the derived copy for a kernel fingerprint lives beside a cache."""
    return cache_path / DERIVED_DIR / re.sub(r"[^a-z0-9._-]", "_", fingerprint)


def ensure_derived_int4(store: LayerStore, vid: str, groups: list[GroupEntry], names: set[str], *, progress: bool = True) -> LayerStore:
    """Open (building what is missing) the derived copy that holds ``names`` in the CPU int4
    kernel's layout. Each group is written in one transaction, so a killed build resumes;
    each tensor is checked against its dequantized reference before it is written.

    Raises:
        KernelError: the kernel is missing or wrong on this host.
    """
    kernel = Int4CpuKernel
    kernel.prove()
    path = derived_store_path(store.path, kernel.fingerprint())

    def missing(st: LayerStore) -> list[GroupEntry]:
        return [g for g in groups if any(t.name in names for t in g.tensors) and st.get_group(vid, g.name) is None]

    if (path / "data.mdb").exists():
        ro = LayerStore(path, readonly=True)
        if not missing(ro):
            return ro
        ro.close()
    try:
        derived = LayerStore(path)
    except OSError as e:
        raise KernelError(
            f"the packed int4 kernel needs its weights derived into {path}, which cannot be written ({e}); "
            "make the cache directory writable, or compute in float32 (--dtype float32)"
        ) from e
    try:
        todo = missing(derived)
        logger.info("deriving %s weights for %d groups into %s", kernel.fingerprint(), len(todo), path)
        for g in tqdm(todo, desc=f"derive {kernel.fingerprint()}", unit="layer", disable=not progress):
            _derive_group(store, derived, vid, g, names)
    finally:
        derived.close()
    return LayerStore(path, readonly=True)


def _derive_group(store: LayerStore, derived: LayerStore, vid: str, g: GroupEntry, names: set[str]) -> None:
    kernel = Int4CpuKernel
    entries, records = [], {}
    for t in g.tensors:
        if t.name not in names:
            continue
        enc = store.get_record(vid, t.name)
        w = kernel.pack(enc)
        kernel.check(enc, w, t.name)
        parts = {"packed": w.packed, "scales_and_zeros": w.scales_and_zeros}
        params = {"kernel": kernel.fingerprint(), "group_size": w.group_size}
        rec, info = encode_record(EncodedTensor("kernel_pack", tuple(t.shape), "bfloat16", parts, params), compress_level=0)
        records[t.name] = rec
        entries.append(
            TensorEntry(t.name, g.name, "kernel_pack", list(t.shape), "bfloat16", t.original_bytes, info.raw_len,
                        info.stored_len, False, t.rel_mse, t.max_abs_err, params={"group_size": w.group_size})
        )
    derived.put_group(vid, GroupEntry(g.name, entries), records)


def packed_from_record(enc: EncodedTensor) -> PackedInt4:
    """A derived record's parts as a :class:`PackedInt4` (views into the record)."""
    return PackedInt4(enc.parts["packed"], enc.parts["scales_and_zeros"], int(enc.params["group_size"]))
