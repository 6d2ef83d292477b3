"""Calibration activations between layers: ``[samples, seqlen, hidden]`` float32, one
buffer read (this layer's inputs) and one written (the next layer's inputs).

Each layer's outputs go to a file under ``<cache>/calibration/<variant>/`` that is flushed to
disk before the layer's records commit, and the layer's group entry names the file with its
size and crc32: the records and the next layer's inputs commit together, and a killed run
resumes from the last committed layer. Buffers live in memory when two of them fit the memory
budget (then the file is written at commit); larger ones are *spilled*: they are the file
itself, mapped, so the page cache holds them and the process does not.
"""

from __future__ import annotations

import logging
import os
import shutil
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

logger = logging.getLogger(__name__)

CALIBRATION_DIR = "calibration"
_CRC_CHUNK = 64 << 20


@dataclass(frozen=True)
class Committed:
    """A flushed activation file, as a group entry records it."""

    file: str
    nbytes: int
    crc32: int

    def to_dict(self) -> dict:
        return {"file": self.file, "nbytes": self.nbytes, "crc32": self.crc32}


def _crc(path: Path) -> int:
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(_CRC_CHUNK):
            crc = zlib.crc32(chunk, crc)
    return crc


class ActivationStore:
    """Activation buffers of one variant's calibration.

    Args:
        cache_dir: the cache directory; files go to ``<cache_dir>/calibration/<vid>/``.
        vid: the variant being built.
        shape: ``(samples, seqlen, hidden)``.
        memory_budget: bytes; buffers stay in memory when two fit in half of it, else they are
            mapped files. None: in memory.
    """

    def __init__(self, cache_dir: Path, vid: str, shape: tuple[int, int, int], *, memory_budget: int | None) -> None:
        self.dir = Path(cache_dir) / CALIBRATION_DIR / vid
        self.dir.mkdir(parents=True, exist_ok=True)
        self.shape = tuple(shape)
        self.nbytes = int(np.prod(self.shape)) * 4
        self.spilled = memory_budget is not None and 2 * self.nbytes > memory_budget // 2
        logger.info(
            "calibration activations: %d x %d x %d float32 = %.1f MiB per buffer, %s", *self.shape, self.nbytes / 2**20,
            f"spilled to {self.dir} (two buffers exceed half the {memory_budget / 2**20:.0f} MiB budget)" if self.spilled else "in memory",
        )
        self._maps: dict[str, np.memmap] = {}

    def path(self, name: str) -> Path:
        return self.dir / f"{name}.f32"

    def new(self, name: str) -> torch.Tensor:
        """A writable buffer that :meth:`commit` will flush to ``name``'s file."""
        if not self.spilled:
            return torch.empty(self.shape, dtype=torch.float32)
        m = np.memmap(self.path(name), dtype=np.float32, mode="w+", shape=self.shape)
        self._maps[name] = m
        return torch.from_numpy(m)

    def commit(self, name: str, buf: torch.Tensor) -> Committed:
        """Put ``buf`` on disk as ``name``'s file (fsynced); returns what the group entry records."""
        path = self.path(name)
        if name in self._maps:
            self._maps[name].flush()
        else:
            tmp = path.with_suffix(".tmp")
            with open(tmp, "wb") as f:
                f.write(memoryview(buf.contiguous().numpy()).cast("B"))
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        return Committed(path.name, path.stat().st_size, _crc(path))

    def open(self, rec: dict | None) -> torch.Tensor | None:
        """The buffer a group entry names, if its file is there and intact (else None: the
        caller recomputes it). Spilled buffers are mapped read-only, others read into memory."""
        if not rec:
            return None
        path = self.dir / rec["file"]
        if not path.is_file() or path.stat().st_size != rec["nbytes"] or rec["nbytes"] != self.nbytes:
            logger.info("calibration inputs %s missing or of another size; recomputing them", path)
            return None
        if _crc(path) != rec["crc32"]:
            logger.warning("calibration inputs %s fail their checksum; recomputing them", path)
            return None
        if self.spilled:
            m = np.memmap(path, dtype=np.float32, mode="c", shape=self.shape)  # copy-on-write: the file is never changed
            self._maps[path.stem] = m
            return torch.from_numpy(m)
        t = torch.empty(self.shape, dtype=torch.float32)
        with open(path, "rb") as f:
            f.readinto(memoryview(t.numpy()).cast("B"))
        return t

    def release(self, name: str) -> None:
        """Drop ``name``'s buffer and file (after the next layer's inputs have committed)."""
        self._maps.pop(name, None)  # the map goes with the last tensor viewing it
        self.path(name).unlink(missing_ok=True)

    def remove_all(self) -> None:
        """The variant is complete: its activation files go."""
        self._maps.clear()
        shutil.rmtree(self.dir, ignore_errors=True)
        parent = self.dir.parent
        if parent.is_dir() and not any(parent.iterdir()):
            parent.rmdir()
