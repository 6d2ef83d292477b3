"""Tensor codecs shared by the quantizing writer and the streaming reader.

A codec turns one floating-point tensor into an :class:`~cache.record.EncodedTensor`
(named parts plus parameters) and back. Codecs are looked up by :class:`CodecName`, the
name stored in every record header, never guessed from tensor names.

Library use: the LLM.int8 and 4-bit NF4/FP4 codecs are bitsandbytes' own quantizers
(``int8_vectorwise_quant``, ``quantize_4bit``/``dequantize_4bit``), which run on CPU.
Written here: the per-channel int8 codec (the layout torch's ``_weight_int8pack_mm``
consumes) and the group-wise int4/int2 codecs (asymmetric, one scale and one offset per
group), because no maintained library ships a CPU round trip for them.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from enum import Enum
from typing import Any

import torch

from cache.record import EncodedTensor, dtype_from_name, dtype_name


def _bnb_functional():
    """bitsandbytes' functional module, or an ImportError that names the fix."""
    try:
        import bitsandbytes.functional as bnbf
    except ImportError as e:
        raise ImportError(
            f"bitsandbytes is required for the int8 (LLM.int8), nf4 and fp4 codecs ({e}); "
            "install it: pip install 'bitsandbytes>=0.41.0'"
        ) from e
    return bnbf


class CodecName(str, Enum):
    """Names of the codecs, as stored in record headers."""

    RAW = "raw"
    INT8_OUTLIER = "int8_outlier"  # LLM.int8: int8 rows + scales, outlier columns in 16-bit
    INT8_CHANNEL = "int8_channel"  # symmetric per-output-channel int8
    NF4 = "nf4"  # bitsandbytes 4-bit NormalFloat
    FP4 = "fp4"  # bitsandbytes 4-bit float
    INT4_GROUP = "int4_group"  # asymmetric group-wise 4-bit, two per byte
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


class BnB4BitCodec(Codec):
    """bitsandbytes 4-bit (NF4 or FP4), block-wise absmax, optional double quantization."""

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

    def decode_into(self, enc: EncodedTensor, out: torch.Tensor) -> torch.Tensor:
        bnbf = _bnb_functional()

        qs = {k[3:]: v for k, v in enc.parts.items() if k.startswith("qs:")}
        state = bnbf.QuantState.from_dict(qs, device=enc.parts["packed"].device)
        state.dtype = out.dtype  # dequantize straight to the caller's dtype (bnb's CPU backend has no out= variant)
        return out.copy_(bnbf.dequantize_4bit(enc.parts["packed"], state).view(out.shape))


class GroupIntCodec(Codec):
    """Asymmetric group-wise integer codec along the last dim: for each group of
    ``group_size`` weights, ``w ≈ q * scale + offset`` with q in [0, 2**bits - 1].
    Values are packed ``8 // bits`` per byte in a planar layout (byte j of a row holds codes
    j, j + w, ... at bit offsets 0, bits, ...; w = padded columns / codes per byte). Rows are
    padded to a multiple of the group size (padding is dropped on decode)."""

    def __init__(self, bits: int, name: CodecName) -> None:
        self.bits = bits
        self.name = name
        self.per_byte = 8 // bits
        self.levels = (1 << bits) - 1

    def encode(self, w: torch.Tensor, *, group_size: int = 128, scale_dtype=torch.float16, **_: Any) -> EncodedTensor:
        self._check_2d(w)
        if group_size <= 0 or group_size % self.per_byte:
            raise ValueError(f"group_size must be a positive multiple of {self.per_byte}, got {group_size}")
        rows, cols = w.shape
        ngroups = -(-cols // group_size)
        pad = ngroups * group_size - cols
        w32 = w.float()
        if pad:
            # pad with the row's first value so padding never widens a group's range
            w32 = torch.cat([w32, w32[:, :1].expand(rows, pad)], dim=1)
        g = w32.reshape(rows, ngroups, group_size)  # [rows, groups, group_size]
        lo = g.amin(dim=2)
        hi = g.amax(dim=2)
        scale = ((hi - lo) / self.levels).clamp_min(1e-8)
        # round the stored statistics first so the encoder uses exactly what the decoder will
        scale = scale.to(scale_dtype)
        lo = lo.to(scale_dtype)
        q = torch.round((g - lo.float()[..., None]) / scale.float()[..., None]).clamp_(0, self.levels).to(torch.uint8)
        params = {"group_size": group_size, "bits": self.bits, "layout": "planar"}
        # planar layout: byte j of a row holds codes j, j + w, j + 2w ... (w = cols_padded / per_byte),
        # so decoding writes contiguous runs instead of interleaving
        q = q.reshape(rows, self.per_byte, -1)  # [rows, per_byte, cols_padded / per_byte]
        packed = torch.zeros(rows, q.shape[2], dtype=torch.uint8)
        for i in range(self.per_byte):
            packed |= q[:, i, :] << (i * self.bits)
        parts = {"packed": packed.contiguous(), "scale": scale.contiguous(), "offset": lo.contiguous()}
        return EncodedTensor(self.name.value, tuple(w.shape), dtype_name(w.dtype), parts, params)

    def encode_measured(
        self, w: torch.Tensor, *, group_size: int = 128, scale_dtype=torch.float16, chunk_elems: int = 1 << 20, **_: Any
    ) -> tuple[EncodedTensor, dict[str, float]]:
        """:meth:`encode` and the error of the float32 dequantized weights, in one pass over
        row chunks of about ``chunk_elems`` elements with reused buffers: the same bytes as
        :meth:`encode`, at a fraction of its memory traffic (quantizing an 8 B model is
        bound by this loop). Rows that need padding take :meth:`encode`'s path."""
        self._check_2d(w)
        rows, cols = w.shape
        if group_size <= 0 or group_size % self.per_byte or cols % group_size or not w.is_floating_point():
            return super().encode_measured(w, group_size=group_size, scale_dtype=scale_dtype)
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
            lo, hi = torch.aminmax(xs, dim=2)
            scale = hi.sub_(lo).div_(self.levels).clamp_min_(1e-8).to(scale_dtype)  # stored statistics, rounded first
            off = lo.to(scale_dtype)
            scale_out[r0 : r0 + n] = scale
            offset_out[r0 : r0 + n] = off
            sf, of = scale.float().unsqueeze(2), off.float().unsqueeze(2)
            torch.sub(xs, of, out=ts).div_(sf)
            torch.round(ts, out=qs).clamp_(0, self.levels)
            sq_ref += float(torch.linalg.vector_norm(xs)) ** 2
            ts.sub_(qs).mul_(sf)  # x - dequantized
            sq_err += float(torch.linalg.vector_norm(ts)) ** 2
            max_abs = max(max_abs, float(ts.abs_().amax()))
            c = codes[:n]
            c.copy_(qs.view(n, cols))
            planes = c.view(torch.uint8).view(n, self.per_byte, width)
            b = packed[r0 : r0 + n]
            b.copy_(planes[:, 0])
            for i in range(1, self.per_byte):
                b.bitwise_or_(torch.bitwise_left_shift(planes[:, i], i * self.bits, out=shifted[:n]))
        params = {"group_size": group_size, "bits": self.bits, "layout": "planar"}
        parts = {"packed": packed, "scale": scale_out, "offset": offset_out}
        enc = EncodedTensor(self.name.value, tuple(w.shape), dtype_name(w.dtype), parts, params)
        mse, ref = sq_err / w.numel(), sq_ref / w.numel()
        return enc, {"rel_mse": mse / ref if ref > 0 else (0.0 if mse == 0 else float("inf")), "max_abs_err": max_abs}

    def _check_layout(self, enc: EncodedTensor) -> None:
        if enc.params.get("layout") != "planar":
            raise ValueError(f"{self.name.value} record has layout {enc.params.get('layout')!r}; this sli reads 'planar' only")

    def unpack(self, enc: EncodedTensor, rows: slice | None = None) -> torch.Tensor:
        """Return the integer codes ``[rows, cols_padded]`` as uint8 (``rows``: a slice of them)."""
        self._check_layout(enc)
        packed = enc.parts["packed"] if rows is None else enc.parts["packed"][rows]
        return torch.cat([(packed >> (i * self.bits)) & self.levels for i in range(self.per_byte)], dim=1)

    def decode(self, enc: EncodedTensor, dtype: torch.dtype) -> torch.Tensor:
        rows, cols = enc.shape
        gs = enc.params["group_size"]
        q = self.unpack(enc).float().reshape(rows, -1, gs)
        w = q * enc.parts["scale"].float()[..., None] + enc.parts["offset"].float()[..., None]
        return w.reshape(rows, -1)[:, :cols].to(dtype)

    def decode_into(self, enc: EncodedTensor, out: torch.Tensor) -> torch.Tensor:
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
    CodecName.INT4_GROUP: frozenset({"packed", "scale", "offset"}),
    CodecName.INT2_GROUP: frozenset({"packed", "scale", "offset"}),
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
