"""Two budgets for a GPU host: GPU memory and host memory, both planned, neither exceeded.

A layer is in one of three places:

- **GPU-resident**: held on the GPU in compute form; nothing crosses PCIe for it;
- **host-resident**: its records held in pinned host memory at their quantized size; each
  pass copies them to the GPU (PCIe), nothing is read from disk;
- **streamed from disk**: read from the cache into a pinned staging buffer, then copied.

On the GPU: the fixed costs (KV cache, activations, embeddings and head, small tensors),
the resident layers, and ``num_slots`` slots, each holding one layer's records as they
arrived plus the layer decoded for compute. On the host: its fixed costs, the
host-resident layers' records, and ``num_slots`` pinned staging buffers of the largest
layer's records. GPU room goes first to the layers that save the most PCIe bytes per GPU
byte; host room then to those that save the most disk bytes per host byte.

Plain arithmetic: it runs (and is tested) without a GPU.
"""

from __future__ import annotations

from dataclasses import dataclass

from runtime.budget import MIN_SLOTS, BudgetTooSmallError
from runtime.memory import format_size


@dataclass(frozen=True)
class DeviceUnit:
    """One decoder layer on a GPU host.

    ``device_bytes``: held on the GPU when resident (compute form); ``transfer_bytes``: its
    records, what crosses PCIe (quantized size, never bf16 unless stored so); ``stored_bytes``:
    read from disk when streamed (after zstd)."""

    name: str
    device_bytes: int
    transfer_bytes: int
    stored_bytes: int


@dataclass(frozen=True)
class DevicePlan:
    """The two-budget plan. Invariants: ``gpu_planned_bytes <= gpu_budget_bytes`` and
    ``host_planned_bytes <= host_budget_bytes``."""

    gpu_budget_bytes: int
    host_budget_bytes: int
    gpu_fixed: dict[str, int]
    host_fixed: dict[str, int]
    num_slots: int
    gpu_slot_bytes: int  # one slot: the records as copied plus the layer decoded
    staging_bytes: int  # one pinned staging buffer: the largest layer's records
    gpu_resident: tuple[str, ...]
    host_resident: tuple[str, ...]
    disk_streamed: tuple[str, ...]
    gpu_resident_bytes: int
    host_resident_bytes: int
    pcie_bytes_per_pass: int
    disk_bytes_per_pass: int

    @property
    def streaming(self) -> bool:
        return bool(self.host_resident or self.disk_streamed)

    @property
    def budget_bytes(self) -> int:
        """The budget the KV reservation lives in (the GPU's)."""
        return self.gpu_budget_bytes

    @property
    def gpu_planned_bytes(self) -> int:
        slots = self.num_slots * self.gpu_slot_bytes if self.streaming else 0
        return sum(self.gpu_fixed.values()) + self.gpu_resident_bytes + slots

    @property
    def host_planned_bytes(self) -> int:
        staging = self.num_slots * self.staging_bytes if self.streaming else 0
        return sum(self.host_fixed.values()) + self.host_resident_bytes + staging

    def describe(self) -> str:
        return (
            f"GPU {format_size(self.gpu_planned_bytes)} of {format_size(self.gpu_budget_bytes)}: "
            f"{len(self.gpu_resident)} layers resident, {self.num_slots if self.streaming else 0} slots of "
            f"{format_size(self.gpu_slot_bytes)}; host {format_size(self.host_planned_bytes)} of "
            f"{format_size(self.host_budget_bytes)}: {len(self.host_resident)} layers pinned, "
            f"{len(self.disk_streamed)} streamed from disk; {format_size(self.pcie_bytes_per_pass)} over PCIe and "
            f"{format_size(self.disk_bytes_per_pass)} from disk per pass"
        )


def plan_two_budgets(
    units: list[DeviceUnit],
    *,
    gpu_budget: int,
    host_budget: int,
    gpu_fixed: dict[str, int],
    host_fixed: dict[str, int],
    num_slots: int = MIN_SLOTS,
) -> DevicePlan:
    """Place every layer on the GPU, in pinned host memory, or on disk.

    Raises:
        BudgetTooSmallError: a budget cannot hold its fixed costs plus the slots (or staging
            buffers) for the largest layer; the message gives the minimum and the option.
    """
    if num_slots < MIN_SLOTS:
        raise ValueError(f"num_slots must be at least {MIN_SLOTS} (one layer computing, the next copying), got {num_slots}")
    gfix, hfix = sum(gpu_fixed.values()), sum(host_fixed.values())
    if hfix > host_budget:
        raise BudgetTooSmallError(
            f"host memory budget {format_size(host_budget)} is below its fixed costs {format_size(hfix)} "
            f"({_parts(host_fixed)}); use --memory-budget {_mb(hfix)}MB or more"
        )
    names = [u.name for u in units]
    if gfix + sum(u.device_bytes for u in units) <= gpu_budget:
        return DevicePlan(gpu_budget, host_budget, dict(gpu_fixed), dict(host_fixed), num_slots, 0, 0, tuple(names), (), (),
                          sum(u.device_bytes for u in units), 0, 0, 0)
    slot = max(u.device_bytes + u.transfer_bytes for u in units)
    staging = max(u.transfer_bytes for u in units)
    gpu_min = gfix + num_slots * slot
    if gpu_min > gpu_budget:
        raise BudgetTooSmallError(
            f"GPU budget {format_size(gpu_budget)} is below the {format_size(gpu_min)} needed for its fixed costs "
            f"({_parts(gpu_fixed)}) plus {num_slots} slots of {format_size(slot)} (the largest layer, as copied and "
            f"decoded); use --gpu-budget {_mb(gpu_min)}MB or more, a shorter context, or a smaller quantization mode"
        )
    host_min = hfix + num_slots * staging
    if host_min > host_budget:
        raise BudgetTooSmallError(
            f"host memory budget {format_size(host_budget)} is below the {format_size(host_min)} needed for its fixed "
            f"costs ({_parts(host_fixed)}) plus {num_slots} pinned staging buffers of {format_size(staging)}; "
            f"use --memory-budget {_mb(host_min)}MB or more"
        )
    room = gpu_budget - gpu_min
    on_gpu: set[str] = set()
    for u in sorted(units, key=lambda u: (-u.transfer_bytes / max(u.device_bytes, 1), u.name)):
        if u.device_bytes <= room:
            on_gpu.add(u.name)
            room -= u.device_bytes
    room = host_budget - host_min
    pinned: set[str] = set()
    for u in sorted((u for u in units if u.name not in on_gpu), key=lambda u: (-u.stored_bytes / max(u.transfer_bytes, 1), u.name)):
        if u.transfer_bytes <= room:
            pinned.add(u.name)
            room -= u.transfer_bytes
    return DevicePlan(
        gpu_budget_bytes=gpu_budget,
        host_budget_bytes=host_budget,
        gpu_fixed=dict(gpu_fixed),
        host_fixed=dict(host_fixed),
        num_slots=num_slots,
        gpu_slot_bytes=slot,
        staging_bytes=staging,
        gpu_resident=tuple(n for n in names if n in on_gpu),
        host_resident=tuple(n for n in names if n in pinned),
        disk_streamed=tuple(n for n in names if n not in on_gpu and n not in pinned),
        gpu_resident_bytes=sum(u.device_bytes for u in units if u.name in on_gpu),
        host_resident_bytes=sum(u.transfer_bytes for u in units if u.name in pinned),
        pcie_bytes_per_pass=sum(u.transfer_bytes for u in units if u.name not in on_gpu),
        disk_bytes_per_pass=sum(u.stored_bytes for u in units if u.name not in on_gpu and u.name not in pinned),
    )


def _parts(d: dict[str, int]) -> str:
    return ", ".join(f"{k} {format_size(v)}" for k, v in d.items()) or "none"


def _mb(n: int) -> int:
    return -(-n // 1_000_000)
