"""Memory sizes and measurement.

`parse_size` reads budgets such as ``"512MB"`` or ``"2GiB"``. `PeakMemorySampler` measures
a process's peak *anonymous* resident memory over a baseline, sampling in a thread:
file-backed pages (mmap'd model files and LMDB pages) are the kernel's to reclaim, so
they are not counted.
"""

from __future__ import annotations

import re
import threading
import time
from types import TracebackType

_UNITS = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "m": 1000**2,
    "mb": 1000**2,
    "g": 1000**3,
    "gb": 1000**3,
    "t": 1000**4,
    "tb": 1000**4,
    "kib": 1 << 10,
    "mib": 1 << 20,
    "gib": 1 << 30,
    "tib": 1 << 40,
}


def parse_size(text: str | int) -> int:
    """Parse a byte size: an int, or a number with an optional unit (B, KB, MB, GB, KiB, MiB, GiB).

    Raises:
        ValueError: not a size.
    """
    if isinstance(text, int):
        if text <= 0:
            raise ValueError(f"size must be positive, got {text}")
        return text
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    if not m or m.group(2).lower() not in _UNITS:
        raise ValueError(f"cannot read {text!r} as a size; write e.g. 512MB, 1.5GB or 2GiB")
    value = int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    if value <= 0:
        raise ValueError(f"size must be positive, got {text!r}")
    return value


def format_size(n: float) -> str:
    """Human-readable size in MiB/GiB (binary units)."""
    if n >= 1 << 30:
        return f"{n / (1 << 30):.2f} GiB"
    return f"{n / (1 << 20):.1f} MiB"


def anon_rss_bytes() -> int:
    """This process's resident anonymous memory (Linux ``RssAnon``; elsewhere psutil's RSS)."""
    try:
        with open("/proc/self/status", "rb") as f:
            for line in f:
                if line.startswith(b"RssAnon:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import psutil

    return psutil.Process().memory_info().rss


class PeakMemorySampler:
    """Context manager sampling anonymous RSS every ``interval`` seconds in a daemon thread,
    or, with ``interval=None``, only when :meth:`sample` is called (and on exit).

    ``peak_bytes`` is the highest sample minus the baseline taken on entry. A thread that
    reads ``/proc`` every few milliseconds takes the GIL and a core from the work it measures
    (16% of a warm decode's samples on 2 cores), so normal runs sample at token boundaries
    (``interval=None``) and only benchmarks sample finely.
    """

    def __init__(self, *, interval: float | None = 0.002) -> None:
        self.interval = interval
        self.baseline = 0
        self.peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, anon_rss_bytes())
            time.sleep(self.interval)

    def sample(self) -> None:
        """Take one sample now (cheap: one read of ``/proc/self/status``)."""
        self.peak = max(self.peak, anon_rss_bytes())

    def __enter__(self) -> "PeakMemorySampler":
        self.baseline = anon_rss_bytes()
        self.peak = self.baseline
        self._stop.clear()
        if self.interval is not None:
            self._thread = threading.Thread(target=self._run, name="sli-mem-sampler", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.peak = max(self.peak, anon_rss_bytes())

    @property
    def peak_bytes(self) -> int:
        return max(0, self.peak - self.baseline)


def release_free_memory() -> bool:
    """Return the allocator's free heap pages to the OS (glibc ``malloc_trim``).

    glibc keeps freed blocks of up to 32 MB on its heap, so after a layer's temporaries
    are freed the process's anonymous RSS stays high; trimming between layers keeps the
    working set near one layer. Returns False where the C library has no ``malloc_trim``
    (nothing to do there: other allocators return memory on their own terms).
    """
    global _MALLOC_TRIM
    if _MALLOC_TRIM is None:
        import ctypes
        import ctypes.util

        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            _MALLOC_TRIM = libc.malloc_trim
        except (OSError, AttributeError):
            _MALLOC_TRIM = False
    if _MALLOC_TRIM is False:
        return False
    _MALLOC_TRIM(0)
    return True


_MALLOC_TRIM = None


def bound_allocator(mmap_threshold: int = 1 << 20, arenas: int = 2) -> bool:
    """Make glibc return large freed blocks to the OS at once and cap its thread arenas.

    glibc raises its mmap threshold after each large free (up to 32 MB), after which
    layer-sized temporaries are carved from the heap and linger there; each extra thread
    also gets an arena of its own. Fixing the threshold and the arena count keeps the
    process's anonymous memory close to what the runtime actually holds. Returns False
    where ``mallopt`` is unavailable.
    """
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    m_mmap_threshold, m_arena_max = -3, -8
    return bool(mallopt(m_mmap_threshold, int(mmap_threshold))) and bool(mallopt(m_arena_max, int(arenas)))
