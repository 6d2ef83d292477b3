"""Errors raised by the on-disk cache. Each message names the record and the fix."""

from __future__ import annotations


class CacheError(Exception):
    """Base class for every cache problem."""


class CorruptRecordError(CacheError):
    """A record failed its checksum, is truncated, or cannot be parsed.

    Nothing is ever served from such a record.
    """

    def __init__(self, key: str, reason: str, *, cache_path: str | None = None) -> None:
        where = f" in cache {cache_path}" if cache_path else ""
        fix = (
            "Rebuild it: delete the cache directory and run `sli quantize` again"
            if cache_path is None
            else f"Rebuild it: `rm -r {cache_path}` and run `sli quantize` again"
        )
        super().__init__(f"record {key!r}{where} is corrupt: {reason}. {fix}.")
        self.key = key
        self.reason = reason


class CacheFormatError(CacheError):
    """The cache was written by a format version this library cannot read."""


class CacheMismatchError(CacheError):
    """The cache (or one of its variants) was built from a different source model or config."""


class VariantNotFoundError(CacheError):
    """The requested variant is not (completely) in the cache."""


class MapResized(CacheError):
    """The LMDB map was full and has been grown: the aborted transaction must be redone."""


class TruncatedCacheError(CacheError):
    """The cache's data file is shorter than the LMDB environment says it must be (a partial
    copy, or a disk that lost its tail). Mapping it would kill the process with SIGBUS."""


class DiskFullError(CacheError):
    """Too little free space on the cache's file system for the next write. Everything
    committed before it is kept: the same command resumes once there is room."""


class CacheGrewError(CacheError):
    """Another process grew the cache past this process's map while records were used in
    place from it: the map cannot move under them. The cache is intact; reopen it."""
