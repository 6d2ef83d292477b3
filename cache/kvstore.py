"""`KVSpillStore`: KV blocks spilled to disk, keyed by their prefix hash.

A separate LMDB environment under the cache directory (``<cache>/kv-spill``), so it stays
writable while the model's variants are open read-only. Each block is one checksummed
record (the same format as weights, zstd where it pays). The store has a size limit:
when a put takes it over, the least recently used blocks are deleted. A block that fails
its checks is deleted and reported as absent, so the caller recomputes it; it is never served.

Spilled KV can always be recomputed, so the spill never stops generation:

* :func:`open_spill_store` opens the store where it can: at its place, else at a fallback
  (a read-only cache, a full disk), else nowhere (spilling off); a damaged store (a data file
  cut short, pages that are not LMDB's) is set aside and started afresh. It says once why.
* A store that is open never raises on a put or a get for a reason of the disk: a write that
  finds too little free space (the store's free-space check) or fails mid-way (the transaction
  is aborted) loses that block only; a store found damaged while running is set aside and
  started afresh; each kind of trouble is said once.

The data file is written with ``pwrite`` (``writemap=False``): through a writable map a
full file system is a SIGBUS, not an error.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import time
from pathlib import Path

import lmdb
import torch

from cache.codecs import RawCodec, decode_tensor
from cache.errors import CacheError, CacheFormatError, CorruptRecordError, DiskFullError, TruncatedCacheError
from cache.record import decode_record, encode_record
from cache.envs import SharedEnv, acquire, release
from cache.store import check_free_space

logger = logging.getLogger(__name__)

DEFAULT_SPILL_LIMIT = 1 << 30
_DATA_FILE = "data.mdb"

# LMDB's answers that mean the file's pages are not what the environment says: set it aside.
_DAMAGED = (lmdb.CorruptedError, lmdb.PageNotFoundError, lmdb.InvalidError, lmdb.VersionMismatchError,
            lmdb.BadValsizeError, lmdb.PanicError, TruncatedCacheError, CacheFormatError)


class SpillDamagedError(CacheError):
    """The spill store's file is not a whole LMDB environment (cut short, or overwritten)."""


def _short(e: BaseException) -> str:
    """The first sentence of an error, for a one-line warning."""
    return str(e).split(". ")[0].strip().rstrip(".") or type(e).__name__


class KVSpillStore:
    """Spilled KV blocks with an LRU size limit.

    Args:
        path: directory of the spill environment.
        limit_bytes: most bytes of records kept.

    Raises:
        SpillDamagedError: the existing environment is cut short or not LMDB's (see
            :func:`open_spill_store`, which sets it aside).
        DiskFullError: no store exists yet and the disk has no room to make one.
        OSError, lmdb.Error: the directory cannot be made or written (a read-only file system).
    """

    def __init__(self, path: str | os.PathLike[str], *, limit_bytes: int = DEFAULT_SPILL_LIMIT) -> None:
        self.path = Path(path)
        self.limit_bytes = limit_bytes
        self.hits = self.misses = self.corrupt = self.evicted = self.skipped = 0
        self._said: set[str] = set()
        self.env: lmdb.Environment | None = None
        self._shared: SharedEnv | None = None
        self._open()

    def _open(self) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        try:
            if not (self.path / _DATA_FILE).exists():
                check_free_space(self.path, 0, "a new KV spill store")
            # shared with every other spill store on this directory in the process (two
            # processors on one cache): LMDB allows one environment per file per process
            shared = acquire(self.path, write=True, max_dbs=2)
        except _DAMAGED as e:
            raise SpillDamagedError(_short(e)) from e
        try:
            self._blocks = shared.db(b"blocks", create=True)
            self._lru = shared.db(b"lru", create=True)  # hash -> {"n": bytes, "t": last use}
        except _DAMAGED as e:
            release(shared)
            raise SpillDamagedError(_short(e)) from e
        except BaseException:
            release(shared)
            raise
        self._shared: SharedEnv | None = shared
        self.env = shared.env

    def _follow(self) -> None:
        """Another process (or another store of this one) set the directory aside as damaged
        and started afresh: use the new environment, not the one moved away."""
        if self.env is not None and not self._shared.is_current():
            logger.info("KV spill %s was replaced by another user; following it", self.path)
            self.close()
            try:
                self._open()
            except (OSError, lmdb.Error, CacheError) as e:
                self._say("follow", "KV spill %s was replaced and cannot be reopened (%s); spilling is off", self.path, _short(e))

    @property
    def enabled(self) -> bool:
        """False once the store gave up (it could not be started afresh): puts and gets do nothing."""
        return self.env is not None

    def close(self) -> None:
        if self.env is not None:
            self.env = None
            release(self._shared)
            self._shared = None

    def _say(self, kind: str, msg: str, *args) -> None:
        """Warn once per kind of trouble."""
        if kind not in self._said:
            self._said.add(kind)
            logger.warning(msg, *args)

    def _damaged(self, e: BaseException) -> None:
        """The environment turned out damaged while running: set it aside and start afresh."""
        self.close()
        try:
            aside = set_aside(self.path)
            self._open()
        except (OSError, lmdb.Error, CacheError) as e2:
            self._say("damaged", "KV spill %s is damaged (%s) and could not be started afresh (%s); spilling is off, "
                      "KV blocks are recomputed instead of reloaded", self.path, _short(e), _short(e2))
            self.close()
            return
        self._say("damaged", "KV spill %s was damaged (%s); set aside as %s and started afresh: blocks spilled "
                  "earlier are recomputed", self.path, _short(e), aside)

    def _failed(self, what: str, e: BaseException) -> None:
        """A put or get failed for a reason of the disk or the environment: that block only is lost."""
        if isinstance(e, _DAMAGED):
            self._damaged(e)
        elif isinstance(e, DiskFullError) or os.strerror(errno.ENOSPC) in str(e):  # our check, or LMDB's pwrite
            self.skipped += 1
            self._say("full", "KV spill %s: %s; blocks are not spilled while the disk is full (they are recomputed "
                      "when needed)", self.path, _short(e))
        else:
            self.skipped += 1
            self._say(f"failed {type(e).__name__}", "KV spill %s: %s failed (%s); that block is not spilled (it is "
                      "recomputed when needed)", self.path, what, _short(e))

    def __contains__(self, h: bytes) -> bool:
        self._follow()
        if self.env is None:
            return False
        try:
            with self._shared.begin(db=self._lru) as txn:
                return txn.get(h) is not None
        except lmdb.Error as e:
            self._failed("a lookup", e)
            return False

    @property
    def total_bytes(self) -> int:
        if self.env is None:
            return 0
        with self._shared.begin(db=self._lru) as txn:
            return sum(json.loads(v)["n"] for _, v in txn.cursor())

    def put(self, h: bytes, block: torch.Tensor) -> bool:
        """Store a block (no-op when already stored, apart from marking it used). Returns
        whether it is stored; a block the disk cannot take is skipped (said once), never raised."""
        self._follow()
        if self.env is None:
            return False
        now = time.time()
        try:
            with self._shared.begin(write=True) as txn:
                meta = txn.get(h, db=self._lru)
                if meta is not None:
                    txn.put(h, json.dumps({"n": json.loads(meta)["n"], "t": now}).encode(), db=self._lru)
                    return True
                rec, _ = encode_record(RawCodec().encode(block.detach().contiguous()))
                # LMDB writes the record and the B-tree pages it touches at commit
                check_free_space(self.path, len(rec) + (64 << 10), f"KV block {h.hex()}")
                txn.put(h, rec, db=self._blocks)
                txn.put(h, json.dumps({"n": len(rec), "t": now}).encode(), db=self._lru)
            self._evict()
        except (lmdb.Error, OSError, CacheError) as e:  # the transaction was aborted: nothing half-written
            self._failed(f"writing block {h.hex()}", e)
            return False
        return True

    def get(self, h: bytes, *, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor | None:
        """The stored block, or None when absent, of another shape, or corrupt (then deleted)."""
        self._follow()
        if self.env is None:
            self.misses += 1
            return None
        try:
            with self._shared.begin(db=self._blocks) as txn:
                rec = txn.get(h)
        except lmdb.Error as e:
            self._failed(f"reading block {h.hex()}", e)
            self.misses += 1
            return None
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
        try:
            with self._shared.begin(write=True) as txn:
                meta = txn.get(h, db=self._lru)
                if meta is not None:
                    txn.put(h, json.dumps({"n": json.loads(meta)["n"], "t": time.time()}).encode(), db=self._lru)
        except lmdb.Error as e:  # only its place in the LRU order is lost
            self._failed("marking a block used", e)
        self.hits += 1
        return t

    def _delete(self, h: bytes) -> None:
        if self.env is None:
            return
        try:
            with self._shared.begin(write=True) as txn:
                txn.delete(h, db=self._blocks)
                txn.delete(h, db=self._lru)
        except lmdb.Error as e:
            self._failed("deleting a corrupt block", e)

    def _evict(self) -> None:
        with self._shared.begin(db=self._lru) as txn:
            entries = [(json.loads(v)["t"], k, json.loads(v)["n"]) for k, v in txn.cursor()]
        total = sum(n for _, _, n in entries)
        if total <= self.limit_bytes:
            return
        entries.sort()
        with self._shared.begin(write=True) as txn:
            for _, k, n in entries:
                if total <= self.limit_bytes:
                    break
                txn.delete(k, db=self._blocks)
                txn.delete(k, db=self._lru)
                total -= n
                self.evicted += 1


def set_aside(path: Path) -> Path:
    """Move a damaged spill store out of the way (``<name>.damaged``, replacing an older one);
    returns where it went.

    Raises:
        OSError: it cannot be moved (a read-only file system).
    """
    aside = path.with_name(path.name + ".damaged")
    if aside.exists():
        shutil.rmtree(aside)
    path.rename(aside)
    return aside


def open_spill_store(path: str | os.PathLike[str], *, limit_bytes: int = DEFAULT_SPILL_LIMIT,
                     fallback: str | os.PathLike[str] | None = None) -> KVSpillStore | None:
    """The spill store at ``path``; where it cannot be (a read-only file system, a full disk), at
    ``fallback``; where neither can, None (spilling off). A damaged store is set aside and
    started afresh. Anything other than opening at ``path`` is said in one warning line.
    """
    notes: list[str] = []
    for where in [Path(path)] + ([Path(fallback)] if fallback is not None else []):
        try:
            try:
                store = KVSpillStore(where, limit_bytes=limit_bytes)
            except SpillDamagedError as e:
                aside = set_aside(where)
                notes.append(f"{where} was damaged ({e}): set aside as {aside}, started afresh")
                store = KVSpillStore(where, limit_bytes=limit_bytes)
        except (OSError, lmdb.Error, CacheError) as e:
            notes.append(f"{where} cannot be used ({_short(e)})")
            continue
        if notes:
            logger.warning("KV spill: %s%s", "; ".join(notes), "" if where == Path(path) else f"; spilling to {where}")
        return store
    logger.warning("KV spill: %s; spilling is off: KV blocks evicted from memory are recomputed instead of reloaded",
                   "; ".join(notes))
    return None
