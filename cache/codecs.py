"""Tensor codecs shared by the quantizing writer and the streaming reader.

A codec turns one floating-point tensor into an :class:`~cache.record.EncodedTensor`
(named parts plus parameters) and back. Codecs are looked up by :class:`CodecName`, the
name stored in every record header, never guessed from tensor names.

Library use: the LLM.int8 and 4-bit NF4/FP4 codecs are bitsandbytes' own quantizers
(``int8_vectorwise_quant``, ``quantize_4bit``/``dequantize_4bit``), which run on CPU.
Written here: the per-channel int8 codec (the layout torch's ``_weight_int8pack_mm``
consumes) and the group-wise int4/int3/int2 codecs (one scale and one offset per group, the
grid of :mod:`cache.grid`), because no maintained library ships a CPU round trip for them.
"""

from __future__ import annotations

import json
import logging
import threading
from abc import ABC, abstractmethod
from enum import Enum
from typing import Any

import torch

from cache.grid import PLANE_PARTS, PLANES, columns_multiple, group_grid, inverse_permutation, pack_codes, quantize_codes, unpack_codes
from cache.wgrid import group_importance, weighted_group_grid
from cache.record import EncodedTensor, dtype_from_name, dtype_name

logger = logging.getLogger(__name__)


def _bnb_functional():
    """bitsandbytes' functional module, or an ImportError that names the fix.

    Only encoding (quantizing) needs it: every codec decodes in torch. On CPUs with
    AVX512-BF16, importing bitsandbytes 0.50 tries to fetch an optional fused CPU 4-bit matmul
    (``gemm_4bit_forward``) from a model hub through the ``kernels`` package and logs a warning
    when it cannot. That kernel only serves bitsandbytes' own ``gemv_4bit`` (its Linear4bit at
    inference), which sli never calls, so that one warning is dropped while importing and
    said at debug level in sli's words instead.
    """
    import sys

    first = "bitsandbytes" not in sys.modules
    hub_kernel = _DropBnbHubKernelWarning()
    bnb_cpu_log = logging.getLogger("bitsandbytes.backends.cpu.ops")
    bnb_cpu_log.addFilter(hub_kernel)
    try:
        import bitsandbytes.functional as bnbf
    except ImportError as e:
        raise ImportError(
            f"bitsandbytes is required for the int8 (LLM.int8), nf4 and fp4 codecs ({e}); "
            "install it: pip install 'bitsandbytes>=0.41.0'"
        ) from e
    finally:
        bnb_cpu_log.removeFilter(hub_kernel)
    if first and hub_kernel.dropped:
        logger.debug("bitsandbytes' optional fused CPU 4-bit matmul is not installed (%s); sli does not use it: "
                     "nf4/fp4 records are decoded by sli's own table lookup", hub_kernel.dropped[0])
    return bnbf


class _DropBnbHubKernelWarning(logging.Filter):
    """Drops bitsandbytes' import-time warning about its hub-fetched CPU kernel (see :func:`_bnb_functional`)."""

    def __init__(self) -> None:
        super().__init__()
        self.dropped: list[str] = []

    def filter(self, record: logging.LogRecord) -> bool:
        if record.getMessage().startswith("Failed to load CPU gemm_4bit_forward"):
            self.dropped.append(str(record.args[0]) if record.args else record.getMessage())
            return False
        return True


class CodecName(str, Enum):
    """Names of the codecs, as stored in record headers."""

    RAW = "raw"
    INT8_OUTLIER = "int8_outlier"  # LLM.int8: int8 rows + scales, outlier columns in 16-bit
    INT8_CHANNEL = "int8_channel"  # symmetric per-output-channel int8
    NF4 = "nf4"  # bitsandbytes 4-bit NormalFloat
    FP4 = "fp4"  # bitsandbytes 4-bit float
    INT4_GROUP = "int4_group"  # group-wise 4-bit, two per byte
    INT3_GROUP = "int3_group"  # group-wise 3-bit: a 2-bit and a 1-bit plane
    INT2_GROUP = "int2_group"  # asymmetric group-wise 2-bit, four per byte


class Codec(ABC):
    """Encode a tensor into parts and decode it back.

    Contract: ``decode(encode(w, ...), dtype)`` has ``w``'s shape and the requested dtype.
    """

    name: CodecName

    @abstractmethod
    def encode(self, w: torch.Tensor, **params: Any) -> EncodedTensor:
        """Encode ``w`` (any floating dtype, CPU)."""

    @abstractmethod
    def decode(self, enc: EncodedTensor, dtype: torch.dtype) -> torch.Tensor:
        """Rebuild the tensor in ``dtype``."""

    def encode_measured(self, w: torch.Tensor, **params: Any) -> tuple[EncodedTensor, dict[str, float]]:
        """Encode ``w`` and measure the error of the weights decoded to float32 against it
        (:func:`tensor_error`'s keys): the codec's own error, before any rounding to a compute
        dtype. Codecs override it to measure while encoding."""
        enc = self.encode(w, **params)
        return enc, tensor_error(w, self.decode(enc, torch.float32))

    def fake_quantize(self, w: torch.Tensor, **params: Any) -> torch.Tensor:
        """``decode(encode(w, **params), float32)``: what the codec would store, as float32
        weights (searches such as AWQ's call this many times; codecs skip the packing)."""
        return self.decode(self.encode(w, **params), torch.float32)

    def decode_into(self, enc: EncodedTensor, out: torch.Tensor) -> torch.Tensor:
        """Rebuild the tensor into ``out`` (its shape, any float dtype); returns ``out``.

        The streaming executor decodes into preallocated slot buffers through this, so a
        layer load allocates at most one tensor's temporaries. Codecs override it to skip
        the intermediate tensor where they can.
        """
        return out.copy_(self.decode(enc, out.dtype))

    def _check_2d(self, w: torch.Tensor) -> None:
        if w.ndim != 2:
            raise ValueError(f"codec {self.name.value} needs a 2-D weight, got shape {tuple(w.shape)}")


class RawCodec(Codec):
    """Keep the tensor as it is, optionally cast to a storage dtype."""

    name = CodecName.RAW

    def encode(self, w: torch.Tensor, *, storage_dtype: torch.dtype | None = None, **_: Any) -> EncodedTensor:
        t = w if storage_dtype is None else w.to(storage_dtype)
        return EncodedTensor(self.name.value, tuple(w.shape), dtype_name(t.dtype), {"data": t.contiguous()})

    def decode(self, enc: EncodedTensor, dtype: torch.dtype) -> torch.Tensor:
        return enc.parts["data"].to(dtype)

    def decode_into(self, enc: EncodedTensor, out: torch.Tensor) -> torch.Tensor:
        return out.copy_(enc.parts["data"].view(out.shape))


class Int8OutlierCodec(Codec):
    """LLM.int8-style weights: int8 rows with absmax scales; columns holding any value at or
    above ``threshold`` in magnitude are zeroed in the int8 part and kept in 16-bit."""

    name = CodecName.INT8_OUTLIER

    def encode(self, w: torch.Tensor, *, threshold: float = 6.0, outlier_dtype=torch.bfloat16, **_: Any) -> EncodedTensor:
        bnbf = _bnb_functional()

        self._check_2d(w)
        w32 = w.float()
        q, row_scale, outlier_cols = bnbf.int8_vectorwise_quant(w32, threshold=float(threshold))
        if outlier_cols is None:
            outlier_cols = torch.empty(0, dtype=torch.int32)
        outlier_cols = outlier_cols.to(torch.int32)
        parts = {
            "q": q.contiguous(),  # [out, in] int8
            "scale": row_scale.float().contiguous(),  # [out] absmax per row
            "outlier_cols": outlier_cols.contiguous(),  # [k]
            "outlier_w": w32[:, outlier_cols.long()].to(outlier_dtype).contiguous(),  # [out, k]
        }
        return EncodedTensor(self.name.value, tuple(w.shape), dtype_name(w.dtype), parts, {"threshold": float(threshold)})

    def decode(self, enc: EncodedTensor, dtype: torch.dtype) -> torch.Tensor:
        p = enc.parts
        w = p["q"].float() * (p["scale"].float() / 127.0)[:, None]
        if p["outlier_cols"].numel():
            w[:, p["outlier_cols"].long()] = p["outlier_w"].float()
        return w.to(dtype)

    def decode_into(self, enc: EncodedTensor, out: torch.Tensor) -> torch.Tensor:
        p = enc.parts
        out.copy_(p["q"])
        out.mul_((p["scale"].float() / 127.0).to(out.dtype)[:, None])
        if p["outlier_cols"].numel():
            out[:, p["outlier_cols"].long()] = p["outlier_w"].to(out.dtype)
        return out


class Int8ChannelCodec(Codec):
    """Symmetric int8 per output channel (row): ``w ≈ q * scale[:, None]``; q in [-127, 127].

    ``scale_dtype``: how the scales are stored. float32 (default), or bfloat16 with each
    scale rounded up to a bfloat16 value, so that kernels reading bf16 scales compute with
    exactly the stored weights (the vocabulary rows are stored this way)."""

    name = CodecName.INT8_CHANNEL

    def encode(self, w: torch.Tensor, *, scale_dtype: torch.dtype | str = torch.float32, **_: Any) -> EncodedTensor:
        self._check_2d(w)
        scale_dtype = dtype_from_name(scale_dtype.removeprefix("torch.")) if isinstance(scale_dtype, str) else scale_dtype
        w32 = w.float()
        scale = (w32.abs().amax(dim=1) / 127.0).clamp_min(1e-12)  # [out]
        if scale_dtype == torch.bfloat16:
            # a bf16 step above the exact scale (bf16 spacing is 2^-8 relative; nearest rounding
            # of s * (1 + 2^-8) stays above s), so every |q| stays within 127
            scale = (scale * (1 + 2**-8)).to(torch.bfloat16)
        elif scale_dtype != torch.float32:
            raise ValueError(f"int8_channel scales are float32 or bfloat16, got {scale_dtype}")
        q = torch.round(w32 / scale.float()[:, None]).clamp_(-127, 127).to(torch.int8)
        params = {"scale_dtype": "bfloat16"} if scale_dtype == torch.bfloat16 else {}
        return EncodedTensor(self.name.value, tuple(w.shape), dtype_name(w.dtype), {"q": q, "scale": scale.contiguous()}, params)

    def decode(self, enc: EncodedTensor, dtype: torch.dtype) -> torch.Tensor:
        return (enc.parts["q"].float() * enc.parts["scale"].float()[:, None]).to(dtype)

    def decode_into(self, enc: EncodedTensor, out: torch.Tensor) -> torch.Tensor:
        out.copy_(enc.parts["q"])
        return out.mul_(enc.parts["scale"].to(out.dtype)[:, None])


# Elements of a 4-bit tensor decoded per step: the float32 scratch (1 MiB) and its index stay
# in cache, and a decode allocates no tensor-sized temporary.
_4BIT_CHUNK = 1 << 18
_PAIR_TABLES: dict[tuple[str, bytes], torch.Tensor] = {}
_SCRATCH = threading.local()  # per thread: the loader may decode on a prefetch thread too


def _pair_table(code: torch.Tensor) -> torch.Tensor:
    """The values of the 256 byte values of a 4-bit codebook, as ``[256]`` int64 holding two
    float32 each: (code[byte >> 4], code[byte & 15]), the first element in the high nibble, as
    bitsandbytes packs. One lookup per byte then yields both of its elements."""
    code = code.detach().float().contiguous()
    key = (str(code.device), code.cpu().numpy().tobytes())
    table = _PAIR_TABLES.get(key)
    if table is None:
        if code.numel() != 16:
            raise ValueError(f"a 4-bit codebook has 16 entries, this record holds {code.numel()}")
        with torch.inference_mode(False):  # kept across calls: a normal tensor, usable in and out of inference mode
            pairs = torch.stack([code.repeat_interleave(16), code.repeat(16)], dim=1).contiguous()  # [256, 2] float32
            table = _PAIR_TABLES.setdefault(key, pairs.view(torch.int64).view(256))
    return table


def _scratch(step: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """This thread's float32 values (``step`` + 2) and int32 byte indices (``step // 2 + 1``),
    reused across decodes: fresh buffers would be faulted in page by page every time."""
    key = (str(device), step)
    bufs = getattr(_SCRATCH, "bufs", None)
    if bufs is None or bufs[0] != key:
        # kept across calls, so made outside inference mode whatever the caller is in: an
        # inference tensor could not be written by a later decode outside it (a model that
        # decodes its kept layers at load, after another one generated)
        with torch.inference_mode(False):
            bufs = _SCRATCH.bufs = (key, torch.empty(step + 2, dtype=torch.float32, device=device),
                                    torch.empty(step // 2 + 1, dtype=torch.int32, device=device))
    return bufs[1], bufs[2]


def _scale_blocks_(values: torch.Tensor, scales: torch.Tensor, blocksize: int) -> torch.Tensor:
    """In place, float32: ``values[i] *= scales[i // blocksize]`` (flat; the last block may be partial)."""
    n = values.numel()
    full = n - n % blocksize
    if full:
        values[:full].view(-1, blocksize).mul_(scales[: full // blocksize, None])
    if full < n:
        values[full:].mul_(scales[full // blocksize])
    return values


def dequantize_4bit_into(packed: torch.Tensor, code: torch.Tensor, absmax: torch.Tensor, blocksize: int, out: torch.Tensor) -> torch.Tensor:
    """Table-lookup dequantization of bitsandbytes' 4-bit layout, straight into ``out``.

    ``out.flatten()[i] = code[q_i] * absmax[i // blocksize]``, where ``q_{2j}`` is the high and
    ``q_{2j+1}`` the low nibble of byte ``j`` of ``packed``; the product is computed in float32
    and rounded once to ``out``'s dtype, as bitsandbytes' ``dequantize_4bit`` does.

    Args:
        packed: the packed codes (any storage dtype; read as bytes), ``ceil(n / 2)`` bytes.
        code: the 16-entry codebook (NF4 or FP4).
        absmax: float32 per-block scales, ``ceil(n / blocksize)``.
        blocksize: elements per scale.
        out: contiguous float tensor of ``n`` elements.

    Raises:
        ValueError: the parts do not fit ``out``.
    """
    if not out.is_contiguous():
        raise ValueError("dequantize_4bit_into writes a contiguous tensor")
    n = out.numel()
    q = packed.reshape(-1).view(torch.uint8)
    if q.numel() * 2 < n or absmax.numel() * blocksize < n or blocksize < 2 or blocksize % 2:
        raise ValueError(
            f"4-bit parts do not fit {n} elements: {q.numel()} packed bytes, {absmax.numel()} scales of blocks of {blocksize}"
        )
    table = _pair_table(code.to(q.device))
    absmax = absmax.float()
    flat = out.view(-1)
    step = max(blocksize, _4BIT_CHUNK // blocksize * blocksize)  # whole blocks per step: scales stay aligned
    scratch, index = _scratch(step, out.device)
    for s in range(0, n, step):
        e = min(n, s + step)
        nbytes = (e - s + 1) // 2
        idx = index[:nbytes]
        idx.copy_(q[s // 2 : s // 2 + nbytes])
        direct = out.dtype == torch.float32 and (e - s) % 2 == 0  # float32 lands in place; else via scratch
        vals = flat[s:e] if direct else scratch[: 2 * nbytes]
        torch.index_select(table, 0, idx, out=vals.view(torch.int64))
        # in place in float32, then one rounding copy: a multiply that casts as it writes measured ~40% slower
        _scale_blocks_(vals[: e - s], absmax[s // blocksize :], blocksize)
        if not direct:
            flat[s:e].copy_(vals[: e - s])
    return out


def _bnb_4bit_scales(parts: dict[str, torch.Tensor], params: dict[str, Any]) -> torch.Tensor:
    """The float32 per-block scales of a bitsandbytes 4-bit record: stored as they are, or with
    double quantization, 8-bit codes of a 256-entry codebook times a second level of blockwise
    scales, plus an offset (bitsandbytes' ``dequantize_blockwise`` + ``offset``)."""
    absmax = parts["qs:absmax"]
    if "qs:nested_absmax" not in parts:
        return absmax.float()
    codes = torch.index_select(parts["qs:nested_quant_map"].float(), 0, absmax.reshape(-1).view(torch.uint8).to(torch.int32))
    _scale_blocks_(codes, parts["qs:nested_absmax"].float(), int(params["nested_blocksize"]))
    return codes.add_(float(params["nested_offset"]))


class BnB4BitCodec(Codec):
    """bitsandbytes 4-bit (NF4 or FP4), block-wise absmax, optional double quantization.

    Encoding is bitsandbytes' ``quantize_4bit`` (the reference codec). Decoding is a table
    lookup in torch (:func:`dequantize_4bit_into`): it writes the compute dtype straight into the
    caller's slot and needs no bitsandbytes; tests check it against bitsandbytes' own
    ``dequantize_4bit``.
    """

    def __init__(self, quant_type: str) -> None:
        self.quant_type = quant_type
        self.name = CodecName(quant_type)

    def encode(
        self,
        w: torch.Tensor,
        *,
        blocksize: int = 64,
        double_quant: bool = True,
        quant_storage: torch.dtype = torch.uint8,
        **_: Any,
    ) -> EncodedTensor:
        bnbf = _bnb_functional()

        src = w if w.dtype in (torch.float16, torch.bfloat16, torch.float32) else w.float()
        packed, state = bnbf.quantize_4bit(
            src.contiguous(),
            blocksize=blocksize,
            compress_statistics=double_quant,
            quant_type=self.quant_type,
            quant_storage=quant_storage,
        )
        parts = {"packed": packed.contiguous()}
        for k, v in state.as_dict(packed=True).items():
            parts[f"qs:{k}"] = v.contiguous()
        params = {"blocksize": blocksize, "double_quant": bool(double_quant)}
        return EncodedTensor(self.name.value, tuple(w.shape), dtype_name(w.dtype), parts, params)

    def decode(self, enc: EncodedTensor, dtype: torch.dtype) -> torch.Tensor:
        out = torch.empty(enc.shape, dtype=dtype if dtype in (torch.bfloat16, torch.float16, torch.float32) else torch.float32,
                          device=enc.parts["packed"].device)
        return self.decode_into(enc, out).to(dtype)

    def _state(self, enc: EncodedTensor) -> dict[str, Any]:
        """The non-tensor fields bitsandbytes serialized beside the parts (JSON in a uint8 part)."""
        key = f"qs:quant_state.bitsandbytes__{self.quant_type}"
        if key not in enc.parts:
            raise ValueError(f"a {self.quant_type} record needs the part {key!r}; it holds {sorted(enc.parts)}")
        state = json.loads(bytes(enc.parts[key].cpu().numpy()))
        if state.get("quant_type") != self.quant_type:
            raise ValueError(f"a {self.quant_type} record whose state says quant_type {state.get('quant_type')!r}")
        return state

    def decode_into(self, enc: EncodedTensor, out: torch.Tensor) -> torch.Tensor:
        state = self._state(enc)
        scales = _bnb_4bit_scales(enc.parts, state)
        dst = out if out.is_contiguous() else torch.empty(out.shape, dtype=out.dtype, device=out.device)
        dequantize_4bit_into(enc.parts["packed"], enc.parts["qs:quant_map"], scales, int(state["blocksize"]), dst)
        return out if dst is out else out.copy_(dst)


class GroupIntCodec(Codec):
    """Group-wise integer codec along the last dim: for each group of ``group_size`` weights,
    ``w ≈ q * scale + offset`` with q in [0, 2**bits - 1] and fp16 ``scale`` and ``offset``.
    The grid (asymmetric with an integer zero point, or symmetric) and the bit-plane packing
    are :mod:`cache.grid`'s. Rows are padded to a multiple of the group size (padding is
    dropped on decode).

    Optional channel permutation: with ``perm`` (or ``permute="weight"``: columns by
    decreasing L2 norm) the columns are reordered before grouping, so a group holds channels
    of like magnitude; stored column ``i`` is original column ``perm[i]``, the permutation is
    a part of the record (``perm``, int32) and decoding puts the columns back in place.
    """

    def __init__(self, bits: int, name: CodecName) -> None:
        self.bits = bits
        self.name = name
        self.levels = (1 << bits) - 1
        self.multiple = columns_multiple(bits)
        self.single_plane = len(PLANES[bits]) == 1
        self.per_byte = 8 // bits if self.single_plane else None

    def _check_group(self, group_size: int) -> None:
        if group_size <= 0 or group_size % self.multiple:
            raise ValueError(f"group_size must be a positive multiple of {self.multiple}, got {group_size}")

    @staticmethod
    def _params(group_size: int, bits: int, symmetric: bool, permuted: bool) -> dict[str, Any]:
        params = {"group_size": group_size, "bits": bits, "layout": "planar", "symmetric": bool(symmetric)}
        if permuted:
            params["permuted"] = True  # the record holds a ``perm`` part; the packed int4 kernel does not take it
        return params

    def _perm(self, w: torch.Tensor, perm: torch.Tensor | None, permute: str | None) -> torch.Tensor | None:
        if permute not in (None, "none", "weight"):
            raise ValueError(f"permute={permute!r}: the codec orders columns by 'weight' L2 norm; pass perm= for other orders")
        if perm is None and permute == "weight":
            perm = torch.argsort(w.float().norm(dim=0), descending=True, stable=True)
        if perm is not None:
            perm = perm.to(torch.int32).contiguous()
            if perm.numel() != w.shape[1] or not torch.equal(torch.sort(perm).values, torch.arange(w.shape[1], dtype=torch.int32)):
                raise ValueError(f"perm must be a permutation of the {w.shape[1]} columns")
        return perm

    def encode(
        self,
        w: torch.Tensor,
        *,
        group_size: int = 128,
        scale_dtype=torch.float16,
        symmetric: bool = False,
        perm: torch.Tensor | None = None,
        permute: str | None = None,
        importance: torch.Tensor | None = None,
        **_: Any,
    ) -> EncodedTensor:
        """``importance``: mean square of each input channel ``[cols]`` (calibration
        statistics): each group's grid is then chosen by the importance-weighted error
        (:mod:`cache.wgrid`); the record is the same format either way."""
        self._check_2d(w)
        self._check_group(group_size)
        perm = self._perm(w, perm, permute)
        rows, cols = w.shape
        ngroups = -(-cols // group_size)
        pad = ngroups * group_size - cols
        w32 = w.float() if perm is None else w.float()[:, perm.long()]
        if pad:
            # pad with the row's first value so padding never widens a group's range
            w32 = torch.cat([w32, w32[:, :1].expand(rows, pad)], dim=1)
        g = w32.reshape(rows, ngroups, group_size)  # [rows, groups, group_size]
        # the stored (rounded) statistics are what the encoder uses, exactly as the decoder will
        scale, offset = self._grid(g, cols, group_size, symmetric, scale_dtype, importance, perm)
        q = quantize_codes(g, scale[..., None], offset[..., None], self.bits).to(torch.uint8).reshape(rows, -1)
        return self._encoded(q, scale, offset, w, group_size, symmetric, perm)

    def _grid(self, g, cols, group_size, symmetric, scale_dtype, importance, perm):
        if importance is None:
            return group_grid(g, self.bits, symmetric=symmetric, scale_dtype=scale_dtype)
        a = group_importance(importance, cols, group_size, perm=perm)
        return weighted_group_grid(g, a, self.bits, symmetric=symmetric, scale_dtype=scale_dtype)

    def fake_quantize(self, w: torch.Tensor, *, group_size: int = 128, scale_dtype=torch.float16, symmetric: bool = False,
                      perm: torch.Tensor | None = None, permute: str | None = None, importance: torch.Tensor | None = None,
                      **_: Any) -> torch.Tensor:
        """:meth:`encode` then :meth:`decode` to float32, without packing the codes (the same numbers)."""
        if perm is not None or permute not in (None, "none"):
            return super().fake_quantize(w, group_size=group_size, symmetric=symmetric, perm=perm, permute=permute,
                                         importance=importance)
        self._check_2d(w)
        self._check_group(group_size)
        rows, cols = w.shape
        ngroups = -(-cols // group_size)
        pad = ngroups * group_size - cols
        w32 = w.float()
        if pad:
            w32 = torch.cat([w32, w32[:, :1].expand(rows, pad)], dim=1)
        g = w32.reshape(rows, ngroups, group_size)
        scale, offset = self._grid(g, cols, group_size, symmetric, scale_dtype, importance, None)
        sf, of = scale.float()[..., None], offset.float()[..., None]
        return torch.addcmul(of, quantize_codes(g, scale[..., None], offset[..., None], self.bits), sf).reshape(rows, -1)[:, :cols]

    def encode_codes(
        self,
        q: torch.Tensor,
        scale: torch.Tensor,
        offset: torch.Tensor,
        like: torch.Tensor,
        *,
        group_size: int,
        symmetric: bool = False,
        perm: torch.Tensor | None = None,
    ) -> EncodedTensor:
        """A record from codes chosen elsewhere (GPTQ): ``q`` ``[rows, cols]`` on the grid of
        ``scale``/``offset`` ``[rows, groups]``, columns in stored order (``perm`` applied);
        ``like`` gives the original shape and dtype."""
        self._check_group(group_size)
        rows, cols = like.shape
        ngroups = -(-cols // group_size)
        if tuple(q.shape) != (rows, cols) or tuple(scale.shape) != (rows, ngroups) or scale.shape != offset.shape:
            raise ValueError(f"codes {tuple(q.shape)} and scales {tuple(scale.shape)} do not fit a {rows}x{cols} weight in groups of {group_size}")
        q = q.to(torch.uint8)
        if ngroups * group_size > cols:
            q = torch.cat([q, torch.zeros(rows, ngroups * group_size - cols, dtype=torch.uint8)], dim=1)
        if perm is not None:
            perm = perm.to(torch.int32).contiguous()
        return self._encoded(q, scale, offset, like, group_size, symmetric, perm)

    def _encoded(self, q, scale, offset, like, group_size, symmetric, perm) -> EncodedTensor:
        parts = pack_codes(q, self.bits)
        parts["scale"] = scale.contiguous()
        parts["offset"] = offset.contiguous()
        if perm is not None:
            parts["perm"] = perm
        params = self._params(group_size, self.bits, symmetric, perm is not None)
        return EncodedTensor(self.name.value, tuple(like.shape), dtype_name(like.dtype), parts, params)

    def encode_measured(
        self,
        w: torch.Tensor,
        *,
        group_size: int = 128,
        scale_dtype=torch.float16,
        symmetric: bool = False,
        perm: torch.Tensor | None = None,
        permute: str | None = None,
        chunk_elems: int = 1 << 20,
        importance: torch.Tensor | None = None,
        **_: Any,
    ) -> tuple[EncodedTensor, dict[str, float]]:
        """:meth:`encode` and the error of the float32 dequantized weights, in one pass over
        row chunks of about ``chunk_elems`` elements with reused buffers: the same bytes as
        :meth:`encode`, at a fraction of its memory traffic (quantizing an 8 B model is
        bound by this loop). Rows that need padding, permuted columns and several bit planes
        take :meth:`encode`'s path."""
        self._check_2d(w)
        rows, cols = w.shape
        kw = dict(group_size=group_size, scale_dtype=scale_dtype, symmetric=symmetric, perm=perm, permute=permute, importance=importance)
        if (importance is not None or group_size <= 0 or group_size % self.multiple or cols % group_size or not w.is_floating_point()
                or not self.single_plane or perm is not None or permute not in (None, "none")):
            return super().encode_measured(w, **kw)
        ngroups, width = cols // group_size, cols // self.per_byte
        step = max(1, min(rows, chunk_elems // cols))
        x = torch.empty(step, ngroups, group_size)  # the chunk in float32
        t = torch.empty_like(x)  # (x - offset) / scale, then the rounding error
        q = torch.empty_like(x)
        codes = torch.empty(step, cols, dtype=torch.int8)  # float -> int8 converts 4x faster than -> uint8
        shifted = torch.empty(step, width, dtype=torch.uint8)
        packed = torch.empty(rows, width, dtype=torch.uint8)
        scale_out = torch.empty(rows, ngroups, dtype=scale_dtype)
        offset_out = torch.empty(rows, ngroups, dtype=scale_dtype)
        sq_err = sq_ref = max_abs = 0.0
        for r0 in range(0, rows, step):
            n = min(step, rows - r0)
            xs, ts, qs = x[:n], t[:n], q[:n]
            xs.copy_(w[r0 : r0 + n].view(n, ngroups, group_size))
            scale, off = group_grid(xs, self.bits, symmetric=symmetric, scale_dtype=scale_dtype)  # stored statistics
            scale_out[r0 : r0 + n] = scale
            offset_out[r0 : r0 + n] = off
            sf, of = scale.float().unsqueeze(2), off.float().unsqueeze(2)
            torch.sub(xs, of, out=ts).div_(sf)
            torch.round(ts, out=qs).clamp_(0, self.levels)
            sq_ref += float(torch.linalg.vector_norm(xs)) ** 2
            # x - dequantized, computed as the decoder computes the weight (q * scale + offset)
            ts.copy_(qs).mul_(sf).add_(of).sub_(xs)
            sq_err += float(torch.linalg.vector_norm(ts)) ** 2
            max_abs = max(max_abs, float(ts.abs_().amax()))
            c = codes[:n]
            c.copy_(qs.view(n, cols))
            planes = c.view(torch.uint8).view(n, self.per_byte, width)
            b = packed[r0 : r0 + n]
            b.copy_(planes[:, 0])
            for i in range(1, self.per_byte):
                b.bitwise_or_(torch.bitwise_left_shift(planes[:, i], i * self.bits, out=shifted[:n]))
        parts = {"packed": packed, "scale": scale_out, "offset": offset_out}
        enc = EncodedTensor(self.name.value, tuple(w.shape), dtype_name(w.dtype), parts, self._params(group_size, self.bits, symmetric, False))
        mse, ref = sq_err / w.numel(), sq_ref / w.numel()
        return enc, {"rel_mse": mse / ref if ref > 0 else (0.0 if mse == 0 else float("inf")), "max_abs_err": max_abs}

    def _check_layout(self, enc: EncodedTensor) -> None:
        if enc.params.get("layout") != "planar":
            raise ValueError(f"{self.name.value} record has layout {enc.params.get('layout')!r}; this sli reads 'planar' only")

    def unpack(self, enc: EncodedTensor, rows: slice | None = None) -> torch.Tensor:
        """Return the integer codes ``[rows, cols_padded]`` as uint8 (``rows``: a slice of them),
        columns in stored order (permuted when the record holds ``perm``)."""
        self._check_layout(enc)
        return unpack_codes(enc.parts, self.bits, rows)

    def decode(self, enc: EncodedTensor, dtype: torch.dtype) -> torch.Tensor:
        rows, cols = enc.shape
        gs = enc.params["group_size"]
        q = self.unpack(enc).float().reshape(rows, -1, gs)
        w = (q * enc.parts["scale"].float()[..., None] + enc.parts["offset"].float()[..., None]).reshape(rows, -1)[:, :cols]
        if "perm" in enc.parts:
            w = w.index_select(1, inverse_permutation(enc.parts["perm"]).long())
        return w.to(dtype)

    def decode_into(self, enc: EncodedTensor, out: torch.Tensor) -> torch.Tensor:
        if not self.single_plane or "perm" in enc.parts:
            return out.copy_(self.decode(enc, out.dtype))
        rows, cols = enc.shape
        gs = enc.params["group_size"]
        packed = enc.parts["packed"]
        w = packed.shape[1]
        self._check_layout(enc)
        plane = torch.empty_like(packed)
        for i in range(self.per_byte):
            lo, hi = i * w, min((i + 1) * w, cols)  # the padding sits at the end of the last plane
            if lo >= hi:
                break
            torch.bitwise_right_shift(packed, i * self.bits, out=plane)
            plane.bitwise_and_(self.levels)
            out[:, lo:hi].copy_(plane[:, : hi - lo])
        del plane
        scale, offset = enc.parts["scale"].to(out.dtype), enc.parts["offset"].to(out.dtype)
        full = cols // gs
        if full:
            g = out[:, : full * gs].view(rows, full, gs) if full * gs == cols else out[:, : full * gs].unflatten(1, (full, gs))
            g.mul_(scale[:, :full, None]).add_(offset[:, :full, None])
        if full * gs < cols:  # a last, partial group
            out[:, full * gs :].mul_(scale[:, full:, None].squeeze(-1)).add_(offset[:, full:, None].squeeze(-1))
        return out


_CODECS: dict[CodecName, Codec] = {
    CodecName.RAW: RawCodec(),
    CodecName.INT8_OUTLIER: Int8OutlierCodec(),
    CodecName.INT8_CHANNEL: Int8ChannelCodec(),
    CodecName.NF4: BnB4BitCodec("nf4"),
    CodecName.FP4: BnB4BitCodec("fp4"),
    CodecName.INT4_GROUP: GroupIntCodec(4, CodecName.INT4_GROUP),
    CodecName.INT3_GROUP: GroupIntCodec(3, CodecName.INT3_GROUP),
    CodecName.INT2_GROUP: GroupIntCodec(2, CodecName.INT2_GROUP),
}


def get_codec(name: CodecName | str) -> Codec:
    """Return the codec registered under ``name``.

    Raises:
        ValueError: unknown codec name (e.g. a record written by a newer sli).
    """
    try:
        return _CODECS[CodecName(name)]
    except ValueError as e:
        raise ValueError(f"unknown codec {name!r}; this sli knows {[c.value for c in CodecName]}") from e


# Codecs whose records decode row by row: the parts indexed by output row (the others are
# shared by all rows). A few rows of a vocabulary-sized matrix (token embeddings) are decoded
# alone, without the rest of their record.
ROW_PARTS: dict[CodecName, frozenset[str]] = {
    CodecName.RAW: frozenset({"data"}),
    CodecName.INT8_CHANNEL: frozenset({"q", "scale"}),
    CodecName.INT8_OUTLIER: frozenset({"q", "scale", "outlier_w"}),
    CodecName.INT4_GROUP: frozenset({*PLANE_PARTS, "scale", "offset"}),  # not "perm": it orders columns
    CodecName.INT3_GROUP: frozenset({*PLANE_PARTS, "scale", "offset"}),
    CodecName.INT2_GROUP: frozenset({*PLANE_PARTS, "scale", "offset"}),
}


def decode_rows(enc: EncodedTensor, rows: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Decode only ``rows`` (int64 indices) of a 2-D record, to ``dtype``: ``[len(rows), cols]``.

    Raises:
        ValueError: the codec does not decode row by row (its blocks span rows, as NF4's do).
    """
    codec = CodecName(enc.codec)
    if codec not in ROW_PARTS or len(enc.shape) != 2:
        raise ValueError(f"codec {enc.codec} does not decode single rows; decode the whole record")
    keep = ROW_PARTS[codec]
    parts = {k: (v.index_select(0, rows) if k in keep else v) for k, v in enc.parts.items()}
    sub = EncodedTensor(enc.codec, (len(rows), enc.shape[1]), enc.dtype, parts, enc.params)
    return get_codec(codec).decode(sub, dtype)


def decode_tensor(enc: EncodedTensor, dtype: torch.dtype | None = None, *, out: torch.Tensor | None = None) -> torch.Tensor:
    """Decode an encoded tensor with the codec named in it, to ``dtype`` (default: its
    original dtype), or into ``out`` when given (its dtype wins)."""
    codec = get_codec(enc.codec)
    if out is not None:
        if tuple(out.shape) != tuple(enc.shape):
            raise ValueError(f"out has shape {tuple(out.shape)}, the record holds {tuple(enc.shape)}")
        return codec.decode_into(enc, out)
    return codec.decode(enc, dtype or dtype_from_name(enc.dtype))


def tensor_error(reference: torch.Tensor, approx: torch.Tensor, *, chunk_elems: int = 1 << 20) -> dict[str, float]:
    """Relative MSE (``mean((a-r)^2) / mean(r^2)``) and max abs error of ``approx`` against ``reference``.

    Computed over row chunks of about ``chunk_elems`` elements in float64 sums, so the
    temporaries stay small however large the tensor is.
    """
    if reference.shape != approx.shape:
        raise ValueError(f"shapes differ: {tuple(reference.shape)} vs {tuple(approx.shape)}")
    if reference.numel() == 0:
        return {"rel_mse": 0.0, "max_abs_err": 0.0}
    r2 = reference.reshape(reference.shape[0], -1) if reference.ndim > 1 else reference.reshape(1, -1)
    a2 = approx.reshape(r2.shape)
    rows = max(1, chunk_elems // max(1, r2.shape[1]))
    sq_err = sq_ref = 0.0
    max_abs = 0.0
    for i in range(0, r2.shape[0], rows):
        r = r2[i : i + rows].float()
        d = a2[i : i + rows].float() - r  # out of place: .float() is a no-op on float32 inputs
        sq_err += float(d.double().pow_(2).sum())
        sq_ref += float(r.double().pow_(2).sum())
        max_abs = max(max_abs, float(d.abs_().max()))
    n = reference.numel()
    mse, ref = sq_err / n, sq_ref / n
    return {"rel_mse": mse / ref if ref > 0 else (0.0 if mse == 0 else float("inf")), "max_abs_err": max_abs}
