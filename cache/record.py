"""The on-disk record: one tensor, encoded by a codec, optionally zstd-compressed, checksummed.

Layout (all integers little-endian)::

    b"SLIR" | u32 header_len | u32 crc32(header) | header (UTF-8 JSON) | payload (stored_len bytes)

The header holds the record format version, the codec and its parameters, the original
dtype and shape, the list of parts (name, dtype, shape, byte length) that make up the raw
payload in order, the compression used, the stored and raw lengths, and the crc32 of the
stored payload. A record is only decoded after both checksums and both lengths agree.
"""

from __future__ import annotations

import json
import struct
import warnings
import zlib
from dataclasses import dataclass, field
from typing import Any

import torch
import zstandard

from cache.errors import CacheFormatError, CorruptRecordError

RECORD_MAGIC = b"SLIR"
# 2: int4 codes only in the portable planar layout
# 3: group codes on a grid with an integer zero point (or symmetric), int3 in two bit planes,
#    an optional column permutation part; version 2 readers would take these records as valid
RECORD_FORMAT_VERSION = 3
_PREFIX = struct.Struct("<4sII")  # magic, header_len, header_crc

# zstd is kept only when it saves at least this share of the raw bytes. Streamed records are
# decompressed on every token; on the 2-core machine sli is measured on, zstd decompresses
# these payloads at 0.56-0.96 GB/s while an uncompressed record is copied from the page
# cache at several GB/s, so a 15-24% saving (int4 codes, bf16) costs far more time per token
# than it saves in reads, even from an NVMe disk. Below a quarter it is not worth it.
DEFAULT_MIN_SAVING = 0.25
_SAMPLE_BYTES = 256 << 10
_HEADER_ROOM = 4096  # bytes reserved ahead of the payload for the prefix and header  # zstd probes payloads larger than four of these on samples first

_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "int8": torch.int8,
    "uint8": torch.uint8,
    "int16": torch.int16,
    "int32": torch.int32,
    "int64": torch.int64,
    "bool": torch.bool,
}


def dtype_name(dtype: torch.dtype) -> str:
    """Return the record's name for a torch dtype ('bfloat16', 'int8', ...)."""
    name = str(dtype).removeprefix("torch.")
    if name not in _DTYPES:
        raise ValueError(f"dtype {dtype} cannot be stored in a record; supported: {sorted(_DTYPES)}")
    return name


def dtype_from_name(name: str) -> torch.dtype:
    """Inverse of :func:`dtype_name`."""
    try:
        return _DTYPES[name]
    except KeyError as e:
        raise ValueError(f"unknown dtype {name!r} in record; supported: {sorted(_DTYPES)}") from e


@dataclass
class EncodedTensor:
    """A tensor as a codec wrote it: named parts plus the parameters needed to decode them.

    Invariant: ``parts`` are contiguous CPU tensors; ``shape``/``dtype`` describe the
    original (decoded) tensor.
    """

    codec: str
    shape: tuple[int, ...]
    dtype: str
    parts: dict[str, torch.Tensor]
    params: dict[str, Any] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        """Bytes the encoded parts occupy in memory (before compression)."""
        return sum(p.numel() * p.element_size() for p in self.parts.values())

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n


@dataclass(frozen=True)
class RecordInfo:
    """What writing one record cost: raw payload bytes, stored bytes, and whether zstd was kept."""

    raw_len: int
    stored_len: int
    compressed: bool

    @property
    def record_len(self) -> int:
        return self.stored_len


def encode_record(
    enc: EncodedTensor,
    *,
    compress_level: int = 3,
    min_saving: float = DEFAULT_MIN_SAVING,
) -> tuple[memoryview, RecordInfo]:
    """Serialise an encoded tensor into a checksummed record.

    Args:
        enc: the codec's output.
        compress_level: zstd level (1..22); 0 disables compression.
        min_saving: keep the zstd payload only if it is at least this share smaller.

    Returns:
        The record's bytes (a ``memoryview``: the payload is written once, in place, and never
        copied whole again) and a :class:`RecordInfo`.
    """
    parts_meta = []
    tensors = []
    for name, t in enc.parts.items():
        t = t.detach().contiguous().cpu()
        nbytes = t.numel() * t.element_size()
        parts_meta.append({"name": name, "dtype": dtype_name(t.dtype), "shape": list(t.shape), "nbytes": nbytes})
        tensors.append(t)
    # the payload goes straight to its place in the record, behind room for the header: each
    # part is copied once, and the record is never copied whole again
    buf = bytearray(_HEADER_ROOM + sum(p["nbytes"] for p in parts_meta))
    raw = memoryview(buf)[_HEADER_ROOM:]
    pos = _HEADER_ROOM
    for t, p in zip(tensors, parts_meta):
        if p["nbytes"]:
            torch.frombuffer(buf, dtype=torch.uint8, offset=pos, count=p["nbytes"]).copy_(t.reshape(-1).view(torch.uint8))
        pos += p["nbytes"]
    del tensors
    payload, compression = raw, "none"
    if compress_level > 0 and raw and _worth_compressing(raw, compress_level, min_saving):
        z = zstandard.ZstdCompressor(level=compress_level).compress(raw)
        if len(z) <= (1.0 - min_saving) * len(raw):
            payload, compression = z, "zstd"
    header = {
        "v": RECORD_FORMAT_VERSION,
        "codec": enc.codec,
        "params": enc.params,
        "dtype": enc.dtype,
        "shape": list(enc.shape),
        "parts": parts_meta,
        "compression": compression,
        "raw_len": len(raw),
        "stored_len": len(payload),
        "crc32": zlib.crc32(payload),
    }
    hbytes = json.dumps(header, separators=(",", ":"), sort_keys=True).encode()
    prefix = _PREFIX.pack(RECORD_MAGIC, len(hbytes), zlib.crc32(hbytes))
    info = RecordInfo(raw_len=len(raw), stored_len=len(payload), compressed=compression == "zstd")
    head = prefix + hbytes
    if compression == "none" and len(head) <= _HEADER_ROOM:
        start = _HEADER_ROOM - len(head)
        buf[start:_HEADER_ROOM] = head
        return memoryview(buf)[start:], info
    return memoryview(head + bytes(payload)), info


def _worth_compressing(raw: memoryview, level: int, min_saving: float) -> bool:
    """Whether zstd may save ``min_saving`` on ``raw``: judged on evenly spaced samples first,
    so incompressible payloads (int4 codes, random bf16) are not compressed whole only to be
    thrown away. A sample saving under half the threshold rules the payload out."""
    if len(raw) <= 4 * _SAMPLE_BYTES:
        return True
    step = len(raw) // 4
    sample = b"".join(bytes(raw[k * step : k * step + _SAMPLE_BYTES]) for k in range(4))
    z = zstandard.ZstdCompressor(level=level).compress(sample)
    return len(z) <= (1.0 - min_saving / 2) * len(sample)


def _as_tensor(raw: bytes | memoryview) -> torch.Tensor:
    """A uint8 view of ``raw`` without copying. The buffer is read-only; decoders only read it."""
    if not len(raw):
        return torch.empty(0, dtype=torch.uint8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "The given buffer is not writable"
        return torch.frombuffer(raw, dtype=torch.uint8)


def read_header(key: str, buf: bytes | memoryview) -> tuple[dict[str, Any], int]:
    """Parse and verify a record's header. Returns (header, payload offset).

    Raises:
        CorruptRecordError: bad magic, truncated, header checksum mismatch or unparsable.
        CacheFormatError: written by another record format version.
    """
    mv = memoryview(buf)
    if len(mv) < _PREFIX.size:
        raise CorruptRecordError(key, f"truncated: {len(mv)} bytes, shorter than the {_PREFIX.size}-byte prefix")
    magic, hlen, hcrc = _PREFIX.unpack_from(mv, 0)
    if magic != RECORD_MAGIC:
        raise CorruptRecordError(key, f"bad magic {bytes(magic)!r} (expected {RECORD_MAGIC!r})")
    end = _PREFIX.size + hlen
    if len(mv) < end:
        raise CorruptRecordError(key, f"truncated: header needs {end} bytes, record has {len(mv)}")
    hbytes = mv[_PREFIX.size : end]
    if zlib.crc32(hbytes) != hcrc:
        raise CorruptRecordError(key, "header checksum mismatch")
    try:
        header = json.loads(bytes(hbytes))
    except ValueError as e:
        raise CorruptRecordError(key, f"header is not valid JSON ({e})") from e
    if header.get("v") != RECORD_FORMAT_VERSION:
        raise CacheFormatError(
            f"record {key!r} has record format version {header.get('v')}, this sli reads version "
            f"{RECORD_FORMAT_VERSION}; rebuild the cache with `sli quantize`"
        )
    return header, end


def decode_record(key: str, buf: bytes | memoryview, *, zero_copy: bool = False, verify_payload: bool = True) -> EncodedTensor:
    """Verify and parse a record back into an :class:`EncodedTensor`.

    By default the returned parts own their memory. With ``zero_copy`` the parts of an
    uncompressed record are read-only views into ``buf`` (for example LMDB's memory map),
    valid only while ``buf`` is; nothing is copied into process memory. ``verify_payload=False``
    skips the payload checksum (the header is always checked), for a record this process has
    already verified in the same read-only map.

    Raises:
        CorruptRecordError: any checksum, length or parse failure.
        CacheFormatError: another record format version.
    """
    header, off = read_header(key, buf)
    mv = memoryview(buf)
    payload = mv[off:]
    if len(payload) != header["stored_len"]:
        raise CorruptRecordError(
            key, f"truncated payload: {len(payload)} bytes stored, header says {header['stored_len']}"
        )
    if verify_payload and zlib.crc32(payload) != header["crc32"]:
        raise CorruptRecordError(key, "payload checksum mismatch")
    if header["compression"] == "zstd":
        try:
            raw = zstandard.ZstdDecompressor().decompress(payload, max_output_size=header["raw_len"])
        except zstandard.ZstdError as e:
            raise CorruptRecordError(key, f"zstd payload does not decompress ({e})") from e
    elif header["compression"] == "none":
        raw = payload if zero_copy else bytes(payload)
    else:
        raise CorruptRecordError(key, f"unknown compression {header['compression']!r}")
    if len(raw) != header["raw_len"]:
        raise CorruptRecordError(key, f"raw payload is {len(raw)} bytes, header says {header['raw_len']}")
    data = _as_tensor(raw)
    parts: dict[str, torch.Tensor] = {}
    pos = 0
    for p in header["parts"]:
        n = p["nbytes"]
        dt = dtype_from_name(p["dtype"])
        chunk = data[pos : pos + n]
        pos += n
        if n and (pos - n) % dt.itemsize:
            chunk = chunk.clone()  # a part after an odd-sized one: copy it to an aligned buffer to view it
        parts[p["name"]] = chunk.view(dt).reshape(p["shape"]) if n else torch.empty(p["shape"], dtype=dt)
    if pos != len(raw):
        raise CorruptRecordError(key, f"parts cover {pos} bytes of a {len(raw)}-byte payload")
    return EncodedTensor(
        codec=header["codec"],
        shape=tuple(header["shape"]),
        dtype=header["dtype"],
        parts=parts,
        params=header["params"],
    )
