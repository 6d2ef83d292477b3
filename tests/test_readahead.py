"""Read-ahead advice and the automatic memory budget: against the kernel's own accounting."""

import ctypes
import mmap
import os
import time
from pathlib import Path

import numpy as np
import pytest

from cache.readahead import WILLNEED_CHUNK, WILLNEED_SUPPORTED, advise_file, advise_willneed, drop_file_cache
from runtime.hostmem import AUTO_MARGIN_BYTES, auto_budget, cgroup_memory

_libc = ctypes.CDLL(None, use_errno=True)


def _resident_share(path: Path) -> float:
    """Share of a file's pages in the page cache (mincore on a fresh mapping)."""
    size = path.stat().st_size
    with open(path, "rb") as f, mmap.mmap(f.fileno(), size, prot=mmap.PROT_READ) as m:
        base = np.frombuffer(m, dtype=np.uint8).ctypes.data
        pages = -(-size // mmap.PAGESIZE)
        vec = (ctypes.c_ubyte * pages)()
        if _libc.mincore(ctypes.c_void_p(base), ctypes.c_size_t(size), vec) != 0:
            pytest.skip(f"mincore unavailable: {os.strerror(ctypes.get_errno())}")
        return sum(v & 1 for v in vec) / pages


def _cold_file(tmp_path: Path, mib: int) -> Path:
    p = tmp_path / "blob"
    with open(p, "wb") as f:
        for _ in range(mib):
            f.write(os.urandom(1 << 20))
        f.flush()
        os.fsync(f.fileno())
    drop_file_cache(p)
    if _resident_share(p) > 0.05:
        pytest.skip("this file system keeps the file's pages resident (tmpfs?): cannot start cold")
    return p


def _wait_resident(p: Path, want: float, seconds: float = 5.0) -> float:
    end = time.time() + seconds
    share = _resident_share(p)
    while share < want and time.time() < end:
        time.sleep(0.05)
        share = _resident_share(p)
    return share


@pytest.mark.skipif(not hasattr(os, "posix_fadvise"), reason="no posix_fadvise")
def test_advice_brings_in_the_whole_range_not_just_the_first_window(tmp_path):
    # one WILLNEED call reads at most one read-ahead window; a 48 MiB range must arrive whole
    p = _cold_file(tmp_path, 48)
    fd = os.open(p, os.O_RDONLY)
    try:
        assert advise_file(fd, 0, p.stat().st_size) == p.stat().st_size
    finally:
        os.close(fd)
    assert _wait_resident(p, 0.95) >= 0.95


@pytest.mark.skipif(not WILLNEED_SUPPORTED, reason="no madvise")
def test_mapped_advice_reads_the_buffer_range(tmp_path):
    p = _cold_file(tmp_path, 24)
    size = p.stat().st_size
    with open(p, "rb") as f, mmap.mmap(f.fileno(), size, prot=mmap.PROT_READ) as m:
        mv = memoryview(m)
        n = advise_willneed(mv[4096 + 17 : size - WILLNEED_CHUNK])  # unaligned start, like a record in LMDB's map
        del mv
        assert n == size - WILLNEED_CHUNK - 4096 - 17
    assert _wait_resident(p, 0.9) >= 0.9
    drop_file_cache(p)
    assert _resident_share(p) < 0.05


def _fake_cgroups(root: Path, proc: Path, *, v1_limit=None, v2_limit=None, usage=100 << 20) -> None:
    lines = []
    if v1_limit is not None:
        d = root / "memory" / "outer" / "inner"
        d.mkdir(parents=True)
        (root / "memory" / "outer" / "memory.limit_in_bytes").write_text(str(v1_limit))
        (root / "memory" / "outer" / "memory.usage_in_bytes").write_text(str(usage))
        (root / "memory" / "outer" / "memory.stat").write_text(f"cache {usage}\nrss 1\ntotal_rss {usage // 2}\ntotal_mapped_file {usage // 4}\n")
        (d / "memory.limit_in_bytes").write_text(str(9223372036854771712))  # "no limit" in v1
        lines.append("4:memory:/outer/inner")
    if v2_limit is not None:
        d = root / "svc.slice" / "job"
        d.mkdir(parents=True)
        (root / "cgroup.controllers").write_text("cpu memory")
        (d / "memory.max").write_text(str(v2_limit))
        (d / "memory.current").write_text(str(usage))
        (root / "svc.slice" / "memory.max").write_text("max")
        lines.append("0::/svc.slice/job")
    proc.write_text("\n".join(lines) + "\n")


def test_cgroup_limits_are_found_in_v1_and_v2_layouts(tmp_path):
    v1 = tmp_path / "v1"
    _fake_cgroups(v1, tmp_path / "p1", v1_limit=900 << 20)
    cg = cgroup_memory(v1, tmp_path / "p1")
    assert (cg.version, cg.limit_bytes, cg.usage_bytes) == (1, 900 << 20, 100 << 20)
    assert cg.free_bytes == (900 << 20) - (75 << 20)  # reclaimable page cache does not count
    assert cg.path == v1 / "memory" / "outer"  # the parent's limit binds the child
    v2 = tmp_path / "v2"
    _fake_cgroups(v2, tmp_path / "p2", v2_limit=2 << 30)
    cg = cgroup_memory(v2, tmp_path / "p2")
    assert (cg.version, cg.limit_bytes) == (2, 2 << 30)
    none = tmp_path / "none"
    _fake_cgroups(none, tmp_path / "p3")
    assert cgroup_memory(none, tmp_path / "p3") is None


def test_auto_budget_plans_within_the_limit_less_the_margin(monkeypatch):
    from runtime import hostmem
    from runtime.hostmem import CgroupMemory

    monkeypatch.setattr(hostmem, "cgroup_memory", lambda: CgroupMemory(2, Path("/x"), 1000 << 20, 900 << 20, 200 << 20))
    b = auto_budget()
    avail = 800 << 20
    assert b.available_bytes == avail
    assert b.budget_bytes == avail - AUTO_MARGIN_BYTES - int(0.10 * avail)
    assert "cgroup v2 limit" in b.describe()
    monkeypatch.setattr(hostmem, "cgroup_memory", lambda: CgroupMemory(1, Path("/x"), 150 << 20, 140 << 20, 100 << 20))
    with pytest.raises(ValueError, match="nothing is left"):
        auto_budget()
