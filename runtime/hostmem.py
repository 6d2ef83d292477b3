"""What memory the host lets this process use: the budget behind ``memory_budget="auto"``.

The limit is the tightest of the memory cgroups on this process's path (cgroup v2
``memory.max``, or v1 ``memory.limit_in_bytes``, walking up to the root: a parent's limit
binds its children too), less what the cgroup holds that reclaim cannot take (anonymous and
mapped file pages, from ``memory.stat``; unmapped page cache is given back on demand); without a limit, the host's
available RAM (``MemAvailable``). A cgroup counts page cache as well as anonymous memory, so
the records a streamed layer reads count against it. From what is left, :data:`AUTO_MARGIN_BYTES`
plus :data:`AUTO_MARGIN_SHARE` of it is kept back: for records in flight in the page cache
(read ahead of the layer that computes), the allocator's slack, the tokenizer and Python's
own objects. The rest is the budget the planner plans within.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import psutil

from runtime.memory import format_size

AUTO_MARGIN_BYTES = 96 << 20
AUTO_MARGIN_SHARE = 0.10
_UNLIMITED = 1 << 60  # cgroup v1 writes "no limit" as a page-rounded LONG_MAX
CGROUP_ROOT = Path("/sys/fs/cgroup")


@dataclass(frozen=True)
class CgroupMemory:
    version: int
    path: Path  # the cgroup directory whose limit binds
    limit_bytes: int
    usage_bytes: int  # what the whole cgroup holds now (anonymous and page cache)
    pinned_bytes: int = -1  # of it, what reclaim cannot take: anonymous and mapped file pages (-1: unknown)

    @property
    def free_bytes(self) -> int:
        """What the cgroup can still give: its limit less the memory reclaim cannot take
        (page cache that is not mapped is reclaimed on demand, so it does not count)."""
        return self.limit_bytes - (self.pinned_bytes if self.pinned_bytes >= 0 else self.usage_bytes)


@dataclass(frozen=True)
class HostBudget:
    """The automatic budget and how it was found."""

    budget_bytes: int
    available_bytes: int
    margin_bytes: int
    source: str

    def describe(self) -> str:
        return (
            f"auto budget {format_size(self.budget_bytes)}: {self.source}; {format_size(self.available_bytes)} available to this "
            f"process, less a margin of {format_size(self.margin_bytes)} ({format_size(AUTO_MARGIN_BYTES)} + "
            f"{AUTO_MARGIN_SHARE:.0%}) for records in flight, allocator slack and Python objects"
        )


def _read_int(p: Path) -> int | None:
    try:
        text = p.read_text().strip()
    except OSError:
        return None
    if text == "max":
        return None
    try:
        v = int(text)
    except ValueError:
        return None
    return None if v >= _UNLIMITED else v


def own_cgroups(proc_cgroup: Path) -> dict[int | str, str]:
    """``{0: v2 path, "memory": v1 memory path}`` from ``/proc/self/cgroup``."""
    out: dict[int | str, str] = {}
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        return out
    for line in lines:
        if line.count(":") < 2:
            continue
        hid, controllers, path = line.split(":", 2)
        if hid == "0" and controllers == "":
            out[0] = path
        elif "memory" in controllers.split(","):
            out["memory"] = path
    return out


def _pinned(stat: Path, version: int) -> int:
    """Anonymous plus mapped file bytes from a cgroup's memory.stat (-1 when unreadable)."""
    keys = ("total_rss", "total_mapped_file") if version == 1 else ("anon", "file_mapped")
    try:
        fields = dict(line.split() for line in stat.read_text().splitlines() if line.count(" ") == 1)
        return sum(int(fields[k]) for k in keys)
    except (OSError, KeyError, ValueError):
        return -1


def cgroup_memory(root: Path = CGROUP_ROOT, proc_cgroup: Path = Path("/proc/self/cgroup")) -> CgroupMemory | None:
    """The binding memory cgroup of this process, or None where no cgroup sets a limit."""
    own = own_cgroups(proc_cgroup)
    candidates: list[tuple[int, Path, str, str]] = []
    if "memory" in own and (root / "memory").is_dir():  # v1: the memory controller's own hierarchy
        candidates.append((1, root / "memory", own["memory"], "memory.limit_in_bytes"))
    if 0 in own:  # v2: the unified hierarchy (alone at the root, or beside v1 under unified/)
        base = root if (root / "cgroup.controllers").exists() else root / "unified"
        candidates.append((2, base, own[0], "memory.max"))
    best: CgroupMemory | None = None
    for version, base, rel, limit_file in candidates:
        d = base / rel.lstrip("/")
        while True:
            limit = _read_int(d / limit_file)
            if limit is not None and (best is None or limit < best.limit_bytes):
                usage_file = "memory.usage_in_bytes" if version == 1 else "memory.current"
                best = CgroupMemory(version, d, limit, _read_int(d / usage_file) or 0, _pinned(d / "memory.stat", version))
            if d == base or d.parent == d:
                break
            d = d.parent
    return best


def auto_budget() -> HostBudget:
    """The budget ``memory_budget="auto"`` means on this host now.

    Raises:
        ValueError: nothing is left after the process's own memory and the margin.
    """
    cg = cgroup_memory()
    if cg is not None:
        available = cg.free_bytes
        source = (
            f"cgroup v{cg.version} limit {format_size(cg.limit_bytes)} at {cg.path}, {format_size(cg.limit_bytes - cg.free_bytes)} "
            f"of it held (anonymous and mapped; this process {format_size(psutil.Process(os.getpid()).memory_info().rss)})"
        )
    else:
        available = psutil.virtual_memory().available
        source = f"no cgroup memory limit; the host has {format_size(available)} available"
    margin = AUTO_MARGIN_BYTES + int(AUTO_MARGIN_SHARE * max(available, 0))
    budget = available - margin
    if budget <= 0:
        raise ValueError(
            f"memory_budget='auto' found no memory to plan in: {source}; after the margin of {format_size(margin)} "
            "nothing is left. Raise the limit, or pass an explicit --memory-budget"
        )
    return HostBudget(budget, available, margin, source)


def readahead_room(need: int) -> tuple[bool, str]:
    """Whether the page cache has ``need`` bytes to spare for records read ahead: in this
    process's memory cgroup (limit less usage), else the host's available RAM."""
    cg = cgroup_memory()
    if cg is not None:
        free, where = cg.free_bytes, f"cgroup v{cg.version} limit {format_size(cg.limit_bytes)}"
    else:
        free, where = psutil.virtual_memory().available, "available RAM"
    verdict = "leaves" if free >= need else "does not leave"
    return free >= need, f"{where} has {format_size(free)} free, which {verdict} the {format_size(need)} records in flight need"
