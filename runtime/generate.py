"""Generation over a `StreamingModel`: a `stream` generator yielding typed steps (plain
decoding, or speculative decoding when asked: :mod:`runtime.speculative`), and `generate` as a
thin wrapper over it. The named phases `prefill` and `decode_step`, the sampling config and the
request checks live in :mod:`runtime.phases` (shared with speculative decoding) and are
re-exported here.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import torch

from runtime.executor import StreamingModel
from runtime.memory import PeakMemorySampler
from runtime.phases import (  # noqa: F401 (re-exported: the names callers import from here)
    Chooser,
    ContextLengthError,
    GenerationOutput,
    GenerationResult,
    GenerationStats,
    InvalidRequestError,
    SamplingConfig,
    Step,
    _positions,
    check_context,
    check_stop,
    context_limit,
    decode_step,
    prefill,
)
from runtime.speculative import stream_speculative


StopFn = Callable[[int, list[int]], bool]


def stream(
    model: StreamingModel,
    input_ids: torch.Tensor,
    cfg: SamplingConfig,
    out: GenerationOutput,
    *,
    attention_mask: torch.Tensor | None = None,
    should_stop: StopFn | None = None,
    prefix_cache=None,
    speculative=None,
    draft: StreamingModel | None = None,
) -> Iterator[Step]:
    """Yield new tokens step by step for a batch ``[batch, seq]`` (left-padded with
    ``attention_mask``); fills ``out`` (tokens and stats) as it goes. A sequence finishes at a
    stop token or when ``should_stop(row, its new tokens)`` says so; the loop ends when all have.
    With ``prefix_cache`` (a :class:`runtime.kv.PrefixCachingSession`, one sequence only) the
    KV lives in the paged pool: the longest cached prefix is reused and only the rest is
    prefilled; afterwards the request's blocks are filed. ``speculative`` (``"lookup"``,
    ``"draft"`` with ``draft=`` a small model of the same tokenizer, or a
    :class:`runtime.speculative.SpeculativeConfig`; one sequence) verifies drafted tokens
    several per pass (:mod:`runtime.speculative`); the tokens are those of plain decoding.

    Raises:
        ValueError: empty prompt, or longer than the context or the budget's KV reservation.
    """
    if speculative is not None:
        yield from stream_speculative(model, input_ids, cfg, out, speculative=speculative, draft=draft,
                                      attention_mask=attention_mask, should_stop=should_stop, prefix_cache=prefix_cache)
        return
    if input_ids.ndim == 1:
        input_ids = input_ids[None]
    batch, n = input_ids.shape
    check_context(model, batch, n, cfg.max_new_tokens)
    if prefix_cache is not None and (batch != 1 or attention_mask is not None):
        raise ValueError("the prefix cache serves one sequence at a time; batched prompts use the plain KV cache")
    choose = Chooser(cfg)
    stats = out.stats
    stats.prompt_tokens = int(attention_mask.sum()) if attention_mask is not None else batch * n
    out.batch_token_ids = [[] for _ in range(batch)]
    out.token_ids = out.batch_token_ids[0]
    reasons = [""] * batch
    seen = input_ids
    mem = PeakMemorySampler(interval=None).__enter__()  # sampled at token boundaries: no polling thread
    t0 = t1 = time.perf_counter()
    prefill_bytes = 0
    steps = 0
    cache = None
    prompt = input_ids[0].tolist()
    try:
        model.reset_stats()
        if cfg.max_new_tokens == 0:
            reasons = ["length"] * batch
            return
        cached = 0
        if prefix_cache is not None:
            cache, cached, stats.disk_cached_tokens = prefix_cache.start(prompt)
        stats.cached_tokens, stats.prefill_tokens = cached, stats.prompt_tokens - cached
        logits, cache = prefill(model, input_ids[:, cached:], attention_mask, cache=cache)
        mem.sample()
        tok = choose(seen, logits)
        t1 = time.perf_counter()
        stats.time_to_first_token_s = t1 - t0
        stats.prefill_tokens_per_s = stats.prompt_tokens / (t1 - t0)
        prefill_bytes = model.stats.bytes_read
        for i in range(cfg.max_new_tokens):
            ids = tok.tolist()
            for b, tid in enumerate(ids):
                if reasons[b]:
                    continue
                out.batch_token_ids[b].append(tid)
                stats.new_tokens += 1
                if tid in cfg.stop_token_ids or (should_stop is not None and should_stop(b, out.batch_token_ids[b])):
                    reasons[b] = "stop"
                elif i + 1 == cfg.max_new_tokens:
                    reasons[b] = "length"
            yield Step(tuple(ids), i)
            if all(reasons):
                break
            seen = torch.cat([seen, tok[:, None]], dim=1)
            if attention_mask is not None:
                attention_mask = torch.cat([attention_mask, attention_mask.new_ones(batch, 1)], dim=1)
            logits, cache = decode_step(model, tok[:, None], cache, attention_mask)
            mem.sample()
            steps += 1
            tok = choose(seen, logits)
    finally:
        t2 = time.perf_counter()
        if prefix_cache is not None and cache is not None:
            # the KV held covers the prompt and every new token but the last (never fed back)
            prefix_cache.finish(cache, prompt + out.batch_token_ids[0][:-1])
        mem.__exit__(None, None, None)
        reasons = [r or "interrupted" for r in reasons]
        stats.stop_reasons = reasons
        stats.stop_reason = reasons[0]
        decoded = stats.new_tokens - batch
        stats.decode_tokens_per_s = decoded / (t2 - t1) if decoded > 0 and steps else 0.0
        stats.bytes_read_per_token = (model.stats.bytes_read - prefill_bytes) / steps if steps else 0.0
        stats.prefetch_hit_rate = model.stats.prefetch_hit_rate
        stats.hidden_io_fraction = model.stats.hidden_io_fraction
        stats.peak_rss_bytes = mem.peak_bytes
        stats.decode_passes = steps
        stats.tokens_per_pass = decoded / batch / steps if steps else 0.0


def generate(model: StreamingModel, input_ids: torch.Tensor, cfg: SamplingConfig, **kwargs) -> GenerationOutput:
    """Blocking wrapper over :func:`stream` (same keyword arguments)."""
    out = GenerationOutput()
    for _ in stream(model, input_ids, cfg, out, **kwargs):
        pass
    return out
