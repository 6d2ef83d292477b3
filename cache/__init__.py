"""sli's on-disk cache: LMDB store, checksummed zstd records, tensor codecs.

This package imports nothing from ``runtime`` or ``sli``.
"""

from cache.codecs import Codec, CodecName, decode_tensor, get_codec, tensor_error
from cache.errors import CacheError, CacheFormatError, CacheMismatchError, CorruptRecordError, VariantNotFoundError
from cache.manifest import STORE_FORMAT_VERSION, GroupEntry, Manifest, TensorEntry
from cache.record import RECORD_FORMAT_VERSION, EncodedTensor, RecordInfo, decode_record, encode_record
from cache.store import LayerStore

__all__ = [
    "CacheError",
    "CacheFormatError",
    "CacheMismatchError",
    "Codec",
    "CodecName",
    "CorruptRecordError",
    "EncodedTensor",
    "GroupEntry",
    "LayerStore",
    "Manifest",
    "RECORD_FORMAT_VERSION",
    "RecordInfo",
    "STORE_FORMAT_VERSION",
    "TensorEntry",
    "VariantNotFoundError",
    "decode_record",
    "decode_tensor",
    "encode_record",
    "get_codec",
    "tensor_error",
]
