"""The int4 linear that picks its kernel by the rows of the step.

torch's packed int4 CPU kernel (:class:`runtime.kernels.Int4CpuKernel`) dequantizes the
weight again for every block of a few activation rows: its time grows with the rows (a
2048x8192 weight, groups of 64, on the 2-core AVX-512 host: 0.45 ms for 1 row, 3.2 ms for
16, 25 ms for 128), while oneDNN's bf16 GEMM costs nearly the same for 1 or 16 rows. So:

- few rows (decode, small batches): the packed kernel, on the derived copy;
- from a crossover on: **dequantize + GEMM** — the weight's *portable* int4 codes (the
  cache's own planar layout, :class:`cache.codecs.GroupIntCodec`, never a kernel's private
  one) are dequantized to bf16 one tile of rows at a time into a scratch tile that is reused
  (:data:`TILE_ELEMS`, counted in the plan), and each tile is multiplied by oneDNN's bf16
  GEMM (:func:`rows_matmul`).

The crossover depends on the host, torch and the weight's shape, so it is measured here once
per shape (:func:`measure_crossover`) and stored beside the derived copy
(:class:`CrossoverTable`, keyed by torch's version, the CPU capability, the CPU model and the
thread count: any change measures again). The choice is made in one place,
:meth:`RowsKernel.matmul`; the model's code never sees it. Like the packed kernel, the rows
path proves itself against the dequantized reference before it is used
(:meth:`RowsKernel.prove`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.nn import functional as F

from cache.codecs import CodecName, get_codec
from cache.record import EncodedTensor
from runtime.budget import BudgetPlan, PageCacheRoom
from runtime.kernels import KERNEL_TOLERANCE, Int4Codes, Int4CpuKernel, KernelError, PackedInt4, cpu_capability

logger = logging.getLogger(__name__)

# bf16 elements of one dequantized tile (4 MiB): 1024 rows x 2048 measured best of 128-2048
# rows, and few tiles keep the parallel regions (each a chance to stall on a busy host) few
TILE_ELEMS = 1 << 21
ROW_COUNTS = (1, 2, 4, 8, 16, 32, 64, 128)  # rows the crossover is searched among
CROSSOVER_FILE = "rows-crossover.json"
CROSSOVER_VERSION = 1


def tile_rows(in_features: int, tile_elems: int = TILE_ELEMS) -> int:
    """Weight rows one tile of ``tile_elems`` holds (at least one)."""
    if tile_elems < in_features:
        raise ValueError(f"a scratch tile of {tile_elems} elements cannot hold one row of {in_features}")
    return tile_elems // in_features


def dequantize_int4_into(codes: Int4Codes, out: torch.Tensor) -> torch.Tensor:
    """The whole weight as bf16 ``[out, in]`` into ``out`` (which it returns)."""
    r = 0
    for p, s, o in codes.parts:
        _dequantize_rows(p, s, o, codes.group_size, out[r : r + p.shape[0]])
        r += p.shape[0]
    return out


def _dequantize_rows(packed: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, group_size: int, out: torch.Tensor) -> None:
    """``out [rows, in]`` (bf16, contiguous) = ``q * scale + offset`` for planar codes ``packed [rows, in/2]``.
    Four passes in place, on a tile that stays in cache: nibbles to bf16, then scale and offset per group."""
    n, half = packed.shape
    planes = out.view(n, 2, half)
    torch.bitwise_and(packed, 15, out=planes[:, 0])  # columns 0 .. in/2: low nibbles
    torch.bitwise_right_shift(packed, 4, out=planes[:, 1])
    groups = out.view(n, -1, group_size)  # [rows, groups, group_size]
    groups.mul_(scale.to(torch.bfloat16).unsqueeze(2)).add_(offset.to(torch.bfloat16).unsqueeze(2))


def rows_matmul(x: torch.Tensor, codes: Int4Codes, *, tile: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ W.T`` for bf16 ``x [..., in]``: ``W`` dequantized a tile of rows at a time into
    ``tile`` (a flat bf16 scratch; one of :data:`TILE_ELEMS` made when None), each tile
    multiplied by torch's bf16 GEMM."""
    k = codes.in_features
    x2 = x.reshape(-1, k)
    y = torch.empty(x2.shape[0], codes.out_features, dtype=torch.bfloat16)
    step = tile_rows(k, TILE_ELEMS if tile is None else tile.numel())
    if tile is None:
        tile = torch.empty(step * k, dtype=torch.bfloat16)
    r = 0
    for p, s, o in codes.parts:
        for a in range(0, p.shape[0], step):
            b = min(p.shape[0], a + step)
            t = tile[: (b - a) * k].view(b - a, k)
            _dequantize_rows(p[a:b], s[a:b], o[a:b], codes.group_size, t)
            torch.matmul(x2, t.T, out=y[:, r + a : r + b])
        r += p.shape[0]
    return y.view(*x.shape[:-1], y.shape[-1])


# -- the crossover ---------------------------------------------------------------------------
def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def crossover_key() -> dict[str, str | int]:
    """What a measured crossover depends on; a stored table with another key is measured again."""
    return {"version": CROSSOVER_VERSION, "torch": torch.__version__, "capability": cpu_capability(), "cpu": _cpu_model(),
            "threads": torch.get_num_threads(), "tile_elems": TILE_ELEMS}


def shape_key(n: int, k: int, group_size: int) -> str:
    return f"{n}x{k}g{group_size}"


def _random_codes(n: int, k: int, group_size: int, gen: torch.Generator) -> EncodedTensor:
    g = k // group_size
    parts = {"packed": torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, generator=gen),
             "scale": (torch.rand(n, g, generator=gen) * 0.01 + 1e-3).half(),
             "offset": (torch.rand(n, g, generator=gen) * -0.08).half()}
    return EncodedTensor(CodecName.INT4_GROUP.value, (n, k), "float32", parts,
                         {"group_size": group_size, "bits": 4, "layout": "planar", "symmetric": False})


def _best_ms(fn, reps: int = 7) -> float:
    """Best of ``reps`` runs: on a shared host the fastest run is the one nothing else stalled."""
    fn()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return 1e3 * min(ts)


def measure_crossover(n: int, k: int, group_size: int, *, tile: torch.Tensor | None = None) -> int | None:
    """The fewest rows (of :data:`ROW_COUNTS`) from which dequantize + GEMM beats the packed
    kernel on a ``[n, k]`` weight here, or None when it never does up to the most rows.
    Bisects, assuming the gap grows with the rows (both kernels' costs are linear in the rows,
    the rows path's with the smaller slope)."""
    gen = torch.Generator().manual_seed(n * 31 + k)
    enc = _random_codes(n, k, group_size, gen)
    packed, codes = Int4CpuKernel.pack(enc), Int4Codes.of([enc])

    def wins(m: int) -> bool:
        x = torch.randn(m, k, generator=gen).to(torch.bfloat16)
        t_rows = _best_ms(lambda: rows_matmul(x, codes, tile=tile))
        t_packed = _best_ms(lambda: Int4CpuKernel.matmul(x, packed))
        logger.debug("%s rows %d: packed %.3f ms, dequant+gemm %.3f ms", shape_key(n, k, group_size), m, t_packed, t_rows)
        return t_rows < t_packed

    return first_win(wins)


def first_win(wins, counts: tuple[int, ...] = ROW_COUNTS) -> int | None:
    """The fewest of ``counts`` (ascending) at which ``wins(rows)`` holds, asking as few as a
    bisection needs (it assumes that once the rows path wins it keeps winning); None when it
    does not win at the most."""
    lo, hi = 0, len(counts) - 1
    if not wins(counts[hi]):
        return None
    while lo < hi:  # invariant: the rows path wins at counts[hi]
        mid = (lo + hi) // 2
        if wins(counts[mid]):
            hi = mid
        else:
            lo = mid + 1
    return counts[hi]


@dataclass
class CrossoverTable:
    """Measured crossovers by weight shape, stored as JSON in ``path`` (beside the derived copy).

    ``rows[shape_key] = r``: from ``r`` rows on, dequantize + GEMM; None: never."""

    path: Path
    rows: dict[str, int | None] = field(default_factory=dict)
    key: dict[str, str | int] = field(default_factory=crossover_key)

    @classmethod
    def load(cls, path: Path) -> "CrossoverTable":
        """The table stored at ``path``; empty when there is none, it is unreadable, or it was
        measured under another key (torch, CPU, threads)."""
        want = crossover_key()
        try:
            d = json.loads(Path(path).read_text())
        except (OSError, ValueError):
            return cls(Path(path))
        if d.get("key") != want:
            logger.info("rows crossover at %s was measured for %s; measuring again for %s", path, d.get("key"), want)
            return cls(Path(path))
        return cls(Path(path), {k: (None if v is None else int(v)) for k, v in d.get("rows", {}).items()})

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"key": self.key, "rows": self.rows}, indent=1, sort_keys=True))
        tmp.replace(self.path)

    def ensure(self, shapes, *, measure=measure_crossover) -> "CrossoverTable":
        """Measure the shapes ``(n, k, group_size)`` not in the table yet, and store it."""
        todo = sorted({s for s in shapes if shape_key(*s) not in self.rows})
        if not todo:
            return self
        tile = torch.empty(TILE_ELEMS, dtype=torch.bfloat16)
        t0 = time.perf_counter()
        for n, k, gs in todo:
            self.rows[shape_key(n, k, gs)] = measure(n, k, gs, tile=tile)
        logger.info("rows crossover measured for %d shapes in %.1f s: %s", len(todo), time.perf_counter() - t0,
                    {shape_key(*s): self.rows[shape_key(*s)] for s in todo})
        try:
            self.save()
        except OSError as e:  # the measurement stands for this process; the next one measures again
            logger.warning("could not store the rows crossover at %s (%s); it is measured again next time", self.path, e)
        return self

    def crossover(self, n: int, k: int, group_size: int) -> int | None:
        return self.rows.get(shape_key(n, k, group_size))


class RowsKernel:
    """The int4 linear's kernel choice: the packed kernel below a weight's crossover (and
    always for a weight without codes), dequantize + GEMM from it on.

    Args:
        table: the measured crossovers; None: the packed kernel for every row count.
        tile_elems: bf16 elements of the scratch tile (counted in the plan as ``rows scratch``).
    """

    _proved: dict[str, float] = {}  # crossover key -> measured error, per process

    def __init__(self, table: CrossoverTable | None = None, *, tile_elems: int = TILE_ELEMS) -> None:
        self.table = table
        self.tile_elems = tile_elems
        self._tile: torch.Tensor | None = None
        self.calls = {"packed": 0, "rows": 0}  # kernel calls by path (cheap counters, read by tests and the bench)

    @property
    def active(self) -> bool:
        return self.table is not None and any(v is not None for v in self.table.rows.values())

    @property
    def scratch_bytes(self) -> int:
        return 2 * self.tile_elems if self.active else 0

    def uses_rows(self, w: PackedInt4, rows: int) -> bool:
        if w.codes is None or self.table is None or w.planes != 1:
            return False
        c = self.table.crossover(w.out_features, w.codes.in_features, w.codes.group_size)
        return c is not None and rows >= c

    def matmul(self, x: torch.Tensor, w: PackedInt4) -> torch.Tensor:
        """``x @ W.T`` for bf16 ``x [..., in]`` by the kernel the rows of ``x`` call for."""
        rows = math.prod(x.shape[:-1])
        if self.uses_rows(w, rows):
            if self._tile is None:
                self._tile = torch.empty(self.tile_elems, dtype=torch.bfloat16)
            self.calls["rows"] += 1
            return rows_matmul(x, w.codes, tile=self._tile)
        self.calls["packed"] += 1
        return Int4CpuKernel.matmul(x, w)

    @classmethod
    def prove(cls) -> float:
        """Once per process: dequantize + GEMM on a known matrix against the dequantized
        reference (fp32 matmul of the same bf16 activations), over tile boundaries and
        stacked records. Returns the relative error.

        Raises:
            KernelError: it gives wrong numbers here.
        """
        key = json.dumps(crossover_key(), sort_keys=True)
        if key in cls._proved:
            return cls._proved[key]
        gen = torch.Generator().manual_seed(4321)
        codec = get_codec(CodecName.INT4_GROUP)
        encs = [codec.encode(torch.randn(n, 256, generator=gen), group_size=64) for n in (48, 80)]
        x = torch.randn(37, 256, generator=gen).to(torch.bfloat16)
        ref = F.linear(x.float(), torch.cat([codec.decode(e, torch.float32) for e in encs]))
        got = rows_matmul(x, Int4Codes.of(encs), tile=torch.empty(16 * 256, dtype=torch.bfloat16)).float()  # tiles of 16 rows
        err = float((got - ref).norm() / ref.norm().clamp_min(1e-30))
        if not math.isfinite(err) or err > KERNEL_TOLERANCE:
            raise KernelError(
                f"the int4 rows path (dequantize + bf16 GEMM) gives wrong numbers on this host: relative error {err:.3g} "
                f"against the dequantized weights (allowed {KERNEL_TOLERANCE}); torch {torch.__version__}, CPU capability "
                f"{cpu_capability()}. Nothing was computed with it. Pass rows_kernel=False (the packed kernel for every "
                "row count) and report this"
            )
        cls._proved[key] = err
        logger.info("int4 rows path proved (relative error %.2e)", err)
        return err


def plan_rows(plan: BudgetPlan, room: PageCacheRoom | None, codes_bytes: int, scratch_bytes: int, *, held_bytes: int = 0,
              ) -> tuple[BudgetPlan | None, str]:
    """The plan with the rows path's costs added, or None and the reason it has no room.

    The path needs the kept layers' portable codes beside their packed copy: ``codes_bytes``
    used in place from the map (in the page-cache room; in the budget when no room is given),
    ``held_bytes`` decompressed into memory (compressed records: in the budget), and one
    scratch tile (``scratch_bytes``, in the budget)."""
    if not codes_bytes + held_bytes:
        return None, "no kept layer has int4 codes the rows path can read"
    anon = plan.planned_bytes + scratch_bytes + held_bytes
    fixed = {**plan.fixed, "rows scratch": scratch_bytes}
    if room is not None:
        have = room.for_mapped(anon) - plan.mapped_bytes - plan.inflight_bytes
        if anon > plan.budget_bytes or codes_bytes > have:
            return None, (f"the plan has no room for the int4 codes ({codes_bytes >> 20} MiB mapped, {max(have, 0) >> 20} MiB left "
                          f"in the page-cache room; {held_bytes >> 20} MiB held) and the {scratch_bytes >> 20} MiB scratch tile")
        new = dataclasses.replace(plan, fixed=fixed, mapped_bytes=plan.mapped_bytes + codes_bytes,
                                  resident_bytes=plan.resident_bytes + held_bytes)
    else:
        if anon + codes_bytes > plan.budget_bytes:
            return None, (f"the budget has no room for the int4 codes ({(codes_bytes + held_bytes) >> 20} MiB) and the "
                          f"{scratch_bytes >> 20} MiB scratch tile beside the plan's {plan.planned_bytes >> 20} MiB")
        new = dataclasses.replace(plan, fixed=fixed, resident_bytes=plan.resident_bytes + codes_bytes + held_bytes)
    return new, (f"kept layers' int4 codes mapped ({codes_bytes >> 20} MiB" + (f", {held_bytes >> 20} MiB held" if held_bytes else "")
                 + f") and a {scratch_bytes >> 20} MiB scratch tile planned")


__all__ = ["plan_rows", "CROSSOVER_FILE", "CrossoverTable", "Int4Codes", "ROW_COUNTS", "RowsKernel", "TILE_ELEMS", "crossover_key",
           "dequantize_int4_into", "first_win", "measure_crossover", "rows_matmul", "shape_key", "tile_rows"]
