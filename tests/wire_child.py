"""Two ranks exchanging messages through :class:`runtime.pipeline.wire.Link` (tests/test_pipeline.py)."""

import datetime
import os
import sys

import torch
import torch.distributed as dist


def main() -> int:
    from runtime.pipeline.wire import Link

    rank = int(os.environ["RANK"])
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=datetime.timedelta(seconds=30))
    link = Link(dist.group.WORLD)
    messages = [
        ({"n": 0}, [torch.arange(6, dtype=torch.bfloat16).view(2, 3), torch.empty(0, dtype=torch.long)]),
        ({"n": 1}, [torch.empty(0, 4), torch.tensor([7, 8, 9])]),
        ({"n": 2}, []),
        ({"n": 3}, [torch.full((3,), 0.5, dtype=torch.float16)]),
    ]
    if rank == 0:
        for header, tensors in messages:  # all in flight at once, as a stage hands micro-batches on
            link.send(1, header, tensors)
        link.flush()
    else:
        for header, tensors in messages:
            got_header, got = link.recv(0)
            assert got_header == header, (got_header, header)
            assert len(got) == len(tensors) and all(
                g.dtype == t.dtype and g.shape == t.shape and torch.equal(g, t) for g, t in zip(got, tensors)), (got, tensors)
        print("ok")
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
