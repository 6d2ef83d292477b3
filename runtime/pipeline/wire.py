"""Messages between neighbouring ranks: a small header (a dict, pickled: the ranks of one
world trust each other) and tensors, each sent as raw bytes so every dtype crosses gloo.

A message is three or more point-to-point sends on the ring group: the sizes, the header,
then each tensor. Sends are ``isend`` (a stage hands one micro-batch on and computes the
next while it travels); :meth:`Link.flush` waits for them. Every receive waits at most the
ring group's timeout; a peer that died fails it at once.
"""

from __future__ import annotations

import pickle
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist


@dataclass
class WireStats:
    """Bytes and seconds spent on messages (sending: until handed to the transport; receiving:
    waiting included)."""

    messages_sent: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0
    send_s: float = 0.0
    recv_s: float = 0.0
    pending: list = field(default_factory=list, repr=False)

    def to_dict(self) -> dict:
        return {"messages_sent": self.messages_sent, "bytes_sent": self.bytes_sent, "bytes_received": self.bytes_received,
                "send_s": round(self.send_s, 6), "recv_s": round(self.recv_s, 6)}


MAX_HEADER_BYTES = 1 << 24


class WireError(RuntimeError):
    """A message that does not parse: the ranks are out of step."""


def _as_bytes(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


class Link:
    """Sending to and receiving from other ranks over ``group``."""

    def __init__(self, group) -> None:
        self.group = group
        self.stats = WireStats()

    def send(self, dst: int, header: dict, tensors: list[torch.Tensor] = ()) -> None:
        t0 = time.perf_counter()
        header = dict(header, tensors=[(str(t.dtype).removeprefix("torch."), tuple(t.shape)) for t in tensors])
        head = torch.frombuffer(bytearray(pickle.dumps(header)), dtype=torch.uint8)
        parts = [torch.tensor([head.numel()], dtype=torch.int64), head, *(_as_bytes(t) for t in tensors)]
        for p in parts:
            if not p.numel():  # an empty tensor travels in the header alone (the receiver posts no receive for it)
                continue
            self.stats.pending.append((dist.isend(p, dst, group=self.group), p))
            self.stats.bytes_sent += p.numel() * p.element_size()
        self.stats.messages_sent += 1
        self.stats.send_s += time.perf_counter() - t0

    def flush(self) -> None:
        """Wait until every message sent so far has left (its buffers may then be reused)."""
        t0 = time.perf_counter()
        pending, self.stats.pending = self.stats.pending, []
        for work, _ in pending:
            work.wait()
        self.stats.send_s += time.perf_counter() - t0

    def recv(self, src: int) -> tuple[dict, list[torch.Tensor]]:
        t0 = time.perf_counter()
        size = torch.full((1,), -1, dtype=torch.int64)
        dist.recv(size, src, group=self.group)
        if not 0 < int(size) <= MAX_HEADER_BYTES:
            raise WireError(f"rank {src} sent a message header of {int(size)} bytes: the ranks' messages are out of step "
                            "(ranks of different sli versions?)")
        head = torch.empty(int(size), dtype=torch.uint8)
        dist.recv(head, src, group=self.group)
        header = pickle.loads(head.numpy().tobytes())
        tensors = []
        for dtype, shape in header.pop("tensors"):
            dt = getattr(torch, dtype)
            buf = torch.empty(torch.Size(shape).numel() * torch.empty(0, dtype=dt).element_size(), dtype=torch.uint8)
            if buf.numel():
                dist.recv(buf, src, group=self.group)
            tensors.append(buf.view(dt).view(shape))
        self.stats.bytes_received += 8 + head.numel() + sum(t.numel() * t.element_size() for t in tensors)
        self.stats.recv_s += time.perf_counter() - t0
        return header, tensors
