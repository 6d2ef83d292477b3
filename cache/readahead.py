"""Page-cache control for records read through LMDB's memory map.

LMDB serves records from a read-only ``mmap`` of ``data.mdb``. Left to itself, a cold record
arrives one page fault at a time: with LMDB's random-access advice each fault reads 4 KiB,
which is how a streamed 8 B model read 717 MB per token through 183,000 faults (81 MB/s).
:func:`advise_willneed` tells the kernel a record's whole range is about to be read
(``madvise(MADV_WILLNEED)``, piece by piece): it queues reads for the whole range and returns, so
the record is in the page cache, read at the speed of the disk, by the time it is touched.
:func:`drop_file_cache` does the opposite, for measurements that must start cold.

Both are advice: the kernel may ignore them. Where the call does not exist (not POSIX),
:data:`WILLNEED_SUPPORTED` is false and callers say so rather than pretend.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import mmap
import os
import sys
from pathlib import Path

import numpy as np

_PAGE = mmap.PAGESIZE
_MADV_WILLNEED = getattr(mmap, "MADV_WILLNEED", None)

try:
    _libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
    _madvise = _libc.madvise
    _madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    _madvise.restype = ctypes.c_int
except (OSError, AttributeError):  # pragma: no cover - non-POSIX
    _madvise = None

WILLNEED_SUPPORTED = _madvise is not None and _MADV_WILLNEED is not None
# Linux reads at most max(read_ahead_kb, max_sectors_kb) per WILLNEED call and silently drops
# the rest of the range (one call on a cold 416 MiB file brought in 8 MiB, measured), so a
# range is advised in pieces no larger than the smallest read-ahead window in common use.
# Each piece is queued and the call returns: a 416 MiB range is queued in ~30 ms and read at
# the disk's speed (0.3 s here, against 1.1 s for one plain sequential read).
WILLNEED_CHUNK = 128 << 10


def buffer_span(buf: memoryview) -> tuple[int, int]:
    """(address, length) of a buffer's memory (a record inside LMDB's map)."""
    mv = memoryview(buf)
    if not len(mv):
        return 0, 0
    addr = np.frombuffer(mv, dtype=np.uint8).ctypes.data  # a read-only buffer's address, no copy
    return addr, len(mv)


def advise_willneed(buf: memoryview) -> int:
    """Ask the kernel to read the pages under ``buf`` now, in large reads; returns the bytes
    advised (0 when the platform has no ``madvise``). Safe on pages already cached."""
    if not WILLNEED_SUPPORTED:
        return 0
    addr, n = buffer_span(buf)
    if not n:
        return 0
    start = addr - addr % _PAGE
    end = addr + n
    for a in range(start, end, WILLNEED_CHUNK):
        if _madvise(a, min(WILLNEED_CHUNK, end - a), _MADV_WILLNEED) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"madvise(MADV_WILLNEED) on {n} bytes failed: {os.strerror(err)}")
    return n


# MADV_PAGEOUT (Linux 5.4+): reclaim the range's pages now. Python's mmap module names it only
# from 3.12; the number is Linux's own.
_MADV_PAGEOUT = getattr(mmap, "MADV_PAGEOUT", 21 if sys.platform.startswith("linux") else None)
PAGEOUT_SUPPORTED = _madvise is not None and _MADV_PAGEOUT is not None


def advise_pageout(buf: memoryview) -> int:
    """Tell the kernel the pages under ``buf`` (a record in a read-only file map) will not be
    needed again soon, so it reclaims them now rather than pages still in use; returns the
    bytes advised (0 where the platform cannot). Clean file pages are dropped and read again
    from the file when next touched. A streamed layer's records get this after the layer has
    run, so under a memory limit they leave the page cache before the weights kept there."""
    if not PAGEOUT_SUPPORTED:
        return 0
    addr, n = buffer_span(buf)
    start = -(-addr // _PAGE) * _PAGE  # whole pages inside the record: its neighbours' pages stay
    end = (addr + n) // _PAGE * _PAGE
    if end <= start:
        return 0
    if _madvise(start, end - start, _MADV_PAGEOUT) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"madvise(MADV_PAGEOUT) on {n} bytes failed: {os.strerror(err)}")
    return n


def advise_file(fd: int, offset: int, length: int) -> int:
    """:func:`advise_willneed` for a byte range of an open file (``posix_fadvise``)."""
    if not hasattr(os, "posix_fadvise"):
        return 0
    for off in range(offset, offset + length, WILLNEED_CHUNK):
        os.posix_fadvise(fd, off, min(WILLNEED_CHUNK, offset + length - off), os.POSIX_FADV_WILLNEED)
    return length


def drop_file_cache(path: str | os.PathLike[str]) -> int:
    """Evict a file's clean pages from the page cache (``POSIX_FADV_DONTNEED``); returns its
    size. Pages another process has mapped and is using may stay."""
    p = Path(path)
    fd = os.open(p, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        else:  # pragma: no cover - macOS has no fadvise
            raise OSError(f"cannot drop {p} from the page cache on this platform (no posix_fadvise)")
        return size
    finally:
        os.close(fd)
