"""One rank of a pipeline, run by tests/test_pipeline.py (``RANK``, ``WORLD_SIZE``,
``MASTER_ADDR`` and ``MASTER_PORT`` set as torchrun would).

Usage: python tests/pipeline_child.py '<json spec>'. Every rank opens its stage of
``cache``; the others serve their stage; rank 0 runs the spec's checks against one process
holding the whole model in memory, and writes the JSON result to ``out``.
"""

from __future__ import annotations

import json
import logging
import sys

import torch


def _engine_tokens(model, prompts: list[list[int]], new: int, **config) -> tuple[dict, int]:
    from runtime.engine import EngineConfig, EngineCore, EngineRequest
    from runtime.generate import SamplingConfig
    from runtime.kv import prefix_session_for
    from runtime.tokenizer import load_tokenizer

    core = EngineCore(model, load_tokenizer(model.store, model.manifest), prefix_session_for(model), EngineConfig(**config))
    outs: dict[str, list[int]] = {}
    for i, p in enumerate(prompts):
        outs[str(i)] = []
        core.add(EngineRequest(tuple(p), SamplingConfig(max_new_tokens=new), request_id=str(i)),
                 lambda o: outs[o.request_id].extend(o.token_ids))
    while core.step():
        pass
    return outs, core.stats.max_batch


def main() -> int:
    spec = json.loads(sys.argv[1])
    logging.basicConfig(level=logging.WARNING)
    from cache import LayerStore
    from runtime.executor import StreamingModel
    from runtime.generate import SamplingConfig, generate
    from runtime.kv import prefix_session_for
    from runtime.pipeline import PipelineConfig
    from runtime.pipeline.driver import StageWorker, open_stage

    dtype = getattr(torch, spec["dtype"])
    cfg = PipelineConfig(timeout_s=spec.get("timeout_s", 30), heartbeat_s=spec.get("heartbeat_s", 1),
                         micro_batches=spec.get("micro_batches", 0), split=spec.get("split", "equal"))
    store = LayerStore(spec["cache"], readonly=True)
    model = open_stage(store, spec["variant"], cfg, memory_budget=spec.get("budget", 1 << 40), dtype=dtype,
                       context_tokens=spec.get("context_tokens", 256))
    if isinstance(model, StageWorker):
        return model.run()
    whole = StreamingModel(store, spec["variant"], memory_budget=1 << 40, dtype=dtype, context_tokens=spec.get("context_tokens", 256))
    g = torch.Generator().manual_seed(spec.get("seed", 0))
    out: dict = {"stages": [s.to_dict() for s in model.stages], "micro_batches": model.micro_batches}
    ids = torch.randint(4, 300, (1, 21), generator=g)
    new = SamplingConfig(max_new_tokens=spec.get("new_tokens", 10))
    out["logits_max_abs_diff"] = float((model.logits(ids) - whole.logits(ids)).abs().max())
    out["dynamic"] = [generate(model, ids, new).token_ids, generate(whole, ids, new).token_ids]
    # a left-padded batch of two prompts (mask and positions cross the wire)
    batch = torch.randint(4, 300, (2, 9), generator=g)
    mask = torch.ones_like(batch)
    batch[1, :3], mask[1, :3] = 0, 0
    out["padded_batch"] = [generate(model, batch, new, attention_mask=mask).batch_token_ids,
                           generate(whole, batch, new, attention_mask=mask).batch_token_ids]
    # the paged pool with prefix reuse: the second run of each reuses the first's blocks
    sp, sw = prefix_session_for(model), prefix_session_for(whole)
    long = torch.randint(4, 300, (1, 40), generator=g)
    paged = []
    for _ in range(2):
        a, b = generate(model, long, new, prefix_cache=sp), generate(whole, long, new, prefix_cache=sw)
        paged.append([a.token_ids, b.token_ids, a.stats.cached_tokens, b.stats.cached_tokens])
    out["paged"] = paged
    prompts = [torch.randint(4, 300, (n,), generator=g).tolist() for n in (5, 17, 9, 30, 3, 12)]
    (got, batch_p), (want, batch_w) = _engine_tokens(model, prompts, spec.get("new_tokens", 10)), _engine_tokens(whole, prompts, spec.get("new_tokens", 10))
    out["engine"] = [got, want, batch_p, batch_w]
    # prompts prefilled 8 tokens a step: some micro-batches hold only sequences mid-prompt (no logits kept)
    chunked = dict(step_tokens=8, itl_factor=None)
    prompts = [torch.randint(4, 300, (n,), generator=g).tolist() for n in (3, 29, 4, 33, 2)]
    (got, batch_p), (want, batch_w) = _engine_tokens(model, prompts, 6, **chunked), _engine_tokens(whole, prompts, 6, **chunked)
    out["engine_chunked"] = [got, want, batch_p, batch_w]
    out["wire"] = model.remote_stats()
    model.close()
    with open(spec["out"], "w") as f:
        json.dump(out, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
