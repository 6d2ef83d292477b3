"""Pipeline stages across processes and hosts over ``torch.distributed``.

A model no host can hold is split into contiguous slices of decoder layers, one per rank;
each rank plans and holds (or streams) only its slice inside its own memory budget, and only
the hidden states of the tokens in flight cross the network. The phases:

- :mod:`runtime.pipeline.world`: joining the world ``torchrun`` started (gloo on CPUs), the
  split of the layers, the check that every rank opened the same cache, liveness;
- :mod:`runtime.pipeline.wire`: messages between neighbouring ranks (a header and tensors,
  sent with ``isend``);
- :mod:`runtime.pipeline.mirror`: a stage's view of the KV cache rank 0 addresses (the same
  blocks of its own pool, or its own dynamic cache for each of rank 0's);
- :mod:`runtime.pipeline.driver`: :class:`PipelineModel` on rank 0 (a ``StreamingModel``
  to the engine, generation and the server: its forward runs every stage) and
  :class:`StageWorker` on every other rank.

Imports ``runtime`` and ``cache``; never ``sli``.
"""

from runtime.pipeline.world import (
    PipelineConfig,
    PipelineError,
    Split,
    StageLostError,
    World,
    WorldMismatchError,
    in_world,
    split_layers,
)

__all__ = [
    "PipelineConfig",
    "PipelineError",
    "Split",
    "StageLostError",
    "World",
    "WorldMismatchError",
    "in_world",
    "split_layers",
]
