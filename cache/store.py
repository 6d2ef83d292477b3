"""`LayerStore`: one LMDB environment per cache directory, holding quantized variants.

Layout (two named databases):

* ``meta``: ``format`` -> store format; ``variant/<vid>/source`` -> what is being built;
  ``variant/<vid>/group/<group>`` -> the group's tensor entries (written in the same
  transaction as the group's records); ``variant/<vid>/manifest`` -> the manifest (last);
  ``model/<model_fp>/file/<name>`` -> tokenizer and config files, shared by variants.
* ``tensors``: ``<vid>/<tensor name>`` -> a checksummed record (see :mod:`cache.record`).

A variant whose manifest is absent is unfinished; writing it again skips the groups
already committed. Many processes may read a finished cache at once (LMDB readers never
block). The map grows on demand, so writers never hit MDB_MAP_FULL.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import shlex
import shutil
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import lmdb
import torch

from cache.codecs import decode_tensor
from cache.errors import (
    CacheFormatError,
    CacheMismatchError,
    CorruptRecordError,
    DiskFullError,
    MapResized,
    TruncatedCacheError,
    VariantNotFoundError,
)
from cache.manifest import STORE_FORMAT_VERSION, GroupEntry, Manifest, TensorEntry
from cache.envs import DATA_FILE as _DATA_FILE
from cache.envs import SharedEnv, _check_not_truncated, _used_bytes, acquire, release
from cache.readahead import advise_pageout, advise_willneed, drop_file_cache
from cache.record import EncodedTensor, decode_record, dtype_from_name, read_header

logger = logging.getLogger(__name__)

# Free space kept on the cache's file system beyond what a write needs: LMDB also writes
# B-tree pages and two meta pages per commit, and a file system needs room of its own.
DISK_MARGIN = 32 << 20


def _free_bytes(path: Path) -> int:
    """Free bytes on the file system holding ``path`` (a seam for tests)."""
    return shutil.disk_usage(path).free


def check_free_space(path: Path, need: int, what: str) -> None:
    """Raise :class:`DiskFullError` unless ``need`` bytes plus :data:`DISK_MARGIN` are free at ``path``.

    Asked before every write, with the size of what is about to be written: LMDB would
    otherwise fail midway through a commit with a bare ENOSPC (or, through a writable memory
    map, a SIGBUS)."""
    free = _free_bytes(path)
    if free < need + DISK_MARGIN:
        raise DiskFullError(
            f"the disk holding {path} has {free / 2**20:.1f} MiB free; writing {what} needs "
            f"{need / 2**20:.1f} MiB plus a {DISK_MARGIN >> 20} MiB margin. Free some space or choose "
            "another cache directory (--cache); what is already written is kept and the same "
            "command resumes from there"
        )


# Per-variant writer locks (``<cache>/locks/<variant id>.lock``, flock'd while a variant is written).
LOCKS_DIR = "locks"


def _k(s: str) -> bytes:
    return s.encode()


class LayerStore:
    """Reads and writes quantized variants in one cache directory.

    Args:
        path: the cache directory (created when writable and absent).
        readonly: open for reading only; the directory must already hold a cache.

    Raises:
        FileNotFoundError: ``readonly`` and no cache at ``path``.
        CacheFormatError: the cache was written with another store format version.
    """

    def __init__(self, path: str | os.PathLike[str], *, readonly: bool = False) -> None:
        self.path = Path(path)
        self.readonly = readonly
        if readonly:
            if not (self.path / _DATA_FILE).exists():
                raise FileNotFoundError(
                    f"no sli cache at {self.path} (no {_DATA_FILE}); build one with `sli quantize MODEL --cache {self.path}`"
                )
        else:
            self.path.mkdir(parents=True, exist_ok=True)
        self._shared: SharedEnv = acquire(self.path, write=not readonly, max_dbs=4)
        self.env = self._shared.env
        self._closed = False
        try:
            self._meta = self._shared.db(b"meta", create=not readonly)
            self._tensors = self._shared.db(b"tensors", create=not readonly)
            self._check_format()
        except lmdb.NotFoundError as e:
            self.close()
            raise CacheFormatError(f"{self.path} is an LMDB environment but not an sli cache ({e})") from e
        except BaseException:
            self.close()
            raise

    # -- housekeeping -------------------------------------------------------------------
    def _check_format(self) -> None:
        with self._shared.begin(db=self._meta) as txn:
            raw = txn.get(b"format")
        if raw is None:
            if self.readonly:
                raise CacheFormatError(f"{self.path} has no format record: not an sli cache, or never written")
            self._write({(self._meta, b"format"): json.dumps({"store_format_version": STORE_FORMAT_VERSION}).encode()})
            return
        try:
            version = json.loads(raw)["store_format_version"]
        except (ValueError, KeyError) as e:
            raise CacheFormatError(f"{self.path}: unreadable format record ({e}); delete the directory and rebuild") from e
        if version != STORE_FORMAT_VERSION:
            raise CacheFormatError(
                f"cache {self.path} was written with store format {version}, this sli reads format "
                f"{STORE_FORMAT_VERSION}. Rebuild it: {self.rebuild_commands()}"
            )

    def rebuild_commands(self) -> str:
        """The shell commands that rebuild this cache's variants from their sources (read
        from the raw metadata, so they work on a cache of any format version)."""
        q = shlex.quote(str(self.path))
        cmds = [f"rm -r {q}"]
        for _, raw in self._raw_manifests():
            try:
                m = json.loads(raw)
                cmds.append(_quantize_command(m["source"]["path"], m["quantization"], q))
            except (ValueError, KeyError, TypeError):
                continue
        if len(cmds) == 1:
            cmds.append(f"sli quantize MODEL --mode MODE --cache {q}")
        return " && ".join(cmds)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            release(self._shared)

    def __enter__(self) -> "LayerStore":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def map_size(self) -> int:
        return self.env.info()["map_size"]

    def _reserve(self, need: int) -> None:
        """Grow the map ahead of a transaction expected to write about ``need`` bytes."""
        used = _used_bytes(self.env)
        # headroom: LMDB copies touched pages on write, so reserve twice the payload
        if used + 2 * need + (16 << 20) > self.map_size:
            self._shared.grow(used + 2 * need + (16 << 20))

    def _write(self, items: Mapping[tuple[Any, bytes], bytes]) -> None:
        """Write all items in one transaction, growing the map until they fit."""
        if self.readonly:
            raise PermissionError(f"cache {self.path} is open read-only")
        size = sum(len(v) + len(k) for (_, k), v in items.items())
        check_free_space(self.path, size, f"{len(items)} metadata entries")
        self._reserve(size)
        while True:
            try:
                with self._shared.begin(write=True) as txn:
                    for (db, key), value in items.items():
                        txn.put(key, value, db=db)
                return
            except lmdb.MapFullError:
                self._shared.grow(self.map_size * 2)

    # -- writing ------------------------------------------------------------------------
    def begin_variant(self, vid: str, source_info: dict[str, Any]) -> None:
        """Record which source and config a variant is built from (once; checked on resume).

        Raises:
            CacheMismatchError: the variant id exists with a different source fingerprint.
        """
        key = _k(f"variant/{vid}/source")
        with self._shared.begin(db=self._meta) as txn:
            old = txn.get(key)
        if old is not None:
            old_info = json.loads(old)
            if old_info.get("model_fingerprint") != source_info.get("model_fingerprint"):
                raise CacheMismatchError(
                    f"variant {vid} in {self.path} was started from model {old_info.get('model_fingerprint')}, "
                    f"not {source_info.get('model_fingerprint')}; delete the cache directory and rebuild"
                )
            return
        self._write({(self._meta, key): json.dumps(source_info, sort_keys=True).encode()})

    @contextmanager
    def write_group(self, vid: str, group: str, *, expected_bytes: int) -> Iterator["GroupWriter"]:
        """Open one write transaction for a group; records are put as they are produced, so
        a group's records are never all held in memory. The group's entry, given with
        :meth:`GroupWriter.finish`, is written last and everything commits at once.

        Raises:
            MapResized: the map filled up; it has been grown and the group must be redone.
        """
        if self.readonly:
            raise PermissionError(f"cache {self.path} is open read-only")
        check_free_space(self.path, 0, f"group {group}")  # each record is checked again as it is put
        self._reserve(expected_bytes)
        txn = self._shared.begin(write=True)
        writer = GroupWriter(self, txn, vid, group)
        try:
            yield writer
            if not writer.finished:
                raise RuntimeError(f"group {group} of {vid} was not finished; nothing was committed")
            txn.commit()
        except lmdb.MapFullError:
            txn.abort()
            self._shared.grow(self.map_size * 2)
            raise MapResized(f"LMDB map of {self.path} grown to {self.map_size >> 20} MiB; redo group {group}") from None
        except BaseException:
            txn.abort()
            raise

    @contextmanager
    def variant_lock(self, vid: str) -> Iterator[None]:
        """Held while a variant is written: a second writer of the same variant (another
        process, or another thread) waits for the first, then finds what it committed, so no
        group is built twice and the manifest is written once. Readers never wait: they see a
        variant only once its manifest is committed, after every group.

        Raises:
            PermissionError: the store is read-only.
        """
        if self.readonly:
            raise PermissionError(f"cache {self.path} is open read-only")
        path = self.path / LOCKS_DIR / f"{vid}.lock"
        path.parent.mkdir(exist_ok=True)
        with open(path, "a+") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                f.seek(0)
                logger.info("variant %s of %s is being written by another writer (%s); waiting for it", vid, self.path,
                            f.read().strip() or "unknown")
                fcntl.flock(f, fcntl.LOCK_EX)
            f.truncate(0)
            f.write(f"pid {os.getpid()}\n")
            f.flush()
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def put_group(self, vid: str, group: GroupEntry, records: Mapping[str, bytes]) -> None:
        """Write a group's records and its entry in one transaction (all or nothing)."""
        while True:
            try:
                with self.write_group(vid, group.name, expected_bytes=sum(map(len, records.values()))) as w:
                    for name, rec in records.items():
                        w.put(name, rec)
                    w.finish(group)
                return
            except MapResized:
                continue

    def put_files(self, model_fp: str, files: Mapping[str, bytes]) -> None:
        """Store the model's tokenizer/config files, shared by all its variants."""
        self._write({(self._meta, _k(f"model/{model_fp}/file/{n}")): b for n, b in files.items()})

    def put_manifest(self, manifest: Manifest) -> None:
        """Write the manifest: the variant becomes complete."""
        self._write({(self._meta, _k(f"variant/{manifest.variant_id}/manifest")): json.dumps(manifest.to_dict()).encode()})

    # -- reading ------------------------------------------------------------------------
    def get_group(self, vid: str, group: str) -> GroupEntry | None:
        with self._shared.begin(db=self._meta) as txn:
            raw = txn.get(_k(f"variant/{vid}/group/{group}"))
        return None if raw is None else GroupEntry.from_dict(json.loads(raw))

    def get_manifest(self, vid: str) -> Manifest | None:
        """The variant's manifest, or None if the variant is absent or unfinished."""
        with self._shared.begin(db=self._meta) as txn:
            raw = txn.get(_k(f"variant/{vid}/manifest"))
        if raw is None:
            return None
        try:
            m = Manifest.from_dict(json.loads(raw))
        except (ValueError, KeyError, TypeError) as e:
            raise CorruptRecordError(f"variant/{vid}/manifest", f"unreadable manifest ({e})", cache_path=str(self.path)) from e
        if m.store_format_version != STORE_FORMAT_VERSION:
            raise CacheFormatError(
                f"variant {vid} in {self.path} has store format {m.store_format_version}, this sli reads "
                f"{STORE_FORMAT_VERSION}; rebuild it with `sli quantize`"
            )
        return m

    def require_manifest(self, vid: str, *, model_fingerprint: str | None = None) -> Manifest:
        """Like :meth:`get_manifest` but raises when absent or built from another model."""
        m = self.get_manifest(vid)
        if m is None:
            raise VariantNotFoundError(
                f"variant {vid} is not complete in {self.path} (known: {self.list_variants()}); "
                "run `sli quantize` to build or finish it"
            )
        if model_fingerprint is not None and m.model_fingerprint != model_fingerprint:
            raise CacheMismatchError(
                f"variant {vid} in {self.path} was built from model {m.model_fingerprint}, not {model_fingerprint}; "
                "quantize this model again"
            )
        return m

    def _raw_manifests(self) -> Iterator[tuple[str, bytes]]:
        """(variant id, manifest bytes as stored) of every complete variant, unparsed."""
        with self._shared.begin(db=self._meta) as txn:
            cur = txn.cursor()
            if cur.set_range(b"variant/"):
                for key, raw in cur:
                    if not key.startswith(b"variant/"):
                        break
                    parts = key.decode().split("/")
                    if len(parts) == 3 and parts[2] == "manifest":
                        yield parts[1], bytes(raw)

    def list_variants(self) -> list[str]:
        """Ids of the complete variants in this cache."""
        return [vid for vid, _ in self._raw_manifests()]

    def get_file(self, model_fp: str, name: str) -> bytes:
        with self._shared.begin(db=self._meta) as txn:
            raw = txn.get(_k(f"model/{model_fp}/file/{name}"))
        if raw is None:
            raise VariantNotFoundError(f"file {name!r} of model {model_fp} is not in {self.path}")
        return bytes(raw)

    def get_record(self, vid: str, name: str) -> EncodedTensor:
        """Read, verify and parse one tensor record.

        Raises:
            VariantNotFoundError: no such record.
            CorruptRecordError: the record fails its checks (it is never served).
        """
        key = f"{vid}/{name}"
        with self._shared.begin(db=self._tensors, buffers=True) as txn:
            buf = txn.get(_k(key))
            if buf is None:
                raise VariantNotFoundError(f"no record {key!r} in {self.path}")
            try:
                return decode_record(key, buf)
            except CorruptRecordError as e:
                raise CorruptRecordError(key, e.reason, cache_path=str(self.path)) from e

    @contextmanager
    def reader(self) -> Iterator["RecordReader"]:
        """A read transaction whose records are decoded without copying uncompressed payloads:
        their parts are views into LMDB's memory map (file-backed pages, not process memory),
        valid only inside the ``with`` block. The streaming executor decodes through this."""
        with self._shared.begin(db=self._tensors, buffers=True) as txn:
            self._shared.pin()
            try:
                yield RecordReader(self, txn)
            finally:
                self._shared.unpin()

    def open_reader(self) -> "RecordReader":
        """Like :meth:`reader`, for a transaction that outlives one block (records used in
        place while a layer computes): the caller must :meth:`RecordReader.close` it."""
        txn = self._shared.begin(db=self._tensors, buffers=True)
        self._shared.pin()
        return RecordReader(self, txn, pinned=True)

    def drop_page_cache(self) -> int:
        """Evict this cache's files from the page cache (for cold measurements); returns
        the bytes of the files dropped."""
        return sum(drop_file_cache(f) for f in sorted(self.path.rglob("*.mdb")))

    def raw_record(self, vid: str, name: str) -> bytes | None:
        """The record's bytes as stored (for inspection and tests)."""
        with self._shared.begin(db=self._tensors) as txn:
            return txn.get(_k(f"{vid}/{name}"))

    def iter_records(self, vid: str) -> Iterator[tuple[str, EncodedTensor]]:
        """Yield every (record name, encoded tensor) of a variant, verifying each (a chunked
        tensor yields one record per row chunk)."""
        m = self.require_manifest(vid)
        for group in m.groups:
            for t in group.tensors:
                for rname in t.record_names():
                    yield rname, self.get_record(vid, rname)

    def read_tensor(
        self, vid: str, entry: TensorEntry, dtype: torch.dtype | None = None, device: str | torch.device | None = None
    ) -> torch.Tensor:
        """Decode a whole tensor (stitching its row chunks), to ``dtype`` or its original dtype.
        With ``device``, each record's parts are copied there at their stored size and decoded there."""
        out = torch.empty(entry.shape, dtype=dtype or dtype_from_name(entry.dtype), device=device)
        rows = entry.chunk_rows or entry.shape[0] if entry.shape else 0
        with self.reader() as r:  # decoded straight from the map: no copy of the record in between
            for k, rname in enumerate(entry.record_names()):
                dst = out[k * rows : (k + 1) * rows] if entry.chunk_rows else out
                enc = r.get(vid, rname)
                if device is not None:
                    enc = EncodedTensor(enc.codec, enc.shape, enc.dtype, {p: v.to(device) for p, v in enc.parts.items()}, enc.params)
                decode_tensor(enc, out=dst)
        return out

    def iter_tensors(self, vid: str, dtype: torch.dtype | None = None) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield every (tensor name, decoded tensor) of a variant, in group order."""
        for group in self.require_manifest(vid).groups:
            for t in group.tensors:
                yield t.name, self.read_tensor(vid, t, dtype)

    def iter_groups(self, vid_prefix: str) -> Iterator[tuple[str, GroupEntry]]:
        """(variant id, group entry) of every written group of the variants whose id starts with ``vid_prefix``."""
        start = _k(f"variant/{vid_prefix}")
        with self._shared.begin(db=self._meta) as txn:
            cur = txn.cursor()
            if cur.set_range(start):
                for key, raw in cur:
                    if not key.startswith(start):
                        break
                    parts = key.decode().split("/", 3)
                    if len(parts) == 4 and parts[2] == "group":
                        yield parts[1], GroupEntry.from_dict(json.loads(raw))

    def put_meta(self, items: Mapping[str, Any]) -> None:
        """Write small JSON values under ``aux/<key>`` in one transaction (None deletes)."""
        if self.readonly:
            raise PermissionError(f"cache {self.path} is open read-only")
        with self._shared.begin(write=True, db=self._meta) as txn:
            for key, value in items.items():
                if value is None:
                    txn.delete(_k(f"aux/{key}"))
                else:
                    txn.put(_k(f"aux/{key}"), json.dumps(value).encode())

    def get_meta(self, key: str) -> Any:
        with self._shared.begin(db=self._meta) as txn:
            raw = txn.get(_k(f"aux/{key}"))
        return None if raw is None else json.loads(raw)

    def delete_group(self, vid: str, group: str) -> GroupEntry | None:
        """Remove one group's records and entry in one transaction; returns the entry removed."""
        if self.readonly:
            raise PermissionError(f"cache {self.path} is open read-only")
        with self._shared.begin(write=True) as txn:
            raw = txn.get(_k(f"variant/{vid}/group/{group}"), db=self._meta)
            if raw is None:
                return None
            entry = GroupEntry.from_dict(json.loads(raw))
            for t in entry.tensors:
                for rname in t.record_names():
                    txn.delete(_k(f"{vid}/{rname}"), db=self._tensors)
            txn.delete(_k(f"variant/{vid}/group/{group}"), db=self._meta)
        return entry

    def delete_variant(self, vid: str) -> None:
        """Remove a variant's records and entries (the model's shared files stay)."""
        if self.readonly:
            raise PermissionError(f"cache {self.path} is open read-only")
        with self._shared.begin(write=True) as txn:
            for db, prefix in ((self._tensors, _k(f"{vid}/")), (self._meta, _k(f"variant/{vid}/"))):
                cur = txn.cursor(db=db)
                if cur.set_range(prefix):
                    while cur.key().startswith(prefix):
                        if not cur.delete():
                            break


def _quantize_command(source: str, quant: dict[str, Any], cache: str) -> str:
    """`sli quantize` for a stored quantization dict (a plain config or an adaptive one)."""
    cmd = f"sli quantize {shlex.quote(source)}"
    planned = quant.get("planned") or {}
    if quant.get("kind") == "adaptive" and planned.get("target_loss") is not None:
        cmd += f" --target-loss {planned['target_loss']:g}"
    elif quant.get("kind") == "adaptive":
        cmd += " --mixed"
    else:
        cmd += f" --mode {quant.get('mode', 'nf4')}"
        if quant.get("mode") in ("int4", "int3", "int2") and quant.get("group_size"):
            cmd += f" --group-size {quant['group_size']}"
        if quant.get("symmetric"):
            cmd += " --symmetric"
        if quant.get("permute") not in (None, "none"):
            cmd += f" --permute {quant['permute']}"
    cal = quant.get("calibration")
    if isinstance(cal, dict):
        cmd += f" --calibrate {cal.get('method')} --calibration-samples {cal.get('samples')} --calibration-seqlen {cal.get('seqlen')}"
        if cal.get("text"):
            cmd += f" --calibration-text {shlex.quote(str(cal['text']))}"
        cmd += " --act-order" if cal.get("act_order") else " --no-act-order"
    return f"{cmd} --cache {cache}"


class GroupWriter:
    """Puts one group's records inside an open write transaction (see :meth:`LayerStore.write_group`)."""

    def __init__(self, store: LayerStore, txn: lmdb.Transaction, vid: str, group: str) -> None:
        self._store, self._txn, self._vid, self._group = store, txn, vid, group
        self._pending = 0
        self.finished = False

    def put(self, name: str, record: bytes) -> None:
        # the transaction's records reach the disk only at commit: they all need room then
        self._pending += len(record)
        check_free_space(self._store.path, self._pending, f"record {name} of {self._group} (with the group's earlier records)")
        self._txn.put(_k(f"{self._vid}/{name}"), record, db=self._store._tensors)

    def finish(self, entry: GroupEntry) -> None:
        if entry.name != self._group:
            raise ValueError(f"entry for {entry.name} given to the writer of {self._group}")
        self._txn.put(_k(f"variant/{self._vid}/group/{entry.name}"), json.dumps(entry.to_dict()).encode(), db=self._store._meta)
        self.finished = True


# Records whose payload checksum this process has verified in a read-only map, keyed by
# (cache path, key, header checksum). The streaming executor reads the same records on every
# token; checking 100 MB of crc32 per token would cost more than the compute. A read-only
# LMDB map never changes a committed record in place, so one check per process suffices.
_VERIFIED: set[tuple[str, bytes, bytes]] = set()


class RecordReader:
    """Zero-copy record access inside one read transaction (see :meth:`LayerStore.reader`).

    In a read-only store, a record's payload checksum is verified the first time this
    process reads it (its header every time)."""

    def __init__(self, store: LayerStore, txn: lmdb.Transaction, *, pinned: bool = False) -> None:
        self.store, self.txn = store, txn
        self._pinned = pinned

    def close(self) -> None:
        """End the transaction (readers from :meth:`LayerStore.open_reader`)."""
        self.txn.abort()
        if self._pinned:
            self._pinned = False
            self.store._shared.unpin()

    def advise(self, vid: str, name: str) -> int:
        """Ask the kernel to read a record's bytes into the page cache now, in large reads
        (see :mod:`cache.readahead`); returns the bytes advised. Unverified: :meth:`get`
        checks the record when it is used."""
        buf = self.txn.get(_k(f"{vid}/{name}"))
        return 0 if buf is None else advise_willneed(buf)

    def pageout(self, vid: str, name: str) -> int:
        """Tell the kernel a record's pages can go now (see :func:`cache.readahead.advise_pageout`);
        returns the bytes advised."""
        buf = self.txn.get(_k(f"{vid}/{name}"))
        return 0 if buf is None else advise_pageout(buf)

    def header(self, vid: str, name: str) -> dict[str, Any]:
        """A record's verified header (codec, shape, dtype, params, and each part's name,
        dtype and shape), without reading its payload.

        Raises:
            VariantNotFoundError: no such record.
            CorruptRecordError: the header fails its checks.
        """
        key = f"{vid}/{name}"
        buf = self.txn.get(_k(key))
        if buf is None:
            raise VariantNotFoundError(f"no record {key!r} in {self.store.path}")
        try:
            return read_header(key, buf)[0]
        except CorruptRecordError as e:
            raise CorruptRecordError(key, e.reason, cache_path=str(self.store.path)) from e

    def get(self, vid: str, name: str) -> EncodedTensor:
        """Verify and parse a record; its parts are valid until the transaction ends.

        Raises:
            VariantNotFoundError: no such record.
            CorruptRecordError: the record fails its checks.
        """
        key = f"{vid}/{name}"
        buf = self.txn.get(_k(key))
        if buf is None:
            raise VariantNotFoundError(f"no record {key!r} in {self.store.path}")
        memo = (str(self.store.path), key.encode(), bytes(buf[8:12])) if self.store.readonly else None
        try:
            enc = decode_record(key, buf, zero_copy=True, verify_payload=memo not in _VERIFIED)
            if memo is not None:
                _VERIFIED.add(memo)
            return enc
        except CorruptRecordError as e:
            raise CorruptRecordError(key, e.reason, cache_path=str(self.store.path)) from e
