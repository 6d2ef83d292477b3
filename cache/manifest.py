"""The manifest of one quantized variant: everything needed to run it without the source."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from cache.record import RECORD_FORMAT_VERSION

# Version of the store layout (keys, manifest schema). Bump on any incompatible change.
# 2: vocabulary-sized tensors stored in row chunks
# 3: int4 records only in the portable planar layout (format 2 could hold torch's AVX2 pack,
#    which other CPUs read wrongly); tensor entries carry their codec's parameters
# 4: record format 3 (integer zero points, int3, permutations); calibrated variants keep each
#    layer's calibration record (the next layer's inputs, AWQ and GPTQ figures) in its group entry
STORE_FORMAT_VERSION = 4

# Group names: the units written in one transaction and streamed as one. Part of the format.
EMBED_GROUP = "embed"  # token embeddings and whatever runs before the first layer
HEAD_GROUP = "head"  # final norm and output projection
LAYER_GROUP_PREFIX = "layer."


def layer_group(i: int) -> str:
    """The group name of decoder layer ``i``."""
    return f"{LAYER_GROUP_PREFIX}{i}"


def layer_index(group: str) -> int | None:
    """Decoder layer index of a group name, or None for the embeddings and the head."""
    return int(group[len(LAYER_GROUP_PREFIX) :]) if group.startswith(LAYER_GROUP_PREFIX) else None


@dataclass
class TensorEntry:
    """One tensor of the variant: where it lives, how it was encoded, and what it cost."""

    name: str
    group: str
    codec: str
    shape: list[int]
    dtype: str  # original dtype in the source
    original_bytes: int  # numel * source element size
    raw_bytes: int  # encoded parts, before zstd
    stored_bytes: int  # on disk, after zstd (or raw when zstd did not pay)
    compressed: bool
    rel_mse: float
    max_abs_err: float
    # rows per record when the tensor is stored in row chunks (records ``<name>#<k>``), else 0
    chunk_rows: int = 0
    params: dict[str, Any] = field(default_factory=dict)  # the codec's parameters (group_size, ...)

    @property
    def num_chunks(self) -> int:
        return -(-self.shape[0] // self.chunk_rows) if self.chunk_rows else 1

    def record_names(self) -> list[str]:
        """Names of the records that hold this tensor, in row order."""
        if not self.chunk_rows:
            return [self.name]
        return [chunk_record_name(self.name, k) for k in range(self.num_chunks)]

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TensorEntry":
        return cls(**d)


def chunk_record_name(tensor_name: str, k: int) -> str:
    """Record name of row chunk ``k`` of a chunked tensor."""
    return f"{tensor_name}#{k}"


@dataclass
class GroupEntry:
    """One unit of writing (embeddings, a decoder layer, or the head): written in one transaction."""

    name: str
    tensors: list[TensorEntry]
    seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)  # what the writer wants kept beside the entry (JSON)

    @property
    def original_bytes(self) -> int:
        return sum(t.original_bytes for t in self.tensors)

    @property
    def raw_bytes(self) -> int:
        return sum(t.raw_bytes for t in self.tensors)

    @property
    def stored_bytes(self) -> int:
        return sum(t.stored_bytes for t in self.tensors)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "GroupEntry":
        return cls(
            name=d["name"], tensors=[TensorEntry.from_dict(t) for t in d["tensors"]], seconds=d.get("seconds", 0.0),
            extra=d.get("extra", {}),
        )


@dataclass
class Manifest:
    """Written last, in its own transaction: a variant without a manifest is unfinished.

    Invariant: ``groups`` lists every group in execution order (embed, layer.0 .. layer.N-1, head).
    """

    variant_id: str
    model_fingerprint: str
    quant_fingerprint: str
    library_version: str
    model_type: str
    source: dict[str, Any]  # path, format, bytes on disk
    config: dict[str, Any]  # the transformers config, as to_dict() gives it
    quantization: dict[str, Any]  # QuantizationConfig / AdaptiveQuantizer as a dict
    tokenizer_files: list[str]
    groups: list[GroupEntry]
    arch: dict[str, Any]  # where embeddings, layers, norm and head live
    compress_level: int = 3
    seconds: float = 0.0
    peak_rss_bytes: int = 0
    store_format_version: int = STORE_FORMAT_VERSION
    record_format_version: int = RECORD_FORMAT_VERSION
    extra: dict[str, Any] = field(default_factory=dict)

    def tensors(self) -> dict[str, TensorEntry]:
        return {t.name: t for g in self.groups for t in g.tensors}

    @property
    def original_bytes(self) -> int:
        return sum(g.original_bytes for g in self.groups)

    @property
    def raw_bytes(self) -> int:
        return sum(g.raw_bytes for g in self.groups)

    @property
    def stored_bytes(self) -> int:
        return sum(g.stored_bytes for g in self.groups)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Manifest":
        d = dict(d)
        d["groups"] = [GroupEntry.from_dict(g) for g in d["groups"]]
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"manifest has unknown fields {sorted(unknown)}; written by a newer sli?")
        return cls(**d)
