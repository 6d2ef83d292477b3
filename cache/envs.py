"""LMDB environments shared by every user of one directory in a process, and followed across processes.

LMDB allows one environment per file per process (its locks are the process's), so every
store on one directory shares one :class:`SharedEnv`. Several processes use one cache at
once (a server reads it while its owner quantizes another variant into it), and LMDB leaves
two things to the caller, both handled here:

* **The map.** A process's map is the most of the file it can see. When another process
  writes past it, LMDB answers the next ``begin`` with ``MDB_MAP_RESIZED``. Every environment
  is opened with a map far larger than any cache (:data:`MAP_BYTES`: address space only;
  without a writable map nothing is reserved on disk or in memory), so this does not happen
  in practice. Where it still does (an address-space limit made the map small, or another
  program grew the file), :meth:`SharedEnv.begin` adopts the new size (``set_mapsize(0)``,
  LMDB's documented answer) and retries. Remapping moves the map, so it is done only while no
  record of this process is used in place from it (:meth:`SharedEnv.pin`); otherwise the
  answer is :class:`~cache.errors.CacheGrewError`, which says to reopen.
* **Writers and readers in one process.** The environment is opened writable whenever the
  directory allows, whatever the first user asked for: a process may read one variant and
  write another into the same cache. Read-only is a property of each store, not of the
  shared environment.

A directory replaced under a process (a spill store set aside as damaged by another
process) is followed by :meth:`SharedEnv.is_current`: its data file is no longer the one
this environment has open.
"""

from __future__ import annotations

import errno
import logging
import os
import resource
import shlex
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path

import lmdb

from cache.errors import CacheFormatError, CacheGrewError, TruncatedCacheError

logger = logging.getLogger(__name__)

DATA_FILE = "data.mdb"
# Every environment's map: address space, not memory or disk (the map is read-only; LMDB
# writes with pwrite). 1 TiB is past any cache sli writes, so no process meets
# MDB_MAP_RESIZED or MDB_MAP_FULL; on a 32-bit build the address space allows far less.
MAP_BYTES = 1 << 40 if sys.maxsize > 2**32 else 1 << 30


def map_bytes(existing: int) -> int:
    """The map to open an environment with: :data:`MAP_BYTES`, within a quarter of an
    address-space limit (``ulimit -v``) when one is set, and never below the file's size."""
    want = MAP_BYTES
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    if soft != resource.RLIM_INFINITY:
        want = min(want, soft // 4)
    return max(want, existing, 1 << 20)


def _identity(path: Path) -> tuple[int, int] | None:
    try:
        st = os.stat(path / DATA_FILE)
    except FileNotFoundError:
        return None
    return st.st_dev, st.st_ino


def _writable(path: Path) -> bool:
    data = path / DATA_FILE
    return os.access(path, os.W_OK) and (not data.exists() or os.access(data, os.W_OK))


@dataclass(eq=False)
class SharedEnv:
    """One LMDB environment, its users in this process and the records it lends in place.

    Invariants: ``users`` counts the stores holding it (closed at zero); ``pins`` counts the
    read transactions whose buffers are in use outside LMDB (the map must not move under
    them); ``identity`` is the (device, inode) of the data file it opened.
    """

    path: Path
    env: lmdb.Environment
    writable: bool
    identity: tuple[int, int] | None
    users: int = 0
    pins: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)
    dbs: dict = field(default_factory=dict)

    def db(self, name: bytes, *, create: bool):
        """The named database's handle, opened once per environment: opening takes LMDB's
        write lock on a writable environment, so a reader waits for another process's
        transaction once, when the process first opens the cache, not at every store.

        Raises:
            lmdb.NotFoundError: absent and ``create`` is False.
        """
        with self.lock:
            handle = self.dbs.get(name)
            if handle is None:
                if create and not self.writable:
                    raise PermissionError(f"{self.path} is read-only here; database {name.decode()} cannot be created")
                handle = self.dbs[name] = self.env.open_db(name, create=create)
            return handle

    def begin(self, **kwargs) -> lmdb.Transaction:
        """``env.begin(**kwargs)``, adopting a map another process grew (see the module docstring).

        Raises:
            CacheGrewError: the map must move but records are in use in place from it.
        """
        try:
            return self.env.begin(**kwargs)
        except lmdb.MapResizedError:
            self.adopt_map_size()
            return self.env.begin(**kwargs)

    def adopt_map_size(self) -> None:
        """Take the map size another process grew the environment to (``set_mapsize(0)``).

        Raises:
            CacheGrewError: records of this process are used in place from the current map.
        """
        with self.lock:
            if self.pins:
                used = (self.env.info()["last_pgno"] + 1) * self.env.stat()["psize"]
                raise CacheGrewError(
                    f"cache {self.path} grew to {used >> 20} MiB in another process, past this process's map of "
                    f"{self.env.info()['map_size'] >> 20} MiB, while {self.pins} reader(s) use its records in place; "
                    "the cache is intact: close this model and open it again (or restart the process). Raise the "
                    "address-space limit (ulimit -v) so the map can be large from the start"
                )
            old = self.env.info()["map_size"]
            self.env.set_mapsize(0)
            logger.info("cache %s: adopted the map size another process grew it to (%d -> %d MiB)", self.path,
                        old >> 20, self.env.info()["map_size"] >> 20)

    def grow(self, at_least: int) -> None:
        """Grow the map (a write found it full: only when :data:`MAP_BYTES` was capped).

        Raises:
            CacheGrewError: records of this process are used in place from the current map.
        """
        with self.lock:
            if self.pins:
                raise CacheGrewError(
                    f"cache {self.path} needs a map larger than {self.env.info()['map_size'] >> 20} MiB while "
                    f"{self.pins} reader(s) in this process use its records in place; write from a process that "
                    "does not read it, or raise the address-space limit (ulimit -v)"
                )
            new = max(at_least, 2 * self.env.info()["map_size"])
            logger.debug("growing LMDB map of %s to %d MiB", self.path, new >> 20)
            self.env.set_mapsize(new)

    def pin(self) -> None:
        """A read transaction's buffers are used in place: the map must stay where it is."""
        with self.lock:
            self.pins += 1

    def unpin(self) -> None:
        with self.lock:
            self.pins -= 1

    def is_current(self) -> bool:
        """Whether the directory's data file is still the one this environment has open."""
        return _identity(self.path) == self.identity


def _used_bytes(env: lmdb.Environment) -> int:
    """Bytes of the data file the environment uses, by its own meta page (last page in use)."""
    return (env.info()["last_pgno"] + 1) * env.stat()["psize"]


def _check_not_truncated(path: Path) -> None:
    """Compare the data file's size with the environment's own record of the pages it uses,
    before anything maps the file: a page past the end of a mapped file is a SIGBUS, not an
    error. The environment is opened read-only and without the lock file (nothing is
    written); its meta pages are read by LMDB itself.

    Raises:
        TruncatedCacheError: the file ends before the last page in use.
        CacheFormatError: the file is not an LMDB environment at all.
    """
    data = path / DATA_FILE
    if not data.exists():
        return
    have = data.stat().st_size
    try:
        env = lmdb.open(str(path), readonly=True, lock=False, max_dbs=4, readahead=False)
    except lmdb.Error as e:
        raise CacheFormatError(
            f"{data} ({have} bytes) is not a readable LMDB environment ({e}): a partial copy or another file. "
            f"Copy the cache again, or delete it (`rm -r {shlex.quote(str(path))}`) and run `sli quantize` again"
        ) from e
    try:
        need = _used_bytes(env)
    finally:
        env.close()
    if have < need:
        raise TruncatedCacheError(
            f"{data} is {have} bytes but its environment uses {need} bytes ({need - have} missing): "
            "the file was cut short (a partial copy or a full disk). Copy the cache again, or delete it "
            f"(`rm -r {shlex.quote(str(path))}`) and run `sli quantize` again"
        )


_OPEN: dict[str, SharedEnv] = {}
_OPEN_LOCK = threading.Lock()


def acquire(path: Path, *, write: bool, max_dbs: int) -> SharedEnv:
    """This process's environment on ``path`` (opened on first use, writable where the
    directory allows); one more user.

    Raises:
        PermissionError: ``write`` on a directory this process cannot write.
        CacheFormatError, TruncatedCacheError: the data file is not LMDB's, or cut short.
    """
    key = os.path.realpath(path)
    with _OPEN_LOCK:
        shared = _OPEN.get(key)
        if shared is not None and not shared.is_current():
            # replaced under us (set aside as damaged, deleted and rebuilt): its users keep
            # the old files until they let go; newcomers open what is there now
            del _OPEN[key]
            shared = None
        if shared is None:
            shared = _open(path, max_dbs=max_dbs)
            _OPEN[key] = shared
        if write and not shared.writable:
            if shared.users == 0:
                shared.env.close()
                del _OPEN[key]
            why = os.strerror(errno.EROFS if os.statvfs(path).f_flag & os.ST_RDONLY else errno.EACCES)
            raise PermissionError(f"{path} cannot be written by this process ({why}); choose a writable directory")
        shared.users += 1
        return shared


def _open(path: Path, *, max_dbs: int) -> SharedEnv:
    _check_not_truncated(path)
    writable = _writable(path)
    data = path / DATA_FILE
    existing = data.stat().st_size if data.exists() else 0
    try:
        env = lmdb.open(
            str(path),
            map_size=map_bytes(existing),
            max_dbs=max_dbs,
            readonly=not writable,
            lock=True,
            # the kernel's own read-ahead on page faults stays on: under a tight memory limit,
            # pages read ahead explicitly (cache.readahead) can be reclaimed before use, and
            # with LMDB's random-access advice each of them then came back 4 KiB at a time
            readahead=True,
            # a transaction's dirty pages are malloc'd and written with pwrite at commit: a
            # writable map would fault every new page in from the file system first (an 8 B
            # model's 4.3 GB of records cost ~1.2 M major faults, measured), a full disk would
            # be a SIGBUS, and the file would be extended to the whole map
            writemap=False,
            metasync=True,
            sync=True,
        )
    except lmdb.Error as e:
        raise CacheFormatError(f"{path} is not a readable LMDB environment ({e}); delete it and run `sli quantize` again") from e
    return SharedEnv(path, env, writable, _identity(path))


def release(shared: SharedEnv) -> None:
    """One user fewer; the environment closes with its last user."""
    with _OPEN_LOCK:
        shared.users -= 1
        if shared.users == 0:
            shared.env.close()
            key = os.path.realpath(shared.path)
            if _OPEN.get(key) is shared:
                del _OPEN[key]


__all__ = ["DATA_FILE", "MAP_BYTES", "SharedEnv", "acquire", "map_bytes", "release"]
