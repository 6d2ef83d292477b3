"""`MemoryBudget`: split a user's memory budget into fixed costs, streaming slots and a
resident set.

Costs are the bytes the runtime holds in compute form (weights decoded to the compute
dtype, KV and activations in it too). The planner first checks whether everything fits;
then nothing is streamed and nothing is read per token. Otherwise it keeps the fixed costs
(KV for the reserved context, activations of one prefill chunk, small tensors, chunk
buffers for the vocabulary-sized matrices), reserves at least two layer slots (one layer
computing while the next is decoded), and fills what is left with kept units — decoder
layers and the output head — taking first those that save the most bytes read per token
for each byte they hold.

Two kinds of memory. The budget bounds what the process holds (anonymous memory: KV,
activations, slots, weights decoded into memory). Weights that are used in place from the
cache's memory map (packed int4 weights from the derived copy, raw records already in the
compute dtype) live in the page cache instead: a kept unit of that kind is *mapped*, held
in the page cache by use, and counts against the room the host leaves there
(:class:`PageCacheRoom`: a memory cgroup's limit less what it holds, else available RAM),
not against the budget. With no room given, mapped bytes count against the budget too.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from cache.manifest import layer_index
from runtime.hostmem import auto_budget
from runtime.memory import format_size, parse_size

AUTO = "auto"

MIN_SLOTS = 2


class BudgetTooSmallError(ValueError):
    """The budget cannot hold the fixed costs plus streaming slots for one layer."""


@dataclass(frozen=True)
class Unit:
    """Something that is either kept or streamed: a decoder layer (``layer.<i>``, streamed
    through a slot) or the head (``head``, streamed in row chunks). Bytes held when kept (in
    compute form), of which ``mapped_bytes`` are used in place from the cache's map, and bytes
    read from the cache each time it is streamed."""

    name: str
    resident_bytes: int
    stored_bytes: int
    uses_slot: bool = True
    mapped_bytes: int = 0


@dataclass(frozen=True)
class PageCacheRoom:
    """What the page cache can hold for mapped weights. ``total``: memory this process may
    still use in all (anonymous plus page cache); mapped bytes fit where planned anonymous
    bytes plus mapped bytes stay within it. ``source`` says how it was found."""

    total: int
    source: str = ""
    shared: bool = True  # False: ``total`` is the room for mapped bytes alone (an explicit page-cache size)

    def for_mapped(self, anon_planned: int) -> int:
        return self.total - anon_planned if self.shared else self.total


@dataclass(frozen=True)
class BudgetPlan:
    """The planner's answer. Invariant: ``planned_bytes <= budget_bytes``."""

    budget_bytes: int
    fixed: dict[str, int]
    slot_bytes: int
    num_slots: int
    resident: tuple[str, ...]  # kept units (mapped or held in memory)
    streamed: tuple[str, ...]
    resident_bytes: int  # anonymous bytes of the kept units
    bytes_read_per_pass: int  # cache bytes read for one forward pass
    context_tokens: int = 0
    details: dict[str, int] = field(default_factory=dict)
    source: str = ""  # how an automatic budget was found ("" for an explicit one)
    mapped: tuple[str, ...] = ()  # of the kept units, those used in place from the map (page cache)
    mapped_bytes: int = 0
    page_cache: str = ""  # the room the mapped units were planned into ("" when they count against the budget)
    inflight_bytes: int = 0  # page cache for streamed records in flight (read ahead, computing)

    @property
    def fixed_bytes(self) -> int:
        return sum(self.fixed.values())

    @property
    def streaming(self) -> bool:
        return bool(self.streamed)

    @property
    def planned_bytes(self) -> int:
        slots = self.num_slots * self.slot_bytes if any(layer_index(n) is not None for n in self.streamed) else 0
        return self.fixed_bytes + slots + self.resident_bytes

    def layer_indices(self, which: tuple[str, ...]) -> tuple[int, ...]:
        return tuple(layer_index(n) for n in which if layer_index(n) is not None)

    @property
    def resident_layers(self) -> tuple[int, ...]:
        return self.layer_indices(self.resident)

    @property
    def streamed_layers(self) -> tuple[int, ...]:
        return self.layer_indices(self.streamed)

    def describe(self) -> str:
        fixed = ", ".join(f"{k} {format_size(v)}" for k, v in self.fixed.items())
        found = f" [{self.source}]" if self.source else ""
        held = len(self.resident) - len(self.mapped)
        mapped = (
            f"{len(self.mapped)} kept mapped in the page cache ({format_size(self.mapped_bytes)}"
            + (f"; room: {self.page_cache}" if self.page_cache else ", counted in the budget") + "); "
        )
        return (
            f"budget {format_size(self.budget_bytes)}{found}: fixed {format_size(self.fixed_bytes)} ({fixed}); "
            f"{mapped}{held} held in memory ({format_size(self.resident_bytes)}); "
            f"{len(self.streamed)} streamed ({len(self.streamed_layers)} layers through {self.num_slots} slots of "
            f"{format_size(self.slot_bytes)}"
            + (f", {format_size(self.inflight_bytes)} of records in flight" if self.inflight_bytes else "")
            + f"); context {self.context_tokens} tokens; {format_size(self.bytes_read_per_pass)} read per forward pass"
        )


class MemoryBudget:
    """A memory budget in bytes, parsed from ``"512MB"``, ``"2GiB"`` or an int, or ``"auto"``:
    what the host lets this process use (see :mod:`runtime.hostmem`).

    Raises:
        ValueError: not a size, or ``"auto"`` found nothing left.
    """

    def __init__(self, budget: str | int) -> None:
        self.source = ""
        if isinstance(budget, str) and budget.strip().lower() == AUTO:
            found = auto_budget()
            self.bytes, self.source = found.budget_bytes, found.describe()
        else:
            self.bytes = parse_size(budget)

    def plan(
        self,
        units: list[Unit],
        *,
        fixed: dict[str, int],
        streaming_fixed: dict[str, int] | None = None,
        resident_extra: dict[str, int] | None = None,
        num_slots: int = MIN_SLOTS,
        context_tokens: int = 0,
        page_cache: PageCacheRoom | None = None,
    ) -> BudgetPlan:
        """Choose kept and streamed units.

        Args:
            units: every layer and the head, with their costs.
            fixed: costs always held (KV, activations, small tensors).
            streaming_fixed: costs held only when something is streamed (chunk buffers,
                decode scratch); kept weights need none of it.
            resident_extra: costs held only when everything is kept.
            num_slots: layer slots when any layer is streamed (at least 2).
            context_tokens: the KV reservation the fixed costs were computed for (reported).
            page_cache: the room for mapped weights; None: their bytes count against the budget.

        Raises:
            BudgetTooSmallError: naming the minimum budget and how to get under it.
        """
        if num_slots < MIN_SLOTS:
            raise ValueError(f"num_slots must be at least {MIN_SLOTS} (double buffering), got {num_slots}")
        mapping = page_cache is not None

        def anon(u: Unit) -> int:  # what keeping u costs the budget
            return u.resident_bytes - (u.mapped_bytes if mapping else 0)

        def mapped(u: Unit) -> int:  # what keeping u costs the page cache
            return u.mapped_bytes if mapping else 0

        def map_room(anon_planned: int) -> int:
            return page_cache.for_mapped(anon_planned) if mapping else 0

        room_text = page_cache.source if mapping else ""
        extra = {k: v for k, v in (resident_extra or {}).items() if v}
        all_fixed = {**fixed, **extra}
        all_anon = sum(all_fixed.values()) + sum(anon(u) for u in units)
        all_mapped = sum(mapped(u) for u in units)
        if all_anon <= self.bytes and all_mapped <= max(map_room(all_anon), 0):
            names = tuple(u.name for u in units)
            return BudgetPlan(
                self.bytes, all_fixed, 0, 0, names, (), all_anon - sum(all_fixed.values()), 0, context_tokens,
                source=self.source, mapped=tuple(u.name for u in units if mapped(u)), mapped_bytes=all_mapped, page_cache=room_text,
            )
        fixed = {**fixed, **(streaming_fixed or {})}
        # a slot holds a streamed layer's anonymous part; its mapped part is read in place
        slot = max((anon(u) for u in units if u.uses_slot), default=0)
        minimum = sum(fixed.values()) + num_slots * slot
        if minimum > self.bytes:
            parts = ", ".join(f"{k} {format_size(v)}" for k, v in fixed.items())
            found = f" ({self.source})" if self.source else ""
            raise BudgetTooSmallError(
                f"budget {format_size(self.bytes)}{found} is below the {format_size(minimum)} needed for the fixed costs ({parts}) "
                f"plus {num_slots} streaming slots of {format_size(slot)} (the largest layer); "
                f"use --memory-budget {_round_up_mb(minimum)}MB or more, a shorter context, or a smaller quantization mode"
            )
        def inflight(kept_names: set[str]) -> int:
            # records of the units that still stream pass through the page cache: the one
            # computing, the next read ahead, slack (a kept unit is never in flight)
            return 3 * max((u.stored_bytes for u in units if u.name not in kept_names), default=0) if mapping else 0

        room = self.bytes - minimum
        anon_planned, mapped_planned = minimum, 0
        kept: list[Unit] = []
        names: set[str] = set()
        # most bytes saved per token for each byte held first; among mapped units (one byte of
        # page cache per byte read) the largest first, which also shrinks what is in flight
        for u in sorted(units, key=lambda u: (-u.stored_bytes / max(u.resident_bytes, 1), -u.stored_bytes, u.name)):
            a, m = anon(u), mapped(u)
            if a <= room and (not m or mapped_planned + m + inflight(names | {u.name}) <= map_room(anon_planned + a)):
                kept.append(u)
                names.add(u.name)
                room -= a
                anon_planned += a
                mapped_planned += m
        return BudgetPlan(
            budget_bytes=self.bytes,
            fixed=fixed,
            slot_bytes=slot,
            num_slots=num_slots,
            resident=tuple(u.name for u in units if u.name in names),
            streamed=tuple(u.name for u in units if u.name not in names),
            resident_bytes=sum(anon(u) for u in kept),
            bytes_read_per_pass=sum(u.stored_bytes for u in units if u.name not in names),
            context_tokens=context_tokens,
            source=self.source,
            mapped=tuple(u.name for u in units if u.name in names and mapped(u)),
            mapped_bytes=mapped_planned,
            page_cache=room_text,
            inflight_bytes=inflight(names),
        )


def kv_bytes_per_token(config, element_size: int) -> int:
    """KV cache bytes one token takes across all layers (keys and values)."""
    heads = getattr(config, "num_attention_heads")
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return 2 * config.num_hidden_layers * kv_heads * head_dim * element_size


def activation_bytes(config, *, chunk_tokens: int, context_tokens: int, element_size: int) -> int:
    """Peak activations of a forward pass over ``chunk_tokens`` new tokens attending to
    ``context_tokens``: residual stream and its normed copy, q/k/v/o, the MLP's three
    intermediate tensors, attention scores and probabilities, one row of logits; with a
    factor of 2 for the temporaries torch's kernels make."""
    h = config.hidden_size
    inter = getattr(config, "intermediate_size", 4 * h)
    heads = config.num_attention_heads
    per_token = 8 * h + 4 * inter
    scores = 2 * heads * chunk_tokens * context_tokens
    logits = 2 * config.vocab_size
    return 2 * (chunk_tokens * per_token + scores + logits) * element_size


def _round_up_mb(n: int) -> int:
    return -(-n // 1_000_000)
