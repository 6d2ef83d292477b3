"""`MemoryBudget`: split a user's memory budget into fixed costs, streaming slots and a
resident set of layers.

Costs are the bytes the runtime holds for each part in its compute form (decoded weights
in the compute dtype). The planner keeps the always-needed parts (embeddings, head, an
allowance for activations and KV), reserves at least two streaming slots (one layer
computing while the next is read), and fills what is left with resident layers, choosing
the layers whose on-disk records are largest first, so that the bytes read per token are
as small as the budget allows. When everything fits, nothing is streamed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from runtime.memory import format_size, parse_size

MIN_SLOTS = 2


class BudgetTooSmallError(ValueError):
    """The budget cannot hold the fixed costs plus streaming slots for one layer."""


@dataclass(frozen=True)
class LayerCost:
    """One decoder layer: bytes held when decoded, and bytes read from the cache to load it."""

    index: int
    resident_bytes: int
    stored_bytes: int


@dataclass(frozen=True)
class BudgetPlan:
    """The planner's answer. Invariant: ``fixed + slots * slot + sum(resident) <= budget``."""

    budget_bytes: int
    fixed_bytes: int
    slot_bytes: int
    num_slots: int
    resident_layers: tuple[int, ...]
    streamed_layers: tuple[int, ...]
    resident_bytes: int
    bytes_read_per_pass: int  # cache bytes read for one forward pass over all layers
    details: dict[str, int] = field(default_factory=dict)

    @property
    def planned_bytes(self) -> int:
        return self.fixed_bytes + self.num_slots * self.slot_bytes * bool(self.streamed_layers) + self.resident_bytes

    def describe(self) -> str:
        return (
            f"budget {format_size(self.budget_bytes)}: fixed {format_size(self.fixed_bytes)}, "
            f"{len(self.resident_layers)} resident layers ({format_size(self.resident_bytes)}), "
            f"{len(self.streamed_layers)} streamed through {self.num_slots} slots of {format_size(self.slot_bytes)}; "
            f"{format_size(self.bytes_read_per_pass)} read per forward pass"
        )


class MemoryBudget:
    """A memory budget in bytes, parsed from ``"512MB"``, ``"2GiB"`` or an int.

    Raises:
        ValueError: not a size.
    """

    def __init__(self, budget: str | int) -> None:
        self.bytes = parse_size(budget)

    def plan(self, layers: list[LayerCost], *, fixed: dict[str, int], num_slots: int = MIN_SLOTS) -> BudgetPlan:
        """Choose resident and streamed layers.

        Args:
            layers: every decoder layer's cost.
            fixed: named costs always held (embeddings, head, activations, KV allowance).
            num_slots: streaming slots when anything is streamed (at least 2).

        Raises:
            BudgetTooSmallError: naming the minimum budget and how to get under it.
        """
        if num_slots < MIN_SLOTS:
            raise ValueError(f"num_slots must be at least {MIN_SLOTS} (double buffering), got {num_slots}")
        fixed_bytes = sum(fixed.values())
        all_resident = fixed_bytes + sum(layer.resident_bytes for layer in layers)
        if all_resident <= self.bytes:
            return BudgetPlan(
                self.bytes, fixed_bytes, 0, 0, tuple(layer.index for layer in layers), (), all_resident - fixed_bytes, 0, dict(fixed)
            )
        slot = max(layer.resident_bytes for layer in layers)
        minimum = fixed_bytes + num_slots * slot
        if minimum > self.bytes:
            parts = ", ".join(f"{k} {format_size(v)}" for k, v in fixed.items())
            raise BudgetTooSmallError(
                f"budget {format_size(self.bytes)} is below the {format_size(minimum)} needed for the fixed costs ({parts}) "
                f"plus {num_slots} streaming slots of {format_size(slot)} (the largest layer); "
                f"use --memory-budget {_round_up_mb(minimum)}MB or more, or a smaller quantization mode"
            )
        room = self.bytes - minimum
        resident: list[LayerCost] = []
        # most bytes saved per byte held first: layers whose records are large for their size
        for layer in sorted(layers, key=lambda c: (-c.stored_bytes / max(c.resident_bytes, 1), c.index)):
            if layer.resident_bytes <= room:
                resident.append(layer)
                room -= layer.resident_bytes
        resident_idx = tuple(sorted(c.index for c in resident))
        streamed = tuple(c.index for c in layers if c.index not in resident_idx)
        return BudgetPlan(
            budget_bytes=self.bytes,
            fixed_bytes=fixed_bytes,
            slot_bytes=slot,
            num_slots=num_slots,
            resident_layers=resident_idx,
            streamed_layers=streamed,
            resident_bytes=sum(c.resident_bytes for c in resident),
            bytes_read_per_pass=sum(c.stored_bytes for c in layers if c.index in streamed),
            details=dict(fixed),
        )


def _round_up_mb(n: int) -> int:
    return -(-n // 1_000_000)
