"""The copy schedule of streamed layers on a device: the copy of the next layer overlaps the
compute of this one, ordered by events, never by a global synchronisation.

Layers run in a fixed order and take device slots round robin. Before layer ``i`` computes,
the compute stream waits for the event of ``i``'s copy, and the copy of the layer after it is
issued on the side stream into the other slot, once the side stream has waited for the
compute event of the slot's previous user. After ``i`` computes, its compute event is
recorded. The host side (filling a pinned staging buffer) waits only on the event of the
copy that last read that buffer.

The schedule talks to a :class:`CopyEngine`; the CUDA one is
:class:`runtime.cuda.CudaCopyEngine`. Tests drive it with an engine that records what was
asked, on any host.
"""

from __future__ import annotations

from typing import Any, Protocol


class CopyEngine(Protocol):
    """What the schedule needs from a device."""

    def copy(self, layer: int, slot: int, after: Any | None) -> Any:
        """On the side stream: wait for ``after`` (an event, or None), fill ``slot`` with
        ``layer``'s records, and return the event that marks the copy done."""

    def wait(self, event: Any) -> None:
        """Make the compute stream wait for ``event`` (the host does not wait)."""

    def record_compute(self) -> Any:
        """An event on the compute stream, after what has been queued so far."""


class LayerPipeline:
    """Double-buffered (or deeper) streaming of ``order`` through ``num_slots`` device slots."""

    def __init__(self, engine: CopyEngine, order: tuple[int, ...] | list[int], num_slots: int = 2) -> None:
        if num_slots < 2:
            raise ValueError(f"a pipeline needs at least 2 slots to overlap copy and compute, got {num_slots}")
        if not order:
            raise ValueError("nothing to stream")
        self.engine = engine
        self.order = list(order)
        self.num_slots = num_slots
        self._pos = {layer: k for k, layer in enumerate(self.order)}
        self._copied: dict[int, tuple[int, Any]] = {}  # layer -> (slot, copy event), issued and not yet used
        self._slot_done: dict[int, Any] = {}  # slot -> compute event of the last layer that used it
        self._next_slot = 0

    def _issue(self, layer: int) -> None:
        slot = self._next_slot
        self._next_slot = (slot + 1) % self.num_slots
        ev = self.engine.copy(layer, slot, self._slot_done.get(slot))
        self._copied[layer] = (slot, ev)

    def before(self, layer: int) -> int:
        """Call before ``layer`` computes; returns the slot its weights are in."""
        if layer not in self._copied:  # the first layer of the first pass (or after a reset)
            self._issue(layer)
        slot, ev = self._copied.pop(layer)
        self.engine.wait(ev)
        nxt = self.order[(self._pos[layer] + 1) % len(self.order)]
        if nxt != layer and nxt not in self._copied:
            self._issue(nxt)  # overlaps this layer's compute
        return slot

    def after(self, layer: int, slot: int) -> None:
        """Call after ``layer``'s compute has been queued."""
        self._slot_done[slot] = self.engine.record_compute()

    def reset(self) -> None:
        """Forget copies in flight (after a pass that did not finish); the engine must have
        finished them (its events are waited on by whoever reuses the slots)."""
        self._copied.clear()
