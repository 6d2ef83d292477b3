"""`KVSpillStore`: KV blocks spilled to disk, keyed by their prefix hash.

A separate LMDB environment under the cache directory (``<cache>/kv-spill``), so it stays
writable while the model's variants are open read-only. Each block is one checksummed
record (the same format as weights, zstd where it pays). The store has a size limit:
when a put takes it over, the least recently used blocks are deleted. A block that fails
its checks is deleted and reported as absent, so the caller recomputes it; it is never served.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import lmdb
import torch

from cache.codecs import RawCodec, decode_tensor
from cache.errors import CacheFormatError, CorruptRecordError
from cache.record import decode_record, encode_record

logger = logging.getLogger(__name__)

DEFAULT_SPILL_LIMIT = 1 << 30


class KVSpillStore:
    """Spilled KV blocks with an LRU size limit.

    Args:
        path: directory of the spill environment.
        limit_bytes: most bytes of records kept.
    """

    def __init__(self, path: str | os.PathLike[str], *, limit_bytes: int = DEFAULT_SPILL_LIMIT) -> None:
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        self.limit_bytes = limit_bytes
        try:
            self.env = lmdb.open(str(self.path), map_size=max(4 * limit_bytes, 64 << 20), max_dbs=2, writemap=True)
        except lmdb.Error as e:
            raise CacheFormatError(f"{self.path} is not a readable KV spill store ({e}); delete it") from e
        self._blocks = self.env.open_db(b"blocks")
        self._lru = self.env.open_db(b"lru")  # hash -> {"n": bytes, "t": last use}
        self.hits = self.misses = self.corrupt = self.evicted = 0

    def close(self) -> None:
        self.env.close()

    def __contains__(self, h: bytes) -> bool:
        with self.env.begin(db=self._lru) as txn:
            return txn.get(h) is not None

    @property
    def total_bytes(self) -> int:
        with self.env.begin(db=self._lru) as txn:
            return sum(json.loads(v)["n"] for _, v in txn.cursor())

    def put(self, h: bytes, block: torch.Tensor) -> None:
        """Store a block (no-op when already stored, apart from marking it used)."""
        now = time.time()
        with self.env.begin(write=True) as txn:
            meta = txn.get(h, db=self._lru)
            if meta is not None:
                txn.put(h, json.dumps({"n": json.loads(meta)["n"], "t": now}).encode(), db=self._lru)
                return
            rec, _ = encode_record(RawCodec().encode(block.detach().contiguous()))
            txn.put(h, rec, db=self._blocks)
            txn.put(h, json.dumps({"n": len(rec), "t": now}).encode(), db=self._lru)
        self._evict()

    def get(self, h: bytes, *, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor | None:
        """The stored block, or None when absent, of another shape, or corrupt (then deleted)."""
        with self.env.begin(db=self._blocks) as txn:
            rec = txn.get(h)
        if rec is None:
            self.misses += 1
            return None
        try:
            t = decode_tensor(decode_record(f"kv/{h.hex()}", rec))
        except (CorruptRecordError, CacheFormatError, ValueError) as e:
            logger.warning("spilled KV block %s is unreadable (%s); it will be recomputed", h.hex(), e)
            self.corrupt += 1
            self._delete(h)
            return None
        if tuple(t.shape) != tuple(shape) or t.dtype != dtype:
            self.misses += 1
            return None
        with self.env.begin(write=True) as txn:
            meta = txn.get(h, db=self._lru)
            if meta is not None:
                txn.put(h, json.dumps({"n": json.loads(meta)["n"], "t": time.time()}).encode(), db=self._lru)
        self.hits += 1
        return t

    def _delete(self, h: bytes) -> None:
        with self.env.begin(write=True) as txn:
            txn.delete(h, db=self._blocks)
            txn.delete(h, db=self._lru)

    def _evict(self) -> None:
        with self.env.begin(db=self._lru) as txn:
            entries = [(json.loads(v)["t"], k, json.loads(v)["n"]) for k, v in txn.cursor()]
        total = sum(n for _, _, n in entries)
        if total <= self.limit_bytes:
            return
        entries.sort()
        with self.env.begin(write=True) as txn:
            for _, k, n in entries:
                if total <= self.limit_bytes:
                    break
                txn.delete(k, db=self._blocks)
                txn.delete(k, db=self._lru)
                total -= n
                self.evicted += 1
